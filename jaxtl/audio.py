"""Decoding, resampling, and batched MFCC / log-mel features.

librosa, soundfile and soxr are imported where used, so the model, training and benchmarks run on
machines that hold cached features but no audio stack (the GPU image, say).

Clips of a batch are zero-padded to a common length and go through librosa as one 2-D array
(librosa computes over leading axes). PCEN (per-channel energy normalisation, `librosa.pcen`) replaces the
log of log-mel with an adaptive gain per band: a level- and channel-invariance lever.

The batch equals per-clip librosa because librosa's STFT pads with zeros (`pad_mode="constant"`), so a
clip's own frames see the same samples either way; the dB step, whose `top_db` floor librosa takes over
the whole array, is done per clip here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# Bump when a change to this module changes the features it computes: cached features of older code are
# then recomputed instead of read (the cache key holds it and the audio libraries' versions).
FEATURE_CODE_VERSION = 2
REPRESENTATIONS = ("mfcc", "mfcc-delta", "logmel", "pcen")
# librosa.pcen's defaults are tuned for integer-range input (its docs scale a magnitude mel spectrogram of
# float audio by 2**31); jaxtl scales the power mel spectrogram by 2**31, the variant the LOSO study measured.
PCEN_INPUT_SCALE = 2.0 ** 31


class BadAudio(Exception):
    """A file that cannot become features; str() is one line naming the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # crosses process boundaries intact
        return BadAudio, (self.path, self.reason)


@dataclass(frozen=True)
class FeatureConfig:
    """Every setting that changes a clip's features (and so keys the feature cache)."""

    representation: str = "mfcc"
    sample_rate: int = 22050
    n_mfcc: int = 13
    n_fft: int = 2048
    hop_length: int = 512
    win_length: int | None = None
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    top_db: float = 80.0
    max_seconds: float = 30.0

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {self.representation!r}: use one of {REPRESENTATIONS}")

    def key(self) -> str:
        """Hash of every setting, this module's feature code version and the audio libraries' versions."""
        ident = {**asdict(self), "code": FEATURE_CODE_VERSION, "libraries": _library_versions()}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def channels(self) -> int:
        return 3 if self.representation == "mfcc-delta" else 1


def _wav_missing_bytes(path: str) -> int:
    """Bytes a WAV's data chunk declares beyond the end of the file (0 when whole, or not a plain RIFF WAV).

    libsndfile clamps a truncated WAV to what is present and reads it without complaint, so the header
    is checked here: a file cut after 8 samples must not train as an 8-sample clip."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return 0
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                if length in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                    return 0
                return max(0, f.tell() + length - size)
            f.seek(length + (length & 1), os.SEEK_CUR)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("librosa", "soxr", "soundfile"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def load_audio(path: str, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 at `sample_rate`; reads at most `max_seconds`. Raises BadAudio for unusable files."""
    import soundfile as sf
    import soxr

    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS:
        raise BadAudio(path, f"unsupported extension {ext or '(none)'}; use one of {', '.join(AUDIO_EXTENSIONS)}")
    try:
        size = os.path.getsize(path)
        missing = _wav_missing_bytes(path) if size else 0
    except OSError as e:
        raise BadAudio(path, f"cannot read ({e.strerror})") from None
    if size == 0:
        raise BadAudio(path, "empty file (0 bytes)")
    if missing:
        raise BadAudio(path, f"truncated: its header declares {missing} more bytes of audio than the file holds")
    try:
        with sf.SoundFile(path) as f:
            native, declared = f.samplerate, f.frames
            frames = -1 if max_seconds is None else int(max_seconds * native)
            y = f.read(frames=frames, dtype="float32", always_2d=True)
        want = declared if frames < 0 else min(declared, frames)
        if len(y) < want:
            raise BadAudio(path, f"truncated: the header promises {declared} frames, {len(y)} could be read")
    except BadAudio:
        raise
    except Exception as sf_error:  # soundfile lacks some formats (old mp3 builds): try librosa's loader
        import librosa

        try:
            with warnings.catch_warnings():  # librosa warns about its deprecated audioread path
                warnings.simplefilter("ignore")
                y, native = librosa.load(path, sr=None, mono=False, duration=max_seconds, dtype=np.float32)
            y = np.atleast_2d(y).T
        except Exception:
            raise BadAudio(path, f"not a readable audio file ({str(sf_error).splitlines()[0]})") from None
    if y.size == 0:
        raise BadAudio(path, "no audio samples")
    if not np.isfinite(y).all():
        raise BadAudio(path, "contains NaN or infinite samples")
    y = y.mean(axis=1)
    if native != sample_rate:  # what librosa.resample(res_type="soxr_hq") does, without its 2 s first call
        n = int(np.ceil(len(y) * sample_rate / native))
        y = soxr.resample(y, native, sample_rate, quality="soxr_hq")
        y = np.pad(y, (0, max(0, n - len(y))))[:n]
    return y.astype(np.float32)


