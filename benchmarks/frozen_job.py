"""The frozen job against competent Keras and PyTorch users: the same clips, one run, whole-process wall times.

    python benchmarks/frozen_job.py [--clips 100] [--epochs 10] [--size 224] [--as-written] [--repeat 3]

Rows (each a fresh process with fresh caches; random init everywhere):
- jaxtl, the seed's settings (`--recipe seed --image-size SIZE`: 13 MFCCs, Flatten -> Dense(256) -> Dense,
  10 epochs, no early stopping): one VGG16 pass over the clips, then the head; the **same work** as the
  features-once rows.
- jaxtl, its default recipe (`jaxtl train` defaults: log-mel at 64x64, pooled taps of blocks 3-4, linear head,
  early stopping): **recipe vs recipe** against every other row.
- Keras features-once (`peers/keras_features_once.py`, TensorFlow, `.venv-peers`): the seed's per-file
  librosa loop (timed here), then `base.predict` once and the head's `fit` on the stored features.
- PyTorch features-once (`peers/torch_features_once.py`, torchvision's VGG16, where `.venv-peers` has torch):
  the same loop's images, the features once, the head trained on them.
- with `--as-written`, the Keras recipe as the seed wrote it (`peers/keras_end_to_end.py --fit-only`): the
  frozen base inside `fit`, so it runs over the clips in every epoch.
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
from end_to_end import job_clips  # noqa: E402
from pipeline import seed_loop  # noqa: E402

from common import machine, write_results  # noqa: E402

PEER = Path(__file__).parent / "peers" / "keras_features_once.py"
TORCH_PEER = Path(__file__).parent / "peers" / "torch_features_once.py"
AS_WRITTEN = Path(__file__).parent / "peers" / "keras_end_to_end.py"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--peer-python", default=".venv-peers/bin/python")
    ap.add_argument("--as-written", action="store_true", help="also time the Keras recipe as written (slow; round 1)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every side (the as-written row runs once)")
    args = ap.parse_args()
    paths, labels, y = job_clips(args.clips)
    rows = []
    for rep in range(args.repeat):
        rows += one_round(args, paths, labels, y, rep, args.as_written and rep == 0)
    m = machine()
    lines = [f"The frozen job: {args.clips} FSDD clips, {args.epochs} epochs, random init, whole-process wall "
             f"time; peers and the seed-settings row at {args.size}x{args.size}, jaxtl's default recipe at its own "
             f"size; {m['cpu']}, {m['cores']} cores; {args.repeat} round(s), each row once per round, ratios taken "
             "within a round (median, min-max).", "",
             "| side | work | seconds | Keras features-once / this | Keras as written / this | test accuracy |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    written = [r["seconds"] for r in rows if r["side"] == "Keras recipe as written" and "seconds" in r]
    for side in dict.fromkeys(r["side"] for r in rows):
        mine = [r for r in rows if r["side"] == side]
        if "skipped" in mine[0]:
            lines.append(f"| {side} | {mine[0]['work']} | not run: {mine[0]['skipped']} | | | |")
            continue
        keras = {r["round"]: r["seconds"] for r in rows if r["side"] == "Keras features-once"}
        secs = [r["seconds"] for r in mine]
        vs_keras = [keras.get(r["round"], float("nan")) / r["seconds"] for r in mine]
        lines.append(f"| {side} | {mine[0]['work']} | {spread(secs, '.1f')} | {spread(vs_keras, '.2f')}x | "
                     + (f"{written[0] / np.median(secs):.1f}x" if written else "-")
                     + f" | {np.median([r['test_accuracy'] for r in mine]):.3f} |")
    write_results(f"frozen_job-{args.clips}clips-s{args.size}", {"args": vars(args), "rows": rows, "machine": m},
                  "\n".join(lines) + "\n")


def spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def one_round(args, paths, labels, y, rep: int, as_written: bool) -> list[dict]:
    """Every side once, each in a fresh process with fresh caches."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "clips.csv"
        manifest.write_text("".join(f"{p},{label}\n" for p, label in zip(paths, labels)))
        common = ["--data", str(manifest), "--weights", "random", "--verbose", "0", "--val-method", "tail"]
        for name, work, extra in (
                ("jaxtl, seed settings", "same work", ["--recipe", "seed", "--epochs", str(args.epochs),
                                                       "--patience", "0", "--plateau-patience", "0",
                                                       "--image-size", str(args.size)]),
                ("jaxtl, default recipe", "recipe vs recipe", ["--recipe", "jaxtl"])):
            out = Path(tmp) / name.replace(" ", "").replace(",", "-")
            seconds, _ = timed([sys.executable, "-m", "jaxtl.train", *common, *extra, "--out", str(out),
                                "--cache-dir", str(out) + "-cache"])
            summary = json.loads((out / "summary.json").read_text())
            rows.append({"side": name, "work": work, "round": rep, "seconds": seconds,
                         "test_accuracy": summary["test_accuracy"], "epochs": summary["epochs_run"]})
            print(rows[-1], flush=True)
        t = time.perf_counter()
        images = seed_loop(paths, args.size)
        loop_s = time.perf_counter() - t
        np.save(Path(tmp) / "x.npy", images)
        np.save(Path(tmp) / "y.npy", y)
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        peers = [("Keras features-once", "same work as the seed-settings row", [str(PEER)]),
                 ("PyTorch features-once", "same work as the seed-settings row", [str(TORCH_PEER)])]
        if as_written:
            peers.append(("Keras recipe as written", "base rerun every epoch", [str(AS_WRITTEN), "--fit-only"]))
        for name, work, script in peers:
            try:
                seconds, out = timed([args.peer_python, *script, "--data", tmp, "--epochs", str(args.epochs)], env)
            except RuntimeError as e:
                rows.append({"side": name, "work": work, "round": rep, "skipped": str(e)[:200]})
                print(rows[-1], flush=True)
                continue
            rows.append({"side": name, "work": work, "round": rep, "seconds": loop_s + seconds,
                         "feature_loop_s": loop_s, "process_s": seconds, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    return rows

if __name__ == "__main__":
    main()
