"""L2H vs confidence thresholding at the same defer rate, over seeds and rejector variants.

Runs each variant for each seed (in-process backend: identical results to Flower on Ray, see
tests/test_e2e.py, and faster), then writes a markdown table and a figure of the mean
accuracy-vs-defer-rate curves (rejector score sweep vs legacy max-softmax) to --out.

Usage:
    python benchmarks/study_l2h_vs_confidence.py                       # default variants, seeds 0 1 2
    python benchmarks/study_l2h_vs_confidence.py --seeds 0 1 --variants "" "strategy.weights=repo"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

VARIANTS = [
    "",
    "strategy.rejector.inputs=sample",
    "strategy.rejector.inputs=legacy",
    "strategy.weights=paper",
    "strategy.weights=repo",
    "strategy.c_e=0.3",
    "fleet.num_clients=4",
]


def run(overrides: list[str]) -> dict:
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.run import simulate

    cfg = compose_checked(overrides + ["sim.backend=inprocess", "sim.progress=false", "sim.plots=false"])
    with open(os.devnull, "w") as null:
        return simulate(cfg, Path(tempfile.mkdtemp()), console=Console(file=null))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    results = {v: [run([f"seed={s}"] + v.split()) for s in ns.seeds] for v in ns.variants}
    lines = ["| variant | L2H system acc | defer rate | confidence @ same rate | L2H - confidence (each seed) "
             "| confidence, per-device budget | random @ same rate |", "|---|---:|---:|---:|---|---:|---:|"]
    for v, runs in results.items():
        mean = lambda f: statistics.mean(f(r) for r in runs)  # noqa: E731
        diffs = [r["system_accuracy"] - r["baselines"]["confidence"]["system_accuracy"] for r in runs]
        lines.append(
            f"| {v or '(default)'} | {mean(lambda r: r['system_accuracy']):.3f} | {mean(lambda r: r['defer_rate']):.3f} "
            f"| {mean(lambda r: r['baselines']['confidence']['system_accuracy']):.3f} "
            f"| {statistics.mean(diffs):+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)}) "
            f"| {mean(lambda r: r['baselines']['confidence_per_device']['system_accuracy']):.3f} "
            f"| {mean(lambda r: r['baselines']['random']['system_accuracy']):.3f} |")
    table = "\n".join(lines)
    print(f"seeds {ns.seeds}; digits; 10 rounds\n{table}")
    (ns.out / "l2h_vs_confidence.md").write_text(f"Seeds {ns.seeds}, digits, 10 rounds, "
                                                 f"`python benchmarks/study_l2h_vs_confidence.py`\n\n{table}\n")
    (ns.out / "l2h_vs_confidence.json").write_text(json.dumps(
        {v: [{k: r[k] for k in ("system_accuracy", "defer_rate", "baselines", "curves", "seed")} for r in runs]
         for v, runs in results.items()}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in ("", "fleet.num_clients=4") if v in results] or list(results)[:1]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4), squeeze=False)
    for ax, v in zip(axes[0], shown):
        runs = results[v]
        rates = runs[0]["curves"]["defer_rate"]
        for key, label in (("rejector", "L2H rejector (score sweep)"), ("confidence", "confidence"),
                           ("random", "random")):
            ys = [statistics.mean(r["curves"][key][i] for r in runs) for i in range(len(rates))]
            ax.plot(rates, ys, marker="." if key != "random" else None, ls="--" if key == "random" else "-",
                    label=label)
        ax.scatter([statistics.mean(r["defer_rate"] for r in runs)],
                   [statistics.mean(r["system_accuracy"] for r in runs)], color="red", zorder=5,
                   label="L2H operating point")
        ax.set_title(f"{v or 'default fleet (10 devices)'}: mean of seeds {ns.seeds}", fontsize=9)
        ax.set_xlabel("defer rate")
        ax.set_ylabel("system accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ns.out / "l2h_vs_confidence.png", dpi=110)
    print(f"wrote {ns.out / 'l2h_vs_confidence.md'} and .png")


if __name__ == "__main__":
    main()
