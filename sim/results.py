"""Run outputs in the Hydra run directory: metrics.jsonl, summary.json, clients.csv.

``metrics.jsonl`` gets one JSON line per round, appended and flushed to disk when the round
ends, so an interrupted run keeps every finished round. ``summary.json`` and ``clients.csv``
are written atomically (temporary file, then rename). Non-finite floats are written as null.
Every result file gets the same mode (0666 less the umask, :func:`sim.core.cache.file_mode`).

A run directory is *claimed* while a run or a resume writes into it (:func:`claim`): an exclusive
lock on the directory, so a second run or resume of it is refused with one line, and a new run is
refused in a directory that already holds a run's results (nothing there is deleted or rewritten) --
unless they are a :func:`dead_end`'s, which nothing can resume: a new run starts there again.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sim.core.cache import atomic_write_text
from sim.core.config import Config
from sim.core.errors import ConfigError
from sim.core.metrics import fairness
from sim.core.storage import guard

RESULT_FILES = ("metrics.jsonl", "checkpoint.npz", "summary.json", "clients.csv", "reference")
"""What a run leaves in its directory once it has finished a round: a new run never starts there."""

_HELD: dict[str, list[int]] = {}
"""Run directories this process has claimed: real path -> [directory fd, claims]."""


def check_run_dir(run_dir: Path, key: str = "hydra.run.dir", new: bool = True) -> Path:
    """Make sure a run can write into ``run_dir`` (created if missing).

    Args:
        key: the config key that named it (for the message). new: a new run (not a resume), which
            must not start where another run left results.

    Raises:
        ConfigError: one line -- an existing file, a directory that cannot be created or written, or
            (``new``) one that already holds a run's results, unless those are a :func:`dead_end`'s.
    """
    p = Path(os.path.expanduser(str(run_dir)))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={p} is an existing file, not a directory: give a directory path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        fix = ("make it writable, or copy it somewhere writable and resume the copy" if key == "sim.resume" else
               "give a directory you can write")
        raise ConfigError(f"{key}={p} cannot be written ({exc.strerror or type(exc).__name__}): {fix}") from None
    found = [name for name in RESULT_FILES if (p / name).exists()]
    if new and found and not dead_end(p):
        raise ConfigError(f"{key}={p} already holds a run's results ({found[0]}): give a new directory, or continue "
                          f"that run with {shlex.quote(resume_override(p))}")
    return p


KEEPS = ("checkpoint.npz", "summary.json")
"""What makes a run directory worth keeping: a run can be resumed from it, or it has finished."""


def dead_end(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run that can be neither resumed nor read left: no
    :data:`KEEPS` file, here or in its ``reference/`` (a run stopped before its first checkpoint, or
    run with ``sim.checkpoint=false``, or stopped by a full disk before it). A new run may start there
    again; it replaces those partial results (:func:`restart_in_place`)."""
    p = Path(run_dir)
    return not any((d / name).exists() for d in (p, p / "reference") for name in KEEPS)


def restart_in_place(run_dir: Path) -> list[str]:
    """Remove the partial results of a :func:`dead_end` run in ``run_dir`` (a new run starts there);
    the names removed (none: nothing was there, or the directory is not a dead end). ``reference/`` is
    left to the new run's own reference run, which is a dead end too."""
    p = Path(run_dir)
    if not dead_end(p):
        return []
    gone = [name for name in RESULT_FILES if name != "reference" and (p / name).is_file()]
    for name in gone:
        (p / name).unlink()
    return gone + (["reference/"] if (p / "reference").is_dir() else [])


def path_override(key: str, path: Path | str) -> str:
    """The override ``<key>=<path>`` as Hydra reads it back to exactly ``path``: the path as it is
    where Hydra's grammar takes it unquoted, else single-quoted for Hydra (a multirun job's directory,
    ``N_key=value,key=value``, has ``=`` and ``,``; ``;``, quotes, ...)."""
    import re

    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = str(path)
    parser = OverridesParser.create()
    try:
        as_is = parser.parse_override(f"{key}={text}").value() == text
    except Exception:  # noqa: BLE001 -- Hydra's grammar refuses it unquoted
        as_is = False
    if as_is:
        return f"{key}={text}"
    # Hydra's quoted strings: a quote is escaped as \', and backslashes before a quote or the end doubled.
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"{key}='{escaped}'"


def resume_override(run_dir: Path | str) -> str:
    """The override ``sim.resume=<run_dir>`` that Hydra reads back as exactly ``run_dir`` (:func:`path_override`)."""
    return path_override("sim.resume", run_dir)


