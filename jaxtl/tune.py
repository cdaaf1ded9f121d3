"""`jaxtl tune`: the XLA:CPU setting this machine runs the frozen pass fastest with, measured.

XLA:CPU's library fusions rank differently by CPU, jax version and even batch size (jax 0.10-0.11 route f32
convolutions and dots through YNNPACK; README, "XLA:CPU settings"), so the choice is measured, not assumed:
`jaxtl tune` times the frozen pass a run of the recipe runs (the same jitted function, at the pass's own
batch sizes) under each candidate, each in a fresh process (XLA reads its flags once per process), and keeps
the winner (the default unless another is 5 % faster) in a file per user (`$JAXTL_TUNE_FILE`, default
~/.cache/jaxtl/xla-tune.json) under this machine's key (CPU model, usable cores, jax and jaxlib versions;
one record a machine, the last recipe tuned). Every command then adds it to XLA_FLAGS before JAX starts its
backend (`apply`, from `jaxtl.command`; a run's summary says what was in effect). A user's own YNNPACK flag
wins, said in one line; other flags of theirs are kept. Without a measurement nothing changes.

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

MARGIN = 1.05  # what another setting must beat the XLA default by: less is within a probe's noise

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
full = PREFIX_BATCH["cpu"]  # the pass's batch, at any image size (224 px: seconds a call)
prefix = jax.jit(lambda p, x: model.apply({"params": p}, images.network_input(x), k, method=Classifier.prefix))
rates = {}
for batch in (full, full - 1):  # the pass's batches are even splits: a power of two or not (YNNPACK minds)
    x = images.batch(feats, np.arange(batch) % 16)  # a batch as the frozen pass gets it
    jax.block_until_ready(prefix(params, x))  # compiled, not timed
    times, end = [], time.perf_counter() + seconds / 2
    while time.perf_counter() < end or len(times) < 2:
        t = time.perf_counter()
        jax.block_until_ready(prefix(params, x))
        times.append(time.perf_counter() - t)
    rates[batch] = batch / float(np.median(times))
print(json.dumps({"images_per_s": float(np.mean(list(rates.values()))), "by_batch": rates}))
"""


def tune_file() -> Path:
    return Path(os.environ.get("JAXTL_TUNE_FILE") or Path.home() / ".cache" / "jaxtl" / "xla-tune.json")


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_key() -> str:
    """CPU model, usable cores, jax and jaxlib versions: what a measurement holds for."""
    import jax
    import jaxlib

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()} | {cores} cores | jax {jax.__version__} | jaxlib {jaxlib.__version__}"


def _records() -> dict:
    try:
        records = json.loads(tune_file().read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _record() -> dict | None:
    """This machine's measurement, if the file holds a usable one (a damaged or older file is ignored)."""
    record = _records().get(machine_key())
    usable = isinstance(record, dict) and record.get("choice") in CANDIDATES and \
        isinstance(record.get("speedup"), int | float)
    return record if usable else None


def probe(settings: dict, seconds: float, log: Callable = print) -> dict:
    """{candidate: images/s of the frozen pass a run of `settings` (a recipe and flags on it) runs, None where
    the setting failed}, each in its own process: the very jitted function (input decoding, preprocessing,
    the frozen convs, the taps' pooling), on batches of real features, the mean over the pass's two batch
    sizes (its even splits are a power of two or not: on a 2-core Intel Xeon, YNNPACK ran the jaxtl recipe's
    pass at 74.5 images/s at batch 64 and 113.3 at 63)."""
    rates = {}
    for name, flags in CANDIDATES.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        try:
            done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(settings), str(seconds)], env=env,
                                  capture_output=True, text=True, timeout=600 + 20 * seconds)
            result, why = json.loads(done.stdout.strip().splitlines()[-1]), ""
        except subprocess.TimeoutExpired:
            result, why = {}, "timed out"
        except (IndexError, ValueError):  # no result line: the reason is in its stderr
            lines = done.stderr.strip().splitlines() or ["?"]
            result, why = {}, next((x for x in lines if "Unknown flag" in x or "Error" in x), lines[-1])
        rate = rates[name] = result.get("images_per_s")
        by_batch = ", ".join(f"batch {b}: {r:.1f}" for b, r in result.get("by_batch", {}).items())
        said = f"{rate:8.1f} images/s ({by_batch})" if rate is not None else f"failed: {why}"
        log(f"  {name:28s} {said[:120]}")
    return rates


YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def apply(log: Callable = print) -> str:
    """Add this machine's measured choice to XLA_FLAGS, before JAX starts its backend; returns what is in
    effect (also kept for `in_effect`)."""
    global _APPLIED
    record, flags = _record(), os.environ.get("XLA_FLAGS", "")
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without it: do not guess
        started = True
    if record is None or started:  # unmeasured, or too late in this process (a notebook that ran JAX)
        _APPLIED = "xla-default" if YNN_FLAG not in flags else f"XLA_FLAGS={flags!r} (the user's)"
    elif YNN_FLAG in flags:
        if CANDIDATES[record["choice"]] not in flags.split():
            log(f"XLA_FLAGS sets YNNPACK itself ({flags!r}): used instead of jaxtl tune's choice "
                f"({record['choice']})")
        _APPLIED = f"XLA_FLAGS={flags!r} (the user's)"
    else:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [flags, CANDIDATES[record["choice"]]]))
        _APPLIED = f"{record['choice']} (jaxtl tune: {record['speedup']:.2f}x the XLA default here)"
    return _APPLIED


_APPLIED = "xla-default (no jaxtl command applied a measurement in this process)"


def in_effect() -> str:
    """The XLA:CPU setting `apply` left this process with, for a run's summary (it matters on a CPU only)."""
    return _APPLIED


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
    best = max(measured, key=measured.get)  # a setting other than the default has to be clearly faster
    choice = best if measured[best] >= MARGIN * measured["xla-default"] else "xla-default"
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
