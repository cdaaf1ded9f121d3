"""Scale: time per clip and each process's peak memory as the dataset grows, in 1 and 2 processes.

Synthetic clips (generated here, 1 s at 8 kHz, 10 classes of noisy tones; no download) at N = 2,000,
20,000 and 100,000; 32x32 images so the VGG16 pass stays minutes. Every run starts from fresh caches and
runs `python -m jaxtl.train` (the jaxtl recipe, random base, no early stopping), frozen (its linear head
on pooled taps of blocks 3 and 4, inputs kept on the devices; 2 epochs) and fine-tune-cached (conv4_3
trained on cached conv4_2 outputs and block 3's pooled tap, 34 KB a clip; 1 epoch), in one process, or
in two processes on 127.0.0.1 (`jax.distributed`). `--data DIR` runs a dataset folder instead (real
recordings: the accuracy of 1 and 2 processes). Each process reports its peak RSS
(`resource.getrusage`); the run's summary gives the wall time of each stage.

    python benchmarks/scale.py                      # 2k, 20k, 100k x frozen, finetune x 1, 2 processes
    python benchmarks/scale.py --sizes 2000 --modes frozen --processes 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish_log_x_plot, machine, write_results  # noqa: E402

RATE, CLASSES = 8000, 10
WRAPPER = textwrap.dedent("""
    import json, resource, sys, time
    from jaxtl.train import main
    t = time.perf_counter()
    rc = main(json.loads(sys.argv[1]))
    json.dump({"rc": rc, "seconds": time.perf_counter() - t,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024},
              open(sys.argv[2], "w"))
    sys.exit(rc)
""")


def clips(root: Path, n: int) -> Path:
    """n one-second clips, 10 classes of tones (each class its own pitch band) in noise; written once."""
    import soundfile as sf

    data = root / f"clips-{n}"
    if (data / ".complete").exists():
        return data
    shutil.rmtree(data, ignore_errors=True)
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    for c in range(CLASSES):
        (data / f"class{c}").mkdir(parents=True)
    for i in range(n):
        c = i % CLASSES
        f0 = 200 * 1.25 ** c * rng.uniform(0.95, 1.05)
        y = 0.3 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.3)) + rng.normal(0, 0.1, RATE)
        sf.write(data / f"class{c}" / f"c{c}_{i:06d}.wav", y.astype(np.float32), RATE, subtype="PCM_16")
    (data / ".complete").touch()
    return data


def one_run(data: Path, n: int, mode: str, processes: int, work: Path, epochs: int, size: int,
            extra: list[str] = ()) -> dict:
    """One fresh-cache training run; each process's peak RSS and the run's summary."""
    tag = f"{mode}-{n}-p{processes}" + "".join(extra).replace("-", "")
    run_dir, cache = work / "runs" / tag, work / "cache" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    argv = ["--recipe", "jaxtl", "--data", str(data), "--mode", mode, "--image-size", str(size), "--weights",
            "random", "--epochs", str(epochs if mode == "frozen" else 1), "--patience", "0", "--out", str(run_dir),
            "--cache-dir", str(cache), "--verbose", "1", "--workers", "1"] + \
        (["--finetune-convs", "1"] if mode == "finetune" else []) + list(extra)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WRAPPER,
                               json.dumps(argv + (["--process-id", str(p)] if processes > 1 else [])),
                               str(work / f"rss-{tag}-{p}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(processes)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise SystemExit(f"{tag} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    rss = [json.loads((work / f"rss-{tag}-{p}.json").read_text()) for p in range(processes)]
    summary = json.loads((run_dir / "summary.json").read_text())
    inputs_mb = cached_mb(cache)
    shutil.rmtree(cache)  # 100,000 clips' features and prefix rows take gigabytes
    return {"n": n, "data": str(data), "extra": " ".join(extra), "mode": mode, "processes": processes,
            "wall_seconds": wall, "val_accuracy": summary["val_accuracy"],
            "stage_seconds": summary["stage_seconds"], "test_accuracy": summary["test_accuracy"],
            "n_train": summary["n_train"], "peak_rss_mb": [r["peak_rss_mb"] for r in rss],
            "workers_peak_rss_mb": [r["workers_peak_rss_mb"] for r in rss], "cached_inputs_mb": inputs_mb,
            "inputs_line": next((line for line in outputs[0].splitlines() if line.startswith("inputs:")), None),
            "prefix_clips_per_s": n / summary["stage_seconds"]["features+prefix"],
            "epoch_seconds_per_1k_train_clips": summary["seconds_per_epoch"] / summary["n_train"] * 1000}


def cached_mb(cache: Path) -> dict:
    """The prefix cache's rows (MB in memory) in total and per shard writer (rows per shard)."""
    import h5py

    total, rows = 0, []
    for shard in sorted(cache.glob("prefix-*/rows-*.h5")):
        with h5py.File(shard, "r") as f:
            total += sum(ds.size * ds.dtype.itemsize for ds in f["acts"].values())
            rows.append(len(f["keys"]))
    return {"total": total / 2**20, "rows_per_shard": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--modes", default="frozen,finetune")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--epochs", type=int, default=2, help="of the frozen runs (fine-tuning runs 1)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--work", default="/tmp/jaxtl-scale", help="generated clips, caches and runs (large)")
    ap.add_argument("--name", default="scale")
    ap.add_argument("--data", default=None, help="a dataset folder to run instead of generated clips (--sizes "
                    "ignored): accuracy of 1 and 2 processes on real recordings")
    ap.add_argument("--extra", default="", help="more `jaxtl train` flags for every run, e.g. '--train-seed 1'")
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    sizes = [0] if args.data else map(int, args.sizes.split(","))
    for n in sizes:
        data = Path(args.data) if args.data else clips(work, n)
        n = n or sum(1 for _ in data.rglob("*.wav"))
        for mode in args.modes.split(","):
            for processes in map(int, args.processes.split(",")):
                rows.append(one_run(data, n, mode, processes, work, args.epochs, args.image_size,
                                    args.extra.split()))
                print(json.dumps(rows[-1]), flush=True)
                save(rows, args, work)
    save(rows, args, work, final=True)


