import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quiet
from jaxtl.backbones.vgg import VGG16
from jaxtl.model import Classifier
from jaxtl.split import SplitPoint
from jaxtl.steps import Augment, compile_time, create_train_state, init_params, train_step
from jaxtl.train import run

CONV_NAMES = VGG16.units


def _leaves_changed(a, b):
    return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b)


def _step(cfg, k: int, cached: bool, bn_train: bool = False):
    """(state, jitted step, batch) of a stage split at k, on 4 random 32x32 images or their prefix at k."""
    model = cfg.model(3)
    params, norm = init_params(model, 32, cfg.seed)
    split = SplitPoint(k, model.spec.units, cached)
    tx = cfg.stages()[0].optimizer.transform(split.labels(params))
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    if cached:
        x = model.apply({"params": params}, x, k, method=Classifier.prefix)
    batch = {"x": x, "y": jnp.array([0, 1, 2, 0]), "mask": jnp.ones(4)}
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.PRNGKey(1), model=model, split=split, augment=Augment(),
                                           preprocess=cfg.preprocess, tx=tx, bn_train=bn_train))
    return create_train_state(params, norm, tx), step, batch


@pytest.mark.parametrize("mode,k", [("frozen", 13), ("finetune", 10), ("finetune-1", 12), ("scratch", 0)])
def test_each_mode_trains_exactly_its_set(cfg, mode, k):
    cfg = dataclasses.replace(cfg, mode=mode.split("-")[0], finetune_convs=1 if mode.endswith("-1") else 3,
                              lr=1e-2, base_lr=1e-2, weights=None if mode == "scratch" else "random")
    assert cfg.stages()[0].split.k == k
    for cached in (False, True):
        state, step, batch = _step(cfg, k, cached)
        new, _ = step(state, batch)
        changed = _leaves_changed(state.params, new.params)
        for i, name in enumerate(CONV_NAMES):
            want = i >= k
            assert changed["base"][name]["kernel"] == want, (mode, name, cached)
            if not want:  # frozen: bit-identical, the very same values
                np.testing.assert_array_equal(new.params["base"][name]["kernel"], state.params["base"][name]["kernel"])
        assert all(jax.tree.leaves(changed["head"]))


def test_batchnorm_statistics_move_only_under_bn_train_and_only_in_the_units_that_train(cfg):
    """MobileNetV2 with its last two units trained: `--bn inference` keeps every moving statistic; `--bn train`
    moves those of the trained units alone; frozen units stay bit-identical, trained ones train either way."""
    cfg = dataclasses.replace(cfg, backbone="mobilenet_v2", mode="finetune", finetune_convs=2, taps="5", lr=1e-2,
                              base_lr=1e-2)
    units = cfg.model(3).spec.units
    k = cfg.stages()[0].split.k
    assert units[k:] == ("block_16", "Conv_1")
    for bn_train in (False, True):
        state, step, batch = _step(cfg, k, cached=False, bn_train=bn_train)
        changed = _leaves_changed(state.params, step(state, batch)[0].params)["base"]
        for i, unit in enumerate(units):
            leaves = jax.tree_util.tree_flatten_with_path(changed[unit])[0]
            for path, moved in leaves:
                if path[-1].key in ("moving_mean", "moving_variance"):
                    assert moved == (i >= k and bn_train), (bn_train, unit, path)
                else:
                    assert not moved or i >= k, (bn_train, unit, path)
            assert any(moved for _, moved in leaves) == (i >= k), (bn_train, unit)


def test_bfloat16_convolutions_run_in_bfloat16_and_saves_stay_float32(cfg):
    import orbax.checkpoint as ocp

    cfg = dataclasses.replace(cfg, dtype="bfloat16", mode="finetune", epochs=1)
    state, step, batch = _step(cfg, 10, cached=True)
    convs = [line for line in step.lower(state, batch).as_text().splitlines() if "stablehlo.convolution" in line]
    assert len(convs) >= 3 and all("xbf16>" in line.split("->")[-1] for line in convs), convs[:2]
    run(cfg, log=quiet)
    (step_dir,) = (Path(cfg.out) / "checkpoints" / "latest").iterdir()
    with ocp.StandardCheckpointer() as c:
        saved = c.restore((step_dir / "state").absolute())  # no template: the dtypes as written
    assert {leaf.dtype for leaf in jax.tree.leaves(saved["params"])} == {np.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(saved["opt_state"]) if np.ndim(leaf)} == {np.dtype("float32")}


def test_compile_time_counts_compilation_once():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.5)
    x = jnp.arange(7.0)
    with compile_time() as first:
        f(x).block_until_ready()
    with compile_time() as again:
        f(x).block_until_ready()
    assert first[0] > 0 and again[0] == 0.0


def test_augment_masks_and_shifts_per_clip():
    images = jnp.ones((4, 8, 16, 3))
    masked = Augment(time_mask=6, freq_mask=4)(images, jax.random.PRNGKey(0))
    assert masked.shape == images.shape and float(masked.min()) == 0.0 and float(masked.max()) == 1.0
    ramp = jnp.broadcast_to(jnp.arange(16.0)[None, None, :, None], (4, 8, 16, 3))
    shifted = Augment(time_shift=3)(ramp, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(jnp.sort(shifted, axis=2), ramp)  # a circular shift keeps every column
    assert not Augment() and Augment(noise_std=0.1)


def test_params_hold_the_convs_the_model_runs_from_a_full_weight_file():
    from jaxtl.model import VGG16Base

    full = VGG16Base().init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))
    params, _ = init_params(Classifier(3, hidden=0, pooling="avg", taps=(3, 4)), 32, 0, full)
    assert list(params["base"]) == list(CONV_NAMES[:10])
    np.testing.assert_array_equal(params["base"]["block4_conv3"]["kernel"], full["params"]["block4_conv3"]["kernel"])


def test_mixup_mixes_the_steps_inputs_and_its_loss_is_the_soft_label_cross_entropy(cfg):
    from jaxtl.steps import forward, mixed_loss, mixup_plan

    lam, perm = mixup_plan(jax.random.PRNGKey(5), 4, 0.4)
    assert 0 < float(lam) < 1 and sorted(np.asarray(perm).tolist()) == [0, 1, 2, 3]
    model = cfg.model(3)
    params, norm = init_params(model, 32, cfg.seed)
    images = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
    prefix = model.apply({"params": params}, images, 13, method=Classifier.prefix)
    for split, x in ((SplitPoint(13, CONV_NAMES, True), prefix),
                     (SplitPoint(13, CONV_NAMES, False), images)):
        mixed = jax.tree.map(lambda a: lam * a + (1 - lam) * a[perm], x)  # by hand, before the model
        want = forward(params, norm, mixed, None, model=model, split=split, augment=Augment(), preprocess="unit",
                       train=False)[0]
        got = forward(params, norm, x, None, model=model, split=split, augment=Augment(), preprocess="unit",
                      train=False, mix=(lam, perm))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    logits = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    y, mask = jnp.array([0, 1, 2, 1]), jnp.array([1.0, 1.0, 1.0, 0.0])
    soft = lam * jax.nn.one_hot(y, 3) + (1 - lam) * jax.nn.one_hot(y[perm], 3)
    want = -(soft * jax.nn.log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(mixed_loss(logits, y, mask, (lam, perm))[0], (want * mask).sum() / 3, rtol=1e-5)
