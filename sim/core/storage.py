"""A full disk as one line: every file the simulator writes goes through :func:`guard`.

Writing onto a full filesystem fails in several shapes: ``OSError`` with ``errno`` ENOSPC (or EDQUOT,
a quota) from Python's own writes; ``OSError("100000 requested and 25584 written")`` *without* an
errno from ``numpy.save`` (a short ``fwrite``); ``RuntimeError("[enforce fail at inline_container.cc]
... unexpected pos")`` from ``torch.save`` to a path. :func:`guard` turns each of them into
:class:`OutOfSpace` -- by the errno where there is one, else when the filesystem holding the path has
less than :data:`NEARLY_FULL` bytes left for this user -- naming the path and the fix. The writer
itself removes its temporary file (every write here goes to a temporary file that is renamed into
place, or is an append that is cut back), so nothing already written is lost.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sim.core.errors import ConfigError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL = 1 << 20
"""Bytes left below which a write that failed without an errno is taken as the disk being full (1 MiB)."""


class OutOfSpace(ConfigError):
    """The filesystem a file is written to is full (one line: the path and the fix)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


def free_bytes(path: Path) -> int | None:
    """Bytes this user may still write on the filesystem holding ``path`` (its nearest existing
    ancestor); None when that cannot be told."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc``, raised while writing ``path``, means its filesystem is full."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in FULL_ERRNOS
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL


@contextmanager
def guard(path: Path, what: str, fix: str = "free space on that disk") -> Iterator[None]:
    """Within the block, a write that fails because ``path``'s filesystem is full raises
    :class:`OutOfSpace` (``no space left on the device for <path> (<what>): <fix>``); any other
    error passes through unchanged.

    Args:
        path: the file (or directory) being written. what: what it is, for the message (``the
            checkpoint``). fix: how to go on.

    Raises:
        OutOfSpace: see above.
    """
    try:
        yield
    except OutOfSpace:
        raise
    except (OSError, RuntimeError) as exc:
        if not is_full(exc, path):
            raise
        raise OutOfSpace(f"no space left on the device for {path} ({what}): {fix}", path) from None
