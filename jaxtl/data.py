"""Datasets: discovery of files and labels, label encoding, splits, and the built-in synthetic set.

Layouts (detected, or forced with `layout=`):
- `folders`: one subfolder per class, `root/<label>/*.wav|flac|ogg|mp3`;
- `fsdd`: file names `{label}_{speaker}_{index}.wav` (Free Spoken Digit Dataset); speaker is the group;
- `csv`: a manifest `path,label[,split][,group]` (a header row is optional; paths relative to it).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from sklearn.preprocessing import LabelEncoder

from jaxtl.audio import AUDIO_EXTENSIONS, BadAudio

LAYOUTS = ("auto", "folders", "fsdd", "csv")
SPLITS = ("stratified", "group", "fsdd", "manifest")
FSDD_NAME = re.compile(r"^(?P<label>[^_]+)_(?P<group>[^_]+)_(?P<index>\d+)\.wav$", re.IGNORECASE)
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip"
# Real speech in the box: 300 FSDD clips (CC BY-SA 4.0, jaxtl/demo/ATTRIBUTION.md), 6 per digit and speaker.
DEMO = Path(__file__).resolve().parent / "demo" / "fsdd"
DEMO_HOLDOUT = "yweweler"  # the demo's held-out speaker: the last name in order, chosen before any result


class DataError(Exception):
    """A dataset that cannot be used as given; the message is one line naming the path and the reason."""


@dataclass
class Dataset:
    paths: list[str]
    labels: list[str]
    groups: list[str]
    splits: list[str]  # "train" / "test" / "" as given by the layout (fsdd index, manifest column)
    layout: str
    bad: list[BadAudio] = field(default_factory=list)  # files found but unusable (unsupported extension)

    def encoder(self) -> LabelEncoder:
        return LabelEncoder().fit(self.labels)


def _is_audio(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def _visible(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    if root.is_file():
        return "csv"
    if (root / "manifest.csv").is_file():
        return "csv"
    entries = _visible(root)
    if any(p.is_file() and _is_audio(p.name) for p in entries):
        return "fsdd"
    if any(p.is_dir() for p in entries):
        return "folders"
    raise DataError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no class folders found")


def discover(root: str | os.PathLike, layout: str = "auto") -> Dataset:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    if layout == "auto":
        layout = detect_layout(root)
        dirs = [p for p in _visible(root) if p.is_dir()] if root.is_dir() else []
        if layout == "folders" and len(dirs) == 1:  # e.g. fsdd/recordings: look inside
            return discover(dirs[0], "auto")
    ds = {"folders": _folders, "fsdd": _fsdd, "csv": _manifest}[layout](root)
    if not ds.paths:
        raise DataError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found ({layout} layout)")
    return ds


def _folders(root: Path) -> Dataset:
    paths, labels, bad = [], [], []
    for d in (p for p in _visible(root) if p.is_dir()):
        for f in (p for p in sorted(d.rglob("*")) if p.is_file() and not p.name.startswith(".")):
            if _is_audio(f.name):
                paths.append(str(f))
                labels.append(d.name)
            else:
                bad.append(BadAudio(str(f), f"unsupported extension {f.suffix or '(none)'}"))
    return Dataset(paths, labels, [""] * len(paths), [""] * len(paths), "folders", bad)


def _fsdd(root: Path) -> Dataset:
    paths, labels, groups, splits, bad = [], [], [], [], []
    for f in (p for p in _visible(root) if p.is_file()):
        m = FSDD_NAME.match(f.name)
        if m:
            paths.append(str(f))
            labels.append(m["label"])
            groups.append(m["group"])
            splits.append("test" if int(m["index"]) < 5 else "train")
        elif _is_audio(f.name):
            raise DataError(f"{f}: name does not follow {{label}}_{{speaker}}_{{index}}.wav; "
                            "use class folders or a CSV manifest")
        else:
            bad.append(BadAudio(str(f), f"unsupported extension {f.suffix or '(none)'}"))
    return Dataset(paths, labels, groups, splits, "fsdd", bad)


def _manifest(root: Path) -> Dataset:
    manifest = root if root.is_file() else root / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    paths, labels, groups, splits = [], [], [], []
    for line, row in enumerate(rows, 1):
        if len(row) < 2:
            raise DataError(f"{manifest}: row {line} needs at least path,label, got {row}")
        path = Path(row[0].strip())
        paths.append(str(path if path.is_absolute() else manifest.parent / path))
        labels.append(row[1].strip())
        split = row[2].strip().lower() if len(row) > 2 else ""
        if split not in ("", "train", "test"):
            raise DataError(f"{manifest}: row {line} has split {split!r}; use train, test or leave it empty")
        splits.append(split)
        groups.append(row[3].strip() if len(row) > 3 else "")
    return Dataset(paths, labels, groups, splits, "csv")


def check_stratifiable(y: np.ndarray, classes, what: str, need: int = 2) -> None:
    counts = np.bincount(y, minlength=len(classes))
    for c, n in zip(classes, counts):
        if n < need:
            raise DataError(f"class {c!r} has {n} clip(s) in the {what}; a stratified split needs at least "
                            f"{need}: add clips, drop the class, or use a smaller --max-clips cut")


def _stratified(idx: np.ndarray, y: np.ndarray, seed: int, what: str, **size) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's stratified split, its refusals (too few clips for the classes) as one line saying what to change."""
    try:
        return tuple(train_test_split(idx, stratify=y, random_state=seed, **size))
    except ValueError as e:
        n_classes = len(np.unique(y))
        raise DataError(f"cannot split {len(idx)} clips of {n_classes} classes into {what} with every class on "
                        f"both sides ({e}); add clips, or change --test-size / --val-size / --max-clips") from None