def n_frames(n_samples: int, hop_length: int) -> int:
    """Frames librosa gives a centered STFT of `n_samples`."""
    return 1 + n_samples // hop_length


def _pad_stack(clips: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(clips), max(len(c) for c in clips)), np.float32)
    for row, clip in zip(out, clips):
        row[:len(clip)] = clip
    return out


def _power_to_db(power: np.ndarray, ref: np.ndarray | float, top_db: float, amin: float = 1e-10) -> np.ndarray:
    """librosa.power_to_db with the `top_db` floor taken per clip (axis 0) instead of over the batch."""
    db = 10.0 * np.log10(np.maximum(amin, power)) - 10.0 * np.log10(np.maximum(amin, ref))
    return np.maximum(db, db.max(axis=(1, 2), keepdims=True) - top_db)


def _deltas(x: np.ndarray, lengths: np.ndarray, width: int = 9) -> np.ndarray:
    """HTK regression deltas over each clip's own frames, edge frames repeated: (N, F, T) -> (N, F, T)."""
    half = width // 2
    t = np.arange(x.shape[-1])
    out = np.zeros_like(x)
    for n in range(1, half + 1):  # loop over the window, not over clips
        ahead = np.minimum(t[None, :] + n, lengths[:, None] - 1)
        behind = np.maximum(t[None, :] - n, 0)
        out += n * (np.take_along_axis(x, ahead[:, None, :], -1) - np.take_along_axis(x, behind[:, None, :], -1))
    return out / (2 * sum(n * n for n in range(1, half + 1)))


