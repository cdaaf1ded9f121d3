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
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.audio import BadAudio
from jaxtl.cache import fingerprint
from jaxtl.checkpoint import CheckpointError, Checkpoints
from jaxtl.command import command
from jaxtl.config import ConfigError, TrainConfig, config_from_args
from jaxtl.data import DataError
from jaxtl.disk import DiskError, writing
from jaxtl.ensemble import train_ensemble
from jaxtl.epochs import EpochBar, PlanChanged, Plateau, class_logits, mean_loss, run_epoch
from jaxtl.feed import StepFeed
from jaxtl.heads import with_fitted_head
from jaxtl.interrupt import Interrupted, StopRequests
from jaxtl.pipeline import load_features, prepare, settle_bad_files
from jaxtl.prefix import advance, cached_prefix, head_input_statistics
from jaxtl.report import EVALUATION, save_confusion_png, scores, write_report
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
    gather_rows,
    gather_strings,
    initialize_distributed,
    is_main_process,
    local_positions,
    make_mesh,
    process_0_decides,
    process_0s,
    replicate,
)
from jaxtl.steps import EvalPrograms, TrainPrograms, create_train_state, init_params, use_compile_cache
from jaxtl.tune import in_effect as xla_setting
from jaxtl.weights import WeightsError, resolve_weights


def resolve_run_weights(mode: str, weights: str | None, backbone: str, log: Callable) -> tuple[dict | None, str, str]:
    """(base variables or None for random init, where they came from, their digest), the same in every process:
    process 0 resolves first (and downloads, if it must), the others then find its file, and a run whose
    processes ended up with different weights stops."""
    if not is_main_process():
        barrier("weights")
    if mode == "scratch":
        base_vars, source = None, "random init (scratch)"
    elif weights is not None:
        base_vars, source = resolve_weights(weights, backbone=backbone)
    else:
        try:
            base_vars, source = resolve_weights("imagenet", backbone=backbone)
        except WeightsError as e:
            log(f"*** ImageNet weights unavailable ({e}); training on a RANDOMLY INITIALISED {backbone} base. "
                "Pass --weights FILE to use a weight file. ***")
            base_vars, source = None, "random init (ImageNet weights unavailable)"
    if is_main_process():
        barrier("weights")
    digest = "random" if base_vars is None else fingerprint(*(np.asarray(a) for a in jax.tree.leaves(base_vars)))
    check_same_everywhere(digest, "weights", "give every process the same --weights FILE")
    return base_vars, source, digest


def run(cfg: TrainConfig, log: Callable = print) -> dict:
    """Train as `cfg` says; returns the summary (also written to OUT/summary.json). A SIGINT or SIGTERM
    during the epochs saves at the next step boundary and raises `Interrupted` (see `jaxtl.interrupt`)."""
    if cfg.validate().ensemble > 1:  # members are runs of their own (jaxtl.ensemble)
        return train_ensemble(cfg, run, log)
    with StopRequests() as stops:
        return _run(cfg, log, stops)


