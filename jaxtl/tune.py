"""`jaxtl tune`: the XLA:CPU settings this machine runs a backbone's frozen pass fastest with, measured.

XLA:CPU's library fusions rank differently by CPU and jax version (jax 0.10-0.11 route f32 convolutions and
dots through YNNPACK; on a 2-core AMD EPYC, VGG16 at 224 px ran ~24 % faster with it off, at 64 px no
faster), so the choice is measured, not assumed: `jaxtl tune` times the frozen forward of `--backbone` at
`--image-size` under each candidate, each in a fresh process (XLA reads its flags once per process), and
keeps the fastest in a file per user (`$JAXTL_TUNE_FILE`, default ~/.cache/jaxtl/xla-tune.json) under this
machine's key (CPU model, cores, jax and jaxlib versions). Every command then sets it before JAX starts its
backend (`apply`, from `jaxtl.command`; a run's summary says what was in effect); a user's own XLA_FLAGS win,
said in one line. Without a measurement for this machine nothing changes.

    jaxtl tune [--backbone vgg16] [--image-size 64] [--batch 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jaxtl.command import command

# XLA:CPU settings tried. YNNPACK's fusion types are a list; "-individual_convolution" takes convolutions
# out of the default list and leaves its dots and elementwise fusions.
CANDIDATES = {"xla-default": "", "ynnpack-off": "--xla_cpu_experimental_ynn_fusion_type=",
              "ynnpack-without-convolutions": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}

PROBE = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxtl.backbones import load_backbone
name, size, batch, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
module, variables = load_backbone(name, "random")
x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32))
forward = jax.jit(module.apply)
jax.block_until_ready(forward(variables, x))  # compiled, not timed
times, end = [], time.perf_counter() + seconds
while time.perf_counter() < end or len(times) < 3:
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, x))
    times.append(time.perf_counter() - t)
print(json.dumps({"images_per_s": batch / float(np.median(times)), "repeats": len(times)}))
"""


def tune_file() -> Path:
    return Path(os.environ.get("JAXTL_TUNE_FILE") or Path.home() / ".cache" / "jaxtl" / "xla-tune.json")


def machine_key() -> str:
    """CPU model, cores, jax and jaxlib versions: what a measurement holds for."""
    import jax
    import jaxlib

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} | {os.cpu_count()} cores | jax {jax.__version__} | jaxlib {jaxlib.__version__}"


def _records() -> dict:
    try:
        return json.loads(tune_file().read_text())
    except (OSError, ValueError):
        return {}


def probe(backbone: str, image_size: int, batch: int, seconds: float, log: Callable = print) -> dict:
    """{candidate: frozen-forward images/s (None where the setting failed)}, each in its own process."""
    rates = {}
    for name, flags in CANDIDATES.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", PROBE, backbone, str(image_size), str(batch), str(seconds)],
                              env=env, capture_output=True, text=True)
        rate = json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"] if done.returncode == 0 else None
        rates[name] = rate
        why = (done.stderr.strip() or "?").splitlines()[-1]
        said = f"{rate:8.1f} images/s" if rate is not None else f"failed: {why}"
        log(f"  {name:28s} {said[:120]}")
    return rates


def apply(log: Callable = print) -> None:
    """Set XLA_FLAGS to this machine's measured choice, before JAX starts its backend."""
    from jax._src import xla_bridge

    record = _records().get(machine_key())
    if record is None or xla_bridge.backends_are_initialized():  # unmeasured, or too late in this process
        return
    if os.environ.get("XLA_FLAGS") is not None:
        if os.environ["XLA_FLAGS"] != CANDIDATES[record["choice"]]:
            log(f"XLA_FLAGS is set ({os.environ['XLA_FLAGS']!r}): used instead of jaxtl tune's choice "
                f"({record['choice']})")
        return
    os.environ["XLA_FLAGS"] = CANDIDATES[record["choice"]]


def in_effect() -> str:
    """The XLA setting this process runs with, for a run's summary."""
    record = _records().get(machine_key())
    flags = os.environ.get("XLA_FLAGS")
    if record is not None and flags == CANDIDATES[record["choice"]]:
        return f"{record['choice']} (jaxtl tune: {record['speedup']:.2f}x the XLA default here)"
    if flags:
        return f"XLA_FLAGS={flags!r}"
    return "xla-default" + ("" if record else " (no jaxtl tune measurement on this machine)")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxtl tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per setting (after its compile)")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    print(f"timing the frozen {args.backbone} forward at {args.image_size} px, batch {args.batch}, under "
          f"{len(CANDIDATES)} XLA settings ({machine_key()}):")
    rates = probe(args.backbone, args.image_size, args.batch, args.seconds)
    measured = {k: v for k, v in rates.items() if v is not None}
    if "xla-default" not in measured:
        print("error: the XLA default setting did not run; nothing was chosen", file=sys.stderr)
        return 2
    choice = max(measured, key=measured.get)
    speedup = measured[choice] / measured["xla-default"]
    records = _records()
    records[machine_key()] = {"choice": choice, "speedup": speedup, "rates": rates, "backbone": args.backbone,
                              "image_size": args.image_size, "batch": args.batch}
    tune_file().parent.mkdir(parents=True, exist_ok=True)
    from jaxtl.disk import write_text

    write_text(tune_file(), json.dumps(records, indent=1))
    print(f"chosen: {choice} ({speedup:.2f}x the XLA default) in {time.perf_counter() - t:.0f} s; saved in "
          f"{tune_file()}, used by every jaxtl command on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
