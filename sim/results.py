"""Run outputs in the Hydra run directory: metrics.jsonl, summary.json, clients.csv.

``metrics.jsonl`` gets one JSON line per round, appended and flushed to disk when the round
ends, so an interrupted run keeps every finished round. ``summary.json`` and ``clients.csv``
are written atomically (temporary file, then rename). Non-finite floats are written as null.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.cache import atomic_write_text
from sim.core.config import Config, Training
from sim.core.metrics import fairness

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

    A new run starts a new metrics.jsonl; a resumed one (``keep_rounds=k``) keeps the records of
    rounds 1..k and drops any later line an interrupted round left.
    """

    def __init__(self, run_dir: Path, keep_rounds: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rounds: list[dict[str, Any]] = []
        if keep_rounds is None:
            self.metrics_path.unlink(missing_ok=True)
            return
        # Resuming: keep the finished rounds (an abandoned round may have left a later line).
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the interruption
                if rec.get("round", keep_rounds + 1) <= keep_rounds:
                    self.rounds.append(rec)
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rounds))

    def round(self, record: dict[str, Any]) -> None:
        """Append one round's record to metrics.jsonl and fsync it."""
        rec = jsonable(record)
        self.rounds.append(rec)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
    s = cfg.strategy
    delta = getattr(s, "max_defer_rate", None)
    coop = cfg.servers.training == Training.coop
    return {
        **{key: metrics[key] for key in SUMMARY_KEYS},
        "served_defer_rate": metrics["served_defer_rate"],
        "baselines": metrics["baselines"], "table": metrics["table"], "curves": metrics["curves"],
        "accuracy_at_defer_rate": metrics["accuracy_at_defer_rate"], "aurc": metrics["aurc"],
        "e_aurc": metrics["e_aurc"], "fairness": fairness(rows),
        "staleness": int(s.staleness), "max_defer_rate": delta,
        "bound": str(s.bound) if delta is not None else None,
        "num_servers": int(cfg.servers.count),
        # cooperative learning: the Teammates' serving-depth limits (cost pressure, capacity)
        "serve_depth": float(cfg.servers.coop.serve_depth) if coop else None,
        "capacity": cfg.servers.coop.capacity if coop else None,
        "num_clients": len(acc), "num_rounds": int(cfg.sim.num_rounds), "seed": int(cfg.seed),
        "num_test_samples": metrics["num_samples"], "num_classes": num_classes,
        "strategy": s.name, "c_e": float(s.c_e), "c_1": float(s.c_1),
        "config": {k: v for k, v in comparable(cfg).items() if k != "seed"},
        "fleet": {"legacy_accuracy_min": float(acc.min()), "legacy_accuracy_median": float(np.median(acc)),
                  "legacy_accuracy_max": float(acc.max())},
        "devices": {"worst_system_accuracy": min(r["system_accuracy"] for r in rows),
                    "devices_helped": sum(r["system_accuracy"] > r["legacy_accuracy"] for r in rows),
                    "devices_hurt": sum(r["system_accuracy"] < r["legacy_accuracy"] for r in rows)},
    }