def save(rows: list[dict], args, work: Path, final: bool = False) -> None:
    lines = ["| N | mode | processes | wall s | features+prefix s | clips/s | epoch s per 1k train clips | "
             "peak RSS MB per process | cached inputs MB | val acc | test acc | flags | inputs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['mode']} | {r['processes']} | {r['wall_seconds']:.0f} | "
                     f"{r['stage_seconds']['features+prefix']:.0f} | {r['prefix_clips_per_s']:.0f} | "
                     f"{r['epoch_seconds_per_1k_train_clips']:.2f} | "
                     f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb'])} | {r['cached_inputs_mb']['total']:.0f} | "
                     f"{r.get('val_accuracy') or 0:.3f} | {r['test_accuracy']:.3f} | {r.get('extra') or '-'} | "
                     f"{r['inputs_line'] or '-'} |")
    payload = {"machine": machine(), "command": " ".join(sys.argv), "rows": rows}
    stem = write_results(f"{args.name}", payload, "\n".join(lines) + "\n")  # after every run: partial results kept
    if final:
        plot(rows, stem.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in sorted({r["mode"] for r in rows}):
        for processes in sorted({r["processes"] for r in rows}):
            sel = sorted((r for r in rows if r["mode"] == mode and r["processes"] == processes), key=lambda r: r["n"])
            if sel:
                ax.plot([r["n"] for r in sel], [max(r["peak_rss_mb"]) for r in sel], "o-",
                        label=f"{mode}, {processes} process(es): peak RSS of the largest process")
        sel = sorted((r for r in rows if r["mode"] == mode and r["processes"] == 1), key=lambda r: r["n"])
        if sel:
            ax.plot([r["n"] for r in sel], [r["cached_inputs_mb"]["total"] for r in sel], "k:", alpha=0.5,
                    label=f"{mode}: cached inputs of all clips")
    finish_log_x_plot(fig, ax, path, "clips", "MB", legend_size=7, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
