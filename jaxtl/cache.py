"""HDF5 feature cache: per-clip features keyed by the file's identity and every feature setting.

One file per feature setting (`features-<settings hash>.h5`), holding the ragged layout of
`RaggedFeatures` plus one key per clip (path, size, mtime). Writes go to a temporary file that gets
a `complete` mark last and is then renamed over the old one, so a run killed mid-write leaves either
the old cache or the new one, never a file that reads as valid but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from jaxtl.audio import BadAudio, FeatureConfig, Perturbation, extract


@contextlib.contextmanager
def atomic_h5(path: Path):
    """Write an HDF5 file into a temporary name, mark it `complete` last, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".h5.tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
            f.flush()
            f.attrs["complete"] = True
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside `path`, held for a read-merge-write, so runs sharing a cache lose nothing."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def file_key(path: str, perturbation: Perturbation | None = None) -> str:
    """Identity of a clip without reading it: absolute path, size, modification time, inode and status-change
    time (and the perturbation of an augmentation copy). ctime cannot be set by `cp -p`, `rsync -a` or
    `touch -r`, so a file rewritten with its old size and mtime still gets a new key."""
    st = os.stat(path)
    extra = "" if perturbation is None else "".join(f"|{v:.6f}" for v in perturbation)
    ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}{extra}"
    return hashlib.sha1(ident.encode()).hexdigest()


