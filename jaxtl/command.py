"""What every command's `main` shares: a signal ends it with one line and 128 + the signal, jaxtl's warnings
reach stderr as the plain lines they are written as, and the XLA setting `jaxtl tune` measured is applied."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading

from jaxtl.interrupt import Interrupted, exit_code


def command(main):
    """`main(argv) -> exit code` as a command: Ctrl-C and SIGTERM end it with one line and 130 / 143, never a
    traceback (training saves first: `jaxtl.interrupt.StopRequests`)."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        def terminate(signum, frame):
            raise Interrupted(signum, "terminated")

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
        try:
            with _plain_warnings():
                from jaxtl import tune  # (tune's own main is a command)

                tune.apply(lambda line: print(line, file=sys.stderr))
                return main(argv)
        except KeyboardInterrupt as e:
            print(str(e) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
            return exit_code(e)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapped


@contextlib.contextmanager
def _plain_warnings():
    """While a command runs, jaxtl's log records go to stderr as their own lines ("warning: ..."), not in the
    root logger's format, which orbax's imports set up."""
    logger = logging.getLogger("jaxtl")
    handler, propagate = _PlainLines(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _PlainLines(logging.Handler):
    """Each record's message alone, on whatever `sys.stderr` is when it is written."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's own contract: a handler never raises)
            self.handleError(record)