@contextmanager
def claim(run_dir: Path, new: bool, key: str = "hydra.run.dir") -> Iterator[Path]:
    """Hold ``run_dir`` for a run (``new``) or a resume while the block writes into it: checked
    (:func:`check_run_dir`) and locked (``flock`` on the directory; released when the block ends or
    the process dies). Re-entrant within one process (a run's ``reference/`` is its own directory).

    Raises:
        ConfigError: see :func:`check_run_dir`; or another process holds the directory.
    """
    p = Path(os.path.expanduser(str(run_dir)))
    real = os.path.realpath(p)
    if real in _HELD:
        _HELD[real][1] += 1
        try:
            yield p
        finally:
            _HELD[real][1] -= 1
        return
    check_run_dir(p, key, new=False)
    import fcntl

    fd = os.open(real, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(f"{p} is in use by another run or resume of it (the directory is locked): wait until "
                          "that one ends, or give another directory") from None
    try:
        if new:
            check_run_dir(p, key, new=True)
        _HELD[real] = [fd, 1]
        yield p
    finally:
        _HELD.pop(real, None)
        os.close(fd)  # releases the lock

SUMMARY_KEYS = ("system_accuracy", "legacy_accuracy", "server_accuracy", "oracle_accuracy", "defer_rate",
                "coverage", "l01_cost")


def jsonable(obj: Any) -> Any:
    """Plain JSON types; numpy scalars/arrays converted; NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


class Recorder:
    """Writes a run's result files into ``run_dir``.

    A new run starts a new metrics.jsonl. A resumed one (``keep_rounds=k``) continues from the
    records of rounds 1..k as its checkpoint proves them (:func:`sim.journal.proven`: a line an
    interrupted round left is dropped, a damaged file rewritten from the checkpoint's copy).

    Raises:
        ConfigError: (resuming) the file cannot be repaired from the checkpoint (one line).
    """

    def __init__(self, run_dir: Path, keep_rounds: int | None = None):
        from sim import journal

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.lines: list[str] = []
        """metrics.jsonl's lines as written (each checkpoint keeps them: :data:`sim.journal.JOURNAL`)."""
        self.rounds: list[dict[str, Any]] = []
        if keep_rounds is None:
            self.metrics_path.unlink(missing_ok=True)
            return
        text = journal.proven(self.run_dir, None, keep_rounds).text
        self.lines = text.splitlines(keepends=True)
        self.rounds = journal.records(text)
        atomic_write_text(self.metrics_path, text, fsync=True)

    @property
    def text(self) -> str:
        """metrics.jsonl as this run has written it so far."""
        return "".join(self.lines)

    def round(self, record: dict[str, Any]) -> None:
        """Append one round's record to metrics.jsonl and fsync it.

        Raises:
            OutOfSpace: the disk is full; the file is cut back to its previous rounds (one line).
        """
        rec = jsonable(record)
        line = json.dumps(rec, sort_keys=True) + "\n"
        data = line.encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # unbuffered: no flush at close
        try:
            size = os.fstat(fd).st_size
            try:
                with guard(self.metrics_path, f"round {rec.get('round')}'s record"):
                    done = 0
                    while done < len(data):
                        done += os.write(fd, data[done:])
                    os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # no torn line left behind (cutting back needs no space)
                raise
        finally:
            os.close(fd)
        self.rounds.append(rec)
        self.lines.append(line)

    def write_json(self, name: str, obj: dict[str, Any]) -> Path:
        """Write ``obj`` as ``run_dir/name`` atomically (sorted keys, NaN as null)."""
        path = self.run_dir / name
        atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")
        return path

    def summary(self, summary: dict[str, Any]) -> Path:
        return self.write_json("summary.json", summary)

    def clients(self, rows: list[dict[str, Any]]) -> Path:
        path = self.run_dir / "clients.csv"
        buf = io.StringIO()
        if rows:
            w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in jsonable(r).items()})
        atomic_write_text(path, buf.getvalue())
        return path


def baseline_routing(cfg: Config) -> str:
    """How the matched baselines' deferrals are answered (summary.json ``baselines_routing``): a
    baseline's deferred sample gets the answer the run's own routing gives that sample."""
    routing = cfg.servers.resolved_routing
    if cfg.servers.count == 1:
        return "the one helper server"
    text = {"learned": "the server the run's rejector picks for each sample (its routing head, argmax over "
                       "the available servers)",
            "all": "the ensemble of every reachable server", "round_robin": "round-robin over the reachable servers",
            "least_loaded": "the least-loaded reachable server"}
    return f"{routing}: {text.get(str(routing), str(routing))}"


