"""The input pipeline: files -> features -> labelled, split clips -> batches a step eats.

`prepare` resolves the data, extracts features through the cache (process 0 first), applies the bad-file
policy, splits, and appends offline augmentation copies of training clips. Batch plans cover every clip
once, padding the last batch and masking the padding, so every step has one shape.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtl.audio import BadAudio, FeatureConfig, Perturbation
from jaxtl.cache import cached_features, file_key
from jaxtl.data import DEMO, DEMO_HOLDOUT, DataError, discover, fetch_fsdd, split_indices, subset, synthetic
from jaxtl.images import ImageSpec, RaggedFeatures
from jaxtl.sharding import barrier, global_batch, is_main_process, local_rows, prefetch, replicate, to_host


@dataclass(frozen=True)
class DataSpec:
    """What `prepare` needs: where the clips are, how they split, what happens to bad files and copies."""

    features: FeatureConfig
    data: str | None = None
    layout: str = "auto"
    split: str = "stratified"
    val_method: str = "stratified"
    test_size: float = 0.2
    test_group: str | None = None
    holdout_group: str | None = "auto"
    val_size: float = 0.2
    max_clips: int | None = None
    train_clips: int | None = None
    seed: int = 42
    split_seed: int | None = None
    on_bad_file: str = "error"
    augment_copies: int = 0
    pitch_shift: float = 2.0
    time_stretch: float = 0.1
    vtlp: float = 0.0
    cache_dir: str | None = ".jaxtl_cache"
    workers: int | None = None
    progress: bool = True


@dataclass
class Prepared:
    paths: list[str]  # per clip; an augmentation copy repeats its source's path
    keys: list[str]  # per clip: identity of its audio (file, and perturbation for a copy)
    feats: RaggedFeatures
    y: np.ndarray
    classes: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    holdout: np.ndarray  # clips of the held-out group: neither trained nor tested on, reported on their own
    holdout_group: str | None
    skipped: list[BadAudio]
    data_source: str
    n_files: int  # clips [0, n_files) are files; augmentation copies follow
    groups: list[str]  # per file: its group (speaker), "" when the layout names none

    def test_protocol(self) -> str:
        """Whether the test set's speakers (groups) were also trained on: the label every accuracy carries."""
        train, test = {self.groups[i] for i in self.train if i < self.n_files}, {self.groups[i] for i in self.test}
        if not len(self.test):
            return "no test set"
        if not any(self.groups):
            return "groups unknown: speaker-dependence not known"
        if train & test:
            return "speaker-dependent: the test speakers are also in training"
        return "speaker-independent: no test speaker was trained on"

    def clip_groups(self, ids: np.ndarray) -> list[str] | None:
        """The group (speaker) of each clip of `ids`, augmentation copies as their source; None when unknown."""
        if not any(self.groups):
            return None
        of_path = dict(zip(self.paths[:self.n_files], self.groups))
        return [of_path[self.paths[i]] for i in ids]


def resolve_data(data: str | None, cache_dir: str | None, log: Callable = print) -> str:
    """--data, else $JAXTL_DATA, else the demo set in the package (300 FSDD clips), else FSDD (downloaded
    once), else the built-in synthetic set (announced)."""
    if data:
        return data
    if os.environ.get("JAXTL_DATA"):
        return os.environ["JAXTL_DATA"]
    if DEMO.is_dir() and any(DEMO.glob("*.wav")):
        log(f"data: no --data given: the demo set in the package, {DEMO} (300 spoken digits, 5 speakers, "
            "FSDD, CC BY-SA 4.0)")
        return str(DEMO)
    cache = Path(cache_dir or ".jaxtl_cache")
    try:
        return str(fetch_fsdd(cache))
    except DataError as e:
        root = synthetic(cache)
        logging.getLogger("jaxtl").warning(  # a fallback: shown at every --verbose
            f"*** no --data given, no demo set and FSDD cannot be downloaded ({e}); using the built-in SYNTHETIC "
            f"dataset at {root} (4 classes of generated sounds, 24 clips each) ***")
        return str(root)


def usable_features(paths: list[str], fc: FeatureConfig, cache_dir: str | None, workers: int | None,
                    progress: bool, on_bad_file: str, perturb: list[Perturbation | None] | None = None):
    """(features of the usable clips, their indices into `paths`, errors, (cache hits, misses)).

    Process 0 fills the cache first, the others then read it. A bad file stops the run with one line
    naming it (`on_bad_file="error"`), or is left out and returned among the errors (`"skip"`)."""
    if not is_main_process():
        barrier("features")
    feats, errors, counts = cached_features(paths, fc, cache_dir or None, workers, progress and is_main_process(),
                                            perturb)
    if is_main_process():
        barrier("features")
    if errors and on_bad_file == "error":
        raise DataError(f"{errors[0]} (use --on-bad-file skip to go on without it)")
    ok = [i for i, f in enumerate(feats) if f is not None]
    return [feats[i] for i in ok], ok, errors, counts


def augmentation_copies(paths: list[str], copies: int, pitch_shift: float, time_stretch: float, vtlp: float = 0.0
                        ) -> list[tuple[int, Perturbation]]:
    """(source clip, (semitones, tempo rate[, mel warp factor])) of every offline copy; fixed per file, so the
    caches reuse them."""
    out = []
    for i, path in enumerate(paths):
        for j in range(copies):
            rng = np.random.default_rng([j, zlib.crc32(os.path.basename(path).encode())])
            pert = (float(rng.uniform(-pitch_shift, pitch_shift)),
                    float(rng.uniform(1 - time_stretch, 1 + time_stretch)))
            out.append((i, pert + ((float(rng.uniform(1 - vtlp, 1 + vtlp)),) if vtlp else ())))
    return out


