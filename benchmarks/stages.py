"""Where a job's seconds go: `jaxtl train` in a fresh process, its wall time split by stage.

    python benchmarks/stages.py [--data DIR] [--clips 100] [--size 64] [--runs 2] [--extra "--dtype bfloat16"]

Each run is `python -m jaxtl.train` with fresh run and feature/prefix caches (a first run), except that
runs after the first share the first one's XLA compilation cache when `--runs` > 1 (a second run with the
same shapes, as a user's rerun). Reports per stage (process start, imports and the closing plots and report; setup;
features; model init and the frozen convs' checkpoint; the frozen prefix pass; epochs; test) seconds, and
the prefix pass's clips/s, from the run's summary.json and the process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FSDD, machine, write_results  # noqa: E402


def clips_manifest(data: Path, n: int | None, where: Path) -> Path:
    """A CSV of the first `n` clips of `data` in a fixed, class-balanced order (FSDD names or class folders)."""
    from jaxtl.data import discover

    ds = discover(data)
    by_label: dict[str, list[int]] = {}
    for i in sorted(range(len(ds.paths)), key=lambda i: ds.paths[i]):
        by_label.setdefault(ds.labels[i], []).append(i)
    order = [i for turn in zip(*by_label.values()) for i in turn]  # classes in turn: every prefix is balanced
    keep = order[:n] if n else order
    path = where / "clips.csv"
    path.write_text("".join(f"{os.path.abspath(ds.paths[i])},{ds.labels[i]}\n" for i in keep))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(FSDD))
    ap.add_argument("--clips", type=int, default=100, help="0: all")
    ap.add_argument("--size", default="64", help="one or more image sizes, comma-separated")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--extra", default="", help="more `jaxtl train` flags")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = clips_manifest(Path(args.data), args.clips or None, tmp)
        for size in args.size.split(","):
            xla = tmp / f"xla-{size}"
            for i in range(args.runs):
                out = tmp / f"run-{size}-{i}"
                cmd = [sys.executable, "-m", "jaxtl.train", "--data", str(manifest), "--weights", "random",
                       "--image-size", size, "--verbose", "0", "--out", str(out), "--cache-dir", str(tmp / f"c{i}"),
                       *shlex.split(args.extra)]
                env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(xla),  # as jaxtl sets its own cache
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    sys.exit(f"{shlex.join(cmd[1:4])} ... failed: {proc.stderr.strip().splitlines()[-1:]}")
                wall = time.perf_counter() - t
                s = json.loads((out / "summary.json").read_text())
                n = s["n_train"] + s["n_val"] + s["n_test"] + (s["holdout"] or {}).get("n", 0)
                stages = {"start, imports, report": wall - s["wall_seconds"], **s["stage_seconds"]}
                rows.append({"size": int(size), "run": i + 1, "clips": n, "wall_seconds": wall, "stages": stages,
                             "epochs": s["epochs_run"], "test_accuracy": s["test_accuracy"],
                             "compile_seconds": s["compile_seconds"], "command": shlex.join(cmd[1:])})
                print(json.dumps(rows[-1]), flush=True)
    m = machine()
    names = list(rows[0]["stages"])
    lines = [f"Where a `jaxtl train` job's seconds go ({m['device']}; {m['cpu']}, {m['cores']} cores): "
             f"{rows[0]['clips']} clips of {args.data}, flags `{args.extra or '(default recipe)'}`; run 2+ reuse "
             "run 1's XLA compilation cache.", "",
             "| size | run | " + " | ".join(names) + " | wall s | epochs | prefix clips/s | test acc |",
             "| ---: | ---: |" + " ---: |" * (len(names) + 4)]
    for r in rows:
        lines.append(f"| {r['size']} | {r['run']} | " + " | ".join(f"{r['stages'][k]:.1f}" for k in names)
                     + f" | {r['wall_seconds']:.1f} | {r['epochs']} | {r['clips'] / r['stages']['prefix']:.0f} | "
                     f"{r['test_accuracy']:.3f} |")
    write_results(args.name or f"stages-{args.clips or 'all'}clips", {"args": vars(args), "machine": m, "rows": rows},
                  "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
