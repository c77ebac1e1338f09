"""The sweep-level tidy table of ``python -m sim.report``: every run's per-round metrics in one long table.

One row per (run, round, metric): the run's directory, seed, configuration (``group``, its legend
``label`` and the varying config keys' values), the round, the metric's name and its value. A
round's scalar fields of ``metrics.jsonl`` become one row each; a per-server list becomes one row
per server (``availability.0``, ``load.1``); a mapping one row per entry (``failovers.subset``).
Fields that are not numbers (text, None) are left out, and so is a run without ``metrics.jsonl``.

Written as ``rounds.csv`` and, where pandas has a Parquet engine (pyarrow, which flwr-datasets
brings), ``rounds.parquet``; either loads in one line::

    df = pandas.read_parquet("report/rounds.parquet")      # or pandas.read_csv("report/rounds.csv")
    df[df.metric == "system_accuracy"].groupby(["label", "round"]).value.mean()
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

CSV = "rounds.csv"
PARQUET = "rounds.parquet"
SKIP = ("round",)
"""Fields of a round record that are the row's identity, not a metric."""


def round_values(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """``(metric, value)`` of every number in one ``metrics.jsonl`` record (lists by index, mappings by key)."""
    def walk(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
        if isinstance(value, bool):
            yield prefix, float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(float(value)):
                yield prefix, float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from walk(f"{prefix}.{i}", v)

    for key, value in record.items():
        if key not in SKIP:
            yield from walk(key, value)


def read_rounds(run: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl`` records (a line that does not parse -- an interrupted write -- is skipped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "round" in rec:
            out.append(rec)
    return out


def rounds_frame(groups: list[dict[str, Any]], varying: list[str]) -> pd.DataFrame:
    """The long table of every run of ``groups`` (``sim.report``'s configuration groups).

    Columns: ``run``, ``seed``, ``group``, ``label``, the ``varying`` keys, ``round``, ``metric``,
    ``value``; sorted by group, seed, run, round and metric.
    """
    rows = []
    for g in groups:
        values = {k: _cell(g["values"].get(k)) for k in varying}
        for r in g["runs"]:
            for rec in read_rounds(Path(r["run"])):
                base = {"run": r["run"], "seed": r["seed"], "group": g["id"], "label": g["label"], **values,
                        "round": int(rec["round"])}
                rows.extend({**base, "metric": m, "value": v} for m, v in round_values(rec))
    cols = ["run", "seed", "group", "label", *varying, "round", "metric", "value"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["group", "seed", "run", "round", "metric"], kind="stable").reset_index(drop=True)


def _cell(value: Any) -> Any:
    """A config value as one table cell: lists and mappings as JSON text (a Parquet column has one type)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def parquet_engine() -> str | None:
    """The Parquet engine pandas would use (pyarrow or fastparquet), or None."""
    for name in ("pyarrow", "fastparquet"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    return None


def write_rounds(groups: list[dict[str, Any]], varying: list[str], out: Path) -> list[Path]:
    """Write ``rounds.csv`` (and ``rounds.parquet`` when a Parquet engine is installed) into ``out``.

    Returns:
        The files written.

    Raises:
        OSError / OutOfSpace: a file cannot be written.
    """
    from sim.core.cache import atomic_write_bytes, atomic_write_text

    df = rounds_frame(groups, varying)
    for c in varying:  # one type per column: mixed None / numbers / text become text
        if df[c].map(type).nunique() > 1:
            df[c] = df[c].map(lambda v: None if v is None else str(v))
    atomic_write_text(out / CSV, df.to_csv(index=False))
    files = [out / CSV]
    engine = parquet_engine()
    if engine is not None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, engine=engine)
        atomic_write_bytes(out / PARQUET, buf.getvalue(), what="a table")
        files.append(out / PARQUET)
    return files
