"""Ctrl-C and SIGTERM (how SLURM, Kubernetes and spot instances stop a job) without losing work.

During training the first SIGINT or SIGTERM is only recorded: the run stops at its next step boundary, saves a
checkpoint (every process, at the same step: the stop is agreed collectively) and raises `Interrupted`, which
the command line (`jaxtl.command`) turns into one line saying how to continue, and exit code 128 + the signal
(130, 143). A second Ctrl-C aborts at once. Outside training (features, the prefix pass, evaluate, predict) a
signal stops the command with one line and the same exit codes; the caches keep what was finished.
"""

from __future__ import annotations

import signal
import threading

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; `str()` says where, and, given the run directory `out`, how to continue."""

    def __init__(self, signum: int, where: str, out: str | None = None):
        super().__init__(where if out is None else f"{where}; continue with: jaxtl train --out {out} --resume")
        self.signum, self.where = signum, where

    def of_run(self, out: str) -> Interrupted:
        """The same stop, told for the run directory `out` (an ensemble's, not its member's)."""
        return Interrupted(self.signum, self.where, out)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """SIGINT and SIGTERM while entered (in the main thread): with `deferred` set (the epochs) they are
    recorded, for the trainer to act on at a step boundary through `signal()`; otherwise they raise
    `Interrupted` at once, saying `outside`."""

    def __init__(self):
        self.received = 0
        self.deferred = False
        self.outside: tuple[str, str | None] = ("interrupted", None)  # (where, the run directory)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._record) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        if not self.deferred:
            raise Interrupted(signum, *self.outside)
        if self.received and signum == signal.SIGINT:  # a second Ctrl-C: now, without saving
            raise Interrupted(signum, "interrupted again: stopped without saving; the last checkpoint stays")
        self.received = self.received or signum

    def signal(self) -> int:
        """The signal some process received (the same value in every process), 0 if none: a collective in a
        run of several processes, so every process must ask at the same point."""
        import jax

        if jax.process_count() == 1:
            return self.received
        from jaxtl.sharding import all_counts

        return int(np.max(all_counts(self.received)))


def exit_code(e: BaseException) -> int:
    """The exit code of a command stopped by `e` (KeyboardInterrupt or an `Interrupted`)."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT
