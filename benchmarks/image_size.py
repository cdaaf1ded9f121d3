"""The cheapest image that keeps accuracy: the jaxtl recipe against image size (and head taps), chosen on
validation accuracy, with each size's VGG16-pass cost.

    python benchmarks/image_size.py [--sizes 64,96,112,128,160,224] [--taps 3,4,5] [--seeds 3]
                                    [--per-cell 25] [--protocols stratified,loso] [--from-log FILE]

Data: a fixed, balanced FSDD subset (`--per-cell` clips of every digit x speaker, recording indices
0..per_cell-1; 25 -> 1,250 clips), HED weights (the stand-in for ImageNet's). For every size (and taps):
- stratified: 64 % fit / 16 % validation / 20 % test, speakers on both sides (**speaker-dependent**), `--seeds` splits;
- loso: each speaker held out for test in turn, validation drawn from other *whole* speakers
  (`--split group`: **speaker-independent** both for the choice and the report), `--seeds` seeds.
Seed i uses the same splits at every size (paired). The choice is made on validation accuracy only: the
cheapest size whose mean validation accuracy is within one standard deviation (over seeds and folds) of the
best size's, in both protocols. Test accuracies are reported beside it, never used to choose.
The pass cost is the prefix section's wall time (its compile included) on the first, cold-cache run at each
size, per clip.
Every finished run is appended to a JSONL log (results/image_size-log-<machine>.jsonl); `--from-log`
renders the table from it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FSDD, HED, JAXTL, RESULTS, device_tag, machine, run_config, write_results  # noqa: E402


def manifest(per_cell: int, where: Path) -> Path:
    """A CSV of the balanced subset: path,label,,group (speaker)."""
    rows = []
    for p in sorted(FSDD.glob("*.wav")):
        digit, speaker, index = p.stem.split("_")
        if int(index) < per_cell:
            rows.append((str(p), digit, "", speaker))
    path = where / f"fsdd-{per_cell}-per-cell.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split", "group"), *rows])
    return path


def runs(args, data: Path, speakers: list[str]):
    """(size, taps, protocol, seed, fold) for every run, smallest image first."""
    for size in map(int, args.sizes.split(",")):
        for taps in args.taps.split(";"):
            for protocol in args.protocols.split(","):
                for seed in range(args.seeds):
                    for fold in (speakers if protocol == "loso" else [None]):
                        yield size, taps, protocol, seed, fold


def summarise(log_rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["size"], r["taps"], r["protocol"]) for r in log_rows}):
        rs = [r for r in log_rows if (r["size"], r["taps"], r["protocol"]) == key]
        cold = [r["prefix_seconds"] / r["n_clips"] for r in log_rows
                if (r["size"], r["taps"]) == key[:2] and r["prefix_cold"]]
        val, test = np.array([r["val_accuracy"] for r in rs]), np.array([r["test_accuracy"] for r in rs])
        out.append({"size": key[0], "taps": key[1], "protocol": key[2], "runs": len(rs),
                    "val_mean": float(val.mean()), "val_std": float(val.std()),
                    "test_mean": float(test.mean()), "test_std": float(test.std()),
                    "pass_ms_per_clip": 1000 * float(np.mean(cold)) if cold else None,
                    "per_speaker_test": {spk: float(np.mean([r["test_accuracy"] for r in rs if r["fold"] == spk]))
                                         for spk in sorted({r["fold"] for r in rs if r["fold"]})}})
    return out


def choose(rows: list[dict]) -> dict | None:
    """The cheapest (size, taps) within one std of the best mean validation accuracy in every protocol."""
    protocols = sorted({r["protocol"] for r in rows})
    configs = sorted({(r["size"], r["taps"]) for r in rows})
    ok = []
    for size, taps in configs:
        fits = []
        for p in protocols:
            mine = [r for r in rows if (r["size"], r["taps"], r["protocol"]) == (size, taps, p)]
            best = max((r for r in rows if r["protocol"] == p), key=lambda r: r["val_mean"])
            fits.append(bool(mine) and mine[0]["val_mean"] >= best["val_mean"] - best["val_std"])
        if all(fits):
            cost = [r["pass_ms_per_clip"] for r in rows if (r["size"], r["taps"]) == (size, taps)
                    and r["pass_ms_per_clip"]]
            ok.append((cost[0] if cost else size * size, size, taps))
    if not ok:
        return None
    _, size, taps = min(ok)
    return {"size": size, "taps": taps}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (protocol, taps), style in zip(sorted({(r["protocol"], r["taps"]) for r in rows}), ("o-", "s-", "^-", "d-")):
        pts = sorted((r["size"], r["val_mean"], r["val_std"], r["test_mean"]) for r in rows
                     if (r["protocol"], r["taps"]) == (protocol, taps))
        x, v, e, t = map(np.array, zip(*pts))
        label = f"{protocol}, taps {taps}"
        ax.errorbar(x, 100 * v, 100 * e, fmt=style, capsize=3, label=f"{label}: validation")
        ax.plot(x, 100 * t, style.replace("-", ":"), alpha=0.5, label=f"{label}: test")
    ax.set_xlabel("image side (pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    costs = sorted({(r["size"], r["pass_ms_per_clip"]) for r in rows if r["pass_ms_per_clip"]})
    if costs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*costs), "k--", alpha=0.4, label="VGG16 pass (ms/clip)")
        ax2.set_ylabel("VGG16 pass, ms per clip (dashed)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("jaxtl recipe: accuracy and cost against image size (HED weights, FSDD)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], chosen: dict | None, meta: dict) -> str:
    lines = [f"# Image size study ({meta['machine']['cpu']}, {meta['machine']['cores']} cores)", "",
             f"`{meta['command']}`", "",
             f"{meta['n_clips']} FSDD clips ({meta['per_cell']} per digit x speaker), HED weights, jaxtl recipe; "
             "stratified = speaker-dependent, loso = speaker-independent (validation on other whole speakers). "
             "Mean ± std over seeds (and the 5 held-out speakers for loso).", "",
             "| size | taps | protocol | runs | validation | test | VGG16 pass ms/clip |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cost = f"{r['pass_ms_per_clip']:.1f}" if r["pass_ms_per_clip"] else "-"
        lines.append(f"| {r['size']} | {r['taps']} | {r['protocol']} | {r['runs']} | "
                     f"{100 * r['val_mean']:.1f} ± {100 * r['val_std']:.1f} % | "
                     f"{100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f} % | {cost} |")
    lines += ["", "Choice (validation only: the cheapest within one std of the best in every protocol): "
              + (f"**{chosen['size']}x{chosen['size']}, taps {chosen['taps']}**" if chosen else "none"), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,96,112,128,160,224")
    ap.add_argument("--taps", default="3,4,5", help="';'-separated tap sets, e.g. '3,4,5;3,4;3'")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-cell", type=int, default=25)
    ap.add_argument("--protocols", default="stratified,loso")
    ap.add_argument("--weights", default=str(HED))
    ap.add_argument("--name", default="image_size")
    ap.add_argument("--from-log", default=None)
    args = ap.parse_args()
    log_path = Path(args.from_log or RESULTS / f"{args.name}-log-{device_tag()}.jsonl")
    done = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    if not args.from_log:
        if not FSDD.is_dir():
            sys.exit(f"error: FSDD not found at {FSDD}")
        speakers = sorted({p.stem.split("_")[1] for p in FSDD.glob("*.wav")})
        with tempfile.TemporaryDirectory() as tmp:
            data = manifest(args.per_cell, Path(tmp))
            seen = {(r["size"], r["taps"], r["protocol"], r["seed"], r["fold"]) for r in done}
            sizes_done = {(r["size"], r["taps"]) for r in done}
            for size, taps, protocol, seed, fold in runs(args, data, speakers):
                if (size, taps, protocol, seed, fold) in seen:
                    continue
                extra = {"split": "group", "test_group": fold} if fold else {}
                s = run_config({**JAXTL, "taps": taps}, seed, size, args.weights, data=data, **extra)
                row = {"size": size, "taps": taps, "protocol": protocol, "seed": seed, "fold": fold,
                       "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
                       "n_clips": s["n_train"] + s["n_val"] + s["n_test"], "epochs": s["epochs_run"],
                       "prefix_seconds": s["stage_seconds"]["features+prefix"],
                       "prefix_cold": (size, taps) not in sizes_done,
                       "wall_seconds": s["wall_seconds"]}
                sizes_done.add((size, taps))
                done.append(row)
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = summarise(done)
    chosen = choose(rows)
    meta = {"machine": machine(), "command": "python benchmarks/image_size.py " + " ".join(sys.argv[1:]),
            "n_clips": done[0]["n_clips"] if done else 0, "per_cell": args.per_cell, "log": log_path.name}
    stem = write_results(args.name, {**meta, "rows": rows, "chosen": chosen}, table(rows, chosen, meta))
    plot(rows, stem.with_suffix(".png"))
    print(f"plot: {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
