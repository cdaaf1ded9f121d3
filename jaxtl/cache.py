"""HDF5 caches of per-clip features and frozen-prefix outputs, keyed by each clip's identity and every setting.

Both are append-only shards (`Shards`): a shard is written to a temporary file that gets a `complete` mark
last and is then renamed into place, so a run killed mid-write leaves no file that reads as valid but is
not; a new clip goes into a new shard, and a reader reads only the rows it asks for.

Cached bytes are verified: every row of every dataset of a shard has its CRC-32 stored beside it
(`crc32/<dataset>`), checked for each row read, and rows read must be finite. A shard that fails either is
named in one warning, set aside (`rows-N.h5.damaged`) and its clips computed again. (HDF5's fletcher32 filter
was tried first: it cannot tell a chunk overwritten with 0xff bytes, checksum included, from a sound one.)
A cache that cannot be written (a full disk, no permission) is said once and the run goes on without caching.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import zlib
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from jaxtl.audio import BadAudio, FeatureConfig, Perturbation, extract
from jaxtl.disk import free_space, os_error_code, reason

warn = logging.getLogger("jaxtl").warning

class Damaged(Exception):
    """Rows read from a cache that cannot be right (a CRC-32 that does not match, non-finite values)."""


def crc(a: np.ndarray) -> int:
    """The CRC-32 of an array's bytes (C order)."""
    return zlib.crc32(np.ascontiguousarray(a).data)


def row_crcs(data) -> np.ndarray:
    """The CRC-32 of each row (along axis 0) of `data`, or of each array of a list."""
    return np.array([crc(row) for row in data], np.uint32)


def put(f: h5py.File, name: str, data: np.ndarray, crcs: np.ndarray | None = None) -> None:
    """`data` as dataset `name`, with the CRC-32 of each row (or the given ones) as `crc32/<name>`."""
    data = np.asarray(data)
    f[name] = data
    f[f"crc32/{name}"] = row_crcs(data) if crcs is None else crcs


def verified(f: h5py.File, name: str, rows: np.ndarray, got: np.ndarray) -> np.ndarray:
    """`got`, rows `rows` of dataset `name` as stored, if their CRC-32s are the stored ones (a shard written
    before jaxtl 0.5 has none)."""
    if f"crc32/{name}" in f:
        bad = int((row_crcs(got) != f[f"crc32/{name}"][rows]).sum())
        if bad:
            raise Damaged(f"{bad} of {len(rows)} rows of {name} fail their CRC-32")
    return got