def features_batch(clips: list[np.ndarray], cfg: FeatureConfig) -> list[np.ndarray]:
    """Per-clip (C, F, T_i) features for a list of clips, computed as one padded batch."""
    import librosa
    import scipy.fft

    lengths = np.array([n_frames(len(c), cfg.hop_length) for c in clips])
    mel = librosa.feature.melspectrogram(
        y=_pad_stack(clips), sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
        win_length=cfg.win_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    valid = np.arange(mel.shape[-1])[None, None, :] < lengths[:, None, None]
    if cfg.representation == "logmel":
        ref = np.where(valid, mel, 0.0).max(axis=(1, 2), keepdims=True)
        feats = _power_to_db(mel, ref, cfg.top_db)[:, None]
    elif cfg.representation == "pcen":  # causal along time from a fixed initial state: padding after a clip is unseen
        feats = librosa.pcen(mel * PCEN_INPUT_SCALE, sr=cfg.sample_rate, hop_length=cfg.hop_length, axis=-1)[:, None]
    else:
        db = _power_to_db(np.where(valid, mel, 0.0), 1.0, cfg.top_db)
        mfcc = scipy.fft.dct(db, axis=-2, type=2, norm="ortho")[:, :cfg.n_mfcc]
        if cfg.representation == "mfcc-delta":
            d1 = _deltas(mfcc, lengths)
            feats = np.stack([mfcc, d1, _deltas(d1, lengths)], axis=1)
        else:
            feats = mfcc[:, None]
    return [f[..., :n].astype(np.float32) for f, n in zip(feats, lengths)]


# An offline augmentation copy: (pitch shift in semitones, tempo rate) of its audio, and optionally a third
# value, the vocal-tract-length warp factor of its mel axis (`warp_bands`).
Perturbation = tuple[float, ...]


def perturb_audio(y: np.ndarray, sample_rate: int, perturbation: Perturbation) -> np.ndarray:
    """A time-stretched, pitch-shifted copy of a clip (librosa's phase vocoder and resampling)."""
    import librosa

    pitch, rate = perturbation[:2]
    with warnings.catch_warnings():  # short clips: librosa warns that its 2048-point FFT exceeds them
        warnings.simplefilter("ignore", UserWarning)
        if rate != 1.0:
            y = librosa.effects.time_stretch(y, rate=rate)
        if pitch:
            y = librosa.effects.pitch_shift(y, sr=sample_rate, n_steps=pitch)
    return y.astype(np.float32)


def warp_bands(feat: np.ndarray, factor: float) -> np.ndarray:
    """Vocal-tract-length perturbation of (C, F, T) mel-band features: band r shows the spectrum at band
    `r * factor` (linear interpolation; past the top band, the top band), as a longer or shorter vocal tract
    moves formants along the frequency axis."""
    bands = feat.shape[-2]
    pos = np.minimum(np.arange(bands) * factor, bands - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, bands - 1)
    frac = (pos - lo)[:, None].astype(feat.dtype)
    return feat[..., lo, :] * (1 - frac) + feat[..., hi, :] * frac


def long_enough(y: np.ndarray, cfg: FeatureConfig, name: str) -> np.ndarray:
    """`y`, or BadAudio when it is shorter than one analysis window (no frame to compute)."""
    window = cfg.win_length or cfg.n_fft
    if len(y) < window:
        raise BadAudio(name, f"too short: {len(y)} samples at {cfg.sample_rate} Hz, less than one {window}-sample "
                             "analysis window")
    return y


def file_features(paths: list[str], cfg: FeatureConfig, perturb: list[Perturbation | None] | None = None
                  ) -> tuple[list[np.ndarray | None], list[BadAudio]]:
    """Features of files (optionally of perturbed copies), batched by similar length; unusable files come
    back as None plus their error."""
    clips: list[np.ndarray | None] = []
    errors = []
    for p, pert in zip(paths, perturb or [None] * len(paths)):
        try:
            y = long_enough(load_audio(p, cfg.sample_rate, cfg.max_seconds), cfg, p)
            clips.append(y if pert is None else perturb_audio(y, cfg.sample_rate, pert))
        except BadAudio as e:
            clips.append(None)
            errors.append(e)
    good = [i for i, c in enumerate(clips) if c is not None]
    out: list[np.ndarray | None] = [None] * len(paths)
    order = sorted(good, key=lambda i: len(clips[i]))
    for start in range(0, len(order), 32):  # similar lengths together: little padding to compute on
        chunk = order[start:start + 32]
        for i, f in zip(chunk, features_batch([clips[i] for i in chunk], cfg)):
            pert = perturb[i] if perturb else None
            out[i] = warp_bands(f, pert[2]) if pert is not None and len(pert) > 2 else f
    return out, errors


def _file_features_chunk(args):
    return file_features(*args)


# Starting the pool (a fork server that pays librosa's first call) costs ~0.5 s more than it saves below a
# few thousand clips on 2 cores: on a 2-core AMD EPYC, 2,500 clips took 3.56 s in this process and 3.00 s in
# 2 workers with the seed's features, 2.12 s and 2.38 s with the jaxtl recipe's, and the pool lost at 100
# and 500 clips with both (`python benchmarks/extract_pool.py`, benchmarks/results/extract_pool-cpu2.md).
# So a worker gets at least this many clips.
CLIPS_PER_WORKER = 1000


def _leave_sigint_to_parent() -> None:
    """Workers ignore Ctrl-C (sent to the whole terminal's process group): the parent stops them, quietly."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def extract(paths: list[str], cfg: FeatureConfig, workers: int | None = None, progress: bool = True,
            chunk: int = 64, perturb: list[Perturbation | None] | None = None,
            clips_per_worker: int = CLIPS_PER_WORKER) -> tuple[list[np.ndarray | None], list[BadAudio]]:
    """`file_features` over many files, spread over processes when there are enough of them.

    Workers fork from a fresh server process that has imported this module once (JAX's threads make a
    plain fork of the caller unsafe, and a spawn per worker pays the imports again). If the workers cannot
    start (a script without an `if __name__ == "__main__":` guard re-runs itself in them), the clips are
    extracted in this process, with a warning.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    workers = max(1, min(workers or os.cpu_count() or 1, len(paths) // max(clips_per_worker, 1)))
    perturb = perturb or [None] * len(paths)
    chunks = [(paths[i:i + chunk], perturb[i:i + chunk]) for i in range(0, len(paths), chunk)]
    results = []
    with tqdm(total=len(paths), desc="features", unit="clip", disable=not progress, leave=False) as bar:
        if workers > 1 and len(chunks) > 1:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["jaxtl.audio_worker"])
            pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx, initializer=_leave_sigint_to_parent)
            try:
                for (c, _), r in zip(chunks, pool.map(_file_features_chunk, [(c, cfg, pc) for c, pc in chunks])):
                    results.append(r)
                    bar.update(len(c))
            except BrokenProcessPool:
                logging.getLogger(__name__).warning(
                    "warning: feature worker processes died (a script that calls jaxtl needs an `if __name__ == "
                    "'__main__':` guard); extracting the remaining clips in this process")
            finally:  # an interrupted run does not wait for the chunks not started
                pool.shutdown(wait=True, cancel_futures=True)
        for c, pc in chunks[len(results):]:  # every chunk when no pool ran
            results.append(file_features(c, cfg, pc))
            bar.update(len(c))
    feats = [f for r in results for f in r[0]]
    errors = [e for r in results for e in r[1]]
    return feats, errors
