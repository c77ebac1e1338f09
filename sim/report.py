"""``python -m sim.report``: aggregate runs into one CSV, a markdown table and comparison figures.

Examples:
    python -m sim.report multirun/2026-11-21/10-00-00               # a sweep (-m): every job in it
    python -m sim.report outputs/A outputs/B multirun/C --out report/

Every ``summary.json`` under the given directories is one run (an all-up ``reference/`` run of a
failure experiment is skipped). Runs that differ only in ``seed`` form one group; the markdown
table gives each group's mean ± standard deviation over its seeds (population std, ddof=0; n is
the number of seeds). Written into ``--out`` (default: the first directory given):

- ``report.csv``: one row per run (every column of the table, plus the run directory).
- ``report.md``: the grouped table; with bounded-reject-rate runs, achieved vs requested rate.
- ``accuracy_vs_defer_rate.png``: each group's accuracy-coverage curve (system accuracy when the
  top-k of its deferral score are deferred, mean over seeds) with its operating point marked.
- ``accuracy_vs_c_e.png``, ``accuracy_vs_staleness.png``, ``achieved_vs_requested_defer_rate.png``:
  when the runs vary in c_e, in the staleness S, or set ``strategy.max_defer_rate``.

A missing directory or a directory without runs is a one-line error (exit 2); a run whose
summary.json cannot be read is skipped with a one-line warning. Nothing in the run directories is
modified.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.cache import atomic_write_text

GROUP_KEYS = ("strategy", "c_e", "c_1", "staleness", "max_defer_rate", "bound", "num_servers", "serve_depth",
              "capacity", "failures", "num_clients", "num_rounds")
"""What identifies a configuration (everything but the seed)."""

VALUE_KEYS = ("system_accuracy", "defer_rate", "coverage", "l01_cost", "legacy_accuracy", "server_accuracy",
              "aurc", "e_aurc", "worst_device_accuracy", "p10_device_accuracy", "fraction_kept")
"""The numbers aggregated over seeds (``acc@r`` columns are added for the fixed defer rates)."""


class ReportError(ValueError):
    """Bad report input; the message is one line."""


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories (holding summary.json) under ``dirs``, sorted; ``reference/`` runs skipped.

    Raises:
        ReportError: a directory does not exist, or none holds a run.
    """
    runs: set[Path] = set()
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory: give run directories (outputs/...) or sweeps (multirun/...)")
        for p in d.rglob("summary.json"):
            if p.parent.name != "reference":
                runs.add(p.parent)
    if not runs:
        raise ReportError(f"no summary.json under {', '.join(map(str, dirs))}: nothing to report "
                          "(a run writes summary.json when it finishes)")
    return sorted(runs)


