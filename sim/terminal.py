"""What a run shows on the terminal: the fleet at start, a progress bar and a line per round,
and the summary tables at the end (rich)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from sim.results import SUMMARY_KEYS


def print_fleet(console: Any, cfg: dict[str, Any], prep: Any, fleet: Any) -> None:
    """The fleet's legacy-accuracy spread, overall and per device group."""
    acc = fleet.legacy_accuracy
    console.print(
        f"[bold]fleet[/bold]: {len(acc)} legacy devices on {cfg['data']['name']} ({prep.num_classes} classes, "
        f"{int((np.asarray(prep.owner) >= 0).sum())} samples, partition={cfg['data']['partition']['name']}); "
        f"legacy accuracy min {acc.min():.3f} / median {np.median(acc):.3f} / max {acc.max():.3f} "
        f"({'built' if fleet.built else 'from cache'})", soft_wrap=True)
    for gi, g in enumerate(fleet.group_cfgs):
        members = [d for d, gg in enumerate(fleet.groups) if gg == gi]
        if members:
            console.print(f"  group {g['name']:<16} {len(members):>4} devices, arch={g['arch']}, "
                          f"legacy accuracy mean {acc[members].mean():.3f}")


def round_progress(console: Any, num_rounds: int, enabled: bool) -> tuple[Progress, TaskID]:
    """A progress bar over rounds with elapsed time and an estimate of the time left."""
    progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
                        disable=not enabled)
    return progress, progress.add_task("rounds", total=num_rounds)


def round_line(record: dict[str, Any], num_rounds: int) -> str:
    return (f"round {record['round']:>3}/{num_rounds}  system {record['system_accuracy']:.3f}  "
            f"defer {record['defer_rate']:.3f}  server {record['server_accuracy']:.3f}  "
            f"legacy {record['legacy_accuracy']:.3f}  [{record['elapsed_s']:.1f}s]")


def _fmt(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def print_summary(console: Any, summary: dict[str, Any], run_dir: Path, sim_s: float, total_s: float) -> None:
    """The final metrics with the matched-rate baselines, and the kept/deferred table."""
    t = Table(title=f"L2H fleet summary ({summary['num_clients']} devices, {summary['num_rounds']} rounds, "
                    f"seed {summary['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        t.add_row(key, f"{summary[key]:.4f}")
    for name in ("confidence", "confidence_per_device", "random"):
        t.add_row(f"{name} @ same defer rate", f"{summary['baselines'][name]['system_accuracy']:.4f}")
    console.print(t)
    tb = Table(title="kept / deferred test samples (METHODS.md section 1)")
    for col in ("samples", "n", "legacy acc", "server acc", "server - legacy"):
        tb.add_column(col, justify="right")
    for name in ("kept", "deferred"):
        r = summary["table"][name]
        tb.add_row(name, str(r["n"]), _fmt(r["legacy_accuracy"]), _fmt(r["server_accuracy"]), _fmt(r["difference"]))
    console.print(tb)
    console.print(f"results in {run_dir}  (simulation {sim_s:.1f}s, total {total_s:.1f}s)", soft_wrap=True)
