import numpy as np
import pytest

from jaxtl.images import RaggedFeatures, caffe, decode, preprocess, row_index, to_images


def reference_image(feat: np.ndarray, size: int) -> np.ndarray:
    """The recipe for one clip, written plainly: pad/truncate, repeat rows, replicate, min-max."""
    f, t = feat.shape
    m = np.zeros((f, size), np.float32)
    m[:, :min(t, size)] = feat[:, :size]
    img = np.zeros((size, size), np.float32)
    for r in range(size):
        img[r] = m[int(np.floor(r * f / size))]
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return np.stack([img] * 3, axis=-1)


def reference_stretch(feat: np.ndarray, size: int) -> np.ndarray:
    t = feat.shape[1]
    centres = (np.arange(size) + 0.5) * t / size - 0.5
    return np.stack([np.interp(centres, np.arange(t), row) for row in feat])


@pytest.mark.parametrize("size", [32, 48])
def test_vectorized_stage_equals_per_clip_reference(size):
    rng = np.random.default_rng(0)
    feats = [rng.normal(0, 50, (13, t)).astype(np.float32) for t in (1, 5, 31, 32, 33, 100, 7, 64)]
    ragged = RaggedFeatures.from_list(feats)
    batch, lengths = ragged.padded(np.arange(len(feats)), size)
    out = to_images(batch, lengths, size)
    assert out.shape == (len(feats), size, size, 3)
    for img, feat in zip(out, feats):
        np.testing.assert_allclose(img, reference_image(feat, size), rtol=1e-5, atol=1e-6)


def test_stretch_fills_the_width_with_each_clips_own_frames():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(13, t)).astype(np.float32) for t in (3, 10, 40)]
    ragged = RaggedFeatures.from_list(feats)
    batch, lengths = ragged.padded(np.arange(3))
    out = to_images(batch, lengths, 32, fit="stretch")
    for img, feat in zip(out, feats):
        s = reference_stretch(feat, 32)
        img_ref = s[row_index(13, 32)]
        img_ref = (img_ref - img_ref.min()) / (img_ref.max() - img_ref.min())
        np.testing.assert_allclose(img[..., 0], img_ref, rtol=1e-5, atol=1e-5)


def test_row_index_mapping():
    idx = row_index(13, 224)
    assert idx[0] == 0 and idx[-1] == 12 and np.all(np.diff(idx) >= 0)
    assert set(np.bincount(idx)) == {17, 18}


def test_constant_feature_gives_zeros_not_nan():
    ragged = RaggedFeatures.from_list([np.full((13, 10), -3.0, np.float32)])
    batch, lengths = ragged.padded(np.arange(1), 10)
    out = to_images(batch, lengths, 32, fit="stretch")
    assert np.all(out == 0) and np.isfinite(out).all()


def test_three_channel_features_map_to_rgb():
    rng = np.random.default_rng(2)
    feat = rng.normal(size=(3, 13, 20)).astype(np.float32)
    ragged = RaggedFeatures.from_list([feat])
    batch, lengths = ragged.padded(np.arange(1), 32)
    out = to_images(batch, lengths, 32)
    for c in range(3):
        np.testing.assert_allclose(out[0, ..., c], reference_image(feat[c], 32)[..., 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_compact_storage_dtypes(dtype):
    rng = np.random.default_rng(3)
    ragged = RaggedFeatures.from_list([rng.normal(size=(13, 20)).astype(np.float32)])
    batch, lengths = ragged.padded(np.arange(1), 32)
    full = to_images(batch, lengths, 32)
    small = to_images(batch, lengths, 32, dtype=dtype)
    assert small.dtype == np.dtype(dtype)
    np.testing.assert_allclose(decode(small), full, atol=1 / 255 if dtype == "uint8" else 1e-3)


def test_subset_and_clip_views():
    feats = [np.full((1, 2, t), t, np.float32) for t in (2, 3, 4)]
    ragged = RaggedFeatures.from_list(feats)
    assert len(ragged) == 3 and ragged.clip(1).shape == (1, 2, 3)
    sub = ragged.subset(np.array([2, 0]))
    batch, lengths = sub.padded(np.arange(2))
    assert list(lengths) == [4, 2] and batch[1, 0, 0, 2] == 0 and batch[0, 0, 0, 3] == 4


def test_caffe_matches_keras_preprocess_input():
    keras = pytest.importorskip("keras")
    x = np.random.default_rng(4).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(caffe(x), expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(preprocess(x / 255.0, "caffe"), expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(preprocess(x, "unit"), x)
    np.testing.assert_allclose(preprocess(x / 255.0, "tf"), keras.applications.mobilenet_v2.preprocess_input(x.copy()),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(preprocess(x / 255.0, "raw"), keras.applications.efficientnet.preprocess_input(x),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(preprocess(x / 255.0, "lite"), (x - 127.0) / 128.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown preprocess"):
        preprocess(x, "torch")


@pytest.mark.parametrize("band_norm", ["mean", "meanvar"])
def test_band_norm_equals_a_per_clip_reference(band_norm):
    """Each clip's rows normalised over its own stretched columns, one clip at a time, then the usual image."""
    rng = np.random.default_rng(5)
    feats = [(rng.normal(size=(13, t)) * rng.uniform(0.5, 20, (13, 1)) + np.arange(13)[:, None] * 10).astype(
        np.float32) for t in (9, 32, 70)]
    feats[0][4] = feats[1][4] = -80.0 / 3  # constant bands (a floored band, stretched): 0, never NaN or noise
    ragged = RaggedFeatures.from_list(feats)
    batch, lengths = ragged.padded(np.arange(3))
    out = to_images(batch, lengths, 32, fit="stretch", band_norm=band_norm)
    assert np.isfinite(out).all()
    for img, feat in zip(out, feats):
        s = reference_stretch(feat, 32)
        s = s - s.mean(axis=1, keepdims=True)
        if band_norm == "meanvar":
            std = s.std(axis=1, keepdims=True)
            s = np.divide(s, std, out=np.zeros_like(s), where=std > 1e-4)
        img_ref = s[row_index(13, 32)]
        img_ref = (img_ref - img_ref.min()) / (img_ref.max() - img_ref.min())
        np.testing.assert_allclose(img[..., 0], img_ref, rtol=1e-4, atol=1e-4)