def subset(y: np.ndarray, max_clips: int | None, seed: int, classes) -> np.ndarray:
    """Indices of a stratified subset of `max_clips` clips (all when None or larger)."""
    idx = np.arange(len(y))
    if max_clips is None or max_clips >= len(y):
        return idx
    if max_clips < len(classes):
        raise DataError(f"--max-clips {max_clips} is below the number of classes ({len(classes)})")
    check_stratifiable(y, classes, "dataset")
    kept, _ = _stratified(idx, y, seed, f"a subset of {max_clips}", train_size=max_clips)
    return np.sort(kept)


def test_split(y: np.ndarray, groups: list[str], given: list[str], method: str, test_size: float, seed: int,
               classes, test_group: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays into y.

    `method="group"` holds out `test_group` (e.g. one speaker), or a random `test_size` of the groups.
    """
    idx = np.arange(len(y))
    groups = np.asarray(groups)
    if method == "stratified":
        check_stratifiable(y, classes, "dataset")
        return _stratified(idx, y, seed, f"train and a {test_size:g} test split", test_size=test_size)
    if method == "group":
        if len(set(groups)) < 2:
            raise DataError("group split needs at least 2 groups (speakers); this dataset has "
                            f"{len(set(groups))}: use --split stratified")
        if test_group is not None:
            if test_group not in set(groups):
                raise DataError(f"--test-group {test_group!r} is not a group of this dataset "
                                f"({sorted(set(groups))})")
            return idx[groups != test_group], idx[groups == test_group]
        gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        return next(gss.split(idx, y, groups))
    if method in ("fsdd", "manifest"):
        given = np.asarray(given)
        if not (given == "test").any():
            raise DataError(f"--split {method}: the dataset marks no clip as test")
        return idx[given != "test"], idx[given == "test"]
    raise DataError(f"unknown split {method!r}: use one of {SPLITS}")


def validation_split(y: np.ndarray, train: np.ndarray, val_size: float, seed: int, classes,
                     method: str = "stratified", groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) subsets of `train`; `method="tail"` takes its last `val_size`, as Keras' `validation_split`.

    With `groups` (a `--split group` run) validation holds out whole groups of the training part, so early
    stopping watches speakers the model was not fitted on, as the test set does."""
    if val_size <= 0:
        return train, train[:0]
    if groups is not None:
        train_groups = np.asarray(groups)[train]
        if len(set(train_groups)) < 2:
            raise DataError(f"grouped validation needs at least 2 groups in the training part; it has "
                            f"{len(set(train_groups))}: use --val-size 0 or more groups")
        gss = GroupShuffleSplit(n_splits=1, test_size=val_size, random_state=seed)
        fit, val = next(gss.split(train, y[train], train_groups))
        return train[fit], train[val]
    if method == "tail":
        n_val = int(round(len(train) * val_size))
        return train[:len(train) - n_val], train[len(train) - n_val:]
    check_stratifiable(y[train], classes, "training split")
    return _stratified(train, y[train], seed, f"fit and a {val_size:g} validation split", test_size=val_size)


def held_out(groups: list[str], holdout_group: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(the rest, the clips of `holdout_group`): a group kept out of training and test entirely."""
    groups = np.asarray(groups)
    if not holdout_group:
        return np.arange(len(groups)), np.arange(0)
    if holdout_group not in set(groups.tolist()):
        raise DataError(f"--holdout-group {holdout_group!r} is not a group of this dataset "
                        f"({sorted(set(groups.tolist()))})")
    return np.flatnonzero(groups != holdout_group), np.flatnonzero(groups == holdout_group)


def split_indices(y: np.ndarray, groups: list[str], given: list[str], method: str, test_size: float,
                  val_size: float, seed: int, classes, val_method: str = "stratified", test_group: str | None = None,
                  train_clips: int | None = None, split_seed: int | None = None, holdout_group: str | None = None):
    """(fit, val, test, holdout) index arrays into y: the clips of `holdout_group` set aside, then on the rest
    `test_split` (seeded by `split_seed`, default `seed`), an optional stratified cut of the training part to
    `train_clips`, then `validation_split` of it (grouped when the test split is)."""
    rest, holdout = held_out(groups, holdout_group)
    fit, val, test = _split_rest(y[rest], [groups[i] for i in rest], [given[i] for i in rest], method, test_size,
                                 val_size, seed, classes, val_method, test_group, train_clips, split_seed)
    return rest[fit], rest[val], rest[test], holdout


def _split_rest(y, groups, given, method, test_size, val_size, seed, classes, val_method, test_group, train_clips,
                split_seed):
    train, test = test_split(y, groups, given, method, test_size, seed if split_seed is None else split_seed,
                             classes, test_group)
    if train_clips is not None:
        train = train[subset(y[train], train_clips, seed, classes)]
    fit, val = validation_split(y, train, val_size, seed, classes, val_method, groups if method == "group" else None)
    return fit, val, test


def synthetic(directory: str | os.PathLike, clips_per_class: int = 24, sample_rate: int = 16000,
              seed: int = 0) -> Path:
    """Write a small built-in dataset of procedurally generated sounds (4 classes), once; returns its root."""
    import soundfile as sf

    root = Path(directory) / f"synthetic-{clips_per_class}-{sample_rate}-{seed}"
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory))
    for label in ("tone", "chirp", "noise", "clicks"):
        (tmp / label).mkdir()
        for i in range(clips_per_class):
            n = int(sample_rate * rng.uniform(0.4, 1.0))
            t = np.arange(n) / sample_rate
            f0 = rng.uniform(200, 1200)
            if label == "tone":
                y = np.sin(2 * np.pi * f0 * t)
            elif label == "chirp":
                y = np.sin(2 * np.pi * (f0 * t + rng.uniform(800, 2000) * t**2))
            elif label == "noise":
                y = rng.standard_normal(n) * 0.5
            else:
                y = np.zeros(n)
                y[:: int(sample_rate / rng.uniform(8, 30))] = 1.0
            y = y * np.hanning(n) * rng.uniform(0.3, 0.9) + rng.standard_normal(n) * 0.01
            sf.write(tmp / label / f"{label}_{i:03d}.wav", y.astype(np.float32), sample_rate)
    (tmp / ".complete").touch()
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def fetch_fsdd(directory: str | os.PathLike, url: str = FSDD_URL, timeout: float = 20.0) -> Path:
    """Download FSDD's recordings once into `directory`; raises DataError when offline."""
    root = Path(directory) / "fsdd" / "recordings"
    if root.is_dir() and any(root.glob("*.wav")):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile() as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
            tmp.seek(0)
            staging = Path(tempfile.mkdtemp(dir=root.parent))
            with zipfile.ZipFile(tmp) as z:
                for member in z.namelist():
                    if "/recordings/" in member and member.endswith(".wav"):
                        (staging / Path(member).name).write_bytes(z.read(member))
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot download FSDD from {url} ({getattr(e, 'reason', e)})") from None
    os.replace(staging, root)
    return root
