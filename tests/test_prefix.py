import dataclasses

import numpy as np
import pytest

from conftest import losses, quiet
from jaxtl import prefix
from jaxtl.feed import StepFeed
from jaxtl.pipeline import prepare
from jaxtl.restore import restore_run
from jaxtl.sharding import make_mesh
from jaxtl.steps import init_params
from jaxtl.train import run

N_CONV = 13  # VGG16's units


def test_cached_prefix_and_in_step_prefix_agree(cfg, tmp_path):
    cfg = dataclasses.replace(cfg, mode="finetune", epochs=1, max_clips=20)  # 20 clips: the suite's time
    run(dataclasses.replace(cfg, out=str(tmp_path / "a")), log=quiet)
    run(dataclasses.replace(cfg, cache_prefix=False, out=str(tmp_path / "b")), log=quiet)
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-4)


def test_normalisation_statistics_come_from_the_training_split(cfg):
    prep = prepare(cfg.data_spec(), log=quiet)
    model = cfg.model(len(prep.classes))
    params, _ = init_params(model, 32, cfg.seed)
    mesh, images = make_mesh(), cfg.image_spec()
    acts, _, _ = prefix.compute_prefix(model, params, prep.features, np.arange(len(prep.y)), N_CONV, images, mesh)
    norm = prefix.head_input_statistics(model, params, StepFeed(prep.y, prep.own, prep.owner, images, acts),
                                        prep.train, N_CONV, True, images, 8, mesh)
    flat = acts["taps"]
    np.testing.assert_allclose(norm["head"]["mean"], flat[prep.train].mean(0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(norm["head"]["mean"], flat.mean(0))  # not fitted on val or test
    run(cfg, log=quiet)
    restored = restore_run(cfg.out)
    np.testing.assert_allclose(restored.variables["norm"]["head"]["mean"], flat[prep.train].mean(0), rtol=1e-5,
                               atol=1e-7)


def test_prefix_cache_computes_only_clips_it_has_not_seen(cfg, monkeypatch):
    calls = []
    real = prefix.compute_prefix

    def counting(*args, **kw):
        out = real(*args, **kw)
        calls.append(len(next(iter(out[0].values()))))
        return out

    monkeypatch.setattr(prefix, "compute_prefix", counting)
    small = dataclasses.replace(cfg, max_clips=20, epochs=1, out=cfg.out + "-small", cache_dir=cfg.out + "-cache")
    run(small, log=quiet)
    run(dataclasses.replace(small, max_clips=None, out=cfg.out + "-all"), log=quiet)
    run(dataclasses.replace(small, max_clips=None, out=cfg.out + "-again"), log=quiet)
    assert calls == [20, 40 - 20]  # the third run computed nothing


def test_a_non_finite_prefix_is_refused_before_it_is_cached(cfg, tmp_path, monkeypatch):
    """Never a NaN fed to training: a prefix pass that gives non-finite outputs stops the run in one line."""
    real = prefix._carried
    monkeypatch.setattr(prefix, "_carried", lambda out: {n: v * np.nan for n, v in real(out).items()})
    cfg = dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FloatingPointError, match="non-finite outputs for 40 of 40 clips"):
        run(cfg, log=quiet)
    assert not list((tmp_path / "cache").glob("prefix-*"))


def test_the_prefix_key_names_the_backbone_and_the_weights_of_the_units_it_runs():
    from jaxtl.backbones import get
    from jaxtl.images import ImageSpec
    from jaxtl.prefix import prefix_key

    units = get("efficientnet_lite0").units
    params = {"base": {u: {"kernel": np.full(3, i, np.float32)} for i, u in enumerate(units)}}
    key = lambda p, u=units, k=4: prefix_key(p, u, k, ImageSpec(), "f", "float32", "3,4", "avgmax")  # noqa: E731
    other_family = tuple(f"x{u}" for u in units)
    assert key(params) != key({"base": {f"x{u}": v for u, v in params["base"].items()}}, other_family)
    changed = {"base": {**params["base"], units[2]: {"kernel": np.zeros(3, np.float32)}}}
    assert key(changed) != key(params)  # a frozen unit's weights
    beyond = {"base": {**params["base"], units[9]: {"kernel": np.zeros(3, np.float32)}}}
    assert key(beyond) == key(params)  # a unit past the split point does not change the cached outputs
