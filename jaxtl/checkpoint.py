"""Orbax checkpoints of a run: the latest N and the best one, each with the state and its metadata.

`latest/` keeps the last `keep` saves for `--resume`; `best/` keeps the one with the lowest
validation loss for evaluation; `frozen/` holds the convs no stage trains, written once per run
(58 MB of VGG16 that would otherwise be rewritten by every epoch's saves). Orbax writes into a
temporary directory and renames it when done, so a run killed mid-save leaves the previous
checkpoint as the newest one that reads as complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import orbax.checkpoint as ocp


class CheckpointError(Exception):
    """No usable checkpoint where one was asked for; one line naming the directory."""


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.latest = _manager(self.directory / "latest", keep)
        self.best = _manager(self.directory / "best", 1)

    def save(self, step: int, state, meta: dict, best: bool) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if best:
            self.best.save(step, args=args, force=True)

    def save_frozen(self, frozen: dict) -> None:
        path = (self.directory / "frozen").absolute()
        if frozen and not path.exists():
            with ocp.StandardCheckpointer() as c:
                c.save(path, frozen)

    def restore_frozen(self, template: dict) -> dict:
        if not template:
            return {}
        path = (self.directory / "frozen").absolute()
        if not path.is_dir():
            raise CheckpointError(f"{path}: the run's frozen weights are missing")
        with ocp.StandardCheckpointer() as c:
            return c.restore(path, template)

    def steps(self, which: str = "latest") -> list[int]:
        return sorted(getattr(self, which).all_steps())

    def meta(self, which: str = "latest", step: int | None = None) -> dict:
        manager, step = self._pick(which, step)
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template, which: str = "latest", step: int | None = None):
        """(state shaped like `template`, meta); falls back to older saves when the newest is unreadable."""
        manager, step = self._pick(which, step)
        candidates = [s for s in sorted(manager.all_steps(), reverse=True) if s <= step]
        errors = []
        for s in candidates:
            try:
                out = manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
                return out["state"], out["meta"]
            except Exception as e:  # a corrupt save: say so, use the one before
                errors.append(f"step {s}: {str(e).splitlines()[0][:200]}")
                print(f"warning: checkpoint {manager.directory}/{s} is unreadable, trying an older one")
        raise CheckpointError(f"{manager.directory}: no readable checkpoint ({'; '.join(errors)})")

    def _pick(self, which: str, step: int | None):
        manager = getattr(self, which)
        manager.reload()
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory / which}: no checkpoint saved yet")
        return manager, max(steps) if step is None else step

    def close(self) -> None:
        self.latest.close()
        self.best.close()
