import os

import h5py
import numpy as np
import pytest

from conftest import rel_l2
from jaxtl.backbones.vgg import VGG16
from jaxtl.model import VGG16Base
from jaxtl.weights import WeightsError, fetch, load_vgg16_weights, main, read_weight_file, resolve_weights, save_npz

CONV_NAMES = VGG16.units

keras = pytest.importorskip("keras")


def _keras_forward(model, x):
    return np.asarray(model(x, training=False))


def _write_legacy(model, path):
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def _write_imagenet_style(model, path, chunk_names=False, whole_model=False):
    """The layout of Keras' ImageNet file: `layer_names`, `weight_names`, `<layer>_W_1:0` datasets."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if whole_model else f
        names = [layer.name.encode() for layer in model.layers]
        if chunk_names:
            root.attrs["layer_names0"], root.attrs["layer_names1"] = names[:5], names[5:]
        else:
            root.attrs["layer_names"] = names
        for layer in model.layers:
            g = root.create_group(layer.name)
            ws = layer.get_weights()
            wnames = [f"{layer.name}_{t}_1:0".encode() for t in ("W", "b")][:len(ws)]
            g.attrs["weight_names"] = wnames
            for n, w in zip(wnames, ws):
                g[n.decode()] = w
    return path


WRITERS = {
    "keras3": lambda m, p: (m.save_weights(str(p)), p)[1],
    "legacy": _write_legacy,
    "imagenet-style": _write_imagenet_style,
    "imagenet-chunked-names": lambda m, p: _write_imagenet_style(m, p, chunk_names=True),
    "whole-model": lambda m, p: _write_imagenet_style(m, p, whole_model=True),
}


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 64, 96, 3)])
def test_parity_with_keras_on_files_keras_writes(keras_vgg, tmp_path, fmt, shape):
    suffix = ".weights.h5" if fmt == "keras3" else ".h5"
    path = WRITERS[fmt](keras_vgg, tmp_path / f"vgg{suffix}")
    variables = load_vgg16_weights(path)
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    ours = VGG16Base().apply(variables, x)
    assert rel_l2(ours, _keras_forward(keras_vgg, x)) < 1e-5


def test_full_model_with_fc_layers_is_converted_with_them_ignored(tmp_path):
    full = keras.applications.VGG16(weights=None, include_top=True, input_shape=(32, 32, 3), classes=7)
    wf = read_weight_file(_write_legacy(full, tmp_path / "full.h5"))
    from jaxtl.weights import to_variables

    variables = to_variables(wf)
    assert set(wf.ignored) == {"fc1", "fc2", "predictions"}
    base = keras.Model(full.input, full.get_layer("block5_pool").output)
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    assert rel_l2(VGG16Base().apply(variables, x), _keras_forward(base, x)) < 1e-5


def test_keras3_group_order_does_not_matter(keras_vgg, tmp_path):
    """Keras 3 names groups conv2d, conv2d_1, conv2d_10, ...: position would mismatch; names must not."""
    path = keras_vgg.save_weights(str(tmp_path / "v.weights.h5")) or tmp_path / "v.weights.h5"
    with h5py.File(path) as f:
        assert "layers/conv2d_10" in f and f["layers/conv2d_10/vars"].attrs["name"] == "block5_conv1"
    params = load_vgg16_weights(path)["params"]
    np.testing.assert_array_equal(params["block5_conv1"]["kernel"],
                                  keras_vgg.get_layer("block5_conv1").get_weights()[0])


def test_hed_file_loads_all_13_layers_and_matches_keras(hed_file, keras_vgg):
    wf = read_weight_file(hed_file)
    from jaxtl.weights import to_variables

    variables = to_variables(wf)
    assert list(variables["params"]) == list(CONV_NAMES)
    assert {wf.where[n] for n in wf.ignored} == {"dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"}
    clone = keras.models.clone_model(keras_vgg)
    for name in CONV_NAMES:  # by layer name, as the task says
        p = variables["params"][name]
        clone.get_layer(name).set_weights([np.asarray(p["kernel"]), np.asarray(p["bias"])])
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 48, 3)).astype(np.float32)
    assert rel_l2(VGG16Base().apply(variables, x), _keras_forward(clone, x)) < 1e-5


def test_inspect_cli_lists_layers(hed_file, capsys):
    assert main(["inspect", str(hed_file)]) == 0
    out = capsys.readouterr().out
    assert "keras3-weights-h5" in out and "ignored layers (6)" in out
    assert all(name in out for name in CONV_NAMES)


def test_convert_roundtrip_npz(keras_vgg, tmp_path, capsys):
    src = _write_legacy(keras_vgg, tmp_path / "v.h5")
    assert main(["convert", str(src), str(tmp_path / "v.npz")]) == 0
    a, b = load_vgg16_weights(src), load_vgg16_weights(tmp_path / "v.npz")
    for name in CONV_NAMES:
        np.testing.assert_array_equal(a["params"][name]["kernel"], b["params"][name]["kernel"])
        np.testing.assert_array_equal(a["params"][name]["bias"], b["params"][name]["bias"])


# --- bad files: one line naming the file and the layer ---------------------------------------------------


def _small_legacy(tmp_path, keras_vgg, mutate):
    path = _write_imagenet_style(keras_vgg, tmp_path / "bad.h5")
    with h5py.File(path, "a") as f:
        mutate(f)
    return path


def test_missing_layer_is_named(tmp_path, keras_vgg):
    def drop(f):
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = [n.encode() for n in names if n != "block3_conv2"]

    path = _small_legacy(tmp_path, keras_vgg, drop)
    with pytest.raises(WeightsError, match=r"bad\.h5: layer block3_conv2 is missing") as e:
        load_vgg16_weights(path)
    assert "\n" not in str(e.value)


def test_wrong_shape_is_named_with_shapes(tmp_path, keras_vgg):
    def reshape(f):
        g = f["block4_conv2"]
        del g["block4_conv2_W_1:0"]
        g["block4_conv2_W_1:0"] = np.zeros((3, 3, 512, 256), np.float32)

    path = _small_legacy(tmp_path, keras_vgg, reshape)
    with pytest.raises(WeightsError, match=r"block4_conv2 has kernel \(3, 3, 512, 256\).*\(3, 3, 512, 512\)"):
        load_vgg16_weights(path)


@pytest.mark.parametrize("content", [b"", b"this is not hdf5 at all"])
def test_non_hdf5_file(tmp_path, content):
    path = tmp_path / "weights.h5"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"weights\.h5: not a readable HDF5 file"):
        load_vgg16_weights(path)


def test_hdf5_without_keras_layers(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match=r"other\.h5: HDF5 file holds no Keras layer weights"):
        load_vgg16_weights(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="nothere.h5: no such weight file"):
        load_vgg16_weights(tmp_path / "nothere.h5")


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "x.h5").write_text("nope")
    assert main(["inspect", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "x.h5" in err and "\n" not in err


# --- resolution and fetching ---------------------------------------------------------------------------


def test_fetch_verifies_md5_and_writes_atomically(tmp_path, keras_vgg):
    import hashlib

    src = _write_imagenet_style(keras_vgg, tmp_path / "src.h5")
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = fetch(tmp_path / "w", url=src.as_uri(), md5=md5)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(WeightsError, match="does not match the published"):
        fetch(tmp_path / "w2", url=src.as_uri(), md5="0" * 32)
    assert not any((tmp_path / "w2").iterdir())  # no partial file left behind


def test_fetch_offline_says_where_to_put_the_file(tmp_path):
    with pytest.raises(WeightsError, match=r"place it at .*vgg16_weights_tf_dim_ordering_tf_kernels_notop\.h5"):
        fetch(tmp_path, url="http://127.0.0.1:9/none.h5", timeout=2)


def test_resolve_imagenet_search_order(tmp_path, keras_vgg, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("JAXTL_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("imagenet", tmp_path / "weights", allow_fetch=False)
    cache = tmp_path / "home" / ".keras" / "models"
    cache.mkdir(parents=True)
    _write_imagenet_style(keras_vgg, cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    variables, source = resolve_weights("imagenet", tmp_path / "weights", allow_fetch=False)
    assert ".keras/models" in source and set(variables["params"]) == set(CONV_NAMES)
    save_npz(variables, tmp_path / "env" / "mine.npz")
    monkeypatch.setenv("JAXTL_WEIGHTS", str(tmp_path / "env" / "mine.npz"))
    assert resolve_weights("imagenet", tmp_path / "weights", allow_fetch=False)[1].endswith("mine.npz)")
    assert resolve_weights("random") == (None, "random init")
    assert not os.path.exists(tmp_path / "weights" / "vgg16_imagenet.npz")
