import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FSDD = SHARED / "data" / "fsdd" / "recordings"
HED = SHARED / "weights" / "hed_bsds500.weights.h5"


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    if not FSDD.is_dir():
        pytest.skip(f"FSDD recordings not found at {FSDD} (../shared is absent)")
    return FSDD


@pytest.fixture(scope="session")
def hed_file() -> Path:
    if not HED.is_file():
        pytest.skip(f"HED weights not found at {HED} (../shared is absent)")
    return HED


@pytest.fixture(scope="session")
def keras_vgg():
    """Keras' own VGG16 base (random Glorot init), any input size."""
    keras = pytest.importorskip("keras")
    return keras.applications.VGG16(weights=None, include_top=False, input_shape=(None, None, 3))


def write_tone(path, seconds=0.5, sr=8000, freq=440.0, channels=1, subtype="PCM_16"):
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    y = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    if channels > 1:
        y = np.stack([y] * channels, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, sr, subtype=subtype)
    return Path(path)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
