"""What a run shows on the terminal: the fleet at start, a line per round, and the summary tables at
the end (rich). The progress display (phases, the rounds' bar) is :mod:`sim.progress`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from sim.core.config import Config, FailureKind
from sim.core.faults import describe
from sim.results import SUMMARY_KEYS


def print_fleet(console: Any, cfg: Config, prep: Any, fleet: Any) -> None:
    """The fleet's legacy-accuracy spread, overall and per device group."""
    acc = fleet.legacy_accuracy
    console.print(
        f"[bold]fleet[/bold]: {len(acc)} legacy devices on {cfg.data.name} ({prep.num_classes} classes, "
        f"{int((np.asarray(prep.owner) >= 0).sum())} samples, partition={cfg.data.partition.name}); "
        f"legacy accuracy min {acc.min():.3f} / median {np.median(acc):.3f} / max {acc.max():.3f} "
        f"({'built' if fleet.built else 'from cache'})", soft_wrap=True)
    for gi, g in enumerate(fleet.group_cfgs):
        members = [d for d, gg in enumerate(fleet.groups) if gg == gi]
        if members:
            console.print(f"  group {g.name:<16} {len(members):>4} devices, arch={g.arch}, "
                          f"legacy accuracy mean {acc[members].mean():.3f}")


def print_servers(console: Any, cfg: Config, schedule: list[Any]) -> None:
    """The helper-server pool and, when failures are injected, the failure schedule."""
    sv, f = cfg.servers, cfg.failures
    if int(sv.count) > 1 or f.name != FailureKind.none:
        console.print(f"[bold]servers[/bold]: {sv.count} x {sv.arch} (hidden {sv.hidden}), "
                      f"training={sv.training}, routing={sv.resolved_routing}", soft_wrap=True)
    if f.name == FailureKind.none:
        return
    drop = max((r.query_drop for r in schedule), default=0.0)
    console.print(f"[bold]failures[/bold]: {f.name}" + (f", per-query drop q={drop:g}" if drop else "")
                  + f", query timeout {float(f.query_timeout_s):g}s", soft_wrap=True)
    lines = [(r.round, describe(r)) for r in schedule if describe(r)]
    for t, text in lines:
        console.print(f"  round {t:>3}: {text}", soft_wrap=True)
    if not lines and not drop:
        console.print("  (no fault falls within this run's rounds)")


def round_line(record: dict[str, Any], num_rounds: int) -> str:
    """One line per evaluated round; with several servers or failures, who is up and the failovers."""
    line = (f"round {record['round']:>3}/{num_rounds}  system {record['system_accuracy']:.3f}  "
            f"defer {record['defer_rate']:.3f}  server {record['server_accuracy']:.3f}  "
            f"legacy {record['legacy_accuracy']:.3f}")
    avail = record.get("availability") or []
    fo = {k: v for k, v in (record.get("failovers") or {}).items() if v}
    errors = int(record.get("train_errors", 0)) + int(record.get("eval_errors", 0))
    if len(avail) > 1 or not all(avail) or fo or errors:
        line += "  up " + "".join("+" if a else "-" for a in avail)
        if fo:
            line += "  failover " + " ".join(f"{k}={v}" for k, v in sorted(fo.items()))
        if record.get("serve_depth"):
            line += "  depth " + " ".join(f"s{k}={v:g}" for k, v in record["serve_depth"].items())
        if errors:
            line += f"  device errors {errors}"
    return line + f"  [{record['elapsed_s']:.1f}s]"


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def _ratio(v: float | None) -> str:
    """A resilience ratio: ``n/a`` when undefined (no reference run, or a reference no better than
    guessing: :func:`sim.core.metrics.ratio_over_reference`)."""
    return "n/a" if v is None or v != v else f"{v:.3f}"


