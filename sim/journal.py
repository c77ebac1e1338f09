"""``metrics.jsonl`` against the checkpoint: what a resume continues is what the checkpoint proves.

A run appends one line per finished round to ``metrics.jsonl`` and then replaces ``checkpoint.npz``.
A resume after round k needs the records of rounds 1..k, each once and in order: ``summary.json``
is computed from every round's record (``resilience.accuracy_by_state``, ``*_kept_by_round``,
``servers.train_load``, ...). Nothing in a checkpoint's *state* can regenerate them -- the servers
and rejectors of the earlier rounds are gone -- so a record that is lost or damaged in the file
could only be refused, never repaired. Hence every checkpoint also holds the exact bytes of
``metrics.jsonl`` up to its round (:data:`JOURNAL`, about 1.5 KB per round for the default run;
rounds x that per checkpoint write, small next to the rejectors and buffers it sits beside), and a
resume rewrites the file from them (:func:`proven`):

- the file is as a stop leaves it (the checkpoint's bytes, maybe followed by complete lines of the
  round that was abandoned): the later lines are dropped, silently (README, "Interrupting and
  resuming");
- anything else -- deleted, empty, a line cut short, a garbage line, a duplicated or edited line --
  is repaired from the checkpoint's copy, and the resume says so in one line (:attr:`Proven.problem`).

So a resumed run's ``summary.json`` equals the uninterrupted run's whatever happened to the file.

A checkpoint written before checkpoints held the journal is checked against the file instead: its
rounds 1..k must each be there once (exact duplicates, unreadable lines and later rounds are
dropped, with the note); if one is missing or two differ, the resume is refused in one line
(:class:`sim.core.errors.ConfigError`), before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError

JOURNAL = "journal/metrics.jsonl"
"""The checkpoint's array holding ``metrics.jsonl``'s bytes up to its round (UTF-8, uint8)."""
METRICS = "metrics.jsonl"


def part(text: str) -> dict[str, np.ndarray]:
    """The checkpoint arrays that keep ``text`` (``metrics.jsonl`` up to the checkpoint's round)."""
    return {JOURNAL: np.frombuffer(text.encode(), dtype=np.uint8)}


@dataclass
class Proven:
    """What ``metrics.jsonl`` must hold to resume after round ``finished``."""

    text: str
    """The file's content for rounds 1..finished: one JSON line each, in order."""
    problem: str | None
    """What was wrong with the file on disk, said when it is rewritten (None: it was as a stop leaves it)."""


def records(text: str) -> list[dict[str, Any]]:
    """The per-round records of a journal text (one JSON object per line)."""
    return [json.loads(line) for line in text.splitlines()]


def _round_of(line: str) -> int | None:
    """The round of one line of metrics.jsonl, or None when it is not a round's record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    r = rec.get("round") if isinstance(rec, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _leftover_problem(rest: str, finished: int) -> str | None:
    """What is wrong with the file after the checkpoint's rounds (None: nothing, or complete records
    of later rounds in order -- what an abandoned round leaves)."""
    *complete, tail = rest.split("\n")
    last = finished
    for line in complete:
        r = _round_of(line)
        if r is None:
            return f"a line after round {finished} was not a round's record"
        if r <= last:
            return f"round {r} appeared again after round {last}"
        last = r
    return f"its last line (after round {finished}) was cut short" if tail else None


def proven(run_dir: Path, arrays: dict[str, np.ndarray] | None, finished: int) -> Proven:
    """The ``metrics.jsonl`` a resume after round ``finished`` continues from, checked against the
    checkpoint's ``arrays`` (None: read ``run_dir``'s checkpoint). Reads the file; writes nothing.

    Raises:
        ConfigError: one line -- the checkpoint's journal is damaged, or (an older checkpoint without
            one) the file lacks a finished round or holds two different records of one.
    """
    run_dir = Path(run_dir)
    if finished <= 0:
        return Proven("", None)
    if arrays is None:
        arrays = _journal_only(run_dir)
    on_disk, unreadable = _read(run_dir / METRICS)
    if JOURNAL in arrays:
        text = _journal_text(arrays[JOURNAL], run_dir, finished)
        return Proven(text, unreadable or _problem(on_disk, text, finished))
    return _from_file(run_dir, on_disk, finished, unreadable)


def _read(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)``; ``(None, None)`` when the file is missing; ``(None, why)`` when it cannot be read."""
    try:
        return path.read_bytes().decode(), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"it was unreadable ({type(exc).__name__})"


