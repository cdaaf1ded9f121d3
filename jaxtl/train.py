"""`python -m jaxtl.train`: the training loop, in sections (setup, data, prefix, stages and epochs, test).

Everything it runs lives in the modules below it: the config (`config`), the input pipeline
(`pipeline`), the frozen prefix's cached outputs (`prefix`), the split point (`split`), the jitted steps
(`steps`), one epoch and its control (`epochs`), checkpoints (`checkpoint`) and the run directory
(`rundir`). Evaluate and predict use `restore`, never this module.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.cache import fingerprint
from jaxtl.checkpoint import CheckpointError, Checkpoints
from jaxtl.config import ConfigError, TrainConfig, config_from_args
from jaxtl.data import DataError
from jaxtl.epochs import Plateau, run_epoch
from jaxtl.pipeline import StepFeed, prepare
from jaxtl.prefix import advance, cached_prefix, head_input_statistics
from jaxtl.rundir import (
    RunDirError,
    check_same_split,
    new_run_dir,
    plot_curves,
    read_metrics,
    split_record,
    write_json,
    write_metrics,
    write_skipped,
)
from jaxtl.sharding import (
    ProcessMismatch,
    barrier,
    check_same_everywhere,
    initialize_distributed,
    is_main_process,
    make_mesh,
    replicate,
)
from jaxtl.steps import EvalPrograms, TrainPrograms, create_train_state, init_params, use_compile_cache
from jaxtl.weights import WeightsError, resolve_weights


def resolve_run_weights(mode: str, weights: str | None, log: Callable) -> tuple[dict | None, str, str]:
    """(base variables or None for random init, where they came from, their digest), the same in every process:
    process 0 resolves first (and downloads, if it must), the others then find its file, and a run whose
    processes ended up with different weights stops."""
    if not is_main_process():
        barrier("weights")
    if mode == "scratch":
        base_vars, source = None, "random init (scratch)"
    elif weights is not None:
        base_vars, source = resolve_weights(weights)
    else:
        try:
            base_vars, source = resolve_weights("imagenet")
        except WeightsError as e:
            log(f"*** ImageNet weights unavailable ({e}); training on a RANDOMLY INITIALISED VGG16 base. "
                "Pass --weights FILE to use a weight file. ***")
            base_vars, source = None, "random init (ImageNet weights unavailable)"
    if is_main_process():
        barrier("weights")
    digest = "random" if base_vars is None else fingerprint(*(np.asarray(a) for a in jax.tree.leaves(base_vars)))
    check_same_everywhere(digest, "weights", "give every process the same --weights FILE")
    return base_vars, source, digest


def run(cfg: TrainConfig, log: Callable = print) -> dict:
    """Train as `cfg` says; returns the summary (also written to OUT/summary.json)."""
    # ---------------------------------------------------------------- setup: run directory, weights, mesh
    t_start = time.perf_counter()
    main_process = is_main_process()
    log = log if main_process else (lambda *_: None)
    cfg.validate()
    use_compile_cache(cfg.cache_dir)
    out = new_run_dir(cfg.out, cfg.recipe, cfg.resume, jax.process_count() > 1)
    cfg = dataclasses.replace(cfg, out=str(out))
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(cfg))
    base_vars, weights_source, weights_digest = resolve_run_weights(cfg.mode, cfg.weights, log)
    log(f"weights: {weights_source} (digest {weights_digest})")
    mesh = make_mesh()

    # ---------------------------------------------------------------- data: files -> features -> splits
    prep = prepare(cfg.data_spec(), log)
    record = split_record(prep)
    if cfg.resume and (out / "split.json").is_file():
        check_same_split(record, out)
    if main_process:
        write_json(out / "split.json", record)
        if prep.skipped:
            write_skipped(out, prep.skipped)

    # ---------------------------------------------------------------- model, checkpoints and resume
    model = cfg.model(len(prep.classes))
    params, norm = init_params(model, cfg.image_size, cfg.seed, base_vars, cfg.init_seed)
    stages, prefix_split = cfg.stages(), cfg.always_frozen()  # the convs no stage trains: cached, saved once
    images = cfg.image_spec()
    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints, prefix_split)
    ckpt.save_frozen(params)
    meta_base = {"classes": prep.classes, "config": dataclasses.asdict(cfg), "weights": weights_source,
                 "weights_digest": weights_digest}
    start_stage, start_epoch, plateau, resumed = 0, 0, Plateau(), None
    if cfg.resume and ckpt.steps():  # state, epoch, stage and counters all from one save
        resumed, meta, step = ckpt.restore(cfg.state_template)
        if meta.get("weights_digest", weights_digest) != weights_digest:
            raise CheckpointError(f"--resume: {out} trained on weights {meta['weights']} (digest "
                                  f"{meta['weights_digest']}), this run resolved {weights_source} (digest "
                                  f"{weights_digest}); resume with the same --weights")
        start_stage, start_epoch, plateau = meta["stage"], meta["epoch"] + 1, Plateau(**meta["counters"])
        log(f"resumed {out} after stage {start_stage + 1} epoch {start_epoch} (step {step})")
    elif cfg.resume:
        log(f"--resume: {out} had saved no checkpoint yet; starting over")
    history = [h for h in read_metrics(out) if (h["stage"], h["epoch"]) < (start_stage, start_epoch)] \
        if resumed is not None else []

    # ---------------------------------------------------------------- the frozen prefix, once per clip
    acts = None
    if prefix_split.cached:
        acts = cached_prefix(model, params, prep.keys, prep.feats, prefix_split.k, images, cfg.batch_size, mesh,
                             cfg.cache_dir, cfg.prefix_cache_key(params, prefix_split.k), cfg.progress, log)
    log(f"data: {len(prep.train)} train / {len(prep.val)} val / {len(prep.test)} test clips, "
        f"{len(prep.classes)} classes; mode {cfg.mode}; prefix {'cached' if prefix_split.cached else 'in the step'}; "
        f"{mesh.size} device(s), {jax.process_count()} process(es)")

    def feed_at(k: int) -> StepFeed:  # a later split's input is one cheap suffix pass over the cached one
        at_k = acts if acts is None or k == prefix_split.k else advance(model, params, acts, prefix_split.k, k,
                                                                        cfg.batch_size)
        return StepFeed(prep, images, at_k)

    # ---------------------------------------------------------------- stages and epochs
    rng = jax.random.PRNGKey(cfg.seed)
    state, steps_done = None, 0
    for stage_index, stage in enumerate(stages):
        if stage_index < start_stage:
            continue
        feed = feed_at(stage.split.k)
        tx = stage.optimizer.transform(stage.split.labels(params))
        if cfg.normalize and stage_index == 0 and resumed is None:
            norm = head_input_statistics(model, params, feed, prep.train, stage.split.k, stage.split.cached, images,
                                         cfg.batch_size, mesh)
        state = create_train_state(params, norm, tx).replace(step=jnp.asarray(steps_done, jnp.int32))
        best_params = None
        if resumed is not None and stage_index == start_stage:
            state = resumed
            try:
                best_state, best_meta, _ = ckpt.restore(cfg.state_template, "best")
                best_params = best_state.params if best_meta["stage"] == stage_index else None
            except CheckpointError as e:  # `best` keeps one save: lost, the run goes on from `latest`
                log(f"warning: {e}; the best model so far is taken from the resumed state")
        state = replicate(mesh, state)
        best_params = best_params if best_params is not None else state.params
        programs = TrainPrograms(model, stage.split, cfg.preprocess, mesh, cfg.augment(), tx, rng)
        first = start_epoch if (resumed is not None and stage_index == start_stage) else 0
        for epoch in range(first, stage.epochs if not plateau.stop(cfg.patience) else first):
            desc = f"stage {stage_index + 1} epoch {epoch + 1}/{stage.epochs}"
            state, tr = run_epoch(programs, state, feed, prep.train, cfg.batch_size, mesh,
                                  [cfg.seed, stage_index, epoch], desc, train=True, progress=cfg.progress)
            val = None
            if len(prep.val):
                _, val = run_epoch(programs, state, feed, prep.val, cfg.batch_size, mesh, None, "validation",
                                   train=False, progress=cfg.progress)
            improved, cut = plateau.update(val.loss if val else tr.loss, cfg.plateau_patience)
            if improved:
                best_params = state.params
            if cut:
                state = state.replace(lr_scale=state.lr_scale * cfg.plateau_factor)
            history.append({"stage": stage_index, "epoch": epoch, "step": int(state.step), "train_loss": tr.loss,
                            "train_acc": tr.accuracy, "val_loss": val.loss if val else None,
                            "val_acc": val.accuracy if val else None, "lr": cfg.lr * float(state.lr_scale),
                            "seconds": tr.seconds,
                            "compile_seconds": tr.compile_seconds + (val.compile_seconds if val else 0.0),
                            "images_per_s": tr.clips / tr.seconds})
            if main_process:
                write_metrics(out, history)
            log(f"{desc}: loss {tr.loss:.4f} acc {tr.accuracy:.3f}"
                + (f" | val loss {val.loss:.4f} acc {val.accuracy:.3f}" if val else "")
                + f" | {tr.seconds:.2f}s, {tr.clips / tr.seconds:.0f} clips/s"
                + (f" (+{history[-1]['compile_seconds']:.1f}s compile)" if history[-1]["compile_seconds"] > 0.05
                   else ""))
            meta = {**meta_base, "stage": stage_index, "epoch": epoch, "counters": dataclasses.asdict(plateau)}
            ckpt.save(int(state.step), state, meta, improved)
            if plateau.stop(cfg.patience):
                log(f"early stopping: no validation improvement for {cfg.patience} epochs")
                break
        state = state.replace(params=best_params)
        params, norm, steps_done, plateau = state.params, state.norm, int(state.step), Plateau()
    ckpt.close()

    # ---------------------------------------------------------------- test and summary
    test = None
    if state is not None and len(prep.test):
        last = stages[-1].split
        _, test = run_epoch(EvalPrograms(model, last, cfg.preprocess, mesh), state, feed_at(last.k), prep.test,
                            cfg.batch_size, mesh, None, "test", train=False, progress=cfg.progress)
    summary = {
        "test_accuracy": test.accuracy if test else None, "test_loss": test.loss if test else None,
        "n_test": len(prep.test), "n_train": len(prep.train), "n_val": len(prep.val), "classes": prep.classes,
        "weights": weights_source, "weights_digest": weights_digest, "data": prep.data_source, "mode": cfg.mode,
        "epochs_run": len(history), "wall_seconds": time.perf_counter() - t_start,
        # speeds leave compilation out; it is reported on its own
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
        "compile_seconds": float(sum(h.get("compile_seconds", 0.0) for h in history)),
        "skipped_files": [str(e) for e in prep.skipped], "device": str(jax.devices()[0].platform),
        "n_devices": len(jax.devices()), "n_processes": jax.process_count(),
    }
    if main_process:
        write_json(out / "summary.json", summary)
        if history:
            plot_curves(history, out / "curves.png")
    if prep.skipped:
        log(f"skipped {len(prep.skipped)} file(s) (listed in {out / 'skipped.tsv'}):")
        for e in prep.skipped:
            log(f"  {e}")
    log(f"test accuracy {'-' if test is None else f'{test.accuracy:.4f}'} on {len(prep.test)} clips; "
        f"{summary['wall_seconds']:.1f}s wall; run in {out}")
    return summary


USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, RunDirError, FloatingPointError,
               ProcessMismatch)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
        run(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
