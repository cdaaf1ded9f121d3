"""VGG16 forward on the CPU: jaxtl under several XLA:CPU settings against TensorFlow (oneDNN), one run.

    python benchmarks/cpu_forward.py [--batch 32] [--size 224] [--iters 3]

Each setting runs in its own process (XLA flags are read at start-up) and prints images/s; the
TensorFlow peer runs Keras' VGG16 in the peers' interpreter (`.venv-peers`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_results  # noqa: E402

SETTINGS = {
    "XLA default": "",
    "oneDNN custom calls": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "XNNPACK": "--xla_cpu_use_xnnpack=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
}

JAX_CHILD = """
import json, sys, time, numpy as np, jax, jax.numpy as jnp
from jaxtl.model import VGG16Base
b, s, iters, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = VGG16Base(dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (b, s, s, 3)), jnp.float32)
v = jax.jit(model.init)(jax.random.PRNGKey(0), x)
f = jax.jit(model.apply)
f(v, x).block_until_ready()
ts = []
for _ in range(iters):
    t = time.perf_counter(); f(v, x).block_until_ready(); ts.append(time.perf_counter() - t)
print(json.dumps({"images_per_s": b / float(np.median(ts))}))
"""

TF_CHILD = """
import json, sys, time, numpy as np, keras
b, s, iters, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if dtype == "bfloat16":  # oneDNN then runs the convs on AMX / AVX-512 BF16 where the CPU has them
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
m = keras.applications.VGG16(weights=None, include_top=False, input_shape=(s, s, 3))
x = np.random.default_rng(0).uniform(0, 1, (b, s, s, 3)).astype("float32")
f = lambda: m(x, training=False).numpy()
f()
ts = []
for _ in range(iters):
    t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
print(json.dumps({"images_per_s": b / float(np.median(ts))}))
"""


def child(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"skipped": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peer-python", default=".venv-peers/bin/python")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    common = [str(args.batch), str(args.size), str(args.iters)]
    rows = {}
    for name in args.settings.split(","):
        flags = SETTINGS[name]
        for dtype in args.dtypes.split(","):
            env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            rows[f"jaxtl, {name}, {dtype}"] = child([sys.executable, "-c", JAX_CHILD, *common, dtype], env)
            print(name, dtype, rows[f"jaxtl, {name}, {dtype}"], flush=True)
    for dtype in args.dtypes.split(","):
        name = f"TensorFlow (Keras VGG16, oneDNN), {dtype}"
        if Path(args.peer_python).exists():
            env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
            rows[name] = child([args.peer_python, "-c", TF_CHILD, *common, dtype], env)
        else:
            rows[name] = {"skipped": f"{args.peer_python} not found"}
        print(name, rows[name], flush=True)
    m = machine()
    table = (f"VGG16 forward, batch {args.batch}, {args.size}x{args.size}, median of {args.iters}; {m['cpu']}, "
             f"{m['cores']} cores\n\n| implementation | images/s |\n| --- | ---: |\n"
             + "".join(f"| {k} | {v['images_per_s']:.2f} |\n" if "images_per_s" in v else
                       f"| {k} | skipped: {v['skipped']} |\n" for k, v in rows.items()))
    write_results(f"cpu_forward-b{args.batch}-s{args.size}", {"args": vars(args), "rows": rows, "machine": m}, table)


if __name__ == "__main__":
    main()
