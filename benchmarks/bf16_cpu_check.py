"""Does XLA:CPU give finite bfloat16 VGG16 activations under `jit`? (It did not with jax 0.11.2; 0.10.2 did.)

    python benchmarks/bf16_cpu_check.py      # prints one line per conv count, eager vs jit max |activation|
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, device_tag  # noqa: E402
from jaxtl.model import VGG16Base  # noqa: E402


def main() -> None:
    x = jnp.asarray(np.random.default_rng(0).uniform(-120, 150, (4, 32, 32, 3)), jnp.float32)  # caffe-range
    v = VGG16Base().init(jax.random.PRNGKey(0), x[:1])
    rows = []
    for stop in (1, 2, 3, 4):
        eager = VGG16Base(dtype=jnp.bfloat16).apply(v, x, 0, stop)
        jitted = jax.jit(lambda p, x, stop=stop: VGG16Base(dtype=jnp.bfloat16).apply(p, x, 0, stop))(v, x)
        rows.append({"convs": stop, "eager_max": float(jnp.abs(eager.astype(jnp.float32)).max()),
                     "jit_max": float(jnp.abs(jitted.astype(jnp.float32)).max()),
                     "jit_finite": bool(jnp.isfinite(jitted).all())})
    text = f"jax {jax.__version__}, {jax.devices()[0].platform}\n" + "".join(json.dumps(r) + "\n" for r in rows)
    print(text, end="")
    path = RESULTS / f"bf16_cpu_check-jax{jax.__version__}-{device_tag()}.txt"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