def finite(a: np.ndarray) -> np.ndarray:
    """`a`, if every value is finite (what a cache wrote always was)."""
    if a.size and not np.isfinite(a).all():
        raise Damaged(f"{int((~np.isfinite(a)).sum())} non-finite values")
    return a


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
        """{key: features} of the `keys` some sound shard holds; each shard's rows read once, in one slice."""
        out: dict[str, np.ndarray] = {}

        def rows_of(f, rows):
            every = np.arange(len(f["keys"]))
            offsets, lengths = (verified(f, n, every, f[n][:]) for n in ("offsets", "lengths"))
            names, crcs = f["keys"][:], f["crc32/flat"][:] if "crc32/flat" in f else None
            got = {}
            for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):  # each run of adjacent rows, once
                lo = int(offsets[run[0]])
                flat = f["flat"][..., lo:int(offsets[run[-1]] + lengths[run[-1]])]
                for r in run:
                    clip = flat[..., offsets[r] - lo:offsets[r] - lo + lengths[r]]
                    if crcs is not None and crc(clip) != crcs[r]:
                        raise Damaged(f"the features of row {r} fail their CRC-32")
                    got[names[r].decode()] = finite(clip)
            return got

        for got in self.shards.read(keys, rows_of):
            out.update(got)
        return out

    def add(self, entries: dict[str, np.ndarray]) -> None:
        """Append the clips no shard holds yet as a new shard (old shards are never rewritten)."""
        def write(f, keys):
            lengths = np.array([entries[k].shape[-1] for k in keys], np.int64)
            put(f, "offsets", np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
            put(f, "lengths", lengths)
            flat = [entries[k].astype(np.float32) for k in keys]
            put(f, "flat", np.concatenate(flat, axis=-1), crcs=row_crcs(flat))
            f.attrs["settings"] = self.settings

        self.shards.append(sorted(entries), write)


class Shards:
    """Append-only HDF5 shards of keyed rows in one directory (`rows-000000.h5`, ...), plus an optional
    legacy single file read as the first shard.

    Each shard is written once, atomically (`atomic_h5`), under a lock, with only the keys no shard holds
    yet: adding clips never rewrites old rows, and a reader reads only the rows it asks for. Incomplete
    shards and those of other settings count as absent; damaged ones (a checksum or the file's structure
    fails, or rows are non-finite) are set aside. The key index is read once per instance and kept up to
    date with its own appends. A shard that cannot be written turns appending off for this instance.
    """

    def __init__(self, path: Path, valid=lambda f: True, legacy: Path | None = None):
        self.path, self.valid, self.legacy = path, valid, legacy
        self._index: dict[str, tuple[Path, int]] | None = None
        self.writable = True

    def files(self) -> list[Path]:
        return ([self.legacy] if self.legacy is not None and self.legacy.is_file() else []) + \
            sorted(self.path.glob("rows-*.h5"))

    def index(self, refresh: bool = False) -> dict[str, tuple[Path, int]]:
        """{key: (shard, row)}, the first shard holding a key winning."""
        if self._index is None or refresh:
            self._index = {}
            for shard in self.files():
                try:
                    with h5py.File(shard, "r") as f:
                        keys = verified(f, "keys", np.arange(len(f["keys"])), f["keys"][:]) \
                            if f.attrs.get("complete") and self.valid(f) else []
                except (OSError, KeyError, ValueError, Damaged) as e:
                    self.unreadable(shard, e)
                    continue
                for r, k in enumerate(keys):
                    self._index.setdefault(k.decode(), (shard, r))
        return self._index

    def read(self, keys: list[str], rows_of) -> list:
        """`rows_of(open shard, increasing row numbers)` for every shard holding some of `keys`; a shard that
        fails (its checksums, its structure, or `Damaged` rows) is set aside and its keys left unread."""
        by_shard: dict[Path, list[int]] = {}
        index = self.index()
        for k in keys:
            if k in index:
                by_shard.setdefault(index[k][0], []).append(index[k][1])
        out = []
        for shard, rows in by_shard.items():
            try:
                with h5py.File(shard, "r") as f:
                    out.append(rows_of(f, np.unique(np.array(rows, np.int64))))
            except (OSError, KeyError, ValueError, Damaged) as e:
                self.unreadable(shard, e)
        return out

    def unreadable(self, shard: Path, error: Exception) -> None:
        """A shard that failed to read: its keys forgotten, so that its clips are computed again. Damage (a
        CRC, non-finite rows, a file HDF5 cannot parse) sets it aside as `*.damaged`, kept for a look and never
        read again; an error of the system (permission, I/O, a lock) leaves it in place for the next run; one
        already gone (set aside by another process) is not worth a word."""
        if self._index is not None:
            self._index = {k: v for k, v in self._index.items() if v[0] != shard}
        code = os_error_code(error)
        if code == errno.ENOENT:
            return
        if code is not None:
            warn(f"warning: {shard}: cannot read the cache shard ({reason(error)}); its clips are computed again")
            return
        aside = shard.with_name(shard.name + ".damaged")
        try:
            os.replace(shard, aside)
            where = f"set aside as {aside.name}"
        except OSError:
            where = "left in place (it cannot be renamed); delete it"
        warn(f"warning: {shard}: damaged cache shard ({reason(error)}); {where}; its clips are computed again")

    def append(self, keys: list[str], write) -> list[str]:
        """`write(h5file, new_keys)` into a new shard for the `keys` no shard holds (another run may have added
        some since this one read the index); returns the keys written. A failed write (a full disk, no
        permission) leaves no file, warns once and turns appending off: the run goes on without caching."""
        if not self.writable:
            return []
        try:
            with locked(self.path):
                index = self.index(refresh=True)
                new = [k for k in keys if k not in index]
                if not new:
                    return []
                taken = [int(p.name[5:11]) for p in self.path.glob("rows-*")  # set-aside shards' numbers too
                         if p.name[5:11].isdigit()]
                shard = self.path / f"rows-{max(taken, default=-1) + 1:06d}.h5"  # a new name under the lock
                with atomic_h5(shard) as f:
                    put(f, "keys", np.array([k.encode() for k in new]))
                    write(f, new)
        except OSError as e:
            self.writable = False
            warn(f"warning: {self.path}: cannot write the cache: {reason(e)} ({free_space(self.path)} free there); "
                 "going on without caching")
            return []
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

        def rows_of(f, rows):
            names = f["keys"][:]
            got = {}
            for n, ds in f["acts"].items():
                # increasing row numbers: h5py reads these rows only (it cannot select from an empty array:
                # the taps of a split point before the first tapped block are (N, 0))
                a = verified(f, f"acts/{n}", rows, ds[rows] if ds.size else np.zeros((len(rows),) + ds.shape[1:],
                                                                                       ds.dtype))
                got[n] = finite(a.view(ml_bfloat16()) if ds.attrs.get("bfloat16") else a)
            return np.array([want[names[r].decode()] for r in rows], np.int64), got

        found, out = np.zeros(len(keys), bool), None
        for dst, got in self.shards.read(keys, rows_of):
            if out is None:
                out = {n: np.zeros((len(keys),) + a.shape[1:], a.dtype) for n, a in got.items()}
            for n, a in got.items():
                out[n][dst] = a
            found[dst] = True
        return found, out

    def add(self, keys: list[str], acts: dict[str, np.ndarray]) -> None:
        """Write the rows of clips no shard holds yet (another run may have added some since) as a new shard."""
        row = {k: i for i, k in enumerate(keys)}

        def write(f, new):
            take = np.array([row[k] for k in new], np.int64)
            for name, a in acts.items():
                bf16 = a.dtype == ml_bfloat16()
                put(f, f"acts/{name}", a[take].view(np.uint16) if bf16 else a[take])
                f[f"acts/{name}"].attrs["bfloat16"] = bf16

        self.shards.append(keys, write)


def ml_bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
