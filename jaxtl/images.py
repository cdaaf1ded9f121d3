"""The feature -> image stage, vectorized over a whole batch, and VGG16 input preprocessing.

Features are kept ragged: every clip's (C, F, T_i) matrix concatenated along time, plus offsets and
lengths. A batch is gathered into (N, C, F, W) by one fancy index, then turned into (N, S, S, 3)
images without a Python loop per clip:

- time: `fit="pad"` (the seed) zero-pads or truncates to S frames; `fit="stretch"` resamples each
  clip's own frames linearly onto S columns, so the image holds signal instead of padding;
- rows: image row `r` shows feature row `floor(r * F / S)` (13 MFCC rows -> 224: rows 0..17 show
  coefficient 0, then 17 or 18 rows per coefficient), i.e. nearest-neighbour row repetition;
- channels: one feature channel is replicated to RGB, three (mfcc-delta) map to R, G, B;
- `band_norm` (optional): per-utterance normalisation against speaker and channel: each feature row's
  mean over the image's columns is subtracted first (`mean`, cepstral-mean style), and it is divided by
  the row's standard deviation (`meanvar`; a constant row becomes 0);
- scale: each image channel min-max scaled to [0, 1], padding included, as the seed does; a constant
  channel (pure silence) becomes 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
PREPROCESS_MODES = ("unit", "caffe", "tf", "raw", "lite")
FIT_MODES = ("pad", "stretch")
STORAGE_DTYPES = ("float32", "float16", "uint8")
BAND_NORMS = ("none", "mean", "meanvar")


@dataclass
class RaggedFeatures:
    """Variable-length per-clip features: clip i is `flat[:, :, offsets[i]:offsets[i] + lengths[i]]`."""

    flat: np.ndarray  # (C, F, total_T)
    offsets: np.ndarray  # (N,)
    lengths: np.ndarray  # (N,)

    @classmethod
    def from_list(cls, feats: list[np.ndarray]) -> RaggedFeatures:
        """From (C, F, T_i) or (F, T_i) per-clip arrays."""
        feats = [f[None] if f.ndim == 2 else f for f in feats]
        lengths = np.array([f.shape[-1] for f in feats], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        flat = np.concatenate(feats, axis=-1) if feats else np.zeros((1, 1, 0), np.float32)
        return cls(flat.astype(np.float32), offsets, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def clip(self, i: int) -> np.ndarray:
        return self.flat[..., self.offsets[i]:self.offsets[i] + self.lengths[i]]

    def subset(self, indices) -> RaggedFeatures:
        return RaggedFeatures(self.flat, self.offsets[indices], self.lengths[indices])

    def padded(self, indices, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, F, width) zero-padded / truncated batch and each clip's kept length."""
        lengths = self.lengths[indices]
        width = int(lengths.max(initial=1)) if width is None else width
        t = np.arange(width)
        valid = t[None, :] < lengths[:, None]
        index = np.where(valid, self.offsets[indices][:, None] + t[None, :], 0)
        batch = np.where(valid[:, None, None, :], self.flat[:, :, index].transpose(2, 0, 1, 3), 0.0)
        return batch.astype(np.float32), np.minimum(lengths, width)


def row_index(n_rows: int, height: int) -> np.ndarray:
    """Feature row shown on each image row: `floor(r * n_rows / height)`."""
    return (np.arange(height) * n_rows) // height


