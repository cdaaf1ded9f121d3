"""What verifying cached rows costs: a prefix-cache read of every row with each row's CRC-32 checked (shards
jaxtl writes now) against the same read of a shard without CRCs (as jaxtl 0.4 wrote it: only the finite check),
for rows the size of the default recipe's head inputs and of a fine-tuning split's activations.

    python benchmarks/cache_verify.py [--clips 2500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402
from jaxtl.cache import ActivationCache  # noqa: E402

# Row shapes: the default recipe's pooled taps (its whole head input) and an 8x8x512 activation (block 4's
# output at 128 px: what a fine-tuned last block reads).
ROWS = {"taps": (1472,), "activation 8x8x512": (8, 8, 512)}


def read_seconds(directory: Path, keys: list[str], repeats: int = 5) -> float:
    """Best of `repeats` full reads, each through a fresh cache object (its key index read again)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        found, _ = ActivationCache(directory, "k").read(keys)
        best = min(best, time.perf_counter() - t)
        assert found.all()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=2500)
    args = parser.parse_args()
    keys = [f"clip{i:05d}" for i in range(args.clips)]
    rows, lines = [], ["| rows | MB | with CRC-32 (s) | without (s) | cost |", "|---|---:|---:|---:|---:|"]
    for name, shape in ROWS.items():
        data = np.random.default_rng(0).normal(size=(args.clips, *shape)).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            verified, legacy = Path(tmp) / "verified", Path(tmp) / "legacy"
            ActivationCache(verified, "k").add(keys, {"x": data})
            shutil.copytree(verified, legacy)
            for shard in legacy.glob("prefix-k/rows-*.h5"):
                with h5py.File(shard, "r+") as f:
                    del f["crc32"]
            with_crc, without = read_seconds(verified, keys), read_seconds(legacy, keys)
        mb = data.nbytes / 2**20
        rows.append({"rows": name, "clips": args.clips, "mb": mb, "with_crc_s": with_crc, "without_crc_s": without})
        lines.append(f"| {name} | {mb:.0f} | {with_crc:.3f} | {without:.3f} | {with_crc / without - 1:+.0%} |")
    table = "\n".join([f"Prefix-cache read of {args.clips} clips, best of 5 ({machine()['cpu']}, "
                       f"{machine()['cores']} cores)", "", *lines]) + "\n"
    print(table)
    write_results("cache_verify", {"machine": machine(), "rows": rows}, table)


if __name__ == "__main__":
    main()
