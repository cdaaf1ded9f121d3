"""Can the host keep the accelerator fed? Images per second from cached features to device arrays.

    python benchmarks/input_pipeline.py [--cache .jaxtl_cache/features-*.h5] [--batch 256] [--size 224]

Reads a jaxtl feature cache (or, without one, random MFCC-like features with FSDD's lengths, 7-56
frames), then times the host side of a training step: gather a batch, build images (vectorized), and
move them to the device (`float32` and `uint8`), on one thread and with the training loop's prefetch
thread. Compare the result with the frozen forward's images/s from step_time.py on the same machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import h5py
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, machine, write_results  # noqa: E402
from jaxtl.images import RaggedFeatures, to_images  # noqa: E402
from jaxtl.sharding import global_batch, make_mesh, prefetch  # noqa: E402


def load_features(path: str | None) -> tuple[RaggedFeatures, str]:
    candidates = [path] if path else sorted(glob.glob(str(CACHE / "features-*.h5")) +  # 0.3's single file
                                            glob.glob(str(CACHE / "features-*" / "rows-*.h5")))  # shards
    for p in candidates:
        try:
            with h5py.File(p, "r") as f:
                if f.attrs.get("complete"):
                    return RaggedFeatures(f["flat"][:], f["offsets"][:], f["lengths"][:]), p
        except OSError:
            continue
    rng = np.random.default_rng(0)
    return RaggedFeatures.from_list([rng.normal(0, 50, (13, n)).astype(np.float32)
                                     for n in rng.integers(7, 57, 2500)]), "random (no cache found)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    feats, source = load_features(args.cache)
    mesh = make_mesh()
    n = len(feats)
    rows = {}
    for dtype in ("float32", "uint8"):
        def make(i, dtype=dtype):
            idx = (np.arange(args.batch) + i * args.batch) % n
            batch, lengths = feats.padded(idx, args.size)
            return to_images(batch, lengths, args.size, dtype=dtype)

        jax.block_until_ready(global_batch(mesh, {"x": make(0)}))
        for threaded in (False, True):
            gen = (make(i) for i in range(args.batches))
            t = time.perf_counter()
            for x in (prefetch(gen, 3) if threaded else gen):
                jax.block_until_ready(global_batch(mesh, {"x": x}))
            secs = time.perf_counter() - t
            rows[f"{dtype}, {'prefetch thread' if threaded else 'one thread'}"] = args.batch * args.batches / secs
    m = machine()
    table = (f"Input pipeline, cached features -> {args.size}x{args.size} images on the device, batch {args.batch}; "
             f"{m['device']} ({m['cpu']}, {m['cores']} cores); features: {source}\n\n"
             "| images | feed rate (images/s) |\n| --- | ---: |\n"
             + "".join(f"| {k} | {v:,.0f} |\n" for k, v in rows.items()))
    write_results(f"input_pipeline-b{args.batch}-s{args.size}", {"args": vars(args), "rows": rows, "machine": m,
                                                                 "features": source}, table, args.out)


if __name__ == "__main__":
    main()