def print_summary(console: Any, summary: dict[str, Any], run_dir: Path, sim_s: float, total_s: float) -> None:
    """The final metrics with the matched-rate baselines, and the kept/deferred table."""
    cfg = summary["config"]
    t = Table(title=f"{cfg['strategy']['name']} fleet summary ({summary['num_clients']} devices, "
                    f"{summary['num_rounds']} rounds, seed {summary['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        t.add_row(key, f"{summary[key]:.4f}")
    if cfg["strategy"].get("max_defer_rate") is not None:
        t.add_row(f"requested max defer rate ({cfg['strategy']['bound']})", f"{cfg['strategy']['max_defer_rate']:.4f}")
    for name in ("confidence", "confidence_per_device", "confidence_calibrated", "random"):
        if name in summary["baselines"]:
            t.add_row(f"{name} @ same defer rate", f"{summary['baselines'][name]['system_accuracy']:.4f}")
    oracle = summary.get("oracle") or {}
    if oracle.get("at_defer_rate") is not None:
        t.add_row("oracle @ same defer rate (headroom)", f"{oracle['at_defer_rate']:.4f} ({oracle['headroom']:+.4f})")
    if oracle.get("routing") is not None and cfg["servers"]["count"] > 1:
        t.add_row("oracle routing: same deferrals / same rate",
                  f"{oracle['routing']:.4f} / {oracle['routing_at_defer_rate']:.4f}")
    t.add_row("AURC / E-AURC (local risk vs coverage)", f"{_fmt(summary['aurc'])} / {_fmt(summary['e_aurc'])}")
    fair = summary["fairness"]
    t.add_row("device system acc: worst / 10th pct", f"{_fmt(fair['worst'])} / {_fmt(fair['p10'])}")
    console.print(t)
    tb = Table(title="kept / deferred test samples")
    for col in ("samples", "n", "legacy acc", "server acc", "server - legacy"):
        tb.add_column(col, justify="right")
    for name in ("kept", "deferred"):
        r = summary["table"][name]
        tb.add_row(name, str(r["n"]), _fmt(r["legacy_accuracy"]), _fmt(r["server_accuracy"]), _fmt(r["difference"]))
    console.print(tb)
    ops = summary.get("operating_points") or {}
    if ops:
        to = Table(title="at fixed defer rates: this run's ranking vs the baselines'")
        for col in ("defer rate", "ranking", "confidence", "per device", "calibrated", "random"):
            to.add_column(col, justify="right")
        for rate, v in ops.items():
            to.add_row(rate, _fmt(v["method"]), _fmt(v["confidence"]), _fmt(v["confidence_per_device"]),
                       _fmt(v.get("confidence_calibrated")), _fmt(v["random"]))
        console.print(to)
    res, srv = summary.get("resilience"), summary.get("servers")
    failures = cfg["failures"]["name"]
    if res and (failures != "none" or srv["count"] > 1):
        tr = Table(title=f"resilience ({failures}; {srv['count']} servers, training={srv['training']}, "
                         f"routing={srv['routing']})")
        tr.add_column("state")
        tr.add_column("rounds", justify="right")
        tr.add_column("system acc", justify="right")
        tr.add_column("served defer rate", justify="right")
        for k, v in res["accuracy_by_state"].items():
            tr.add_row(k, str(v["rounds"]), _fmt(v["system_accuracy"]), _fmt(v["served_defer_rate"]))
        console.print(tr)
        fo = ", ".join(f"{k} {v}" for k, v in res["failovers"].items())
        console.print(f"accuracy kept in the {res['rounds_degraded']} degraded round(s), vs the all-up reference: "
                      f"{_ratio(res['fraction_kept'])} (min {_ratio(res['fraction_kept_min'])}); same trained servers "
                      f"all up (inference only): {_ratio(res['inference_kept'])} (min {_ratio(res['inference_kept_min'])});"
                      f" final round {_fmt(res['system_accuracy'])} / all up {_fmt(res['all_up_accuracy'])}; "
                      f"failovers: {fo}", soft_wrap=True)
        table = srv.get("table") or {}
        if table.get("standalone"):
            parts = [f"server {k} {v:.3f}" for k, v in table["standalone"].items()]
            parts += [f"ensemble {k} {v:.3f}" for k, v in table.get("ensemble", {}).items()]
            console.print("servers alone (final test samples): " + ", ".join(parts), soft_wrap=True)
        for s, accs in (table.get("exits") or {}).items():
            console.print(f"teammate {s} by depth fraction: " + ", ".join(f"{f} {a:.3f}" for f, a in accs.items()),
                          soft_wrap=True)
    console.print(f"results in {run_dir}  (simulation {sim_s:.1f}s, total {total_s:.1f}s)", soft_wrap=True)
