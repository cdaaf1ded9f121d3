"""The seed's whole job, end to end on the same clips: jaxtl against the Keras recipe.

    python benchmarks/end_to_end.py [--clips 100] [--epochs 10] [--modes frozen,finetune]

Both sides: N FSDD clips, stratified 80/20 test split (random_state 42), Keras-style validation_split 0.2
(the tail of the training part), batch 32, all epochs (no early stopping, so both do the same work),
224x224 images. The Keras side runs in the peers' interpreter (`.venv-peers`, TensorFlow backend) and is
timed twice: as `model.fit` runs it, and as pure compute (a `train_on_batch` loop plus the same
validation passes). Both include their audio->image work (the seed's per-file librosa loop for Keras).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline import seed_loop  # noqa: E402

from common import FSDD, machine, write_results  # noqa: E402
from jaxtl.config import TrainConfig  # noqa: E402
from jaxtl.data import discover, subset  # noqa: E402
from jaxtl.train import run  # noqa: E402

PEER = Path(__file__).parent / "peers" / "keras_end_to_end.py"


def job_clips(n: int) -> tuple[list[str], list[str], np.ndarray]:
    """The N FSDD clips both sides train on (stratified, random_state 42): paths, labels, label ids."""
    ds = discover(FSDD)
    classes = sorted(set(ds.labels))
    y_all = np.searchsorted(classes, ds.labels)
    keep = subset(y_all, n, 42, classes)
    return [ds.paths[i] for i in keep], [ds.labels[i] for i in keep], y_all[keep]


def jaxtl_job(tmp: Path, paths: list[str], labels: list[str], mode: str, epochs: int = 10,
              size: int = 224) -> TrainConfig:
    """jaxtl doing the seed's job from the wav files, with fresh feature and prefix caches in `tmp`."""
    manifest = tmp / "clips.csv"
    manifest.write_text("".join(f"{p},{label}\n" for p, label in zip(paths, labels)))
    return TrainConfig(data=str(manifest), mode=mode, epochs=epochs, patience=0, plateau_patience=0,
                         val_method="tail", image_size=size, weights="random", seed=42, out=str(tmp / f"run-{mode}"),
                         cache_dir=str(tmp / f"cache-{mode}"), verbose=0, lr=1e-3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--modes", default="frozen,finetune")
    ap.add_argument("--peer-python", default=".venv-peers/bin/python")
    args = ap.parse_args()
    paths, labels, y = job_clips(args.clips)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            cfg = jaxtl_job(Path(tmp), paths, labels, mode, args.epochs, args.size)
            t = time.perf_counter()
            summary = run(cfg, log=lambda *_: None)
            jaxtl_s = time.perf_counter() - t
            # Keras: the seed's per-file feature loop, then fit / a train_on_batch loop
            t = time.perf_counter()
            images = seed_loop(paths, args.size)
            seed_features_s = time.perf_counter() - t
            np.save(Path(tmp) / "x.npy", images)
            np.save(Path(tmp) / "y.npy", y)
            proc = subprocess.run([args.peer_python, str(PEER), "--data", tmp, "--mode", mode, "--epochs",
                                   str(args.epochs)], capture_output=True, text=True,
                                  env={**os.environ, "KERAS_BACKEND": "tensorflow"}, timeout=7200)
            if proc.returncode != 0:
                keras = {"skipped": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            else:
                keras = json.loads(proc.stdout.strip().splitlines()[-1])
                keras["fit_total_s"] = keras["fit_s"] + seed_features_s
                keras["compute_total_s"] = keras["loop_s"] + seed_features_s
            row = {"mode": mode, "clips": len(paths), "jaxtl_s": jaxtl_s, "seed_features_s": seed_features_s,
                   "jaxtl_seconds_per_epoch": summary["seconds_per_epoch"],
                   "jaxtl_test_accuracy": summary["test_accuracy"],
                   "keras": keras}
            rows.append(row)
            print(json.dumps(row), flush=True)
    m = machine()
    lines = [f"The seed's job end to end: {args.clips} FSDD clips, {args.epochs} epochs, batch 32, "
             f"{args.size}x{args.size}, random init; {m['cpu']}, {m['cores']} cores\n",
             "| mode | jaxtl s | Keras fit s | Keras pure compute s | jaxtl vs fit | jaxtl vs compute | "
             "Keras per-epoch fit s |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        k = r["keras"]
        if "skipped" in k:
            lines.append(f"| {r['mode']} | {r['jaxtl_s']:.1f} | skipped: {k['skipped']} | | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['jaxtl_s']:.1f} | {k['fit_total_s']:.1f} | {k['compute_total_s']:.1f} | "
                     f"{k['fit_total_s'] / r['jaxtl_s']:.1f}x | {k['compute_total_s'] / r['jaxtl_s']:.1f}x | "
                     f"{', '.join(f'{s:.0f}' for s in k['fit_epoch_s'])} |")
    write_results(f"end_to_end-{args.clips}clips", {"args": vars(args), "rows": rows, "machine": m},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
