"""The stop signal: set when the run must stop (Ctrl-C / SIGTERM), checked by long-running work.

The runner's signal handler sets :data:`STOP`; the ServerApp thread, the server pool and the
engine's waits call :func:`check_stop` (or test :data:`STOP`) so that nothing keeps waiting on a
simulation engine that is shutting down.
"""
from __future__ import annotations

import threading

STOP = threading.Event()
"""Set when the run must stop."""

SIGNAL: list[int] = []
"""The signals received, in order (the last one decides the exit code)."""


class Interrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C / SIGTERM): the work in progress is abandoned."""


def check_stop() -> None:
    """Raise :class:`Interrupted` if the run is stopping."""
    if STOP.is_set():
        raise Interrupted("the run is stopping")
