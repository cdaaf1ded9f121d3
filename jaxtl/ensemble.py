"""Ensembles (`--ensemble N`): N members trained as ordinary runs in RUN/members/I, averaged in probability.

Members share the run's splits (its `seed`) and differ in their training seed (`train_seed + i`: the
head's init, the order of its batches) and, with a random base, in the base's init (`init_seed + i`:
each member then sees different frozen features, the diversity a linear head on one base lacks).
The run directory holds every member's checkpoints; `jaxtl.restore.restore_run` loads them as one
model (logits: the log of the members' mean probability), so evaluate and predict need nothing else.
An interrupted ensemble resumes member by member: finished members are kept, the one that was running
resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax

from jaxtl.config import ConfigError, TrainConfig, load_config, saved_config
from jaxtl.data import DataError
from jaxtl.epochs import mean_loss
from jaxtl.evaluate import labelled_clips
from jaxtl.interrupt import Interrupted
from jaxtl.report import EVALUATION, scores, write_report
from jaxtl.restore import MEMBERS, predict_logits, restore_run
from jaxtl.rundir import SPLIT_RECORD, new_run_dir, write_json


def member_config(cfg: TrainConfig, i: int) -> TrainConfig:
    """Member i's settings: the run's, its splits included, with training and random-init seeds + i."""
    return dataclasses.replace(
        cfg, ensemble=1, train_seed=cfg.training_seed + i,
        init_seed=(cfg.seed if cfg.init_seed is None else cfg.init_seed) + i, out=str(Path(cfg.out) / MEMBERS / str(i)),
        resume=(Path(cfg.out) / MEMBERS / str(i) / "config.json").is_file())


def check_member(member: TrainConfig) -> None:
    """A member an interrupted ensemble started must be finished with the settings it started with."""
    saved = load_config(saved_config(member.out), Path(member.out) / "config.json")
    resolved = ("mode", "head") if member.mode == "auto" else ()  # saved as --mode auto resolved them
    changed = sorted(f.name for f in dataclasses.fields(member) if f.name not in ("out", "resume", "verbose", *resolved)
                     and getattr(saved, f.name) != getattr(member, f.name))
    if changed:
        raise ConfigError(f"--resume: {member.out} was trained with other settings ({', '.join(changed)}); resume "
                          "the ensemble with its own settings, or start a new --out")


def train_ensemble(cfg: TrainConfig, run_member: Callable[[TrainConfig, Callable], dict], log: Callable = print
                   ) -> dict:
    """Train (or finish) every member with `run_member`, then score the ensemble on the run's validation, test
    and held-out clips; returns the summary (also OUT/summary.json)."""
    t_start = time.perf_counter()
    if jax.process_count() > 1:
        raise ConfigError("--ensemble trains its members in one process; run it without --num-processes")
    out = new_run_dir(cfg.out, cfg.recipe, cfg.resume, False)
    if (out / MEMBERS).is_dir() and not cfg.resume:
        raise ConfigError(f"{out} already holds ensemble members: pass --resume to finish it or choose another --out")
    cfg = dataclasses.replace(cfg, out=str(out))
    for member in (member_config(cfg, i) for i in range(cfg.ensemble)):
        if member.resume:  # before anything is written
            check_member(member)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    members = []
    for i in range(cfg.ensemble):
        member = member_config(cfg, i)
        done = Path(member.out) / "summary.json"
        if done.is_file():
            log(f"ensemble member {i + 1}/{cfg.ensemble}: finished before ({member.out})")
            members.append(json.loads(done.read_text()))
            continue
        log(f"ensemble member {i + 1}/{cfg.ensemble}: training seed {member.train_seed}"
            + (", resumed" if member.resume else ""))
        try:
            members.append(run_member(member, log))
        except Interrupted as e:  # continued as the ensemble it is part of, not as a run of its own
            raise e.of_run(str(out)) from None
    t_members, t = time.perf_counter() - t_start, time.perf_counter()
    shutil.copy(Path(members[0]["out"]) / SPLIT_RECORD, out / SPLIT_RECORD)
    restored = restore_run(out)
    scored = {}
    for side in ("val", "test", "holdout"):
        try:
            feats, y, _, keys = labelled_clips(restored, out, None, side=side, progress=False)
        except DataError:  # the run has no clips on this side
            continue
        logits = predict_logits(restored, feats, keys=keys)
        scored[side] = {**scores(y, logits.argmax(-1), restored.classes), "loss": mean_loss(logits, y)}
    test, holdout, val = scored.get("test"), scored.get("holdout"), scored.pop("val", None)
    first = members[0]
    summary = {
        "test_accuracy": test["accuracy"] if test else None, "test_loss": test["loss"] if test else None,
        "test_protocol": first["test_protocol"], "scores": scored,
        "holdout": {**first["holdout"], "accuracy": holdout["accuracy"]} if holdout else None,
        "val_accuracy": val["accuracy"] if val else None, "val_loss": val["loss"] if val else None,
        "best_epoch": None, "ensemble": cfg.ensemble,
        "members": [{"out": m["out"], "seed": cfg.training_seed + i, "val_accuracy": m["val_accuracy"],
                     "test_accuracy": m["test_accuracy"],
                     "holdout_accuracy": m["holdout"]["accuracy"] if m.get("holdout") else None}
                    for i, m in enumerate(members)],
        **{k: first[k] for k in ("n_test", "n_train", "n_val", "classes", "weights", "weights_digest", "data", "mode",
                                 "skipped_files", "device", "n_devices", "n_processes")},
        "epochs_run": sum(m["epochs_run"] for m in members), "wall_seconds": time.perf_counter() - t_start,
        "stage_seconds": {"members": t_members, "ensemble scores": time.perf_counter() - t}, "out": str(out),
    }
    write_json(out / "summary.json", summary)
    (out / EVALUATION).unlink(missing_ok=True)
    write_report(out)
    log(f"ensemble of {cfg.ensemble}: test accuracy "
        + ("-" if test is None else f"{test['accuracy']:.4f} on {test['n']} clips ({first['test_protocol']})")
        + (f"; held-out speaker {first['holdout']['group']}: {holdout['accuracy']:.4f}" if holdout else "")
        + " (members: " + ", ".join("-" if m["test_accuracy"] is None else f"{m['test_accuracy']:.4f}" for m in members)
        + ")"
        + f"; {summary['wall_seconds']:.1f}s wall; report {out / 'report.md'}")
    return summary
