"""Where XLA:CPU loses to oneDNN: each VGG16 conv shape as XLA's convolution and as matrix products.

    python benchmarks/cpu_conv.py [--batch 8] [--iters 3]

On CPUs with AMX / AVX-512 BF16, XLA:CPU runs a bfloat16 matrix product several times faster than a
float32 one, but its convolution gets no such kernel. This times, per conv shape of VGG16 at 224x224:
`lax.conv_general_dilated`, and the same 3x3 conv as three products over a row-wise im2col (the 3
horizontal taps stacked on the channel axis, one product per kernel row), in float32 and bfloat16,
under XLA's default and its oneDNN dot fusion (`--xla_cpu_experimental_onednn_fusion_type=dot`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402

# (spatial size, channels in, channels out) of VGG16's convs at 224x224; repeated shapes once
SHAPES = [(224, 3, 64), (224, 64, 64), (112, 128, 128), (56, 256, 256), (28, 512, 512), (14, 512, 512)]
SETTINGS = {"XLA default": "", "oneDNN dot fusion": "--xla_cpu_experimental_onednn_fusion_type=dot"}

CHILD = """
import json, sys, time, numpy as np, jax, jax.numpy as jnp
b, iters, shapes = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])

def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=jnp.float32)

def row_dots(x, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = jnp.concatenate([xp[:, :, dx:dx + wd] for dx in range(3)], axis=-1)
    out = sum(jnp.dot(rows[:, dy:dy + h].reshape(-1, 3 * c), w[dy].reshape(3 * c, -1),
                      preferred_element_type=jnp.float32) for dy in range(3))
    return out.reshape(n, h, wd, -1)

out = []
for s, cin, cout in shapes:
    for name, fn in (("lax.conv", lax_conv), ("row im2col + 3 dots", row_dots)):
        for dtype in ("float32", "bfloat16"):
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.uniform(0, 1, (b, s, s, cin)), dtype)
            w = jnp.asarray(rng.normal(0, 0.05, (3, 3, cin, cout)), dtype)
            f = jax.jit(fn)
            f(x, w).block_until_ready()
            ts = []
            for _ in range(iters):
                t = time.perf_counter(); f(x, w).block_until_ready(); ts.append(time.perf_counter() - t)
            sec = float(np.median(ts))
            out.append({"shape": [s, cin, cout], "impl": name, "dtype": dtype, "ms": 1e3 * sec,
                        "gflops": 2 * b * s * s * cin * cout * 9 / sec / 1e9})
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    for name, flags in SETTINGS.items():
        env = {**os.environ, "XLA_FLAGS": flags}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.iters), json.dumps(SHAPES)],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"error: {name}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, "done", flush=True)
    m = machine()
    lines = [f"VGG16 conv shapes, batch {args.batch}, median of {args.iters}, GFLOP/s (ms); {m['cpu']}, "
             f"{m['cores']} cores\n", "| conv (size, in, out) | XLA setting | lax.conv f32 | lax.conv bf16 | "
             "row dots f32 | row dots bf16 |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for setting, res in rows.items():
        for shape in SHAPES:
            cells = {(r["impl"], r["dtype"]): f"{r['gflops']:.0f} ({r['ms']:.0f})" for r in res
                     if tuple(r["shape"]) == shape}
            lines.append(f"| {shape[0]}, {shape[1]}, {shape[2]} | {setting} | "
                         + " | ".join(cells[(i, d)] for i in ("lax.conv", "row im2col + 3 dots")
                                      for d in ("float32", "bfloat16")) + " |")
    write_results(f"cpu_conv-b{args.batch}", {"args": vars(args), "rows": rows, "machine": m}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
