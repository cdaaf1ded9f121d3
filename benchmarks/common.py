"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxtl import tune
from jaxtl.config import RECIPES, TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
tune.apply()  # the XLA setting `jaxtl tune` measured on this machine, as every jaxtl command uses it


def machine() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"cpu": tune.cpu_model(), "cores": os.cpu_count(), "device": getattr(dev, "device_kind", dev.platform),
            "platform": dev.platform, "n_devices": len(jax.devices()), "jax": jax.__version__,
            "xla_setting": tune.in_effect()}


def device_tag() -> str:
    m = machine()
    name = m["device"] if m["platform"] != "cpu" else f"cpu{m['cores']}"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def write_results(name: str, payload: dict, table: str, out_dir: str | os.PathLike | None = None) -> Path:
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{device_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    return stem


def median_seconds(f, *args, iters: int, warmup: int = 1) -> float:
    """Median wall time of `f(*args)` over `iters` synchronised calls, after `warmup` calls (the compile)."""
    import time

    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def finish_log_x_plot(fig, ax, path, xlabel: str, ylabel: str, legend_size: int = 8, dpi: int = 110) -> None:
    """The studies' plots: a log x axis, labels, grid and legend, saved and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd" / "recordings"
HED = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "hed_bsds500.weights.h5"
CACHE = Path(__file__).resolve().parents[1] / ".jaxtl_cache"

# The configurations the studies compare, as TrainConfig overrides of the seed recipe: the jaxtl recipe
# (jaxtl.config.RECIPES, the one table) and its parts, so each lever can be tried alone.
SEED_RECIPE: dict = RECIPES["seed"]
_FEATURES = ("representation", "sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "fmax", "fit",
             "preprocess")
LOGMEL_8K = {k: v for k, v in RECIPES["jaxtl"].items() if k in _FEATURES}
# "taps345": the head of the recipe before the image-size study chose taps 3,4 (kept, so old results reproduce)
LINEAR_TAPS = {**{k: v for k, v in RECIPES["jaxtl"].items() if k not in (*_FEATURES, "image_dtype", "image_size")},
               "taps": "3,4,5", "mode": "frozen"}
# today's recipe, frozen with a trained head (what the `jaxtl…` rows measured; `--mode auto` picks the head)
JAXTL = {**{k: v for k, v in RECIPES["jaxtl"].items() if k not in ("image_dtype", "image_size")}, "mode": "frozen"}

CONFIGS = {
    "seed": SEED_RECIPE,
    "jaxtl": JAXTL,
    "jaxtl+bandnorm": {**JAXTL, "band_norm": "mean"},
    "jaxtl+aug2": {**JAXTL, "augment_copies": 2},
    # issue 15's levers, each alone on today's recipe
    "jaxtl+meanvar": {**JAXTL, "band_norm": "meanvar"},
    "jaxtl+pcen": {**JAXTL, "representation": "pcen"},
    "jaxtl+mixup": {**JAXTL, "mixup": 0.4},
    "jaxtl+logreg": {**JAXTL, "head": "logreg"},
    "jaxtl+lda": {**JAXTL, "head": "lda"},
    "jaxtl+ncm": {**JAXTL, "head": "ncm"},
    "jaxtl+vtlp2": {**JAXTL, "augment_copies": 2, "pitch_shift": 0.0, "time_stretch": 0.0, "vtlp": 0.15},
    "jaxtl+ens5": {**JAXTL, "ensemble": 5},
    # the best head on validation (lda) with the other levers
    "jaxtl+lda+pcen": {**JAXTL, "head": "lda", "representation": "pcen"},
    "jaxtl+lda+taps23": {**JAXTL, "head": "lda", "taps": "2,3"},
    "jaxtl+lda+taps234": {**JAXTL, "head": "lda", "taps": "2,3,4"},
    "jaxtl+lda+vtlp2": {**JAXTL, "head": "lda", "augment_copies": 2, "pitch_shift": 0.0, "time_stretch": 0.0,
                        "vtlp": 0.15},
    "jaxtl+lda+aug2": {**JAXTL, "head": "lda", "augment_copies": 2},
    "jaxtl+lda+ens5": {**JAXTL, "head": "lda", "ensemble": 5},
    "seed+zscore": {"normalize": True},
    "seed+zscore+40ep": {"normalize": True, "epochs": 40, "patience": 6},
    "mfcc-stretch+zscore": {"normalize": True, "fit": "stretch"},
    "taps345-linear": LINEAR_TAPS,
    "taps345-linear+logmel8k": {**LINEAR_TAPS, **LOGMEL_8K},
    "taps345-mlp+logmel8k": {**LINEAR_TAPS, **LOGMEL_8K, "hidden": 256, "dropout": 0.3},
    "taps345-linear+mfcc-delta": {**LINEAR_TAPS, "representation": "mfcc-delta", "fit": "stretch"},
    "taps345-linear+logmel8k+bandnorm": {**LINEAR_TAPS, **LOGMEL_8K, "band_norm": "mean"},
    "taps345-linear+logmel8k+aug2": {**LINEAR_TAPS, **LOGMEL_8K, "augment_copies": 2},
    # small training sets: every clip fits (no validation clips to stop on), pitch/tempo copies
    "taps345-linear+logmel8k+noval": {**LINEAR_TAPS, **LOGMEL_8K, "val_size": 0.0, "patience": 0,
                                      "plateau_patience": 0},
    "taps345-linear+logmel8k+aug4": {**LINEAR_TAPS, **LOGMEL_8K, "augment_copies": 4},
    "taps345-linear+logmel8k+noval+aug4": {**LINEAR_TAPS, **LOGMEL_8K, "val_size": 0.0, "patience": 0,
                                           "plateau_patience": 0, "augment_copies": 4},
}


def run_config(overrides: dict, seed: int, size: int, weights: str, data: Path = FSDD, **extra) -> dict:
    """One training run of jaxtl on `data` with `overrides`; returns its summary."""
    import dataclasses
    import tempfile

    from jaxtl.train import run

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(data), image_size=size, weights=weights, seed=seed, out=out,
                          cache_dir=str(CACHE), verbose=0, init_seed=0 if weights == "random" else None)
        cfg = dataclasses.replace(cfg, **{**overrides, **extra, "image_size": size})
        return run(cfg, log=lambda *_: None)
