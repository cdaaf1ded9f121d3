"""One pass over a set of clips, and the epoch-level control of training (early stopping, LR on plateau).

Each pass follows `jaxtl.feed.epoch_plan`: every device takes its own clips. A head-only stage on cached
inputs kept on the devices (`StepFeed.table`) runs a whole epoch as one device program; any other stage
feeds one jitted step per batch, each process preparing its rows on a host thread. The divergence
check stays on the device (no host sync per step) and stops the run before a non-finite state is saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxtl.feed import StepFeed, epoch_plan, map_local
from jaxtl.sharding import gather_rows, global_batch, is_main_process, local_rows, prefetch
from jaxtl.steps import EvalPrograms, compile_time


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    clips: int
    seconds: float  # without compilation
    compile_seconds: float
    totals: list  # [loss sum, correct count, row count] of the batches run, with those of a resumed part
    batches: int  # in the epoch's plan
    stopped_after: int | None = None  # batches done when a stop request ended the pass early; None: complete
    stop_signal: int = 0  # the signal of that request


def means(totals) -> tuple[float, float]:
    """(mean loss, accuracy) from [loss sum, correct count, row count]."""
    t = np.asarray(totals)
    return float(t[0] / max(t[2], 1)), float(t[1] / max(t[2], 1))


class PlanChanged(Exception):
    """A run resumed in the middle of an epoch whose batches are no longer the ones it stopped in."""


def diverged(step: int, desc: str) -> FloatingPointError:
    return FloatingPointError(f"training diverged: non-finite loss at step {step} ({desc}); stopped before "
                              "saving it, the last good checkpoint stays in place")


def run_epoch(programs: EvalPrograms, state, feed: StepFeed, clip_ids: np.ndarray, batch_size: int, mesh,
              rng, desc: str, train: bool, progress: bool = False, stop=None, resume: dict | None = None):
    """One pass over `clip_ids` (shuffled by `rng` when training); returns (state, EpochResult).

    A training pass fed from the host asks `stop()` after each step and ends early when it says so
    (`stopped_after`); `resume` ({"batches", "totals"} of such a pass) skips the batches it ran and goes on
    with its totals, so the epoch ends as an uninterrupted one does. A scanned pass (one device program)
    always runs whole."""
    with compile_time() as compiled:
        t0 = time.perf_counter()
        idx, mask = epoch_plan(clip_ids, feed.owner, mesh.size, batch_size,
                               np.random.default_rng(rng) if train else None)
        if programs.scanned and feed.table is not None:
            state, totals = _scanned(programs, state, feed, idx, mask, desc, train)
            done = None
        else:
            if resume is not None and resume.get("of", len(idx)) != len(idx):
                raise PlanChanged(f"--resume: the run stopped after batch {resume['batches']} of {resume['of']} in "
                                  f"this epoch, which now has {len(idx)} (another --batch-size or device count?); "
                                  "resume with the settings it ran with")
            state, totals, done = _host_fed(programs, state, feed, idx, mask, mesh, desc, train, progress,
                                            stop if train else None, resume or {"batches": 0, "totals": [0, 0, 0]})
        wall = time.perf_counter() - t0
    loss, acc = means(totals)
    return state, EpochResult(loss, acc, int(np.asarray(totals)[2]), wall - compiled[0], compiled[0],
                              np.asarray(totals, np.float64).tolist(), len(idx), *(done or (None, 0)))


def class_logits(programs: EvalPrograms, state, feed: StepFeed, clip_ids: np.ndarray, batch_size: int, mesh,
                 desc: str, progress: bool = False) -> np.ndarray:
    """Logits of every clip of `clip_ids`, in every process: each process scores the clips it holds (one
    jitted evaluation per batch), then the logits (not the inputs) are gathered."""
    from tqdm.auto import tqdm

    mine = clip_ids[feed.row[clip_ids] >= 0]

    def rows_of(ids):
        return {"x": feed(ids), "y": feed.y[ids].astype(np.int32), "mask": np.ones(len(ids), np.float32)}

    with tqdm(total=len(mine), desc=desc, unit="clip", disable=not progress or not is_main_process(),
              leave=False) as bar:
        logits = map_local(lambda b: {"logits": programs.eval(state, b)[1]}, mine, batch_size, mesh, rows_of,
                           bar.update, fill=feed.own[0] if len(feed.own) else 0)["logits"]
    ids, logits = gather_rows(mine, logits)
    return logits[np.searchsorted(ids, clip_ids)]


def mean_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of integer labels, as the steps compute it."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), y]))


def _scanned(programs, state, feed: StepFeed, idx, mask, desc: str, train: bool):
    first = int(state.step)
    scan = programs.train_scan if train else programs.eval_scan
    state, per_step = scan(state, feed.table.arrays, feed.table.slot[idx].astype(np.int32), mask)
    per_step = np.asarray(per_step)
    bad = np.flatnonzero(~np.isfinite(per_step[:, 0]))
    if train and len(bad):
        raise diverged(first + int(bad[0]) + 1, desc)
    return state, per_step.sum(0)


def _host_fed(programs, state, feed: StepFeed, idx, mask, mesh, desc: str, train: bool, progress: bool, stop,
              resume: dict):
    from tqdm.auto import tqdm

    first = resume["batches"]
    host = ((ids, m, feed(ids)) for ids, m in (local_rows(mesh, i, m) for i, m in zip(idx[first:], mask[first:])))
    totals, first_bad, stopped = jnp.asarray(resume["totals"], jnp.float32), jnp.asarray(-1), None
    show = progress and is_main_process()
    with tqdm(total=len(idx), initial=first, desc=desc, unit="batch", disable=not show, leave=False) as bar:
        for i, (ids, m, x) in enumerate(prefetch(host), start=first):
            batch = global_batch(mesh, {"x": x, "y": feed.y[ids].astype(np.int32), "mask": m})
            if train:
                state, metrics = programs.train(state, batch)
                bad = ~jnp.isfinite(metrics[0]) & (first_bad < 0)
                first_bad = jnp.where(bad, state.step, first_bad)  # stays on device: no sync per step
            else:
                metrics, _ = programs.eval(state, batch)
            totals = totals + metrics
            bar.update(1)
            if show and (i % 10 == 0 or i == len(idx) - 1):
                loss, acc = means(totals)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
            if stop is not None and i < len(idx) - 1 and (signal := stop()):  # a step boundary: a stop ends here
                stopped = (i + 1, signal)
                break
    if int(first_bad) >= 0:
        raise diverged(int(first_bad), desc)
    return state, np.asarray(totals), stopped


class EpochBar:
    """Keras-style progress over a stage's epochs (verbose 1): one bar showing the latest loss and accuracy
    and the best epoch so far; event lines (early stopping, a learning-rate cut) print above it."""

    def __init__(self, total: int, first: int, desc: str, show: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=first, desc=desc, unit="epoch") if show else None

    def advance(self, row: dict, history: list[dict]) -> None:
        if self.bar is None:
            return
        best = [h for h in history if h["stage"] == row["stage"] and h.get("improved")]
        shown = {"loss": f"{row['train_loss']:.4f}", "acc": f"{row['train_acc']:.3f}"}
        if row["val_loss"] is not None:
            shown |= {"val_loss": f"{row['val_loss']:.4f}", "val_acc": f"{row['val_acc']:.3f}"}
        if best:
            shown["best"] = best[-1]["epoch"] + 1
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, line: str, log) -> None:
        if self.bar is None:
            log(line)
            return
        with self.bar.external_write_mode():
            log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Plateau:
    """Early stopping and reduce-on-plateau counters, both on the monitored (validation) loss."""

    best: float = float("inf")
    bad: int = 0
    plateau_bad: int = 0

    def update(self, loss: float, plateau_patience: int) -> tuple[bool, bool]:
        """(improved, cut the learning rate) after an epoch with this loss."""
        if loss < self.best - 1e-7:
            self.best, self.bad, self.plateau_bad = loss, 0, 0
            return True, False
        self.bad += 1
        self.plateau_bad += 1
        cut = bool(plateau_patience) and self.plateau_bad >= plateau_patience
        if cut:
            self.plateau_bad = 0
        return False, cut

    def stop(self, patience: int) -> bool:
        return bool(patience) and self.bad >= patience
