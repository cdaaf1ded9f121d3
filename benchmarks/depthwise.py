"""Depthwise convolutions on XLA:CPU: the grouped convolution (`lax.conv_general_dilated`, feature_group_count
= C) against jaxtl's k*k shifted multiply-adds (`jaxtl.backbones.layers.depthwise_same`), forward and
gradient, on the shapes of MobileNetV2 / EfficientNet at 64x64 and 128x128 inputs, batch 32.

    python benchmarks/depthwise.py [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_seconds, write_results  # noqa: E402

SHAPES = ((64, 32, 3, 1), (64, 96, 3, 2), (32, 96, 3, 2), (16, 144, 3, 1), (8, 240, 5, 2), (4, 672, 5, 1))


def main() -> None:
    import jax
    import jax.numpy as jnp

    from jaxtl.backbones.layers import depthwise_same

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    grouped = lambda x, k, s: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
    rng, rows = np.random.default_rng(0), []
    for h, c, k, s in SHAPES:
        x = jnp.asarray(rng.normal(size=(32, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
        row = {"side": h, "channels": c, "kernel": k, "stride": s}
        for name, f in (("grouped", grouped), ("shifted", depthwise_same)):
            row[f"{name}_ms"] = 1e3 * median_seconds(jax.jit(f, static_argnums=2), x, w, s, iters=args.iters)
            grad = jax.jit(jax.grad(lambda x, w, f=f: f(x, w, s).sum(), argnums=(0, 1)))
            row[f"{name}_grad_ms"] = 1e3 * median_seconds(grad, x, w, iters=args.iters)
        row["max_abs_diff"] = float(jnp.abs(grouped(x, w, s) - depthwise_same(x, w, s)).max())
        rows.append(row)
    m = machine()
    table = (f"Depthwise conv on XLA:CPU, batch 32, float32, median of {args.iters}; {m['cpu']}, {m['cores']} cores, "
             f"jax {m['jax']}\n\n| input side | channels | kernel | stride | grouped ms | shifted ms | grouped grad ms "
             "| shifted grad ms | max abs diff |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
             + "".join(f"| {r['side']} | {r['channels']} | {r['kernel']} | {r['stride']} | {r['grouped_ms']:.2f} | "
                       f"{r['shifted_ms']:.2f} | {r['grouped_grad_ms']:.2f} | {r['shifted_grad_ms']:.2f} | "
                       f"{r['max_abs_diff']:.1e} |\n" for r in rows))
    write_results("depthwise", {"args": vars(args), "rows": rows, "machine": m}, table)


if __name__ == "__main__":
    main()
