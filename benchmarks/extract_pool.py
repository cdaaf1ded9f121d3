"""Feature extraction in this process against a pool of worker processes, by number of clips.

    python benchmarks/extract_pool.py [--clips 100,500,2500] [--recipes seed,jaxtl]

Each measurement runs in a fresh interpreter (imports not timed; the pool's start, a fork server that pays
librosa's first call, is), on FSDD clips from ../shared, no cache. It sets `jaxtl.audio.CLIPS_PER_WORKER`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FSDD, machine, write_results  # noqa: E402

ONE = """
import glob, json, sys, time
from jaxtl.audio import extract
from jaxtl.config import TrainConfig
if __name__ == "__main__":
    recipe, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    files = sorted(glob.glob(sys.argv[4] + "/*.wav"))[:n]
    t = time.perf_counter()
    extract(files, TrainConfig.from_recipe(recipe).features(), workers=workers, progress=False, clips_per_worker=1)
    print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", default="100,500,2500")
    ap.add_argument("--recipes", default="seed,jaxtl")
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes.split(","):
        for n in map(int, args.clips.split(",")):
            row = {"recipe": recipe, "clips": n}
            for workers in (1, 2):
                out = subprocess.run([sys.executable, "-c", ONE, recipe, str(n), str(workers), str(FSDD)],
                                     capture_output=True, text=True, check=True).stdout
                row[f"workers{workers}_s"] = json.loads(out.strip().splitlines()[-1])["seconds"]
            rows.append(row)
            print(row, flush=True)
    m = machine()
    table = [f"Feature extraction, FSDD clips, no cache; {m['cpu']}, {m['cores']} cores.", "",
             "| recipe | clips | in this process s | 2 worker processes s |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r['recipe']} | {r['clips']} | {r['workers1_s']:.2f} | {r['workers2_s']:.2f} |" for r in rows]
    write_results("extract_pool", {"machine": m, "rows": rows}, "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