class FeatureCache:
    def __init__(self, directory: str | os.PathLike, cfg: FeatureConfig):
        self.path = Path(directory) / f"features-{cfg.key()}.h5"
        self.settings = json.dumps(asdict(cfg), sort_keys=True)

    def load(self) -> dict[str, np.ndarray]:
        """Every cached clip, or nothing when the file is absent, incomplete, or of other settings."""
        if not self.path.exists():
            return {}
        try:
            with h5py.File(self.path, "r") as f:
                if not f.attrs.get("complete") or f.attrs.get("settings") != self.settings:
                    return {}
                keys = [k.decode() for k in f["keys"][:]]
                offsets, lengths, flat = f["offsets"][:], f["lengths"][:], f["flat"][:]
        except (OSError, KeyError):
            return {}
        return {k: flat[..., o:o + n] for k, o, n in zip(keys, offsets, lengths)}

    def add(self, entries: dict[str, np.ndarray]) -> None:
        """Merge `entries` into the file as it is now (another run may have added clips since we read it)."""
        if not entries:
            return
        with locked(self.path):
            self._write({**self.load(), **entries})

    def _write(self, entries: dict[str, np.ndarray]) -> None:
        keys = sorted(entries)
        lengths = np.array([entries[k].shape[-1] for k in keys], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        with atomic_h5(self.path) as f:
            f["keys"] = np.array([k.encode() for k in keys])
            f["offsets"], f["lengths"] = offsets, lengths
            f["flat"] = np.concatenate([entries[k] for k in keys], axis=-1).astype(np.float32)
            f.attrs["settings"] = self.settings


def cached_features(paths: list[str], cfg: FeatureConfig, cache_dir: str | os.PathLike | None,
                    workers: int | None = None, progress: bool = True,
                    perturb: list[Perturbation | None] | None = None):
    """Features for `paths` (None where a file is bad), the BadAudio errors, and (hits, misses)."""
    perturb = perturb or [None] * len(paths)
    if cache_dir is None:
        feats, errors = extract(paths, cfg, workers, progress, perturb=perturb)
        return feats, errors, (0, len(paths))
    cache = FeatureCache(cache_dir, cfg)
    stored = cache.load()
    keys, errors = [], []
    for p, pert in zip(paths, perturb):
        try:
            keys.append(file_key(p, pert))
        except OSError as e:
            keys.append(None)
            errors.append(BadAudio(p, f"cannot read ({e.strerror})"))
    todo = [i for i, k in enumerate(keys) if k is not None and k not in stored]
    feats = [stored.get(k) if k is not None else None for k in keys]
    if todo:
        new, new_errors = extract([paths[i] for i in todo], cfg, workers, progress,
                                  perturb=[perturb[i] for i in todo])
        errors += new_errors
        for i, f in zip(todo, new):
            feats[i] = f
        cache.add({keys[i]: f for i, f in zip(todo, new) if f is not None})
    return feats, errors, (len(paths) - len(todo), len(todo))


def fingerprint(*parts) -> str:
    """Stable hash of settings and arrays (weights), for cache keys."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


class ActivationCache:
    """Frozen-prefix outputs per clip, under one (prefix weights, split point, settings) key.

    Computing VGG16's prefix is the most expensive thing a frozen run does; kept on disk per clip, a
    second run (another head, seed, subset or learning rate) pays only for clips it has not seen.
    `prefix-<key>/` holds append-only shards (`rows-000000.h5`, ...), each written once, atomically, with
    the rows of clips no earlier shard holds: adding clips writes a new shard and never rewrites old rows,
    and a run reads only the rows of the clips it asks for (HDF5 reads of those rows), into one array.
    jaxtl 0.2's single file, `prefix-<key>.h5`, is read as the first shard.
    """

    def __init__(self, directory: str | os.PathLike, key: str):
        self.path = Path(directory) / f"prefix-{key}"
        self.legacy = Path(directory) / f"prefix-{key}.h5"

    def shards(self) -> list[Path]:
        return ([self.legacy] if self.legacy.is_file() else []) + sorted(self.path.glob("rows-*.h5"))

    def stored_keys(self) -> set[str]:
        keys: set[str] = set()
        for shard in self.shards():
            with contextlib.suppress(OSError, KeyError), h5py.File(shard, "r") as f:
                if f.attrs.get("complete"):
                    keys.update(k.decode() for k in f["keys"][:])
        return keys

    def read(self, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """(which of `keys` are stored, {name: (len(keys), ...) rows, those of clips not stored left zero});
        None for the rows when no clip is stored. Incomplete or unreadable shards count as absent."""
        want = {k: i for i, k in enumerate(keys)}
        found, out = np.zeros(len(keys), bool), None
        for shard in self.shards():
            with contextlib.suppress(OSError, KeyError), h5py.File(shard, "r") as f:
                if not f.attrs.get("complete"):
                    continue
                rows = [(r, want[k]) for r, k in enumerate(x.decode() for x in f["keys"][:])
                        if k in want and not found[want[k]]]
                if not rows:
                    continue
                src, dst = (np.array(c, np.int64) for c in zip(*rows))
                if out is None:
                    out = {n: np.zeros((len(keys),) + ds.shape[1:], ml_bfloat16() if ds.attrs.get("bfloat16")
                                       else ds.dtype) for n, ds in f["acts"].items()}
                for n, ds in f["acts"].items():
                    # increasing row numbers: h5py reads these rows only (it cannot select from an empty array:
                    # the taps of a split point before the first tapped block are (N, 0))
                    a = ds[src] if ds.size else np.zeros((len(src),) + ds.shape[1:], ds.dtype)
                    out[n][dst] = a.view(ml_bfloat16()) if ds.attrs.get("bfloat16") else a
                found[dst] = True
        return found, out

    def add(self, keys: list[str], acts: dict[str, np.ndarray]) -> None:
        """Write the rows of clips no shard holds yet (another run may have added some since) as a new shard."""
        with locked(self.path):
            have = self.stored_keys()
            new = [i for i, k in enumerate(keys) if k not in have]
            if not new:
                return
            shard = self.path / f"rows-{len(list(self.path.glob('rows-*.h5'))):06d}.h5"  # unique under the lock
            with atomic_h5(shard) as f:
                f["keys"] = np.array([keys[i].encode() for i in new])
                for name, a in acts.items():
                    bf16 = a.dtype == ml_bfloat16()
                    f[f"acts/{name}"] = (a[new].view(np.uint16) if bf16 else a[new])
                    f[f"acts/{name}"].attrs["bfloat16"] = bf16


def ml_bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
