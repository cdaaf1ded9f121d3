"""What makes VGG16 transfer work on spoken digits: each change's test accuracy, mean and std over seeds.

    python benchmarks/transfer_study.py [--size 112] [--seeds 3] [--configs a,b,...] [--split stratified|loso]
                                        [--train-clips N]

Every configuration trains with jaxtl itself on FSDD (1,600 fit / 400 validation / 500 test clips by
default; `--split loso` holds out each of the 5 speakers in turn). Frozen prefixes are cached on disk,
so a configuration costs one VGG16 pass over the clips the first time and seconds after that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, FSDD, HED, machine, run_config, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--weights", default=f"{HED},random", help="comma list: weight files and/or random")
    ap.add_argument("--split", default="stratified", choices=("stratified", "loso"))
    ap.add_argument("--train-clips", type=int, default=None,
                    help="train (fit + validation) on a stratified subset of this many clips; the test set stays")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if not FSDD.is_dir():
        sys.exit(f"error: FSDD not found at {FSDD}")
    speakers = sorted({p.split("_")[1] for p in os.listdir(FSDD) if p.endswith(".wav")})
    rows = []
    for name in args.configs.split(","):
        for weights in args.weights.split(","):
            accs, vals, t0 = [], [], time.perf_counter()
            for seed in range(args.seeds):
                if args.split == "loso":
                    runs = [run_config(CONFIGS[name], seed, args.size, weights, split="group", test_group=spk,
                                       train_clips=args.train_clips) for spk in speakers]
                else:
                    fixed_test = 0 if args.train_clips else None  # data_size.py's test set
                    runs = [run_config(CONFIGS[name], seed, args.size, weights, split_seed=fixed_test,
                                       train_clips=args.train_clips)]
                accs += [s["test_accuracy"] for s in runs]
                vals += [np.nan if s["val_accuracy"] is None else s["val_accuracy"] for s in runs]
            label = "HED" if weights.endswith(".h5") else weights
            row = {"config": name, "weights": label, "accuracies": accs, "mean": float(np.mean(accs)),
                   "std": float(np.std(accs)), "val_accuracies": vals, "val_mean": float(np.mean(vals)),
                   "worst_speaker": float(min(np.mean(accs[i::len(speakers)]) for i in range(len(speakers))))
                   if args.split == "loso" else None,
                   "seconds": time.perf_counter() - t0, "overrides": CONFIGS[name]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    m = machine()
    what = "leave-one-speaker-out (mean over speakers and seeds)" if args.split == "loso" else \
        "stratified 1,600 fit / 400 val / 500 test"
    if args.train_clips:
        what += f", training on a stratified {args.train_clips} of them"
    worst = lambda r: "-" if r.get("worst_speaker") is None else f"{100 * r['worst_speaker']:.1f} %"  # noqa: E731
    table = (f"Transfer study, FSDD, {args.size}x{args.size}, {what}, {args.seeds} seeds; {m['cpu']}\n\n"
             "Choose on the validation column (LOSO: early stopping and scores on other whole speakers); the test "
             "column is the held-out speaker's (each speaker in turn).\n\n"
             "| configuration | weights | validation accuracy | test accuracy (mean ± std) | worst speaker | runs |\n"
             "| --- | --- | ---: | ---: | ---: | ---: |\n"
             + "".join(f"| {r['config']} | {r['weights']} | {100 * r.get('val_mean', np.nan):.1f} % | "
                       f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} % | {worst(r)} | {len(r['accuracies'])} |\n"
                       for r in rows))
    write_results(args.name or f"transfer_study-{args.split}-s{args.size}", {"args": vars(args), "rows": rows,
                                                                          "machine": m}, table)


if __name__ == "__main__":
    main()
