"""The tables and the figure of docs/findings.md that ``python -m sim.report`` does not make by itself.

    python benchmarks/findings_tables.py RUNS_DIR OUT_DIR

reads the sweeps ``benchmarks/findings.sh`` writes under ``RUNS_DIR`` (any that exist) and writes
``OUT_DIR/tables.md`` and ``OUT_DIR/fleet_size.png`` (and ``.pdf``):

- fleet size x rejector federation: L2H minus confidence (per device, calibrated) at the run's own
  (bounded) defer rate and at 30%, paired within each run, mean and 95% t-interval over seeds, with
  the centralised reference beside them;
- the label sources at 300 devices (paired against in_sample);
- how much reusing the method's own server flatters the matched confidence baseline (global
  confidence at 30% with L2H's server vs with a confidence run's own server, paired by seed);
- uneven help: per preset and configuration, the share of deferrals per class group (classes a
  server knows / does not), the oracle's headroom and, with several servers, the oracle routing.

Every statistic comes from the runs' summary.json files through :mod:`sim.report` (mean, sample
std, t-interval); nothing here is typed in.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sim.report import find_runs, mean_ci
from sim.results import upgrade_summary

KNOWN = {"partial": [list(range(6))], "specialist": [list(range(5)), list(range(5, 10))]}


def load(d: Path) -> list[dict[str, Any]]:
    """Every run's summary under ``d`` (none if ``d`` does not exist), upgraded to today's form."""
    if not d.is_dir() or not any(d.rglob("summary.json")):
        return []
    out = []
    for run in find_runs([d]):
        s = upgrade_summary(json.loads((run / "summary.json").read_text()))
        s["_run"] = str(run)
        out.append(s)
    return out


def cell(values: list[float], digits: int = 3) -> str:
    """``mean ± half-width`` of a 95% t-interval over seeds (``mean`` alone for one value)."""
    st = mean_ci([v for v in values if v is not None])
    if st["n"] == 0 or not math.isfinite(st["mean"]):
        return "–"
    if st["n"] == 1:
        return f"{st['mean']:+.{digits}f}"
    return f"{st['mean']:+.{digits}f} ± {st['hi'] - st['mean']:.{digits}f}"


def plain(values: list[float], digits: int = 3) -> str:
    st = mean_ci([v for v in values if v is not None])
    return "–" if not st["n"] else f"{st['mean']:.{digits}f}"


def variant_of(s: dict[str, Any]) -> str:
    r = s["config"]["strategy"]["rejector"]
    return "local" if r["federation"] == "local" else f"{r['federation']} by {r['federate_by']}"


def op(s: dict[str, Any], rate: str, name: str) -> float | None:
    p = (s.get("operating_points") or {}).get(rate) or {}
    return None if p.get("method") is None or p.get(name) is None else p["method"] - p[name]


def own(s: dict[str, Any], name: str) -> float:
    return s["system_accuracy"] - s["baselines"][name]["system_accuracy"]


def fleet_size_table(runs: list[dict[str, Any]], central: list[dict[str, Any]]) -> tuple[list[str], dict]:
    """The fleet-size table's markdown lines and the figure's series (federation -> sizes, means, CIs)."""
    head = ("| devices | rejectors | n | legacy acc | system acc | defer rate | vs per-device conf. | "
            "vs calibrated conf. | vs per-device @ 30% | vs calibrated @ 30% |")
    lines = [head, "|" + "---|" * 10]
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for s in runs:
        groups.setdefault((s["num_clients"], variant_of(s)), []).append(s)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for (n, var), g in sorted(groups.items()):
        lines.append(f"| {n} | {var} | {len(g)} | {plain([s['legacy_accuracy'] for s in g])} | "
                     f"{plain([s['system_accuracy'] for s in g])} | {plain([s['defer_rate'] for s in g])} | "
                     f"{cell([own(s, 'confidence_per_device') for s in g])} | "
                     f"{cell([own(s, 'confidence_calibrated') for s in g])} | "
                     f"{cell([op(s, '0.3', 'confidence_per_device') for s in g])} | "
                     f"{cell([op(s, '0.3', 'confidence_calibrated') for s in g])} |")
        st = mean_ci([op(s, "0.3", "confidence_per_device") for s in g])
        series.setdefault(var, []).append((n, st["mean"], st["hi"] - st["mean"] if st["n"] > 1 else 0.0))
    if central:
        g = central
        lines.append(f"| 1 (centralised, {g[0]['config']['data']['num_samples']} samples) | – | {len(g)} | "
                     f"{plain([s['legacy_accuracy'] for s in g])} | {plain([s['system_accuracy'] for s in g])} | "
                     f"{plain([s['defer_rate'] for s in g])} | {cell([own(s, 'confidence_per_device') for s in g])} | "
                     f"{cell([own(s, 'confidence_calibrated') for s in g])} | "
                     f"{cell([op(s, '0.3', 'confidence_per_device') for s in g])} | "
                     f"{cell([op(s, '0.3', 'confidence_calibrated') for s in g])} |")
    return lines, series


def plot_fleet_size(series: dict[str, list[tuple[int, float, float]]], path: Path) -> Path:
    """L2H minus per-device confidence at 30% against fleet size, one line per federation mode (95% CI bars)."""
    from sim.style import color, figure, legend_outside, save, styled

    @styled
    def draw() -> Path:
        fig, ax = figure()
        for i, (var, pts) in enumerate(sorted(series.items())):
            pts = sorted(pts)
            x = np.array([p[0] for p in pts], dtype=float) * (1.0 + 0.04 * (i - 1))  # side by side
            ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", color=color(i), label=var)
        ax.axhline(0.0, color="0.4", linewidth=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("devices in the fleet")
        ax.set_ylabel("L2H − per-device confidence\nat 30% deferrals")
        legend_outside(fig, ax)
        return save(fig, path)

    return draw()


def label_table(runs: list[dict[str, Any]]) -> list[str]:
    base = {s["seed"]: s for s in runs if s["config"]["strategy"]["server_labels"] == "in_sample"}
    lines = ["| labels | n | system acc | defer rate | L01 cost | paired L01 vs in_sample | vs per-device conf. @ 30% |",
             "|" + "---|" * 7]
    by: dict[str, list[dict[str, Any]]] = {}
    for s in runs:
        by.setdefault(s["config"]["strategy"]["server_labels"], []).append(s)
    for name, g in sorted(by.items()):
        paired = [s["l01_cost"] - base[s["seed"]]["l01_cost"] for s in g if s["seed"] in base] if name != "in_sample" else []
        lines.append(f"| {name} | {len(g)} | {plain([s['system_accuracy'] for s in g])} | "
                     f"{plain([s['defer_rate'] for s in g])} | {plain([s['l01_cost'] for s in g])} | "
                     f"{cell(paired) if paired else '–'} | {cell([op(s, '0.3', 'confidence_per_device') for s in g])} |")
    return lines


def bias_lines(l2h: list[dict[str, Any]], conf: list[dict[str, Any]]) -> list[str]:
    mine = {s["seed"]: s for s in conf}
    diffs = [op_value(mine[s["seed"]]) - op_value(s) for s in l2h if s["seed"] in mine]
    return [f"Global confidence at 30% deferrals answered by a confidence run's own server minus the same rule answered "
            f"by L2H's server (same seed, same fleet; positive: L2H's server flatters L2H by making the baseline look "
            f"worse): {cell(diffs)} (n = {len(diffs)} seeds)."]


def op_value(s: dict[str, Any]) -> float:
    return s["operating_points"]["0.3"]["confidence"]


def uneven_table(name: str, runs: list[dict[str, Any]]) -> list[str]:
    known = sorted(set().union(*map(set, KNOWN.get(name, [[]])))) if name in KNOWN else []
    head = ("| configuration | n | system acc | defer rate | L01 cost | vs conf. @ same rate | vs per-device | "
            "oracle headroom | oracle routing |")
    if name == "partial":
        head = head.replace("| oracle routing |", "| classes 6-9: share of deferrals | classes 6-9: defer rate |")
    if name == "tiered":
        head += " large server's share of the final answers |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by: dict[str, list[dict[str, Any]]] = {}
    for s in runs:
        c = s["config"]
        key = c["strategy"]["name"]
        if name == "specialist":
            key += f", routing={c['servers']['routing']}"
        if name == "tiered":
            key += f", servers={c['servers']['count']}, widths={c['servers']['widths']}, c_e={c['servers']['c_e']}"
        by.setdefault(key, []).append(s)
    for key, g in sorted(by.items()):
        row = (f"| {key} | {len(g)} | {plain([s['system_accuracy'] for s in g])} | {plain([s['defer_rate'] for s in g])} | "
               f"{plain([s['l01_cost'] for s in g])} | "
               f"{cell([own(s, 'confidence') for s in g])} | {cell([own(s, 'confidence_per_device') for s in g])} | "
               f"{cell([s['oracle']['headroom'] for s in g])} | ")
        if name == "partial":
            unknown = [c for c in range(10) if c not in known]
            share, rate = [], []
            for s in g:
                bc = s["by_class"]
                d = np.array([(bc["defer_rate"][c] or 0) * bc["n"][c] for c in range(len(bc["n"]))])
                share.append(float(d[unknown].sum() / d.sum()) if d.sum() else None)
                rate.append(float(d[unknown].sum() / sum(bc["n"][c] for c in unknown)))
            row += f"{plain(share)} | {plain(rate)} |"
        else:  # perfect routing among several servers (one server: nothing to route)
            routing = [s["oracle"].get("routing") if s["config"]["servers"]["count"] > 1 else None for s in g]
            row += f"{plain(routing)} |"
            if name == "tiered":
                row += f" {plain([last_load_share(s) for s in g])} |"
        lines.append(row)
    return lines


def last_load_share(s: dict[str, Any]) -> float | None:
    """The share of the last round's deferred test samples the last (largest) server answered."""
    if s["config"]["servers"]["count"] < 2:
        return None
    lines = (Path(s["_run"]) / "metrics.jsonl").read_text().splitlines()
    load = json.loads(lines[-1]).get("load") or []
    return float(load[-1] / sum(load)) if load and sum(load) else None