SUMMARY_VERSION = 2
"""summary.json's schema (its ``summary_version``; none: 1). Version 2 states every parameter once,
under ``config``; version 1 also had the top-level keys of :data:`V1_KEYS` and ``resilience.failures``
(:func:`upgrade_summary` reads it)."""

V1_KEYS = {"strategy": "strategy.name", "c_e": "strategy.c_e", "c_1": "strategy.c_1",
           "staleness": "strategy.staleness", "max_defer_rate": "strategy.max_defer_rate",
           "bound": "strategy.bound", "num_servers": "servers.count", "serve_depth": "servers.coop.serve_depth",
           "capacity": "servers.coop.capacity"}
"""Version 1's top-level copies of config values -> their config (dotted) names."""

V1_DEFAULTS = {"strategy.staleness": 1, "servers.count": 1, "failures.name": "none"}
"""What a version-1 summary from before a key existed meant by its absence."""


def upgrade_summary(s: dict[str, Any]) -> dict[str, Any]:
    """A summary read from summary.json in today's form (:data:`SUMMARY_VERSION`); the one place an older
    form is read. From version 1 it drops the copies of config values (:data:`V1_KEYS`,
    ``resilience.failures``); a summary so old it has no ``config`` keeps those values instead as
    top-level keys under their dotted config names (``"strategy.c_e"``, ``"failures.name"``; absent ones
    as :data:`V1_DEFAULTS`), the only identity such a run has. ``s`` itself is not modified.
    """
    if s.get("summary_version", 1) >= SUMMARY_VERSION:
        return s
    out = {k: v for k, v in s.items() if k not in V1_KEYS}
    res = s.get("resilience")
    if isinstance(res, dict):
        out["resilience"] = {k: v for k, v in res.items() if k != "failures"}
    if not isinstance(s.get("config"), dict):
        old = {**{new: s[k] for k, new in V1_KEYS.items() if k in s},
               **({"failures.name": res["failures"]} if isinstance(res, dict) and "failures" in res else {})}
        out.update({**V1_DEFAULTS, **old})
    out["summary_version"] = SUMMARY_VERSION
    return out


def build_summary(cfg: Config, metrics: dict[str, Any], rows: list[dict[str, Any]],
                  legacy_accuracy: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The run's summary.json: final pooled metrics, run identity, fleet spread, per-device extremes.

    Only seed-determined numbers (no wall-clock times), so the same seed gives the same file.
    ``config`` is the run's whole configuration as plain values, without ``seed`` and without the
    ``sim.*`` keys that cannot change results (:data:`sim.checkpoint.RESUME_FREE`; the same
    stripping as :func:`sim.checkpoint.comparable`, which also resolves ``servers.routing=auto``):
    ``python -m sim.report`` groups runs whose ``config`` is identical as seeds of one configuration.
    """
    from sim.checkpoint import comparable

    acc = np.asarray(legacy_accuracy)
    return {
        **{key: metrics[key] for key in SUMMARY_KEYS},
        "served_defer_rate": metrics["served_defer_rate"],
        "baselines": metrics["baselines"], "baselines_routing": baseline_routing(cfg),
        "operating_points": metrics["operating_points"],
        "oracle": {**metrics["oracle"], "headroom": metrics["oracle"]["at_defer_rate"] - metrics["system_accuracy"]
                   if metrics["system_accuracy"] is not None else None},
        "table": metrics["table"], "by_class": metrics["by_class"], "curves": metrics["curves"],
        "accuracy_at_defer_rate": metrics["accuracy_at_defer_rate"], "aurc": metrics["aurc"],
        "e_aurc": metrics["e_aurc"], "fairness": fairness(rows),
        "summary_version": SUMMARY_VERSION,
        "num_clients": len(acc), "num_rounds": cfg.sim.num_rounds, "seed": cfg.seed,
        "num_test_samples": metrics["num_samples"], "num_classes": num_classes,
        "config": {k: v for k, v in comparable(cfg).items() if k != "seed"},
        "fleet": {"legacy_accuracy_min": float(acc.min()), "legacy_accuracy_median": float(np.median(acc)),
                  "legacy_accuracy_max": float(acc.max()), "legacy_accuracy_mean": float(acc.mean()),
                  "legacy": str(cfg.fleet.legacy)},
        "devices": {"worst_system_accuracy": min(r["system_accuracy"] for r in rows),
                    "devices_helped": sum(r["system_accuracy"] > r["legacy_accuracy"] for r in rows),
                    "devices_hurt": sum(r["system_accuracy"] < r["legacy_accuracy"] for r in rows)},
    }
