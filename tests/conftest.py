import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
# One persistent XLA compilation cache for the session (and the subprocesses it starts), fresh each session:
# the many small runs compile the same programs again and again (390 s -> 264 s for the suite on 2 cores).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtl-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The session's own `jaxtl tune` record (none): a developer's measured XLA setting must not change the tests' runs.
os.environ["JAXTL_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="jaxtl-tests-tune-"), "xla-tune.json")

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


def weights_file(path) -> Path:
    """A VGG16 weight file (.npz) of a random init that no run's own seed gives."""
    import jax
    import jax.numpy as jnp

    from jaxtl.model import VGG16Base
    from jaxtl.weights import save_npz

    save_npz(VGG16Base().init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))), path)
    return Path(path)


def overwrite(shard, dataset: str, byte: int, n: int = 4096) -> None:
    """The first `n` bytes (at most all) of `dataset`'s data in `shard` set to `byte`: bit rot."""
    import h5py

    with h5py.File(shard, "r") as f:
        offset, size = f[dataset].id.get_offset(), f[dataset].id.get_storage_size()
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes([byte]) * min(n, size))


def wait_until_ready(proc) -> None:
    """Read `proc`'s output up to its "ready" line (killed after 300 s: a run that never gets there fails)."""
    import threading

    timer = threading.Timer(300, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                return
        raise AssertionError(f"exited ({proc.wait()}) before its signal: {proc.stderr.read()[-2000:]}")
    finally:
        timer.cancel()


def all_features(prep):
    """Every clip's features of a prepared run (what the pipeline extracts on demand), in clip order."""
    return prep.features(np.arange(len(prep.y)))[0]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The built-in synthetic set, 10 clips of each of 4 classes (generated, deterministic)."""
    from jaxtl.data import synthetic

    return synthetic(tmp_path_factory.mktemp("synthetic"), clips_per_class=10)


@pytest.fixture
def cfg(data_dir, tmp_path):
    """A small run: 32x32 images, 3 epochs, random base, its own run directory; features cached per session."""
    from jaxtl.config import TrainConfig

    return TrainConfig(data=str(data_dir), image_size=32, epochs=3, batch_size=8, weights="random",
                       normalize=True, out=str(tmp_path / "run"), cache_dir=str(data_dir.parent / "cache"),
                       workers=1, verbose=0, patience=0,
                       checkpoint_every=0)


def quiet(*_):
    pass


def metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[float]:
    return [row["train_loss"] for row in metrics(run_dir)]
