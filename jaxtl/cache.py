"""HDF5 caches of per-clip features and frozen-prefix outputs, keyed by each clip's identity and every setting.

Both are append-only shards (`Shards`): a shard is written to a temporary file that gets a `complete` mark
last and is then renamed into place, so a run killed mid-write leaves no file that reads as valid but is
not; a new clip goes into a new shard, and a reader reads only the rows it asks for.
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
    """An exclusive lock beside `path`, held while a shard is appended, so runs sharing a cache lose nothing."""
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
    """Per-clip features under one feature setting: `features-<settings hash>/` holds append-only shards,
    each the ragged layout of `RaggedFeatures` plus one key per clip (see `Shards`). jaxtl 0.3's single
    file, `features-<hash>.h5`, is read as the first shard."""

    def __init__(self, directory: str | os.PathLike, cfg: FeatureConfig):
        self.settings = json.dumps(asdict(cfg), sort_keys=True)
        self.shards = Shards(Path(directory) / f"features-{cfg.key()}", self._valid,
                             Path(directory) / f"features-{cfg.key()}.h5")

    def _valid(self, f) -> bool:
        return f.attrs.get("settings") == self.settings

    def read(self, keys: list[str]) -> dict[str, np.ndarray]:
        """{key: features} of the `keys` some shard holds; each shard's rows read once, in one slice."""
        out: dict[str, np.ndarray] = {}
        for f, rows in self.shards.rows_of(keys):
            offsets, lengths, names = f["offsets"][:], f["lengths"][:], f["keys"][:]
            for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):  # each run of adjacent rows, once
                lo = int(offsets[run[0]])
                flat = f["flat"][..., lo:int(offsets[run[-1]] + lengths[run[-1]])]
                for r in run:
                    out[names[r].decode()] = flat[..., offsets[r] - lo:offsets[r] - lo + lengths[r]]
        return out

    def add(self, entries: dict[str, np.ndarray]) -> None:
        """Append the clips no shard holds yet as a new shard (old shards are never rewritten)."""
        def write(f, keys):
            lengths = np.array([entries[k].shape[-1] for k in keys], np.int64)
            f["offsets"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            f["lengths"] = lengths
            f["flat"] = np.concatenate([entries[k] for k in keys], axis=-1).astype(np.float32)
            f.attrs["settings"] = self.settings

        self.shards.append(sorted(entries), write)


class Shards:
    """Append-only HDF5 shards of keyed rows in one directory (`rows-000000.h5`, ...), plus an optional
    legacy single file read as the first shard.

    Each shard is written once, atomically (`atomic_h5`), under a lock, with only the keys no shard holds
    yet: adding clips never rewrites old rows, and a reader reads only the rows it asks for. Incomplete or
    unreadable shards count as absent. The key index is read once per instance and kept up to date with
    its own appends.
    """

    def __init__(self, path: Path, valid=lambda f: True, legacy: Path | None = None):
        self.path, self.valid, self.legacy = path, valid, legacy
        self._index: dict[str, tuple[Path, int]] | None = None

    def files(self) -> list[Path]:
        return ([self.legacy] if self.legacy is not None and self.legacy.is_file() else []) + \
            sorted(self.path.glob("rows-*.h5"))

    def index(self, refresh: bool = False) -> dict[str, tuple[Path, int]]:
        """{key: (shard, row)}, the first shard holding a key winning."""
        if self._index is None or refresh:
            self._index = {}
            for shard in self.files():
                with contextlib.suppress(OSError, KeyError), h5py.File(shard, "r") as f:
                    if f.attrs.get("complete") and self.valid(f):
                        for r, k in enumerate(f["keys"][:]):
                            self._index.setdefault(k.decode(), (shard, r))
        return self._index

    def rows_of(self, keys: list[str]):
        """(open shard, increasing row numbers) for every shard holding some of `keys`."""
        by_shard: dict[Path, list[int]] = {}
        index = self.index()
        for k in keys:
            if k in index:
                by_shard.setdefault(index[k][0], []).append(index[k][1])
        for shard, rows in by_shard.items():
            with h5py.File(shard, "r") as f:
                yield f, np.unique(np.array(rows, np.int64))

    def append(self, keys: list[str], write) -> list[str]:
        """`write(h5file, new_keys)` into a new shard for the `keys` no shard holds (another run may have added
        some since this one read the index); returns the keys written."""
        with locked(self.path):
            index = self.index(refresh=True)
            new = [k for k in keys if k not in index]
            if not new:
                return []
            taken = [int(p.stem.split("-")[1]) for p in self.path.glob("rows-*.h5") if p.stem.split("-")[1].isdigit()]
            shard = self.path / f"rows-{max(taken, default=-1) + 1:06d}.h5"  # a new name under the lock
            with atomic_h5(shard) as f:
                f["keys"] = np.array([k.encode() for k in new])
                write(f, new)
            index.update({k: (shard, r) for r, k in enumerate(new)})
            return new


def cached_features(paths: list[str], cfg: FeatureConfig, cache: FeatureCache | None, workers: int | None = None,
                    progress: bool = True, perturb: list[Perturbation | None] | None = None):
    """Features for `paths` (None where a file is bad), the BadAudio errors, and (hits, misses); the clips
    the cache lacks are extracted and appended to it as one new shard."""
    perturb = perturb or [None] * len(paths)
    if cache is None:
        feats, errors = extract(paths, cfg, workers, progress, perturb=perturb)
        return feats, errors, (0, len(paths))
    keys, errors = [], []
    for p, pert in zip(paths, perturb):
        try:
            keys.append(file_key(p, pert))
        except OSError as e:
            keys.append(None)
            errors.append(BadAudio(p, f"cannot read ({e.strerror})"))
    stored = cache.read([k for k in keys if k is not None])
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
    `prefix-<key>/` holds append-only `Shards`: each process of a run appends the rows of its own clips and
    reads only the rows of the clips it asks for, into one array. jaxtl 0.2's single file,
    `prefix-<key>.h5`, is read as the first shard.
    """

    def __init__(self, directory: str | os.PathLike, key: str):
        self.shards = Shards(Path(directory) / f"prefix-{key}", legacy=Path(directory) / f"prefix-{key}.h5")
        self.path = self.shards.path

    def read(self, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """(which of `keys` are stored, {name: (len(keys), ...) rows, those of clips not stored left zero});
        None for the rows when no clip is stored."""
        want = {k: i for i, k in enumerate(keys)}
        found, out = np.zeros(len(keys), bool), None
        for f, rows in self.shards.rows_of(keys):
            names = f["keys"][:]
            dst = np.array([want[names[r].decode()] for r in rows], np.int64)
            if out is None:
                out = {n: np.zeros((len(keys),) + ds.shape[1:], ml_bfloat16() if ds.attrs.get("bfloat16")
                                   else ds.dtype) for n, ds in f["acts"].items()}
            for n, ds in f["acts"].items():
                # increasing row numbers: h5py reads these rows only (it cannot select from an empty array:
                # the taps of a split point before the first tapped block are (N, 0))
                a = ds[rows] if ds.size else np.zeros((len(rows),) + ds.shape[1:], ds.dtype)
                out[n][dst] = a.view(ml_bfloat16()) if ds.attrs.get("bfloat16") else a
            found[dst] = True
        return found, out

    def add(self, keys: list[str], acts: dict[str, np.ndarray]) -> None:
        """Write the rows of clips no shard holds yet (another run may have added some since) as a new shard."""
        row = {k: i for i, k in enumerate(keys)}

        def write(f, new):
            take = np.array([row[k] for k in new], np.int64)
            for name, a in acts.items():
                bf16 = a.dtype == ml_bfloat16()
                f[f"acts/{name}"] = (a[take].view(np.uint16) if bf16 else a[take])
                f[f"acts/{name}"].attrs["bfloat16"] = bf16

        self.shards.append(keys, write)


def ml_bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
