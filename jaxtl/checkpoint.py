"""Orbax checkpoints of a run: the latest N and the best one, each with the state and its metadata.

`latest/` keeps the last `keep` saves for `--resume`; `best/` keeps the one with the lowest
validation loss for evaluation; `frozen/` holds the convs no stage trains, written once per run
(58 MB of VGG16 that would otherwise be rewritten by every epoch's saves). Orbax writes into a
temporary directory and renames it when done, so a run killed mid-save leaves the previous
checkpoint as the newest one that reads as complete.

A checkpoint writes `best` (when an epoch improved since the last one) before `latest`: `latest` is the
commit point. Checkpoints are written every `--checkpoint-every` seconds and at the end of a stage (a save
costs ~0.1 s on CPU, more than a head-only epoch), so a killed run redoes at most that much work. A run killed
between the two resumes from the previous `latest` and redoes the epoch, so `best` is never older than
the state a resumed run continues from.

A save that fails for lack of space or permission stops the run with one line (`jaxtl.disk.DiskError`), its
temporary directory removed and the saves before it readable. Orbax logs each failure it raises on absl's
logger (three ERROR lines for one corrupt save); those are kept from the user, who gets jaxtl's one line.

Reading tells corruption from mismatch: a save that cannot be read (I/O errors, missing or garbled
files) is reported on stderr and the one before it is used; a save that reads but does not fit the run
(an array of another shape) is an error naming the array and both shapes, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtl.disk import check_room, disk_error, os_error_code, writing
from jaxtl.split import SplitPoint

log = logging.getLogger(__name__)

# What a damaged save raises from orbax, tensorstore or json (JSONDecodeError is a ValueError).
CORRUPT = (OSError, ValueError, KeyError)


class CheckpointError(Exception):
    """No usable checkpoint where one was asked for; one line naming the directory."""


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax's absl ERROR lines held back while it runs: jaxtl reports what failed, once."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


@contextlib.contextmanager
def _saving(directory: Path, what: str, tree):
    """A save of `tree` that cannot fit is refused before it starts; one that fails on the disk midway has its
    temporary directory removed (again, while orbax's writer threads wind down); either is one `DiskError` line.

    When a save fails, tensorstore's callbacks still post to orbax's closed event loop, each a "RuntimeError:
    Event loop is closed" traceback on stderr (as unraisable exceptions, during the save and after it): those
    alone are dropped while a save runs, and from a failed one on, so the run's one line is what the user reads.
    """
    check_room(directory, sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree)), what)
    previous, failed = sys.unraisablehook, False
    sys.unraisablehook = lambda u: None if _closed_loop(u.exc_value) else previous(u)
    try:
        with _orbax_quiet():
            yield
    except (OSError, ValueError) as e:
        if os_error_code(e) is None:
            raise
        failed = True
        for attempt in range(20):  # orbax's writer threads may still create what was removed: until it stays gone
            partial = list(directory.glob("*.orbax-checkpoint-tmp*"))
            for p in partial:
                shutil.rmtree(p, ignore_errors=True)
            if not partial and attempt > 0:
                break
            time.sleep(0.05)
        raise disk_error(directory, what, e) from None
    finally:
        if not failed:
            sys.unraisablehook = previous


def _closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _put(manager: ocp.CheckpointManager, step: int, args) -> None:
    if step in manager.all_steps():  # a resumed run redoing an epoch a killed run had half-committed
        manager.delete(step)
    manager.save(step, args=args, force=True)


def _shapes(tree, prefix: str = "") -> dict[str, tuple]:
    """Shapes of a nested dict of arrays (or of orbax's stored-array metadata), keyed by path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _shapes(sub, f"{prefix}{key}/").items()}
    shape = getattr(tree, "shape", None)
    return {} if shape is None else {prefix.rstrip("/"): tuple(shape)}


def _params(state) -> dict:
    return state.params if hasattr(state, "params") else state.get("params", {})


def check_shapes(where, template: dict, stored: dict) -> None:
    """Every param of `template` has its stored shape; else one line naming the array and both shapes."""
    have, want = _shapes(stored), _shapes(template)
    for name in sorted(set(have) ^ set(want)):
        where_found = "the checkpoint" if name in have else "the model the run's config builds"
        raise CheckpointError(f"{where}: params/{name} is only in {where_found} (was the run's config changed?)")
    for name, shape in want.items():
        if have[name] != shape:
            raise CheckpointError(f"{where}: params/{name} has shape {have[name]} in the checkpoint but {shape} "
                                  "in the model the run's config builds")


class Checkpoints:
    """A run's `checkpoints/`. With `frozen` (the split point of the convs no stage trains), states are saved
    without those convs, which `save_frozen` writes once, and restored states get them back."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2, frozen: SplitPoint | None = None):
        self.directory = Path(directory)
        self.frozen = frozen
        with _orbax_quiet(), writing(self.directory, "create the checkpoint directories"):
            # (orbax reads the saves there: a damaged one is jaxtl's to report, at restore)
            self.latest = _manager(self.directory / "latest", keep)
            self.best = _manager(self.directory / "best", 1)

    def _trained_part(self, state):
        return state if self.frozen is None else state.replace(params=self.frozen.partition(state.params)[1])

    def save(self, step: int, state, meta: dict, best: tuple[int, Any, dict] | None = None) -> None:
        """`state` as the newest `latest`; first, when given, the best epoch since the last save as `best`
        ((step, state, meta); often this very epoch)."""
        def put(manager, step, state, meta):
            state = self._trained_part(state)
            with _saving(Path(manager.directory), f"save checkpoint step {step}", state):
                _put(manager, step, ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))

        if best is not None:
            put(self.best, *best)
        put(self.latest, step, state, meta)

    def save_frozen(self, params: dict) -> None:
        """The convs no stage trains, written once per run (a resumed run finds them in place)."""
        convs = jax.tree.map(np.asarray, self.frozen.partition(params)[0])
        path = (self.directory / "frozen").absolute()
        if convs and not path.exists():
            with _saving(self.directory, "save the run's frozen weights", convs), ocp.StandardCheckpointer() as c:
                c.save(path, convs)

    def _restore_frozen(self, template: dict) -> dict:
        if not template:
            return {}
        path = (self.directory / "frozen").absolute()
        if not path.is_dir():
            raise CheckpointError(f"{path}: the run's frozen weights are missing")
        with ocp.StandardCheckpointer() as c, _orbax_quiet():
            try:
                return c.restore(path, template)
            except CORRUPT as e:
                raise CheckpointError(f"{path}: the run's frozen weights are unreadable "
                                      f"({str(e).splitlines()[0][:200]})") from None

    def steps(self, which: str = "latest") -> list[int]:
        manager = getattr(self, which)
        with _orbax_quiet():
            manager.reload()
            return sorted(manager.all_steps())

    def restore(self, template: Any | Callable[[dict], Any], which: str = "latest") -> tuple[Any, dict, int]:
        """(state, its meta, its step) of the newest readable save in `which`; state and meta always come
        from the same save. `template` is the state's shape, or a function of the save's meta giving it
        (a progressive run's optimizer state depends on the stage the meta names)."""
        template_for = template if callable(template) else (lambda _: template)
        built = {}

        def trained_part(meta: dict):  # the whole template is built once per save tried, and kept
            built["last"] = template_for(meta)
            return self._trained_part(built["last"])

        state, meta, step = self._restore(trained_part, which)
        if self.frozen is not None:
            convs = self._restore_frozen(self.frozen.partition(built["last"].params)[0])
            state = state.replace(params=SplitPoint.join(convs, state.params))
        return state, meta, step

    def _restore(self, template_for: Callable[[dict], Any], which: str) -> tuple[Any, dict, int]:
        manager = getattr(self, which)
        steps = self.steps(which)[::-1]
        if not steps:
            raise CheckpointError(f"{self.directory / which}: no checkpoint saved yet")
        errors = []
        with _orbax_quiet():
            for s in steps:
                found = self._restore_step(manager, s, template_for, errors)
                if found is not None:
                    return found
        raise CheckpointError(f"{manager.directory}: no readable checkpoint ({'; '.join(errors)})")

    def _restore_step(self, manager, s: int, template_for: Callable[[dict], Any], errors: list[str]):
        """(state, meta, step) of save `s`, or None with the reason it is unreadable added to `errors`."""
        try:
            meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except CORRUPT as e:
            errors.append(self._unreadable(manager, s, "meta", e))
            return None
        try:
            stored = manager.item_metadata(s)["state"]
        except CORRUPT as e:
            errors.append(self._unreadable(manager, s, "state", e))
            return None
        target = template_for(meta)
        if stored is not None:  # None: orbax could not read the array metadata; the restore below says why
            check_shapes(Path(manager.directory) / str(s), _params(target), _params(stored.tree))
        try:
            state = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except CORRUPT as e:
            errors.append(self._unreadable(manager, s, "state", e))
            return None
        return state, meta, s

    @staticmethod
    def _unreadable(manager, step: int, part: str, error: Exception) -> str:
        reason = f"step {step}: {part} unreadable ({type(error).__name__}: {str(error).splitlines()[0][:160]})"
        log.warning("warning: checkpoint %s/%s is unreadable (%s); trying an older one", manager.directory, step, part)
        return reason

    def close(self) -> None:
        with _orbax_quiet():
            self.latest.close()
            self.best.close()
