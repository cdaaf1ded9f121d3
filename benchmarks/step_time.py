"""Train-step time of every mode, jaxtl against peers on the same batch, image size and trainable set.

    python benchmarks/step_time.py [--batch 32] [--size 224] [--dtype float32|bfloat16] [--steps 20]
                                   [--modes ...] [--peers keras-tf,keras-jax,torch] [--out DIR]

For each mode: compile time, median step time over `--steps` timed steps after warm-up (each step
synchronised with `block_until_ready`), images/s, and achieved FLOP/s from XLA's cost analysis set
against a ceiling measured on the same device (a large matrix product).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_seconds, write_results  # noqa: E402
from jaxtl.config import DTYPES, TrainConfig  # noqa: E402
from jaxtl.model import Classifier  # noqa: E402
from jaxtl.split import SplitPoint  # noqa: E402
from jaxtl.steps import create_train_state, init_params, train_step  # noqa: E402

# name: (split k, prefix cached?)
MODES = {
    "frozen-cached": (13, True),
    "frozen-instep": (13, False),
    "finetune-cached": (10, True),
    "finetune-instep": (10, False),
    "full": (0, False),
}
PEER_MODES = {"frozen-instep": "frozen", "finetune-instep": "finetune", "full": "full"}


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_ceiling(dtype: str, steps: int = 10) -> float:
    n = 8192 if jax.devices()[0].platform != "cpu" else 2048
    dt = DTYPES[dtype]
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / median_seconds(f, a, iters=steps, warmup=2)


def time_mode(name: str, batch: int, size: int, dtype: str, steps: int, classes: int = 10) -> dict:
    k, cached = MODES[name]
    cfg = TrainConfig(image_size=size, batch_size=batch, dtype=dtype, mode="scratch" if k == 0 else "finetune",
                      weights=None if k == 0 else "random", verbose=0)
    model = cfg.model(classes)
    params, norm = init_params(model, size, cfg.seed)
    split = SplitPoint(k, model.spec.units, cached)
    tx = cfg.stages()[0].optimizer.transform(split.labels(params))
    state = create_train_state(params, norm, tx)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (batch, size, size, 3)), jnp.float32)
    if cached:  # what the frozen prefix hands the step: its split-point inputs (no activation left at k = 13)
        x = jax.jit(lambda p, im: model.apply({"params": p}, im, k, method=Classifier.prefix))(params, x)
        x = {name: a for name, a in x.items() if a is not None}
    b = {"x": x, "y": jnp.asarray(rng.integers(0, classes, batch), jnp.int32), "mask": jnp.ones(batch)}
    step = jax.jit(functools.partial(train_step, rng=jax.random.PRNGKey(0), model=model, split=split,
                                     augment=cfg.augment(), preprocess=cfg.preprocess, tx=tx))
    t = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    seconds = median_seconds(lambda s, bb: compiled(s, bb)[1], state, b, iters=steps, warmup=2)
    flops = _flops(compiled)
    return {"mode": name, "k": k, "cached": cached, "compile_s": compile_s, "step_s": seconds,
            "images_per_s": batch / seconds, "flops_per_step": flops,
            "flops_per_s": flops / seconds if flops else None}


def run_peer(peer: str, mode: str, batch: int, size: int, steps: int, python: str) -> dict:
    script = Path(__file__).parent / "peers" / ("keras_recipe.py" if peer.startswith("keras") else "torch_vgg.py")
    env = dict(os.environ)
    if peer.startswith("keras"):
        env["KERAS_BACKEND"] = {"keras-tf": "tensorflow", "keras-jax": "jax"}[peer]
    cmd = [python, str(script), "--mode", mode, "--batch", str(batch), "--size", str(size), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "failed").splitlines()
        return {"skipped": lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="32", help="one or more, comma-separated")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="float32", help="float32 and/or bfloat16, comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--peers", default="keras-tf,keras-jax,torch",
                    help="comma list; each runs in its own process, skipped with a reason when not installed")
    ap.add_argument("--peer-python", default=None, help="interpreter of the peers (default: .venv-peers, else this)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    peer_python = args.peer_python or next(
        (p for p in (".venv-peers/bin/python",) if Path(p).exists()), sys.executable)
    peers = [p for p in args.peers.split(",") if p]
    rows, ceilings = [], {}
    for dtype in args.dtype.split(","):
        ceilings[dtype] = matmul_ceiling(dtype)
        for batch in (int(b) for b in args.batch.split(",")):
            for name in args.modes.split(","):
                r = time_mode(name, batch, args.size, dtype, args.steps)
                r.update(batch=batch, dtype=dtype)
                r["fraction_of_ceiling"] = r["flops_per_s"] / ceilings[dtype] if r["flops_per_s"] else None
                for peer in peers:
                    if name in PEER_MODES and dtype == "float32":
                        r[peer] = run_peer(peer, PEER_MODES[name], batch, args.size, args.steps,
                                           peer_python if peer != "keras-jax" else sys.executable)
                rows.append(r)
                print(json.dumps(r), flush=True)
    m = machine()
    head = "| batch | dtype | mode | compile s | step ms | images/s | GFLOP/step | TFLOP/s | % of ceiling |" + "".join(
        f" {p} step ms | jaxtl speed-up vs {p} |" for p in peers)
    lines = [f"Step time, {args.size}x{args.size}; {m['device']} ({m['cpu']}, {m['cores']} cores); jax {m['jax']}; "
             "matmul ceiling " + ", ".join(f"{d} {c / 1e12:.3f} TFLOP/s" for d, c in ceilings.items()) + "\n",
             head, "|" + " --- |" * (9 + 2 * len(peers))]
    for r in rows:
        cells = [str(r["batch"]), r["dtype"], r["mode"], f"{r['compile_s']:.1f}", f"{r['step_s'] * 1e3:.1f}",
                 f"{r['images_per_s']:.1f}", f"{(r['flops_per_step'] or 0) / 1e9:.1f}",
                 f"{(r['flops_per_s'] or 0) / 1e12:.3f}", f"{100 * (r['fraction_of_ceiling'] or 0):.0f}"]
        for p in peers:
            peer = r.get(p)
            if not peer:
                cells += ["-", "-"]
            elif "skipped" in peer:
                cells += [f"skipped: {peer['skipped'][:60]}", "-"]
            else:
                cells += [f"{peer['step_s'] * 1e3:.1f}", f"{peer['step_s'] / r['step_s']:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    tag = f"b{args.batch.replace(',', '-')}-s{args.size}-{args.dtype.replace(',', '-')}"
    write_results(f"step_time-{tag}", {"args": vars(args), "machine": m, "ceiling_flops_per_s": ceilings,
                                       "rows": rows}, "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
