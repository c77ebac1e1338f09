"""Resilience study: two helper servers, one crashes; MEL vs independent vs DML servers.

For each seed and server-training mode, runs the default digits fleet with 2 helper servers
(1) with every server up (the reference) and (2) with server 1 crashed (crash-stop) at each
``--crash-rounds`` round, on the in-process backend (identical results to Flower on Ray, see
tests/test_failures_e2e.py). Reports, per mode, the fraction of the all-up system accuracy kept
(``resilience.fraction_kept``: same seed, same test samples) and MEL's own inference-only ratio
(mean standalone accuracy / ensemble accuracy of the all-up servers, ``servers.table``), then
writes a markdown table, JSON and a grouped bar plot (accuracy per failure state per mode).

Usage:
    python benchmarks/study_mel_failover.py                     # seeds 0 1 2, crash at rounds 10 and 5
    python benchmarks/study_mel_failover.py --seeds 0 --crash-rounds 10
    python benchmarks/study_mel_failover.py --extra servers.hidden=16 --name mel_failover_hidden16 \
        --modes "independent (ensemble)" "MEL (ensemble)" --crash-rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

MODES = {
    "independent (ensemble)": ["servers.training=independent", "servers.routing=all"],
    "MEL (ensemble)": ["servers.training=mel", "servers.routing=all"],
    "DML (ensemble)": ["servers.training=dml", "servers.routing=all"],
    "independent (learned routing)": ["servers.training=independent", "servers.routing=learned"],
}


def run(overrides: list[str]) -> dict:
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.run import simulate

    cfg = compose_checked(overrides + ["servers.count=2", "sim.backend=inprocess", "sim.progress=false",
                                       "sim.plots=false", "failures.reference=false"])
    with open(os.devnull, "w") as null:
        return simulate(cfg, Path(tempfile.mkdtemp()), console=Console(file=null))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--crash-rounds", type=int, nargs="+", default=[10, 5])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run, e.g. servers.hidden=16")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--name", default="mel_failover", help="output file stem")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    for mode in ns.modes:
        over = MODES[mode] + ns.extra
        for seed in ns.seeds:
            ref = run(over + [f"seed={seed}"])
            entry = {"all_up": ref["system_accuracy"], "table": ref["servers"]["table"], "crash": {}}
            for t in ns.crash_rounds:
                s = run(over + [f"seed={seed}", "failures=crash_stop", "failures.servers=[1]", f"failures.round={t}"])
                assert s["test_set_digest"] == ref["test_set_digest"]
                entry["crash"][t] = {"system_accuracy": s["system_accuracy"],
                                     "fraction_kept": s["system_accuracy"] / ref["system_accuracy"],
                                     "served_defer_rate": s["served_defer_rate"],
                                     "survivor": s["servers"]["table"]["standalone"].get("0")}
            raw.setdefault(mode, {})[seed] = entry
            print(f"{mode:32s} seed {seed}: all up {ref['system_accuracy']:.4f}; " + "; ".join(
                f"crash@{t} {c['system_accuracy']:.4f} (kept {c['fraction_kept']:.4f})" for t, c in entry["crash"].items()),
                flush=True)

    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = ["| servers | all-up system acc | " + " | ".join(
        f"crash@{t}: system acc | crash@{t}: fraction kept (each seed)" for t in ns.crash_rounds)
        + " | MEL ratio: mean standalone / ensemble (all up) | ensemble acc (all up) |",
        "|---|---:|" + "---:|---|" * len(ns.crash_rounds) + "---:|---:|"]
    for mode, seeds in raw.items():
        e = list(seeds.values())
        up = ms([x["all_up"] for x in e])
        rows.append({"training": mode, "state": "all up", "mean": up[0], "std": up[1]})
        cells = [f"{up[0]:.4f} ± {up[1]:.4f}"]
        for t in ns.crash_rounds:
            acc = ms([x["crash"][t]["system_accuracy"] for x in e])
            kept = [x["crash"][t]["fraction_kept"] for x in e]
            rows.append({"training": mode, "state": f"server 1 crashed at round {t}", "mean": acc[0], "std": acc[1]})
            cells += [f"{acc[0]:.4f} ± {acc[1]:.4f}",
                      f"{statistics.mean(kept):.4f} ({', '.join(f'{k:.4f}' for k in kept)})"]
        ratio = [x["table"].get("standalone_over_ensemble") for x in e]
        ens = [x["table"]["ensemble"].get("0+1") for x in e]
        cells.append(f"{statistics.mean(ratio):.4f}" if all(r is not None for r in ratio) else "-")
        cells.append(f"{statistics.mean(ens):.4f}" if all(v is not None for v in ens) else "-")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    extra = f" Extra overrides: {' '.join(ns.extra)}." if ns.extra else ""
    (ns.out / f"{ns.name}.md").write_text(
        f"Seeds {ns.seeds}; default digits fleet (10 devices, 10 rounds), 2 helper servers, crash-stop of "
        f"server 1.{extra}\n\n{table}\n")
    (ns.out / f"{ns.name}.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    from sim.plots import plot_mode_comparison

    plot_mode_comparison(rows, ns.out / f"{ns.name}.png")
    print(f"wrote {ns.out / ns.name}.md, .json, .png")


if __name__ == "__main__":
    main()