def stretch_time(batch: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Linear resampling of each clip's first `lengths[i]` frames onto `width` columns."""
    lengths = np.maximum(lengths, 1).astype(np.float64)
    pos = (np.arange(width)[None, :] + 0.5) * lengths[:, None] / width - 0.5
    pos = np.clip(pos, 0.0, lengths[:, None] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, lengths[:, None].astype(np.int64) - 1)
    frac = (pos - lo).astype(np.float32)
    take = lambda idx: np.take_along_axis(batch, idx[:, None, None, :], axis=-1)  # noqa: E731
    return take(lo) * (1 - frac[:, None, None, :]) + take(hi) * frac[:, None, None, :]


def to_images(batch: np.ndarray, lengths: np.ndarray, size: int = 224, fit: str = "pad",
              dtype: str = "float32", band_norm: str = "none") -> np.ndarray:
    """(N, C, F, T) features, C in {1, 3} -> (N, size, size, 3) images in [0, 1] (NHWC).

    Scaling happens on the small (N, C, F', size) array of the rows that appear in the image (row
    repetition changes neither min nor max), and the full-size image is written once, already in its
    storage dtype.
    """
    if fit not in FIT_MODES:
        raise ValueError(f"unknown fit {fit!r}: use one of {FIT_MODES}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"unknown image dtype {dtype!r}: use one of {STORAGE_DTYPES}")
    if band_norm not in BAND_NORMS:
        raise ValueError(f"unknown band_norm {band_norm!r}: use one of {BAND_NORMS}")
    if fit == "stretch":
        batch = stretch_time(batch, lengths, size)
    else:
        batch = batch[..., :size]
        if batch.shape[-1] < size:
            batch = np.pad(batch, [(0, 0)] * 3 + [(0, size - batch.shape[-1])])
    rows, inverse = np.unique(row_index(batch.shape[2], size), return_inverse=True)
    small = batch[:, :, rows, :].astype(np.float32)
    if band_norm != "none":  # per-utterance normalisation of each band over the clip's columns
        small = small - small.mean(axis=3, keepdims=True)
        if band_norm == "meanvar":  # a band whose spread is rounding (a floored, interpolated band) becomes 0
            std = small.std(axis=3, keepdims=True)
            real = std > 1e-5 * (std.max(axis=2, keepdims=True) + 1e-12)
            small = np.where(real, small / np.where(real, std, 1.0), 0.0)
    lo = small.min(axis=(2, 3), keepdims=True)
    span = small.max(axis=(2, 3), keepdims=True) - lo
    small = np.where(span > 0, (small - lo) / np.where(span > 0, span, 1.0), 0.0)
    if dtype == "uint8":
        small = np.round(small * 255.0)
    small = small.astype(dtype).transpose(0, 2, 3, 1)  # (N, F', size, C)
    out = np.empty((batch.shape[0], size, size, 3), dtype)
    out[...] = small[:, inverse]  # one full-size write; C = 1 broadcasts to RGB
    return out


def decode(images):
    """float32 [0, 1] images from any storage dtype (works on numpy and jax arrays)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def caffe(images_255):
    """Keras' `vgg16.preprocess_input`: RGB -> BGR, ImageNet channel means subtracted (0-255 scale)."""
    return images_255[..., ::-1] - CAFFE_MEAN_BGR


def preprocess(images01, mode: str):
    """[0, 1] images -> the network's input: `unit` keeps them (the seed); each family's own: `caffe` (VGG,
    ResNet50), `tf` ([-1, 1]: MobileNetV2), `raw` ([0, 255]: EfficientNet-B0, whose stem normalises),
    `lite` ((x - 127) / 128 on [0, 255]: EfficientNet-Lite0)."""
    if mode == "unit":
        return images01
    if mode == "caffe":
        return caffe(images01 * 255.0)
    if mode == "tf":
        return images01 * 2.0 - 1.0
    if mode == "raw":
        return images01 * 255.0
    if mode == "lite":
        return (images01 * 255.0 - 127.0) / 128.0
    raise ValueError(f"unknown preprocess {mode!r}: use one of {PREPROCESS_MODES}")


@dataclass(frozen=True)
class ImageSpec:
    """How a run turns clips' features into network input: the one place those five settings travel."""

    size: int = 224
    fit: str = "pad"
    storage: str = "float32"
    band_norm: str = "none"
    preprocess: str = "unit"

    def batch(self, feats: RaggedFeatures, idx) -> np.ndarray:
        """Host-side (N, size, size, 3) images of clips `idx`, in the storage dtype."""
        batch, lengths = feats.padded(idx, self.size if self.fit == "pad" else None)
        return to_images(batch, lengths, self.size, self.fit, self.storage, self.band_norm)

    def network_input(self, images):
        """Stored images -> what VGG16 sees (inside jitted code)."""
        return preprocess(decode(images), self.preprocess)
