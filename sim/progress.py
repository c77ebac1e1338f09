"""Progress on the long phases of a run, and of a sweep (rich).

A run spends seconds to minutes before its first round: preparing the data, building the legacy
fleet (a few product-line models, or one model per device: minutes for 10,000 devices), starting
Flower on Ray and the handshake with every Flower node. Each of these phases shows:

- on a terminal, a transient status line (spinner, what is happening, ``n/N`` where it is counted,
  elapsed time), replaced by the next phase and gone when the rounds start; the rounds then get
  their progress bar, whose clock and estimate start with the first round (not with Ray's start);
- elsewhere (stdout redirected to a file or a pipe, a CI log), exactly one line per phase, when it
  starts, and no bars, spinners or control codes.

``sim.progress=false`` shows neither. A sweep's job prints one line as it starts:
``job k/N: <its overrides> (d done in MM:SS, eta MM:SS)`` (:func:`job_line`), where ``d`` counts the
sweep's finished jobs on disk (so jobs running at once in other processes count too).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Group
from rich.live import Live
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

JOBS_ENV = "L2H_SIM_SWEEP_JOBS"
"""How many jobs the sweep running now has (set by :func:`sim.run.main`; read in each job's process)."""
T0_ENV = "L2H_SIM_SWEEP_T0"
"""When the sweep running now started (Unix seconds; set by :func:`sim.run.main`)."""


def interactive(console: Any) -> bool:
    """Whether ``console`` writes to a terminal (a live display can redraw there)."""
    return bool(getattr(console, "is_terminal", False)) and not bool(getattr(console, "quiet", False))


class CountColumn(ProgressColumn):
    """``done/total`` once a phase has a total (nothing before: a phase need not be counted)."""

    def render(self, task: Task) -> Text:
        """The count, or an empty text."""
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:.0f}/{task.total:.0f}", style="progress.download")


def _phase_bar() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), CountColumn(), TimeElapsedColumn())


class Status:
    """One phase's status: :meth:`update` sets its text and its count (``done`` of ``total``)."""

    def __init__(self, bar: Progress | None, task: TaskID | None):
        self.bar, self.task = bar, task

    def update(self, done: int | None = None, total: int | None = None, text: str | None = None) -> None:
        """Show ``done`` of ``total`` (and a new ``text``) on the status line (terminal only)."""
        if self.bar is None or self.task is None:
            return
        fields: dict[str, Any] = {}
        if text is not None:
            fields["description"] = text
        if total is not None:
            fields["total"] = total
        if done is not None:
            fields["completed"] = done
        self.bar.update(self.task, **fields)


@contextmanager
def phase(console: Any, name: str, text: str, enabled: bool = True) -> Iterator[Status]:
    """A phase before the rounds (``name``: one word, e.g. ``data``; ``text``: what happens).

    On a terminal: a transient status line while the block runs (:class:`Status` updates it).
    Elsewhere: the line ``name: text`` once, as the phase starts. ``enabled=False``: nothing.
    """
    if not enabled:
        yield Status(None, None)
        return
    if not interactive(console):
        console.print(f"{name}: {text}", soft_wrap=True, highlight=False)
        yield Status(None, None)
        return
    bar = _phase_bar()
    task = bar.add_task(f"[bold]{name}[/bold]: {text}", total=None)
    with Live(bar, console=console, transient=True, refresh_per_second=8):
        yield Status(bar, task)


class RunProgress:
    """The live display of a run's federation: the engine's phases (start, handshake) as a status
    line, then the rounds' progress bar (module docstring). Use as a context manager around the
    engine; :meth:`phase` moves to the next phase, :meth:`rounds_start` to the rounds, and
    :meth:`advance` counts a finished round."""

    def __init__(self, console: Any, num_rounds: int, finished: int, enabled: bool):
        self.console, self.enabled, self.live_ok = console, enabled, enabled and interactive(console)
        self.rounds = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               TextColumn("eta"), TimeRemainingColumn(), console=console)
        self.task = self.rounds.add_task("rounds", total=num_rounds, completed=finished, start=False)
        self.phases = _phase_bar()
        self.phase_task: TaskID | None = None
        self.live = Live(Group(self.phases, self.rounds), console=console, transient=True, refresh_per_second=4) \
            if self.live_ok else None

    def __enter__(self) -> RunProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.stop()

    def phase(self, name: str, text: str) -> None:
        """The engine's next phase (``name: text``): the status line on a terminal, else one line."""
        if not self.enabled:
            return
        if not self.live_ok:
            self.console.print(f"{name}: {text}", soft_wrap=True, highlight=False)
            return
        if self.phase_task is not None:
            self.phases.remove_task(self.phase_task)
        self.phase_task = self.phases.add_task(f"[bold]{name}[/bold]: {text}", total=None)

    def rounds_start(self) -> None:
        """The rounds begin: the status line goes, the bar's clock (and its estimate) starts now."""
        if self.phase_task is not None:
            self.phases.remove_task(self.phase_task)
            self.phase_task = None
        self.rounds.start_task(self.task)

    def advance(self) -> None:
        """One more round finished."""
        self.rounds.advance(self.task)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def finished_jobs(sweep_dir: Path) -> int:
    """The sweep's jobs that have ended: job directories holding a ``summary.json`` (finished) or a
    ``failed.txt`` (:data:`sim.sweep.FAILED_FILE`), counted on disk (jobs in other processes too)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        return 0
    return sum(1 for d in root.iterdir() if d.is_dir() and ((d / "summary.json").is_file() or (d / "failed.txt").is_file()))


def job_line(num: int, total: int, overrides: list[str], sweep_dir: Path, t0: float | None,
             now: float | None = None) -> str:
    """``job k/N: overrides (d done in MM:SS, eta MM:SS)`` for the job numbered ``num`` (0-based); the
    estimate is the mean wall time per finished job (jobs at once included) times the jobs left."""
    line = f"job {num + 1}/{total}: {' '.join(overrides)}"
    if t0 is None:
        return line
    elapsed = (time.time() if now is None else now) - t0
    done = finished_jobs(sweep_dir)
    if done:
        line += f" ({done} done in {_clock(elapsed)}, eta {_clock(elapsed / done * max(total - done, 0))})"
    else:
        line += f" (started {_clock(elapsed)} ago)"
    return line


def sweep_context() -> tuple[int | None, float | None]:
    """The sweep's job count and start time as :func:`sim.run.main` left them (None outside a sweep)."""
    try:
        total = int(os.environ[JOBS_ENV])
    except (KeyError, ValueError):
        total = None
    try:
        t0 = float(os.environ[T0_ENV])
    except (KeyError, ValueError):
        t0 = None
    return total, t0
