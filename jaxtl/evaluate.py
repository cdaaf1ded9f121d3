"""Evaluate a run's checkpoint: accuracy, per-class precision/recall/F1, confusion matrix.

    python -m jaxtl.evaluate RUN_DIR [--data DIR] [--json]

Without --data it evaluates the run's own test set, as recorded in RUN/split.json when it trained.
With --data it evaluates every clip of that folder; labels the run does not know are an error, classes
of the run the folder lacks are listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from jaxtl.cache import file_key
from jaxtl.checkpoint import CheckpointError
from jaxtl.config import ConfigError
from jaxtl.data import DataError, discover
from jaxtl.images import RaggedFeatures
from jaxtl.pipeline import usable_features
from jaxtl.restore import RestoredRun, predict_logits, restore_run
from jaxtl.rundir import recorded_test_clips


def labelled_clips(restored: RestoredRun, run_dir: Path, data: str | None, on_bad_file: str = "error"):
    """(features, integer labels, skipped, clip keys) of the clips to evaluate, labels in the run's order:
    the run's recorded test set, or every clip of `data`."""
    cfg = restored.cfg
    if data is None:
        paths, labels = recorded_test_clips(run_dir)
        on_bad_file = "error"  # the recorded test set is evaluated whole or not at all
    else:
        ds = discover(data, "auto")
        unknown = sorted(set(ds.labels) - set(restored.classes))
        if unknown:
            raise DataError(f"{data}: label {unknown[0]!r} is not one the run was trained on ({restored.classes})")
        paths, labels = ds.paths, ds.labels
    feats, ok, errors, _ = usable_features(paths, cfg.features(), cfg.cache_dir or None, cfg.workers, cfg.progress,
                                           on_bad_file)
    y = np.searchsorted(restored.classes, [labels[i] for i in ok])
    return RaggedFeatures.from_list(feats), y, errors, [file_key(paths[i]) for i in ok]


def save_confusion_png(cm: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(run_dir: str, data: str | None = None, which: str = "best", on_bad_file: str = "error") -> dict:
    restored = restore_run(run_dir, which)
    feats, y, skipped, keys = labelled_clips(restored, Path(run_dir), data, on_bad_file)
    pred = predict_logits(restored, feats, keys=keys).argmax(-1)
    classes = restored.classes
    present = sorted(set(y.tolist()))
    names = [classes[i] for i in present]
    report = classification_report(y, pred, labels=present, target_names=names, output_dict=True, zero_division=0)
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    png = Path(run_dir) / "confusion_matrix.png"
    save_confusion_png(cm, classes, png)
    return {"accuracy": float(np.mean(pred == y)), "n": int(len(y)), "classes": classes,
            "per_class": {c: report[c] for c in names},
            "missing_classes": [c for i, c in enumerate(classes) if i not in present],
            "confusion_matrix": cm.tolist(), "predictions": pred.tolist(), "confusion_png": str(png),
            "skipped": [str(e) for e in skipped]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtl.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", help="labelled dataset to evaluate on (default: the run's test split)")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    parser.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.run_dir, args.data, args.checkpoint, args.on_bad_file)
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
    print(f"saved {result['confusion_png']}")
    for s in result["skipped"]:
        print(f"skipped {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
