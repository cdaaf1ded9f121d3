"""The run directory: what a run writes for people and for the tools that come after it.

    RUN/config.json     every setting (what --resume and restore rebuild the run from)
    RUN/split.json      every file's path, label and side, with size and mtime (evaluate's test set)
    RUN/metrics.jsonl   one row per epoch
    RUN/summary.json    test accuracy, timings, what was used
    RUN/curves.png      loss and accuracy per epoch
    RUN/skipped.tsv     files left out by --on-bad-file skip, with the reason
    RUN/checkpoints/    see jaxtl.checkpoint

Every file is written to a temporary name and renamed into place (`jaxtl.disk`), so a killed run, or one
that found the disk full, leaves whole files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jaxtl.audio import BadAudio
from jaxtl.data import DataError
from jaxtl.disk import replaced, write_text
from jaxtl.pipeline import Prepared

SPLIT_RECORD = "split.json"


class RunDirError(Exception):
    """A run directory that cannot be used as asked; one line saying what to do."""


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def new_run_dir(out: str | None, recipe: str, resume: bool, several_processes: bool) -> Path:
    """The run's directory: `out`, or a new runs/RECIPE-YYYYmmdd-HHMMSS; refuses to overwrite a run."""
    if out is None:
        if several_processes:
            raise RunDirError("several processes need one run directory: give --out")
        out = f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(out)
    if (path / "checkpoints").exists() and not resume:
        raise RunDirError(f"{path} already holds a run: pass --resume to continue it or choose another --out")
    if resume and not (path / "config.json").is_file():
        raise RunDirError(f"--resume: {path} holds no run (no config.json)")
    return path


def split_record(prep: Prepared) -> dict:
    """Every file's path, label and side (train, val, test, holdout), with its size and mtime to notice a file
    changed since: `evaluate RUN` uses exactly this test set, whatever the data folder holds later."""
    sides = (("train", prep.train), ("val", prep.val), ("test", prep.test), ("holdout", prep.holdout))
    side = {int(i): name for name, ids in sides for i in ids if i < prep.n_files}
    clips = []
    for i, name in sorted(side.items()):
        st = os.stat(prep.paths[i])
        clips.append({"path": os.path.abspath(prep.paths[i]), "label": prep.classes[prep.y[i]], "side": name,
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"data": prep.data_source, "classes": prep.classes, "holdout_group": prep.holdout_group, "clips": clips}


def read_split_record(run_dir: Path) -> dict:
    path = Path(run_dir) / SPLIT_RECORD
    if not path.is_file():
        raise DataError(f"{run_dir}: no {SPLIT_RECORD} (a run of an older jaxtl): evaluate it with --data DIR")
    return json.loads(path.read_text())


def check_same_split(record: dict, run_dir: Path) -> None:
    """A resumed run must train on the clips it started with."""
    fields = ("path", "side", "label", "size", "mtime_ns")
    recorded = {tuple(c[f] for f in fields) for c in read_split_record(run_dir)["clips"]}
    now = {tuple(c[f] for f in fields) for c in record["clips"]}
    if now != recorded:
        changed = sorted(now ^ recorded)[0][0]
        raise DataError(f"--resume: the data changed since the run started ({changed} is new, gone, moved to "
                        f"another side or rewritten, against {Path(run_dir) / SPLIT_RECORD}); resume with the data "
                        "as it was, or start a new run")


def recorded_test_clips(run_dir: Path, side: str = "test") -> tuple[list[str], list[str]]:
    """(paths, labels) of the run's own test set (or held-out group); a file changed or gone since training is
    an error, never a silently different test set."""
    where = Path(run_dir) / SPLIT_RECORD
    clips = [c for c in read_split_record(run_dir)["clips"] if c["side"] == side]
    if not clips:
        raise DataError(f"{where}: the run has no {side} clips" + (" (it held out no group: train with "
                        "--holdout-group)" if side == "holdout" else ""))
    for c in clips:
        try:
            st = os.stat(c["path"])
        except OSError:
            raise DataError(f"{c['path']}: a test clip of {where} is missing; evaluate with --data DIR to use "
                            "the files as they are now") from None
        if (st.st_size, st.st_mtime_ns) != (c["size"], c["mtime_ns"]):
            raise DataError(f"{c['path']}: changed since training (size or mtime differ from {where}); "
                            "evaluate with --data DIR to use the files as they are now")
    return [c["path"] for c in clips], [c["label"] for c in clips]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def write_skipped(run_dir: Path, skipped: list[BadAudio]) -> None:
    write_text(Path(run_dir) / "skipped.tsv", "".join(f"{e.path}\t{e.reason}\n" for e in skipped))


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history) + 1))  # counted across stages
    last = history[-1]["stage"]
    kept = [i for i, h in zip(epochs, history) if h["stage"] == last and h.get("improved")][-1:]
    starts = [i for i, h in zip(epochs, history) if i > 1 and h["stage"] != history[i - 2]["stage"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, name, ax in (("loss", "loss", axes[0]), ("acc", "accuracy", axes[1])):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        if any(h.get(f"val_{key}") is not None for h in history):
            ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation")
        for x in kept:
            ax.axvline(x, color="green", ls="--", lw=1, label=f"kept model (epoch {x})")
        for x in starts:
            ax.axvline(x - 0.5, color="gray", ls=":", lw=1, label="next stage")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
