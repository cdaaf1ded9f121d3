"""Where a short job's seconds go: the default recipe on 100 FSDD clips as `python -m jaxtl.train`, whole-process
wall time split into the interpreter and imports, the run's own stages (`summary.json`'s `stage_seconds`) and
what is left (the report, plots, process exit). Cold (fresh cache: features, prefix and XLA programs computed)
and warm (the same command again: every cache hit).

    python benchmarks/fixed_costs.py [--clips 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def job(cache: Path, out: Path, clips: int) -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxtl.train", "--data", str(FSDD), "--max-clips", str(clips),
                    "--weights", "random", "--verbose", "0", "--cache-dir", str(cache), "--out", str(out)],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stage_seconds"]
    return {"process_wall_s": wall, "run_wall_s": summary["wall_seconds"], "stages_s": stages,
            "compile_s": summary["compile_seconds"],
            "outside_run_s": wall - summary["wall_seconds"]}


def imports_seconds() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jaxtl.train"], check=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            for kind in ("cold", "warm"):
                rows.append({"repeat": r, "kind": kind, **job(cache, Path(tmp) / kind, args.clips)})
    imports = min(imports_seconds() for _ in range(3))
    stage_names = list(rows[0]["stages_s"])
    lines = ["| run | process wall (s) | interpreter + imports (s) | " + " | ".join(stage_names)
             + " | after the run (s) |", "|---|---:|---:|" + "---:|" * len(stage_names) + "---:|"]
    for row in rows:
        lines.append(f"| {row['kind']} {row['repeat'] + 1} | {row['process_wall_s']:.1f} | {imports:.1f} | "
                     + " | ".join(f"{row['stages_s'][n]:.2f}" for n in stage_names)
                     + f" | {row['outside_run_s'] - imports:.1f} |")
    m = machine()
    table = "\n".join([f"Default recipe, {args.clips} FSDD clips, random VGG16 ({m['cpu']}, {m['cores']} cores, "
                       f"jax {m['jax']}, XLA {m['xla_setting']}); stage columns from summary.json", "",
                       *lines]) + "\n"
    print(table)
    write_results(f"fixed_costs-n{args.clips}", {"machine": m, "imports_s": imports, "rows": rows}, table)


if __name__ == "__main__":
    main()
