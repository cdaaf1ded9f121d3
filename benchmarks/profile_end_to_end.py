"""Where jaxtl's time goes in the seed's job (end_to_end.py's jaxtl side): timed log lines and a cProfile
of one run.

    python benchmarks/profile_end_to_end.py [--clips 100] [--mode frozen]
"""

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FSDD  # noqa: E402
from jaxtl import train as T  # noqa: E402
from jaxtl.data import discover, subset  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--mode", default="frozen")
    args = ap.parse_args()
    ds = discover(FSDD)
    classes = sorted(set(ds.labels))
    y = np.searchsorted(classes, ds.labels)
    keep = subset(y, args.clips, 42, classes)
    with tempfile.TemporaryDirectory() as tmp:
        m = Path(tmp) / "clips.csv"
        m.write_text("".join(f"{ds.paths[i]},{ds.labels[i]}\n" for i in keep))
        cfg = T.TrainConfig(data=str(m), mode=args.mode, epochs=10, patience=0, plateau_patience=0, val_method="tail",
                            weights="random", seed=42, out=str(Path(tmp) / "run"), cache_dir=str(Path(tmp) / "c"),
                            progress=False)
        t0 = time.perf_counter()
        cProfile.run("T.run(cfg, log=lambda *a: print(f'{time.perf_counter() - t0:6.1f}s', *a))", "/tmp/e2e.prof")
    pstats.Stats("/tmp/e2e.prof").sort_stats("cumtime").print_stats(25)