def prepare(spec: DataSpec, log: Callable = print) -> Prepared:
    """Files -> features -> labels -> splits (+ augmentation copies of training clips)."""
    source = resolve_data(spec.data, spec.cache_dir, log)
    ds = discover(source, spec.layout)
    classes = list(ds.encoder().classes_)
    y_all = np.searchsorted(classes, ds.labels)
    keep = subset(y_all, spec.max_clips, spec.seed, classes)
    paths = [ds.paths[i] for i in keep]
    bad = list(ds.bad)
    if bad and spec.on_bad_file == "error":
        raise DataError(f"{bad[0]} (use --on-bad-file skip to go on without it)")
    feats, ok, errors, (hits, misses) = usable_features(paths, spec.features, spec.cache_dir, spec.workers,
                                                        spec.progress, spec.on_bad_file)
    log(f"features: {len(paths)} clips ({hits} from cache, {misses} computed) from {source} [{ds.layout}]")
    paths = [paths[i] for i in ok]
    y = y_all[keep][ok]
    groups = [ds.groups[keep[i]] for i in ok]
    given = [ds.splits[keep[i]] for i in ok]
    holdout_group = spec.holdout_group
    if holdout_group == "auto":  # the demo reports a speaker it never heard beside its own test split
        holdout_group = DEMO_HOLDOUT if Path(source).resolve() == DEMO and spec.split == "stratified" else None
    train, val, test, holdout = split_indices(y, groups, given, spec.split, spec.test_size, spec.val_size,
                                              spec.seed, classes, spec.val_method, spec.test_group,
                                              spec.train_clips, spec.split_seed, holdout_group)
    keys = [file_key(p) for p in paths]
    n_files = len(paths)
    if spec.augment_copies:
        copies = augmentation_copies([paths[i] for i in train], spec.augment_copies, spec.pitch_shift,
                                     spec.time_stretch, spec.vtlp)
        sources = [int(train[i]) for i, _ in copies]
        extra, _, _, (hits, _) = usable_features([paths[i] for i in sources], spec.features, spec.cache_dir,
                                                 spec.workers, spec.progress, "error", [p for _, p in copies])
        log(f"augmentation: {len(copies)} pitch/tempo{'/vocal-tract' if spec.vtlp else ''} copies of training clips "
            f"({hits} from cache)")
        train = np.concatenate([train, len(paths) + np.arange(len(copies))])
        keys += [file_key(paths[i], p) for i, (_, p) in zip(sources, copies)]
        paths, feats, y = paths + [paths[i] for i in sources], feats + extra, np.concatenate([y, y[sources]])
    return Prepared(paths, keys, RaggedFeatures.from_list(feats), y, classes, train, val, test, holdout,
                    holdout_group or None, bad + errors, source, n_files, groups)


def batches(n: int, batch_size: int, multiple: int, rng: np.random.Generator | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) batches covering 0..n-1 once; the last is padded to full size and masked."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    size = -(-batch_size // multiple) * multiple
    for start in range(0, n, size):
        idx = order[start:start + size]
        mask = np.zeros(size, np.float32)
        mask[:len(idx)] = 1.0
        yield np.concatenate([idx, np.full(size - len(idx), idx[0])]), mask


def even_batch_size(n: int, largest: int, multiple: int) -> int:
    """The batch size that covers n rows in as few batches as `largest` allows with the least padding:
    100 clips at 64 are two batches of 50, not 64 + 36 padded to 64 (a fifth of the work wasted)."""
    n_batches = -(-n // largest)
    rows = -(-n // n_batches)
    return -(-rows // multiple) * multiple


def map_batches(fn: Callable, n: int, batch_size: int, mesh, rows_of: Callable, progress=None) -> dict:
    """`fn` (jitted; a dict of per-row outputs) over rows 0..n-1 in masked global batches built on a host
    thread; each process feeds its share of every batch (`rows_of(ids)`) and receives every row.
    Returns {name: (n, ...) array}."""
    import jax

    host = ((idx, mask, rows_of(local_rows(mesh, idx)[0])) for idx, mask in batches(n, batch_size, mesh.size))
    out: dict[str, np.ndarray] = {}
    for idx, mask, x in prefetch(host):
        result = jax.tree.map(to_host, fn(global_batch(mesh, x)))
        real = mask > 0
        for name, a in result.items():
            if name not in out:
                out[name] = np.zeros((n,) + a.shape[1:], a.dtype)
            out[name][idx[real]] = a[real]
        if progress is not None:
            progress(int(real.sum()))
    return out


def take(acts: dict, ids: np.ndarray) -> dict:
    return {name: a[ids] for name, a in acts.items()}


class StepFeed:
    """What a stage's step eats for given clips: the cached split-point activations (`{"h", "taps"}`) when
    the stage has them, else images built from the clips' features."""

    def __init__(self, prep: Prepared, images: ImageSpec, acts: dict | None):
        self.prep, self.images, self.acts = prep, images, acts
        self._device = None

    def on_device(self, mesh) -> dict:
        """The cached activations and labels of every clip, replicated on the devices (moved once)."""
        if self._device is None:
            self._device = replicate(mesh, {"x": self.acts, "y": self.prep.y.astype(np.int32)})
        return self._device

    def __call__(self, clip_ids: np.ndarray):
        if self.acts is not None:
            return take(self.acts, clip_ids)
        return self.images.batch(self.prep.feats, clip_ids)
