"""The backbone study: each family's cost here, and whether ImageNet weights transfer to spoken digits.

    python benchmarks/backbones.py speed [--families all] [--sizes 64,96,128,224] [--batch 32]
    python benchmarks/backbones.py accuracy [--protocol loso|unseen|data] [--configs NAME,...] [--seeds 1]
                                   [--train-clips 1000] [--speakers all]

`speed`: the whole base's forward (the frozen pass) and a whole-base fine-tune step (forward, backward,
Adam), images/s, batch 32, float32, median of timed calls after a warm-up, with XLA's own FLOP count of
the forward (GMAC = FLOPs / 2).

`accuracy`: jaxtl runs on FSDD (`benchmarks/common.py`'s `run_config`) for the configurations below.
`loso`: each speaker held out in turn (speaker-independent), the others' clips trained on (`--train-clips`
of them, 80 % fit / 20 % validation by whole speakers); `unseen`: the same with one held-out speaker
(`--speakers`); `data`: speaker-dependent, one fixed 500-clip test set, `--train-clips` training clips.
Validation accuracy is what a choice is made on; the test column is read once per row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CONFIGS, FSDD, HED, machine, median_seconds, run_config, write_results  # noqa: E402
from jaxtl.config import WHOLE_FINETUNE  # noqa: E402

FROZEN = {**CONFIGS["jaxtl"], "mode": "frozen", "head": "lda"}
WHOLE = {**CONFIGS["jaxtl"], **WHOLE_FINETUNE}  # the whole base trains (jaxtl.config: what --mode auto runs)
# The last stage fine-tuned on the cached outputs of the stages before it (Lite0: stage 5, six blocks): the
# whole-base settings without the in-step masks (they would run the prefix in every step).
LAST = {**WHOLE, "finetune_convs": 6, "time_mask": 0, "freq_mask": 0}
# The first fine-tune settings tried: inference-mode BatchNorm, standardised avg+max head inputs, mixup. They
# did not train (chance; results/backbones-loso-s64-n1000-frozen-last-cpu2.md): kept to reproduce that row.
LAST_V1 = {**CONFIGS["jaxtl"], "mode": "finetune", "finetune_convs": 6, "taps": "5", "head": "dense", "lr": 1e-3,
           "base_lr": 1e-3, "epochs": 30, "patience": 6, "plateau_patience": 2, "mixup": 0.2}
STUDY = {  # name: (backbone, weights, overrides)
    "vgg16-random-frozen": ("vgg16", "random", FROZEN),
    "vgg16-hed-frozen": ("vgg16", str(HED), FROZEN),
    "lite0-imagenet-frozen": ("efficientnet_lite0", "imagenet", FROZEN),
    "lite0-random-frozen": ("efficientnet_lite0", "random", FROZEN),
    "lite0-imagenet-frozen-taps45": ("efficientnet_lite0", "imagenet", {**FROZEN, "taps": "4,5"}),
    "lite0-imagenet-last": ("efficientnet_lite0", "imagenet", LAST),
    "lite0-random-last": ("efficientnet_lite0", "random", LAST),
    "lite0-imagenet-last-v1": ("efficientnet_lite0", "imagenet", LAST_V1),
    "lite0-random-last-v1": ("efficientnet_lite0", "random", LAST_V1),
    "lite0-imagenet-whole": ("efficientnet_lite0", "imagenet", WHOLE),
    "lite0-random-whole": ("efficientnet_lite0", "random", WHOLE),
    "mobilenet_v2-random-frozen": ("mobilenet_v2", "random", FROZEN),
    "resnet50-random-frozen": ("resnet50", "random", FROZEN),
}


def speed_row(name: str, size: int, batch: int, iters: int, dtype: str = "float32", with_step: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxtl import backbones

    module = backbones.get(name).module(dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), x[:1])
    forward = jax.jit(module.apply)
    flops = forward.lower(variables, x).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt, x):
        loss = lambda p: jnp.mean(module.apply({"params": p}, x) ** 2)
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params = variables["params"]
    t_forward = median_seconds(forward, variables, x, iters=iters)
    t_step = median_seconds(step, params, tx.init(params), x, iters=max(2, iters // 2)) if with_step else float("nan")
    return {"backbone": name, "size": size, "batch": batch, "dtype": dtype, "gmac_per_image": flops / 2 / batch / 1e9,
            "forward_images_s": batch / t_forward, "finetune_step_images_s": batch / t_step}


def speed(args) -> None:
    from jaxtl import backbones

    names = list(backbones.BACKBONES) if args.families == "all" else args.families.split(",")
    rows = []
    for name in names:
        for size in map(int, args.sizes.split(",")):
            for dtype in args.dtypes.split(","):
                rows.append(speed_row(name, size, args.batch, args.iters, dtype, not args.forward_only))
                print(json.dumps(rows[-1]), flush=True)
    m = machine()
    where = f"{m['device']}" if m["platform"] != "cpu" else f"{m['cpu']}, {m['cores']} cores"
    table = (f"Backbone cost, batch {args.batch}, whole base; {where}, jax {m['jax']}\n\n"
             "| backbone | size | dtype | GMAC / image (XLA) | frozen pass images/s | whole fine-tune step images/s |\n"
             "| --- | ---: | --- | ---: | ---: | ---: |\n"
             + "".join(f"| {r['backbone']} | {r['size']} | {r['dtype']} | {r['gmac_per_image']:.3f} | "
                       f"{r['forward_images_s']:.1f} | {r['finetune_step_images_s']:.1f} |\n" for r in rows))
    write_results(args.name or "backbones-speed", {"args": vars(args), "rows": rows, "machine": m}, table, args.out)


def accuracy(args) -> None:
    speakers = sorted({p.split("_")[1] for p in os.listdir(FSDD) if p.endswith(".wav")})
    held = speakers if args.speakers == "all" else args.speakers.split(",")
    rows = []
    for name in args.configs.split(","):
        backbone, weights, overrides = STUDY[name]
        overrides = {**overrides, "backbone": backbone, **({"epochs": args.epochs} if args.epochs else {})}
        runs, t0 = [], time.perf_counter()
        for seed in range(args.seeds):
            if args.protocol == "data":
                runs.append(run_config(overrides, seed, args.size, weights, split_seed=0, train_clips=args.train_clips))
                continue
            for spk in held:
                runs.append(run_config(overrides, seed, args.size, weights, split="group", test_group=spk,
                                       train_clips=args.train_clips))
        tests = [r["test_accuracy"] for r in runs]
        vals = [np.nan if r["val_accuracy"] is None else r["val_accuracy"] for r in runs]
        by_speaker = [float(np.mean(tests[i::len(held)])) for i in range(len(held))] if args.protocol != "data" else []
        row = {"config": name, "backbone": backbone, "weights": "HED" if weights.endswith(".h5") else weights,
               "val_mean": float(np.mean(vals)), "test_mean": float(np.mean(tests)), "test_std": float(np.std(tests)),
               "worst_speaker": min(by_speaker) if by_speaker else None, "speakers": held, "tests": tests,
               "vals": vals, "seconds": time.perf_counter() - t0,
               "wall_seconds": [r.get("wall_seconds") for r in runs], "overrides": overrides}
        rows.append(row)
        print(json.dumps(row), flush=True)
    m = machine()
    what = {"loso": "leave-one-speaker-out (speaker-independent), grouped validation",
            "unseen": f"held-out speaker(s) {', '.join(held)} (speaker-independent), grouped validation",
            "data": "speaker-dependent, one fixed 500-clip test set"}[args.protocol]
    clips = f"{args.train_clips} training clips" if args.train_clips else "all training clips"
    worst = lambda r: "-" if r["worst_speaker"] is None else f"{100 * r['worst_speaker']:.1f} %"  # noqa: E731
    table = (f"Backbone study, FSDD, {args.size}x{args.size}, {what}, {clips}, {args.seeds} seed(s); {m['cpu']}, "
             f"{m['cores']} cores\n\n| configuration | backbone | weights | validation | test (mean ± std) | worst "
             "speaker | runs | seconds |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
             + "".join(f"| {r['config']} | {r['backbone']} | {r['weights']} | {100 * r['val_mean']:.1f} % | "
                       f"{100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f} % | {worst(r)} | {len(r['tests'])} | "
                       f"{r['seconds']:.0f} |\n" for r in rows))
    name = args.name or f"backbones-{args.protocol}-s{args.size}-n{args.train_clips or 'all'}"
    write_results(name, {"args": vars(args), "rows": rows, "machine": m}, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--families", default="all")
    p.add_argument("--sizes", default="64,96,128,224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtypes", default="float32", help="comma list: float32, bfloat16")
    p.add_argument("--forward-only", action="store_true", help="skip the fine-tune step")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else benchmarks/results)")
    p = sub.add_parser("accuracy")
    p.add_argument("--protocol", default="loso", choices=("loso", "unseen", "data"))
    p.add_argument("--configs", default=",".join(STUDY))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--train-clips", type=int, default=1000)
    p.add_argument("--speakers", default="all")
    p.add_argument("--epochs", type=int, default=None, help="override the configurations' epochs")
    p.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.part == "accuracy" and not FSDD.is_dir():
        sys.exit(f"error: FSDD not found at {FSDD}")
    speed(args) if args.part == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
