"""The stop signal: set when the run must stop (Ctrl-C / SIGTERM), checked by long-running work.

The runner's signal handler sets :data:`STOP`; the ServerApp thread, the server pool and the
engine's waits call :func:`check_stop` (or test :data:`STOP`) so that nothing keeps waiting on a
simulation engine that is shutting down. :func:`exit_code` is the status the process ends with.
"""
from __future__ import annotations

import signal
import threading

STOP = threading.Event()
"""Set when the run must stop."""

SIGNAL: list[int] = []
"""The signals received, in order (the first one decides the exit code)."""


class Interrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C / SIGTERM): the work in progress is abandoned."""


def check_stop() -> None:
    """Raise :class:`Interrupted` if the run is stopping."""
    if STOP.is_set():
        raise Interrupted("the run is stopping")


def signal_name() -> str:
    """``SIGTERM`` or ``SIGINT``: the first stop signal received (SIGINT when none was)."""
    return "SIGTERM" if SIGNAL and SIGNAL[0] == signal.SIGTERM else "SIGINT"


def exit_code() -> int:
    """The shell's convention for a process ended by the signal: 143 (SIGTERM) or 130 (SIGINT)."""
    return 143 if signal_name() == "SIGTERM" else 130
