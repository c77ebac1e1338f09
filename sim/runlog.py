"""``run.log``: what a run's console got, as plain text, in its run directory.

Hydra gives every job a ``run.log`` (its ``job_logging`` file handler), but a run prints through a
rich Console, not through ``logging``, so that file stayed empty and a sweep's console output was
nowhere on disk. :func:`mirrored` wraps the run's console so that every ``print`` / ``log`` also goes,
without colour or progress display, into ``<run dir>/run.log`` (appended: a resume adds to what the
run printed before, after a header line naming the command). Hydra's own log records, if any, land
in the same file through its handler, which also appends.

Progress displays (bars, status spinners) are not copied: they are redrawn in place on a terminal
and say nothing a finished run needs; :mod:`sim.progress` prints one line per phase to the
console instead, and those lines are copied.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.control import Control

FILE = "run.log"


class MirroredConsole:
    """A rich Console (every attribute forwarded) whose ``print``, ``log``, ``rule`` and ``out`` also
    write into a plain-text console on a log file."""

    def __init__(self, console: Any, log: Console, path: Path):
        self._console, self._log, self.log_path = console, log, Path(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console, name)

    def __enter__(self) -> Any:
        return self._console.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._console.__exit__(*exc)

    def _mirror(self, method: str, objects: tuple, kwargs: dict[str, Any]) -> None:
        if objects and all(isinstance(o, Control) for o in objects):
            return  # a live display's refresh, not output
        try:
            getattr(self._log, method)(*objects, **kwargs)
            self._log.file.flush()
        except OSError:  # a full disk or a vanished directory must not stop the run; the console has it
            pass

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print to the console and to the log."""
        self._console.print(*objects, **kwargs)
        self._mirror("print", objects, kwargs)

    def log(self, *objects: Any, **kwargs: Any) -> None:
        """``Console.log`` on the console and on the log."""
        self._console.log(*objects, **kwargs)
        self._mirror("log", objects, kwargs)

    def rule(self, *args: Any, **kwargs: Any) -> None:
        """``Console.rule`` on the console and on the log."""
        self._console.rule(*args, **kwargs)
        self._mirror("rule", args, kwargs)

    def out(self, *objects: Any, **kwargs: Any) -> None:
        """``Console.out`` on the console and on the log."""
        self._console.out(*objects, **kwargs)
        self._mirror("out", objects, kwargs)


def plain_console(file: Any, width: int) -> Console:
    """A console that writes plain text (no colour, no control codes) ``width`` columns wide."""
    return Console(file=file, width=width, force_terminal=False, no_color=True, color_system=None,
                   highlight=False, emoji=False, soft_wrap=False)


@contextmanager
def mirrored(console: Any, run_dir: Path) -> Iterator[Any]:
    """``console``, its output also appended to ``run_dir/run.log`` while the block runs (a console that
    already mirrors into that file is used as it is). A log that cannot be opened is skipped, silently:
    the run's results never depend on it."""
    path = Path(run_dir) / FILE
    if isinstance(console, MirroredConsole) and console.log_path == path:
        yield console
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 -- closed below
    except OSError:
        yield console
        return
    try:
        log = plain_console(fh, max(int(getattr(console, "width", 100) or 100), 100))
        log.print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}  {' '.join(sys.argv)}", soft_wrap=True)
        yield MirroredConsole(console, log, path)
    finally:
        fh.close()


def append_line(run_dir: Path, line: str) -> None:
    """Append one line (e.g. the job's one-line error, printed on stderr) to ``run_dir/run.log``; best effort."""
    try:
        with open(Path(run_dir) / FILE, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")
    except OSError:
        pass
