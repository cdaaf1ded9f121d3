"""Writing to disk without losing work: whole files or none, and a full or read-only disk said in one line.

A failed write (no space, no permission, a read-only filesystem) becomes a `DiskError` naming the path, what
was being written and the free space left there; the callers decide what it costs: a cache goes on without
caching, a run directory or checkpoint stops the run (exit 2) with what it saved before left readable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
from pathlib import Path


class DiskError(Exception):
    """A write that failed for lack of space or permission; one line naming the path and the free space."""


def size(nbytes: float) -> str:
    """A byte count for people: 0 B, 1020.0 KB, 58.9 MB."""
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GB":
            break
    return f"{nbytes:.1f} {unit}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """The free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def free_space(path: str | os.PathLike) -> str:
    free = free_bytes(path)
    return "unknown space" if free is None else size(free)


def check_room(path: str | os.PathLike, nbytes: int, what: str) -> None:
    """A `DiskError` before a write of about `nbytes` that cannot fit: a library that fails midway (orbax)
    leaves threads writing and noise behind, a refusal up front leaves nothing."""
    free = free_bytes(path)
    if free is not None and free < nbytes:
        raise DiskError(f"{path}: cannot {what}: {os.strerror(errno.ENOSPC)} (needs {size(nbytes)}, "
                        f"{size(free)} free there)")


def os_error_code(e: BaseException) -> int | None:
    """The errno behind `e`: an OSError's own, or the one tensorstore (orbax) writes into its ValueError."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"os_error_code='?(\d+)", str(e)) or re.search(r"\[Errno (\d+)\]", str(e))
    return int(found.group(1)) if found else None


def reason(e: BaseException) -> str:
    """What went wrong, in one short line: the system's words for an errno, else the error's first line."""
    code = os_error_code(e)
    return os.strerror(code) if code else ((str(e).strip().splitlines() or [type(e).__name__])[0][:200])


def disk_error(path: str | os.PathLike, what: str, e: BaseException) -> DiskError:
    return DiskError(f"{path}: cannot {what}: {reason(e)} ({free_space(path)} free there)")


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str):
    """Turn an OSError raised inside into a one-line `DiskError` about `path` and `what`."""
    try:
        yield
    except OSError as e:
        raise disk_error(path, what, e) from None


@contextlib.contextmanager
def replaced(path: str | os.PathLike, what: str | None = None):
    """A temporary name beside `path` (same suffix, one per writer) to write into; renamed into place when the
    block ends: a failed write leaves the old file whole and no temporary file behind (a killed one may leave a
    hidden `.tmp-*` file, never a half-written file under the real name)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")  # each writer its own
    try:
        with writing(path, what or f"write {path.name}"):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, what: str | None = None) -> None:
    with replaced(path, what) as tmp:
        tmp.write_text(text)