def run_row(run: Path) -> dict[str, Any]:
    """One run's row: its configuration and final metrics (from summary.json).

    Raises:
        ReportError: the summary cannot be read or lacks a field.
    """
    try:
        s = json.loads((run / "summary.json").read_text())
        row: dict[str, Any] = {
            "run": str(run), "seed": s["seed"], "strategy": s["strategy"], "c_e": s["c_e"], "c_1": s["c_1"],
            "staleness": s.get("staleness", 1), "max_defer_rate": s.get("max_defer_rate"),
            "bound": s.get("bound"), "num_servers": s.get("num_servers", 1),
            "serve_depth": s.get("serve_depth"), "capacity": s.get("capacity"),
            "failures": (s.get("resilience") or {}).get("failures", "none"),
            "num_clients": s["num_clients"], "num_rounds": s["num_rounds"],
            **{k: s[k] for k in ("system_accuracy", "defer_rate", "coverage", "l01_cost", "legacy_accuracy",
                                 "server_accuracy")},
            "aurc": s.get("aurc"), "e_aurc": s.get("e_aurc"),
            "worst_device_accuracy": (s.get("fairness") or {}).get("worst"),
            "p10_device_accuracy": (s.get("fairness") or {}).get("p10"),
            "fraction_kept": (s.get("resilience") or {}).get("fraction_kept"),
            "num_test_samples": s["num_test_samples"],
        }
        for r, a in (s.get("accuracy_at_defer_rate") or {}).items():
            row[f"acc@{r}"] = a
        row["_curve"] = (s["curves"]["defer_rate"], s["curves"]["rejector"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{run / 'summary.json'} is unreadable ({type(exc).__name__}: {exc}); skipped") from None
    return row


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by :data:`GROUP_KEYS`; each group: the keys, ``n`` (seeds), ``seeds`` and, per
    value column, ``<col>_mean`` and ``<col>_std`` (NaN-aware, population std)."""
    value_cols = list(VALUE_KEYS) + sorted({k for r in rows for k in r if k.startswith("acc@")})
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP_KEYS), []).append(r)
    out = []
    for key, members in groups.items():
        g: dict[str, Any] = dict(zip(GROUP_KEYS, key))
        g["n"] = len(members)
        g["seeds"] = sorted(m["seed"] for m in members)
        for col in value_cols:
            v = np.array([_num(m.get(col)) for m in members])
            ok = v[np.isfinite(v)]
            g[f"{col}_mean"] = float(ok.mean()) if ok.size else float("nan")
            g[f"{col}_std"] = float(ok.std()) if ok.size else float("nan")
        curves = [m["_curve"] for m in members]
        g["_curve"] = (curves[0][0], np.mean([c[1] for c in curves], axis=0).tolist())
        g["_members"] = members
        out.append(g)
    def order(v: Any) -> tuple:
        return (2, "") if v is None else (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))

    return sorted(out, key=lambda g: tuple(order(g[k]) for k in GROUP_KEYS))


def varying(groups: list[dict[str, Any]]) -> list[str]:
    """The group keys whose value differs between groups (the columns worth showing)."""
    return [k for k in GROUP_KEYS if len({json.dumps(g[k]) for g in groups}) > 1] or ["strategy"]


def label(g: dict[str, Any], keys: list[str]) -> str:
    """A configuration's legend label from the keys that vary (unset ones left out)."""
    return ", ".join(f"{g[k]}" if k == "strategy" else f"{k}={g[k]}" for k in keys if g[k] is not None)


def _cell(v: Any) -> str:
    return "–" if v is None else str(v)


def _pm(mean: float, std: float) -> str:
    return "–" if not math.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The report as markdown: one table row per group (mean ± std over seeds)."""
    keys = varying(groups)
    cols = [("system acc", "system_accuracy"), ("defer rate", "defer_rate"), ("L01 cost", "l01_cost"),
            ("local acc", "legacy_accuracy"), ("server acc", "server_accuracy"), ("AURC", "aurc"),
            ("E-AURC", "e_aurc"), ("worst device", "worst_device_accuracy"),
            ("10th pct device", "p10_device_accuracy")]
    if any(g["failures"] != "none" and math.isfinite(g["fraction_kept_mean"]) for g in groups):
        cols.append(("fraction kept", "fraction_kept"))
    lines = [f"{len(rows)} runs in {len(groups)} configurations; mean ± std over seeds (n = seeds).", ""]
    lines.append("| " + " | ".join(keys + ["n"] + [c for c, _ in cols]) + " |")
    lines.append("|" + "---|" * (len(keys) + 1 + len(cols)))
    for g in groups:
        cells = [_cell(g[k]) for k in keys] + [str(g["n"])] + [_pm(g[f"{c}_mean"], g[f"{c}_std"]) for _, c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    rate_cols = sorted(k[:-5] for k in groups[0] if k.startswith("acc@") and k.endswith("_mean"))
    if rate_cols:
        lines += ["", "System accuracy when the top-k of each configuration's deferral score are deferred "
                  "(the accuracy-coverage curve at fixed defer rates):", ""]
        lines.append("| " + " | ".join(keys + [c.replace("acc@", "defer ") for c in rate_cols]) + " |")
        lines.append("|" + "---|" * (len(keys) + len(rate_cols)))
        for g in groups:
            lines.append("| " + " | ".join([_cell(g[k]) for k in keys] + [f"{g[c + '_mean']:.3f}" for c in rate_cols])
                         + " |")
    bounded = [g for g in groups if g["max_defer_rate"] is not None]
    if bounded:
        lines += ["", "Bounded reject rate: achieved test defer rate vs the requested bound delta. 'noise' is "
                  "the binomial standard error sqrt(delta(1-delta)/N) of a rate measured on N test samples; "
                  "'over by' is (achieved - delta) in those units (above +2 means the bound is exceeded by "
                  "more than sampling noise).", ""]
        lines.append("| bound | delta | n | achieved defer rate | noise | over by (noise units) | system acc |")
        lines.append("|---|---|---|---|---|---|---|")
        for g in bounded:
            d = float(g["max_defer_rate"])
            n_test = float(np.mean([m["num_test_samples"] for m in g["_members"]]))
            se = math.sqrt(max(d * (1 - d), 1e-12) / n_test)
            over = (g["defer_rate_mean"] - d) / se
            lines.append(f"| {g['bound']} | {d:g} | {g['n']} | {_pm(g['defer_rate_mean'], g['defer_rate_std'])} | "
                         f"{se:.3f} | {over:+.1f} | {_pm(g['system_accuracy_mean'], g['system_accuracy_std'])} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = ["run", "seed", *GROUP_KEYS]
    cols += [k for k in rows[0] if k not in cols and not k.startswith("_")]
    for r in rows[1:]:
        cols += [k for k in r if k not in cols and not k.startswith("_")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())


def report(dirs: list[Path], out: Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Build the report of the runs under ``dirs`` into ``out`` (default ``dirs[0]``).

    Returns:
        ``{"rows": [...], "groups": [...], "files": [paths written], "skipped": [messages]}``.

    Raises:
        ReportError: no runs, a missing directory, or no readable summary.
    """
    from sim import plots as P

    runs = find_runs(dirs)
    rows, skipped = [], []
    for run in runs:
        try:
            rows.append(run_row(run))
        except ReportError as exc:
            skipped.append(str(exc))
    if not rows:
        raise ReportError(f"none of the {len(runs)} runs has a readable summary.json")
    groups = group_rows(rows)
    out = Path(out) if out is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.csv", out / "report.md"]
    write_csv(rows, files[0])
    atomic_write_text(files[1], markdown(groups, rows))
    if plots:
        keys = varying(groups)
        files.append(P.plot_report_curves(groups, [label(g, keys) for g in groups], out / "accuracy_vs_defer_rate.png"))
        for key, name, xlabel in (("c_e", "accuracy_vs_c_e.png", "deferral price c_e"),
                                  ("staleness", "accuracy_vs_staleness.png", "staleness S (rounds between refreshes)")):
            if len({g[key] for g in groups}) > 1:
                others = [k for k in keys if k != key]
                files.append(P.plot_report_sweep(groups, key, others, xlabel, out / name))
        if any(g["max_defer_rate"] is not None for g in groups):
            files.append(P.plot_report_bounded(groups, out / "achieved_vs_requested_defer_rate.png"))
    return {"rows": rows, "groups": groups, "files": files, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or multirun sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first directory)")
    parser.add_argument("--no-plots", action="store_true", help="write only report.csv and report.md")
    args = parser.parse_args(argv)
    try:
        res = report(args.dirs, args.out, plots=not args.no_plots)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for msg in res["skipped"]:
        print(f"warning: {msg}", file=sys.stderr)
    print(Path(res["files"][1]).read_text())
    print("wrote " + ", ".join(str(f) for f in res["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
