"""Evaluate a run's checkpoint: accuracy, per-class precision/recall/F1, confusion matrix, the run report.

    jaxtl evaluate RUN_DIR [--data DIR] [--side test|holdout] [--json]

Without --data it evaluates the run's own test set (or its held-out speaker, `--side holdout`), as
recorded in RUN/split.json when it trained. With --data it evaluates every clip of that folder; labels
the run does not know are an error, classes of the run the folder lacks are listed. The result goes to
RUN/evaluation.json and into RUN/report.md and report.html.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from jaxtl.cache import file_key
from jaxtl.checkpoint import CheckpointError
from jaxtl.command import command
from jaxtl.config import ConfigError
from jaxtl.data import DataError, discover
from jaxtl.disk import DiskError, write_text
from jaxtl.images import RaggedFeatures
from jaxtl.pipeline import usable_features
from jaxtl.report import EVALUATION, save_confusion_png, scores, write_report
from jaxtl.restore import RestoredRun, predict_logits, restore_run
from jaxtl.rundir import recorded_test_clips


def labelled_clips(restored: RestoredRun, run_dir: Path, data: str | None, on_bad_file: str = "error",
                   side: str = "test", progress: bool = True):
    """(features, integer labels, skipped, clip keys) of the clips to evaluate, labels in the run's order:
    the run's recorded test set (or held-out group), or every clip of `data`."""
    cfg = restored.cfg
    if data is None:
        paths, labels = recorded_test_clips(run_dir, side)
        on_bad_file = "error"  # the recorded test set is evaluated whole or not at all
    else:
        ds = discover(data, "auto")
        unknown = sorted(set(ds.labels) - set(restored.classes))
        if unknown:
            raise DataError(f"{data}: label {unknown[0]!r} is not one the run was trained on ({restored.classes})")
        paths, labels = ds.paths, ds.labels
    feats, ok, errors = usable_features(paths, cfg.features(), cfg.cache_dir or None, cfg.workers, progress,
                                           on_bad_file)
    y = np.searchsorted(restored.classes, [labels[i] for i in ok])
    return RaggedFeatures.from_list(feats), y, errors, [file_key(paths[i]) for i in ok]


def evaluate(run_dir: str, data: str | None = None, which: str = "best", on_bad_file: str = "error",
             side: str = "test", progress: bool = True, restored: RestoredRun | None = None) -> dict:
    """Scores of the run's `which` checkpoint on its recorded `side`, or on every clip of `data`; written to
    RUN/evaluation.json and the run report."""
    restored = restored or restore_run(run_dir, which)
    feats, y, skipped, keys = labelled_clips(restored, Path(run_dir), data, on_bad_file, side, progress)
    pred = predict_logits(restored, feats, keys=keys, progress=progress).argmax(-1)
    classes = restored.classes
    png = Path(run_dir).absolute() / "confusion_matrix.png"
    what = f"every clip of {data}" if data else f"the run's recorded {side} set"
    result = {**scores(y, pred, classes), "classes": classes, "what": what, "checkpoint": which,
              "predictions": pred.tolist(), "confusion_png": str(png), "skipped": [str(e) for e in skipped]}
    try:  # a run directory that cannot be written (trained elsewhere, read-only) still gets its scores
        save_confusion_png(result["confusion_matrix"], classes, png, f"evaluate: {what}")
        write_text(Path(run_dir) / EVALUATION, json.dumps(result))
        write_report(run_dir)
    except DiskError as e:
        logging.getLogger("jaxtl").warning(f"warning: {run_dir}: scores not saved into the run directory ({e})")
    return result


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxtl evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", help="labelled dataset to evaluate on (default: the run's test split)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    parser.add_argument("--side", choices=("test", "holdout"), default="test",
                        help="without --data: the recorded test set, or the held-out speaker (group)")
    parser.add_argument("--verbose", type=int, choices=(0, 1), default=1, help="0: no progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.run_dir, args.data, args.checkpoint, args.on_bad_file, args.side, args.verbose >= 1)
    except (CheckpointError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    classes = result["classes"]
    print(f"accuracy {result['accuracy']:.4f} on {result['n']} clips")
    if result["missing_classes"]:
        print(f"the data holds no clip of {len(result['missing_classes'])} of the run's classes: "
              + ", ".join(result["missing_classes"]))
    print(f"{'class':>12s} {'precision':>9s} {'recall':>9s} {'f1':>9s} {'support':>8s}")
    for c, r in result["per_class"].items():
        print(f"{c:>12s} {r['precision']:9.3f} {r['recall']:9.3f} {r['f1-score']:9.3f} {int(r['support']):8d}")
    print("confusion matrix (rows: true, columns: predicted):")
    width = max(len(c) for c in classes) + 1
    print(" " * width + "".join(f"{c:>{width}s}" for c in classes))
    for c, row in zip(classes, result["confusion_matrix"]):
        print(f"{c:>{width}s}" + "".join(f"{v:>{width}d}" for v in row))
    print(f"saved {result['confusion_png']} and {Path(args.run_dir) / 'report.md'}")
    for s in result["skipped"]:
        print(f"skipped {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
