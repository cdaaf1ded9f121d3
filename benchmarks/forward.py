"""VGG16 forward throughput against the roofline: jaxtl (XLA) and, where installed, torchvision.

    python benchmarks/forward.py [--batch 32,128,256] [--dtype bfloat16,float32] [--size 224,64] [--iters 10]
                                 [--peak-tflops N]

Images/s of the conv base (Keras' VGG16 without top) on random images, median of `--iters` synchronised
calls after a warm-up, and the share of the device's dense peak that is (31 GFLOP per 224x224 image,
scaled by area). The peak defaults to the H100/H200 SXM dense figures (bf16 989 TFLOP/s; float32 runs as
TF32 on tensor cores, 494) and to nothing on other devices (pass `--peak-tflops`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402

GFLOP_224 = 30.95  # 2 x 15.47 GMAC: VGG16's 13 convs at 224x224
PEAKS = {"H100": {"bfloat16": 989.0, "float32": 494.0}, "H200": {"bfloat16": 989.0, "float32": 494.0}}


def jaxtl_rate(batch: int, size: int, dtype: str, iters: int) -> float:
    import jax
    import jax.numpy as jnp

    from jaxtl.model import VGG16Base

    model = VGG16Base(dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)), jnp.float32)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    f = jax.jit(model.apply)
    f(v, x).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f(v, x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return batch / float(np.median(ts))


def torch_rate(batch: int, size: int, dtype: str, iters: int) -> float | None:
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = torchvision.models.vgg16(weights=None).features.to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    ctx = torch.autocast(dev, dtype=torch.bfloat16) if dtype == "bfloat16" else torch.autocast(dev, enabled=False)

    def call():
        with torch.inference_mode(), ctx:
            base(x)
        if dev == "cuda":
            torch.cuda.synchronize()

    call()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    return batch / float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="32,128,256")
    ap.add_argument("--dtype", default="bfloat16,float32")
    ap.add_argument("--size", default="224", help="one or more image sides, comma-separated")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device, for every dtype")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = machine()
    peaks = next((p for name, p in PEAKS.items() if name in m["device"]), {})
    rows = []
    for size in map(int, args.size.split(",")):
        gflop = GFLOP_224 * (size / 224) ** 2
        for dtype in args.dtype.split(","):
            peak = args.peak_tflops or peaks.get(dtype)
            for batch in map(int, args.batch.split(",")):
                for side, fn in (("jaxtl", jaxtl_rate), ("torchvision", None if args.no_torch else torch_rate)):
                    rate = fn(batch, size, dtype, args.iters) if fn else None
                    if rate is None:
                        continue
                    tflops = rate * gflop / 1000
                    rows.append({"side": side, "size": size, "dtype": dtype, "batch": batch, "images_per_s": rate,
                                 "ms_per_image": 1000 / rate, "tflops": tflops,
                                 "pct_of_peak": 100 * tflops / peak if peak else None})
                    print(json.dumps(rows[-1]), flush=True)
    lines = [f"VGG16 forward (13 convs; {GFLOP_224} GFLOP per 224x224 image, scaled by area), {m['device']} "
             f"({m['cpu']}, {m['cores']} cores), median of {args.iters} calls", "",
             "| side | size | dtype | batch | images/s | ms/image | TFLOP/s | % of dense peak |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['side']} | {r['size']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:,.1f} | "
              f"{r['ms_per_image']:.2f} | {r['tflops']:.2f} | "
              + (f"{r['pct_of_peak']:.0f} |" if r["pct_of_peak"] is not None else "- |") for r in rows]
    write_results(f"forward-s{args.size.replace(',', '-')}", {"args": vars(args), "machine": m, "rows": rows},
                  "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
