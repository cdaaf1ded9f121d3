"""What every command's `main` shares: a signal ends it with one line and 128 + the signal, and jaxtl's
warnings reach stderr as the plain lines they are written as."""

from __future__ import annotations

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
        _plain_warnings()

        def terminate(signum, frame):
            raise Interrupted(signum, "terminated")

        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            print(str(e) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
            return exit_code(e)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapped


def _plain_warnings() -> None:
    """jaxtl's log records as their own lines on stderr ("warning: ..."), not in the root logger's format,
    which orbax's imports set up."""
    logger = logging.getLogger("jaxtl")
    if not any(getattr(h, "jaxtl", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.jaxtl = True
        logger.addHandler(handler)
        logger.propagate = False