def _run(cfg: TrainConfig, log: Callable, stops: StopRequests) -> dict:
    # ---------------------------------------------------------------- setup: run directory, weights, mesh
    t_start = time.perf_counter()
    main_process = is_main_process()
    notice = log if main_process else (lambda *_: None)  # the closing line, resumes, fallbacks: every verbosity
    log = notice if cfg.verbose >= 1 else (lambda *_: None)
    use_compile_cache(cfg.cache_dir)
    out = new_run_dir(cfg.out, cfg.recipe, cfg.resume, jax.process_count() > 1)
    cfg = dataclasses.replace(cfg, out=str(out))
    stops.outside = ("interrupted before training began; the caches keep what was done", str(out))
    if main_process:
        with writing(out, "create the run directory"):
            out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(cfg))
    base_vars, weights_source, weights_digest = resolve_run_weights(cfg.mode, cfg.weights, cfg.backbone, notice)
    mesh = make_mesh()
    if cfg.inputs == "replicated" and jax.process_count() > 1:
        raise ConfigError("--inputs replicated holds every clip on every device, which a process of several does "
                          "not have: use --inputs sharded or auto")

    # ---------------------------------------------------------------- data: files -> splits -> each device's share
    seconds = {"setup": time.perf_counter() - t_start}
    t = time.perf_counter()
    prep = prepare(cfg.data_spec(), mesh.size, tuple(local_positions(mesh)), log)
    seconds["split"] = time.perf_counter() - t
    if cfg.mode == "auto":  # the mode and head measured best for this much data (jaxtl.config.AUTO)
        cfg, why = cfg.resolve_auto(int(np.sum(prep.train < prep.n_files)) + len(prep.val), len(prep.classes),
                                    base_vars is not None)
        log(f"--mode auto: {why}")
        if cfg.mode == "scratch":  # only without a weight file (AUTO's rule)
            base_vars, weights_source, weights_digest = None, "random init (scratch)", "random"
        if main_process:
            write_json(out / "config.json", dataclasses.asdict(cfg))

    # ---------------------------------------------------------------- model, checkpoints and resume
    t = time.perf_counter()
    log(f"weights: {weights_source} (digest {weights_digest})")
    model = cfg.model(len(prep.classes))
    params, norm = init_params(model, cfg.image_size, cfg.training_seed, base_vars,
                               cfg.seed if cfg.init_seed is None else cfg.init_seed)
    stages, prefix_split = cfg.stages(), cfg.always_frozen()  # the convs no stage trains: cached, saved once
    images = cfg.image_spec()
    ckpt = Checkpoints(out / "checkpoints", cfg.keep_checkpoints, prefix_split)
    ckpt.save_frozen(params)
    meta_base = {"classes": prep.classes, "config": dataclasses.asdict(cfg), "weights": weights_source,
                 "weights_digest": weights_digest}
    start_stage, start_epoch, plateau, resumed, within = 0, 0, Plateau(), None, None
    if cfg.resume and ckpt.steps():  # state, epoch, stage and counters all from one save
        resumed, meta, step = ckpt.restore(cfg.state_template)
        if meta.get("weights_digest", weights_digest) != weights_digest:
            raise CheckpointError(f"--resume: {out} trained on weights {meta['weights']} (digest "
                                  f"{meta['weights_digest']}), this run resolved {weights_source} (digest "
                                  f"{weights_digest}); resume with the same --weights")
        start_stage, start_epoch, plateau = meta["stage"], meta["epoch"] + 1, Plateau(**meta["counters"])
        within = meta.get("within")  # saved by a stop request in the middle of an epoch
        notice(f"resumed {out} " + (f"in stage {start_stage + 1} epoch {start_epoch + 1} after batch "
                                    f"{within['batches']} (step {step})" if within else
                                    f"after stage {start_stage + 1} epoch {start_epoch} (step {step})"))
    elif cfg.resume:
        notice(f"--resume: {out} had saved no checkpoint yet; starting over")
    history = [h for h in read_metrics(out) if (h["stage"], h["epoch"]) < (start_stage, start_epoch)] \
        if resumed is not None else []

    # ---------------------------------------------------------------- features -> the frozen prefix, streamed
    seconds["model"], acts, feats, t = time.perf_counter() - t, None, None, time.perf_counter()
    own = prep.own
    if prefix_split.cached:  # each process: its own clips, a chunk of features at a time into the frozen pass
        acts, good, errors = cached_prefix(model, params, own, [prep.keys[i] for i in own], prep.features,
                                           prefix_split.k, images, mesh, cfg.cache_dir,
                                           cfg.prefix_cache_key(params, prefix_split.k), cfg.stream_chunk,
                                           cfg.progress, log)
    else:  # images are built in the steps: the process keeps its clips' features
        feats, good, errors = load_features(prep.features, own, cfg.stream_chunk, cfg.progress and main_process)
    log(f"features: {prep.features.describe()} in this process, from {prep.data_source}")
    seconds["features+prefix"] = time.perf_counter() - t
    prep = settle_bad_files(prep, gather_rows(own[~good], np.zeros(int((~good).sum()), np.int8))[0],
                            [BadAudio(*line.split("\0", 1)) for line in  # NUL: in no path
                             gather_strings([f"{e.path}\0{e.reason}" for e in errors])], cfg.on_bad_file)
    record = split_record(prep)
    if cfg.resume and (out / "split.json").is_file():
        check_same_split(record, out)
    if main_process:
        write_json(out / "split.json", record)
        if prep.skipped:
            write_skipped(out, prep.skipped)
    log(f"data: {len(prep.train)} train / {len(prep.val)} val / {len(prep.test)} test clips, "
        f"{len(prep.classes)} classes; mode {cfg.mode}; prefix {'cached' if prefix_split.cached else 'in the step'}; "
        f"{mesh.size} device(s), {jax.process_count()} process(es), {len(own)} clips held here")

    def feed_at(k: int) -> StepFeed:  # a later split's input is one cheap suffix pass over the cached one
        at_k = acts if acts is None or k == prefix_split.k else advance(model, params, acts, prefix_split.k, k,
                                                                        cfg.batch_size)
        return StepFeed(prep.y, own, prep.owner, images, at_k, feats)

    # ---------------------------------------------------------------- stages and epochs
    rng = jax.random.PRNGKey(cfg.training_seed)
    state, steps_done, t = None, 0, time.perf_counter()
    stops.deferred = True  # from here a signal is acted on at a step boundary, after a save

    def interrupted(signum: int, stage_index: int, epoch: int, step: int) -> Interrupted:
        ckpt.close()
        return Interrupted(signum, f"interrupted at stage {stage_index + 1} epoch {epoch + 1} (step {step})", str(out))

    for stage_index, stage in enumerate(stages):
        if stage_index < start_stage:
            continue
        feed = feed_at(stage.split.k)
        if stage.split.cached and stage.split.head_only:  # scanned epochs: the inputs stay on the devices
            feed.put_on_devices(mesh, cfg.inputs, log)
        tx = stage.optimizer.transform(stage.split.labels(params))
        my_train = prep.train[feed.row[prep.train] >= 0]
        if cfg.normalize and stage_index == 0 and resumed is None:
            norm = head_input_statistics(model, params, feed, my_train, stage.split.k, stage.split.cached, images,
                                         cfg.batch_size, mesh)
        if cfg.head != "dense" and resumed is None:  # a closed-form head on the cached head inputs (frozen only)
            ids, taps = gather_rows(my_train, acts["taps"][feed.row[my_train]])  # pooled head inputs, not activations
            params, chosen = with_fitted_head(params, norm, taps[np.searchsorted(ids, prep.train)], prep.y[prep.train],
                                              len(prep.classes), cfg.head, prep.clip_groups(prep.train),
                                              cfg.training_seed)
            params = {**params, "head": process_0s(params["head"])}
            log(f"head: {cfg.head} fitted on {len(prep.train)} clips" + (f" ({chosen})" if chosen else ""))
        state = create_train_state(params, norm, tx).replace(step=jnp.asarray(steps_done, jnp.int32))
        best_params = None
        if resumed is not None and stage_index == start_stage:
            state = resumed
            try:  # none yet after a stop in the first epoch: the resumed state is the best so far
                best_state, best_meta, _ = ckpt.restore(cfg.state_template, "best") if ckpt.steps("best") else \
                    (None, {"stage": -1}, None)
                best_params = replicate(mesh, best_state.params) if best_meta["stage"] == stage_index else None
            except CheckpointError as e:  # `best` keeps one save: lost, the run goes on from `latest`
                notice(f"warning: {e}; the best model so far is taken from the resumed state")
        state = replicate(mesh, state)
        best_params = best_params if best_params is not None else state.params
        programs = TrainPrograms(model, stage.split, images.preprocess, mesh, cfg.augment(), tx, rng, cfg.mixup,
                                 feed.table is None or feed.table.sharded, cfg.bn == "train")
        first = start_epoch if (resumed is not None and stage_index == start_stage) else 0
        bar = EpochBar(stage.epochs, first, f"stage {stage_index + 1}/{len(stages)}",
                       cfg.verbose == 1 and main_process)
        best_save, saved_at = None, time.perf_counter()  # the best epoch's save waits for the next checkpoint
        for epoch in range(first, stage.epochs if not plateau.stop(cfg.patience) else first):
            desc = f"stage {stage_index + 1} epoch {epoch + 1}/{stage.epochs}"
            state, tr = run_epoch(programs, state, feed, prep.train, cfg.batch_size, mesh,
                                  [cfg.training_seed, stage_index, epoch], desc, train=cfg.head == "dense",
                                  progress=cfg.progress, stop=stops.signal, resume=within if epoch == first else None)
            if tr.stopped_after is not None:  # a stop request mid-epoch: where it stood, saved, then stop
                meta = {**meta_base, "stage": stage_index, "epoch": epoch - 1, "counters": dataclasses.asdict(plateau),
                        "within": {"batches": tr.stopped_after, "of": tr.batches, "totals": tr.totals}}
                ckpt.save(int(state.step), state, meta, best_save)
                raise interrupted(tr.stop_signal, stage_index, epoch, int(state.step))
            val = None
            if len(prep.val):
                _, val = run_epoch(programs, state, feed, prep.val, cfg.batch_size, mesh, None, "validation",
                                   train=False, progress=cfg.progress)
            improved, cut = plateau.update(val.loss if val else tr.loss, cfg.plateau_patience)
            if improved:
                best_params = state.params
            if cut:
                state = state.replace(lr_scale=state.lr_scale * cfg.plateau_factor)
                bar.write(f"{desc}: learning rate cut to {cfg.lr * float(state.lr_scale):.3g} after "
                          f"{cfg.plateau_patience} epochs without improvement", log)
            history.append({"stage": stage_index, "epoch": epoch, "step": int(state.step), "train_loss": tr.loss,
                            "train_acc": tr.accuracy, "val_loss": val.loss if val else None,
                            "val_acc": val.accuracy if val else None, "lr": cfg.lr * float(state.lr_scale),
                            "seconds": tr.seconds,
                            "compile_seconds": tr.compile_seconds + (val.compile_seconds if val else 0.0),
                            "images_per_s": tr.clips / tr.seconds, "improved": improved})
            if main_process:
                write_metrics(out, history)
            line = (f"{desc}: loss {tr.loss:.4f} acc {tr.accuracy:.3f}"
                    + (f" | val loss {val.loss:.4f} acc {val.accuracy:.3f}" if val else "")
                    + f" | {tr.seconds:.2f}s, {tr.clips / tr.seconds:.0f} clips/s"
                    + (f" (+{history[-1]['compile_seconds']:.1f}s compile)" if history[-1]["compile_seconds"] > 0.05
                       else ""))
            if cfg.verbose >= 2:
                log(line)
            bar.advance(history[-1], history)
            meta = {**meta_base, "stage": stage_index, "epoch": epoch, "counters": dataclasses.asdict(plateau)}
            best_save = (int(state.step), state, meta) if improved else best_save
            last = epoch == stage.epochs - 1 or plateau.stop(cfg.patience)
            stop = stops.signal()
            if last or stop or process_0_decides(time.perf_counter() - saved_at >= cfg.checkpoint_every):
                ckpt.save(int(state.step), state, meta, best_save)
                best_save, saved_at = None, time.perf_counter()
            if stop:
                raise interrupted(stop, stage_index, epoch, int(state.step))
            if plateau.stop(cfg.patience):
                bar.write(f"early stopping after epoch {epoch + 1}: no validation improvement for {cfg.patience} "
                          "epochs", log)
                break
        bar.close()
        within = None
        state = state.replace(params=best_params)
        params, norm, steps_done, plateau = state.params, state.norm, int(state.step), Plateau()
    ckpt.close()
    stops.deferred = False
    stops.outside = ("interrupted after training, before its scores and report were written; the checkpoints "
                     "are saved", str(out))
    seconds["epochs"] = time.perf_counter() - t

    # ---------------------------------------------------------------- test and summary
    scored, t = {}, time.perf_counter()
    if state is not None:
        last = stages[-1].split
        programs, feed = EvalPrograms(model, last, images.preprocess, mesh), feed_at(last.k)
        for side, ids in (("test", prep.test), ("holdout", prep.holdout)):
            if len(ids):
                logits = class_logits(programs, state, feed, ids, cfg.batch_size, mesh, side, cfg.progress)
                scored[side] = {**scores(prep.y[ids], logits.argmax(-1), prep.classes),
                                "loss": mean_loss(logits, prep.y[ids])}
    test, holdout = scored.get("test"), scored.get("holdout")
    seconds["test"] = time.perf_counter() - t
    kept = [h for h in history if h["stage"] == len(stages) - 1 and h.get("improved")][-1:]  # the model kept
    summary = {
        "test_accuracy": test["accuracy"] if test else None, "test_loss": test["loss"] if test else None,
        "test_protocol": prep.test_protocol(), "scores": scored,
        "holdout": {"group": prep.holdout_group, "accuracy": holdout["accuracy"], "n": holdout["n"]} if holdout
        else None,
        # the validation scores of the model kept (the best epoch): what choices are made on
        "val_accuracy": kept[0]["val_acc"] if kept else None, "val_loss": kept[0]["val_loss"] if kept else None,
        "best_epoch": {"stage": kept[0]["stage"] + 1, "epoch": kept[0]["epoch"] + 1} if kept else None,
        "n_test": len(prep.test), "n_train": len(prep.train), "n_val": len(prep.val), "classes": prep.classes,
        "weights": weights_source, "weights_digest": weights_digest, "data": prep.data_source, "mode": cfg.mode,
        "epochs_run": len(history), "wall_seconds": time.perf_counter() - t_start,
        # speeds leave compilation out; it is reported on its own
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
        "train_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
        "compile_seconds": float(sum(h.get("compile_seconds", 0.0) for h in history)),
        "skipped_files": [str(e) for e in prep.skipped], "device": str(jax.devices()[0].platform),
        "xla_setting": xla_setting(),
        "n_devices": len(jax.devices()), "n_processes": jax.process_count(),
        "stage_seconds": seconds, "out": str(out),
    }
    if main_process:
        write_json(out / "summary.json", summary)
        if history:
            plot_curves(history, out / "curves.png")
        for side, s in scored.items():
            save_confusion_png(s["confusion_matrix"], prep.classes, out / f"confusion_{side}.png",
                               f"{side} set, end of training")
        (out / EVALUATION).unlink(missing_ok=True)  # scored a model this run has replaced
        write_report(out)
    if prep.skipped:
        notice(f"skipped {len(prep.skipped)} file(s) (listed in {out / 'skipped.tsv'}):")
        for e in prep.skipped:
            notice(f"  {e}")
    notice(f"test accuracy {'-' if test is None else format(test['accuracy'], '.4f')} on {len(prep.test)} clips "
        f"({summary['test_protocol']})"
        + (f"; held-out speaker {prep.holdout_group}: {holdout['accuracy']:.4f} on {holdout['n']} clips "
           "(speaker-independent)" if holdout else "")
        + f"; {summary['wall_seconds']:.1f}s wall; report {out / 'report.md'}")
    return summary


def train(cfg: TrainConfig | None = None, log: Callable = print, **settings) -> dict:
    """The notebook entry point: `run` of `cfg` (default: the jaxtl recipe), with `settings` on top; returns
    the summary (`summary["out"]` is the run directory)."""
    cfg = dataclasses.replace(cfg, **settings) if cfg is not None else TrainConfig.from_recipe("jaxtl", **settings)
    return run(cfg, log)


class _CallableModule(types.ModuleType):
    """`from jaxtl import train` gives this module once anything imported it (Python binds a package's
    submodule to its name), so the module itself calls `train`: the API's name and `python -m jaxtl.train`
    can both stay."""

    def __call__(self, *args, **kwargs) -> dict:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


USER_ERRORS = (ConfigError, DataError, WeightsError, CheckpointError, RunDirError, FloatingPointError,
               ProcessMismatch, DiskError, PlanChanged)


@command
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
