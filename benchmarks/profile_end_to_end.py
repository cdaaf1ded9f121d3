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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import jaxtl_job, job_clips  # noqa: E402

from jaxtl.train import run  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--mode", default="frozen")
    args = ap.parse_args()
    paths, labels, _ = job_clips(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = jaxtl_job(Path(tmp), paths, labels, args.mode)
        t0 = time.perf_counter()
        profile = cProfile.Profile()
        profile.runcall(run, cfg, log=lambda *a: print(f"{time.perf_counter() - t0:6.1f}s", *a))
        profile.dump_stats("/tmp/e2e.prof")
    pstats.Stats("/tmp/e2e.prof").sort_stats("cumtime").print_stats(25)