def main(argv: list[str]) -> int:
    runs_dir, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Findings tables (benchmarks/findings_tables.py)", "",
          "Cells: mean ± half-width of the 95% Student t-interval over seeds; differences are paired within each "
          "run (same test samples) or by seed.", ""]
    fs, central = load(runs_dir / "fleet_size"), load(runs_dir / "fleet_central")
    if fs:
        lines, series = fleet_size_table([s for s in fs if s["config"]["strategy"]["name"] == "l2h"], central)
        md += ["## Fleet size x rejector federation (MNIST-1D, bounded at 30%)", "", *lines, ""]
        png = plot_fleet_size(series, out / "fleet_size.png")
        md += [f"![fleet size]({png.name})", ""]
    labels = load(runs_dir / "fleet_labels")
    if labels:
        md += ["## Label sources (300 devices, federated by group)", "", *label_table(labels), ""]
    conf = load(runs_dir / "fleet_confidence")
    if conf and fs:
        l2h = [s for s in fs if s["num_clients"] == 300 and variant_of(s) == "fedavg by group"]
        md += ["## Reusing the method's server", "", *bias_lines(l2h, conf), ""]
    for name in ("partial", "specialist", "drift", "tiered"):
        for data in ("digits", "mnist1d"):
            runs = load(runs_dir / f"{name}_{data}") + (load(runs_dir / f"tiered_price_{data}") if name == "tiered" else [])
            if runs:
                md += [f"## {name} ({data})", "", *uneven_table(name, runs), ""]
    (out / "tables.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