def _journal_only(run_dir: Path) -> dict[str, np.ndarray]:
    """Only the journal of ``run_dir``'s checkpoint (the rest is not read); {} when it has none."""
    from sim.checkpoint import CHECKPOINT

    try:
        with open(run_dir / CHECKPOINT, "rb") as f, np.load(f, allow_pickle=False) as z:
            return {JOURNAL: z[JOURNAL]} if JOURNAL in z.files else {}
    except Exception as exc:  # noqa: BLE001 -- any unreadable checkpoint is one line
        raise ConfigError(f"the checkpoint in {run_dir} is unreadable ({type(exc).__name__}): start the run again "
                          "without sim.resume") from None


def _journal_text(arr: np.ndarray, run_dir: Path, finished: int) -> str:
    """The checkpoint's journal as text, checked: rounds 1..finished, each once, in order."""
    try:
        text = np.asarray(arr, dtype=np.uint8).tobytes().decode()
        rounds = [_round_of(line) for line in text.splitlines()]
    except (ValueError, TypeError, UnicodeDecodeError):
        rounds = None
    if rounds != list(range(1, finished + 1)) or (text and not text.endswith("\n")):
        raise ConfigError(f"the checkpoint in {run_dir} is damaged (its copy of {METRICS} does not hold rounds "
                          f"1-{finished}): it cannot be resumed; start the run again in a new directory")
    return text


def _problem(on_disk: str | None, text: str, finished: int) -> str | None:
    """How ``on_disk`` differs from the checkpoint's ``text`` beyond an abandoned round's lines."""
    if on_disk is None:
        return "it was missing"
    if not on_disk.strip():
        return "it was empty"
    if on_disk.startswith(text):
        return _leftover_problem(on_disk[len(text):], finished)
    lines, want = on_disk.splitlines(keepends=True), text.splitlines(keepends=True)
    for i, line in enumerate(want):
        if i >= len(lines):
            return f"it ended after {i} of the {finished} finished rounds"
        if line != lines[i]:
            return (f"its line {i + 1} was cut short" if i == len(lines) - 1 and not lines[i].endswith("\n")
                    else f"its line {i + 1} differed from round {i + 1}'s record")
    return None  # pragma: no cover -- on_disk would start with text


def _from_file(run_dir: Path, on_disk: str | None, finished: int, unreadable: str | None) -> Proven:
    """An older checkpoint without a journal: rounds 1..finished taken from the file, if it has each
    of them (exact duplicates and lines that are not records of those rounds dropped)."""
    seen: dict[int, str] = {}
    for line in (on_disk or "").splitlines():
        r = _round_of(line)
        if r is None or not 1 <= r <= finished:
            continue
        if seen.setdefault(r, line) != line:
            raise ConfigError(f"{run_dir / METRICS} holds two different records of round {r}, and its checkpoint "
                              "(written before checkpoints kept the rounds' records) cannot tell which is right: "
                              "start the run again in a new directory")
    missing = [r for r in range(1, finished + 1) if r not in seen]
    if missing:
        raise ConfigError(f"{run_dir / METRICS} lacks the record of round {missing[0]} (the checkpoint has finished "
                          f"rounds 1-{finished}), and this checkpoint (written before checkpoints kept the rounds' "
                          "records) cannot restore it: start the run again in a new directory")
    text = "".join(seen[r] + "\n" for r in range(1, finished + 1))
    return Proven(text, unreadable or _problem(on_disk, text, finished))


def of_finished_run(run_dir: Path, num_rounds: int) -> Proven:
    """The ``metrics.jsonl`` of a finished run (its ``summary.json`` written: a run's all-up
    ``reference/``), checked against its last checkpoint when that holds every round (:func:`proven`),
    else against itself (rounds 1..num_rounds each once, in order). Writes nothing.

    Raises:
        ConfigError: one line -- the records cannot be trusted and no checkpoint can restore them.
    """
    from sim.checkpoint import finished_round

    run_dir = Path(run_dir)
    if finished_round(run_dir) == num_rounds:
        return proven(run_dir, None, num_rounds)
    try:
        text = (run_dir / METRICS).read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    if [_round_of(line) for line in text.splitlines()] != list(range(1, num_rounds + 1)) or \
            not text.endswith("\n"):
        raise ConfigError(f"{run_dir / METRICS} does not hold rounds 1-{num_rounds} once each, in order, and the "
                          f"run has no checkpoint of its last round to restore them from: move {run_dir} away and "
                          "resume again (it is run again)")
    return Proven(text, None)
