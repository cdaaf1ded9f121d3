"""The input pipeline's first half: files -> labelled, split clips, each owned by one device -> features.

`prepare` resolves the data, splits it, appends offline augmentation copies of training clips and gives
every clip an owner: a mesh position (device), round-robin within each split, so each process holds a
fixed, balanced share. Features are not extracted here: `ClipFeatures` gives them on demand through the
feature cache, a chunk at a time, so the frozen-prefix pass can start on the first chunk and memory stays
bounded by a chunk (`jaxtl.prefix`). Bad files found on the way are settled after extraction
(`settle_bad_files`): one line that stops the run, or the clips dropped from their splits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtl.audio import BadAudio, FeatureConfig, Perturbation
from jaxtl.cache import FeatureCache, cached_features, file_key
from jaxtl.data import DEMO, DEMO_HOLDOUT, DataError, discover, fetch_fsdd, split_indices, subset, synthetic
from jaxtl.images import RaggedFeatures


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


@dataclass
class Prepared:
    paths: list[str]  # per clip; an augmentation copy repeats its source's path
    keys: list[str | None]  # per clip this process owns: identity of its audio (None: unreadable; "" not owned)
    features: ClipFeatures  # features of any clip, on demand, through the cache
    owner: np.ndarray  # per clip: the mesh position (device) that holds it; -1 for clips of no split
    own: np.ndarray  # the clips this process's devices own, increasing
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
                    progress: bool, on_bad_file: str):
    """(features of the usable clips, their indices into `paths`, errors), all at once (evaluate, predict):
    a bad file stops with one line naming it (`on_bad_file="error"`), or is left out and returned among the
    errors (`"skip"`)."""
    feats, errors, _ = cached_features(paths, fc, FeatureCache(cache_dir, fc) if cache_dir else None, workers,
                                       progress)
    if errors and on_bad_file == "error":
        raise DataError(f"{errors[0]} (use --on-bad-file skip to go on without it)")
    ok = [i for i, f in enumerate(feats) if f is not None]
    return [feats[i] for i in ok], ok, errors


class ClipFeatures:
    """Features of clips by id, extracted on demand through the feature cache (one index read per run)."""

    def __init__(self, paths: list[str], perturbations: list[Perturbation | None], fc: FeatureConfig,
                 cache_dir: str | None, workers: int | None):
        self.paths, self.perturbations, self.fc, self.workers = paths, perturbations, fc, workers
        self.cache = FeatureCache(cache_dir, fc) if cache_dir else None
        self.counts = [0, 0]  # clips read from the cache, clips extracted

    def __call__(self, ids: np.ndarray) -> tuple[RaggedFeatures, np.ndarray, list[BadAudio]]:
        """(features of clips `ids`, a one-frame placeholder where a clip is bad; which are good; errors)."""
        feats, errors, (hits, misses) = cached_features([self.paths[i] for i in ids], self.fc, self.cache,
                                                        self.workers, False, [self.perturbations[i] for i in ids])
        self.counts[0] += hits
        self.counts[1] += misses
        good = np.array([f is not None for f in feats], bool)
        shape = next((f.shape[:-1] for f in feats if f is not None), (1,))
        return RaggedFeatures.from_list([f if f is not None else np.zeros(shape + (1,), np.float32)
                                         for f in feats]), good, errors

    def describe(self) -> str:
        return f"{sum(self.counts)} clips ({self.counts[0]} from cache, {self.counts[1]} computed)"


def load_features(features: ClipFeatures, ids: np.ndarray, chunk: int, progress: bool = False
                  ) -> tuple[RaggedFeatures, np.ndarray, list[BadAudio]]:
    """`features(ids)` a chunk at a time (what a run that builds images in its steps keeps in memory)."""
    from tqdm.auto import tqdm

    parts, good, errors = [], [], []
    step = max(chunk, 1) if chunk else max(len(ids), 1)
    with tqdm(total=len(ids), desc="features", unit="clip", disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), step):
            f, g, e = features(ids[start:start + step])
            parts += [f.clip(i) for i in range(len(f))]
            good.append(g)
            errors += e
            bar.update(len(g))
    return RaggedFeatures.from_list(parts), np.concatenate(good) if good else np.zeros(0, bool), errors


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


def prepare(spec: DataSpec, positions: int = 1, mine: tuple[int, ...] = (0,), log: Callable = print) -> Prepared:
    """Files -> labels -> splits (+ augmentation copies of training clips) -> each clip's owner among
    `positions` mesh positions; `mine` are this process's. No feature is extracted here."""
    source = resolve_data(spec.data, spec.cache_dir, log)
    ds = discover(source, spec.layout)
    classes = list(ds.encoder().classes_)
    y_all = np.searchsorted(classes, ds.labels)
    keep = subset(y_all, spec.max_clips, spec.seed, classes)
    paths = [ds.paths[i] for i in keep]
    bad = list(ds.bad)
    if bad and spec.on_bad_file == "error":
        raise DataError(f"{bad[0]} (use --on-bad-file skip to go on without it)")
    y = y_all[keep]
    groups = [ds.groups[i] for i in keep]
    given = [ds.splits[i] for i in keep]
    holdout_group = spec.holdout_group
    if holdout_group == "auto":  # the demo reports a speaker it never heard beside its own test split
        holdout_group = DEMO_HOLDOUT if Path(source).resolve() == DEMO and spec.split == "stratified" else None
    train, val, test, holdout = split_indices(y, groups, given, spec.split, spec.test_size, spec.val_size,
                                              spec.seed, classes, spec.val_method, spec.test_group,
                                              spec.train_clips, spec.split_seed, holdout_group)
    n_files = len(paths)
    perturbations: list[Perturbation | None] = [None] * n_files
    if spec.augment_copies:
        copies = augmentation_copies([paths[i] for i in train], spec.augment_copies, spec.pitch_shift,
                                     spec.time_stretch, spec.vtlp)
        sources = [int(train[i]) for i, _ in copies]
        log(f"augmentation: {len(copies)} pitch/tempo{'/vocal-tract' if spec.vtlp else ''} copies of training clips")
        train = np.concatenate([train, n_files + np.arange(len(copies))])
        perturbations += [p for _, p in copies]
        paths, y = paths + [paths[i] for i in sources], np.concatenate([y, y[sources]])
    owner = np.full(len(paths), -1, np.int64)
    for ids in (train, val, test, holdout):  # round-robin within each split: balanced shares of every split
        owner[ids] = np.arange(len(ids)) % positions
    own = np.flatnonzero(np.isin(owner, mine))
    keys: list[str | None] = [""] * len(paths)
    for i in own:
        try:
            keys[i] = file_key(paths[i], perturbations[i])
        except OSError:
            keys[i] = None  # unreadable: found bad when its features are asked for
    return Prepared(paths, keys, ClipFeatures(paths, perturbations, spec.features, spec.cache_dir, spec.workers),
                    owner, own, y, classes, train, val, test, holdout, holdout_group or None, bad, source, n_files,
                    groups)


def settle_bad_files(prep: Prepared, bad: np.ndarray, errors: list[BadAudio], on_bad_file: str) -> Prepared:
    """The run's clips without the bad ones (`bad`: every process's bad clip ids, `errors` naming them), or
    one line that stops the run (`on_bad_file="error"`)."""
    if not len(bad):
        return prep
    if on_bad_file == "error":
        raise DataError(f"{errors[0]} (use --on-bad-file skip to go on without it)")
    keep = [ids[~np.isin(ids, bad)] for ids in (prep.train, prep.val, prep.test, prep.holdout)]  # order kept
    named = {e.path: e for e in prep.skipped}
    for e in errors:  # an augmentation copy fails as its file does: named once
        named.setdefault(e.path, e)
    return dataclasses.replace(prep, train=keep[0], val=keep[1], test=keep[2], holdout=keep[3],
                               skipped=list(named.values()))
