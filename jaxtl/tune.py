"""`jaxtl tune`: the XLA:CPU settings this machine runs a backbone's frozen pass fastest with, measured.

XLA:CPU's library fusions rank differently by CPU and jax version (jax 0.10-0.11 route f32 convolutions and
dots through YNNPACK; on a 2-core AMD EPYC, VGG16 at 224 px ran ~24 % faster with it off, at 64 px no
faster), so the choice is measured, not assumed: `jaxtl tune` times the frozen pass a run of the recipe runs
(the same jitted function, not the bare backbone: on a 2-core Intel Xeon the bare VGG16 forward at 64 px ran
1.65x faster with YNNPACK off, the job's pass no faster) under each candidate, each in a fresh process (XLA
reads its flags once per process), and
keeps the fastest in a file per user (`$JAXTL_TUNE_FILE`, default ~/.cache/jaxtl/xla-tune.json) under this
machine's key (CPU model, cores, jax and jaxlib versions). Every command then sets it before JAX starts its
backend (`apply`, from `jaxtl.command`; a run's summary says what was in effect); a user's own XLA_FLAGS win,
said in one line. Without a measurement for this machine nothing changes.

    jaxtl tune [--recipe jaxtl] [--backbone NAME] [--image-size N] [--seconds 3]
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
import dataclasses, json, sys, time
import jax, numpy as np
from jaxtl.audio import features_batch
from jaxtl.config import TrainConfig
from jaxtl.images import RaggedFeatures
from jaxtl.model import Classifier
from jaxtl.prefix import PREFIX_BATCH
from jaxtl.steps import init_params
settings, seconds = json.loads(sys.argv[1]), float(sys.argv[2])
cfg = TrainConfig.from_recipe(**settings)
if cfg.mode == "auto":  # it resolves to a frozen base for the data sizes it is for: the same frozen pass
    cfg = dataclasses.replace(cfg, mode="frozen", head="dense")
model, images, k = cfg.model(10), cfg.image_spec(), cfg.always_frozen().k
params, _ = init_params(model, cfg.image_size, 0)
sr, rng = cfg.features().sample_rate, np.random.default_rng(0)
clips = [rng.normal(scale=0.1, size=int(sr * s)).astype(np.float32) for s in rng.uniform(0.3, 1.0, 16)]
feats = RaggedFeatures.from_list(features_batch(clips, cfg.features()))
full = max(8, min(PREFIX_BATCH["cpu"], PREFIX_BATCH["cpu"] * 64 ** 2 // cfg.image_size ** 2))  # ~1 s a call
prefix = jax.jit(lambda p, x: model.apply({"params": p}, images.network_input(x), k, method=Classifier.prefix))
rates = {}
for batch in (full, full - 1):  # the pass's batches are even splits: a power of two or not (YNNPACK minds)
    x = images.batch(feats, np.arange(batch) % 16)  # a batch as the frozen pass gets it
    jax.block_until_ready(prefix(params, x))  # compiled, not timed
    times, end = [], time.perf_counter() + seconds / 2
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        jax.block_until_ready(prefix(params, x))
        times.append(time.perf_counter() - t)
    rates[batch] = batch / float(np.median(times))
print(json.dumps({"images_per_s": float(np.mean(list(rates.values()))), "by_batch": rates}))
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


def probe(settings: dict, seconds: float, log: Callable = print) -> dict:
    """{candidate: images/s of the frozen pass a run of `settings` (a recipe and flags on it) runs, None where
    the setting failed}, each in its own process: the very jitted function (input decoding, preprocessing,
    the frozen convs, the taps' pooling), on batches of real features, the mean over two batch sizes (a
    power of two and one less: on a 2-core Intel Xeon, YNNPACK ran the jaxtl recipe's pass at 71 images/s at
    batch 64 and 111-114 at 63 and 50)."""
    rates = {}
    for name, flags in CANDIDATES.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings), str(seconds)],
                              env=env, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
        rate = rates[name] = result.get("images_per_s")
        by_batch = ", ".join(f"batch {b}: {r:.1f}" for b, r in result.get("by_batch", {}).items())
        why = (done.stderr.strip() or "?").splitlines()[-1]
        said = f"{rate:8.1f} images/s ({by_batch})" if rate is not None else f"failed: {why}"
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
    parser.add_argument("--recipe", default="jaxtl", help="the recipe whose frozen pass is timed (default: jaxtl)")
    parser.add_argument("--backbone", help="default: the recipe's")
    parser.add_argument("--image-size", type=int, help="default: the recipe's")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per setting (after its compile)")
    args = parser.parse_args(argv)
    settings = {"recipe": args.recipe, **{k: v for k, v in (("backbone", args.backbone),
                                                            ("image_size", args.image_size)) if v is not None}}
    t = time.perf_counter()
    print(f"timing the frozen pass of {settings} under {len(CANDIDATES)} XLA settings ({machine_key()}):")
    rates = probe(settings, args.seconds)
    measured = {k: v for k, v in rates.items() if v is not None}
    if "xla-default" not in measured:
        print("error: the XLA default setting did not run; nothing was chosen", file=sys.stderr)
        return 2
    choice = max(measured, key=measured.get)
    speedup = measured[choice] / measured["xla-default"]
    records = _records()
    records[machine_key()] = {"choice": choice, "speedup": speedup, "rates": rates, "settings": settings}
    tune_file().parent.mkdir(parents=True, exist_ok=True)
    from jaxtl.disk import write_text

    write_text(tune_file(), json.dumps(records, indent=1))
    print(f"chosen: {choice} ({speedup:.2f}x the XLA default) in {time.perf_counter() - t:.0f} s; saved in "
          f"{tune_file()}, used by every jaxtl command on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
