"""PNG plots of a run (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> Path:
    """System / legacy / server / oracle accuracy and defer rate per evaluated round."""
    ev = [r for r in rounds if r.get("system_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["round"] for r in ev]
    for key, label in (("system_accuracy", "system (L2H)"), ("legacy_accuracy", "legacy only"),
                       ("server_accuracy", "server only"), ("oracle_accuracy", "oracle")):
        ax.plot(x, [_nan(r[key]) for r in ev], marker="o", label=label)
    ax2 = ax.twinx()
    ax2.plot(x, [_nan(r["defer_rate"]) for r in ev], color="k", ls="--", label="defer rate")
    ax2.set_ylabel("defer rate")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "round", "accuracy", "Fleet metrics per round", path)


def plot_defer_curve(metrics: dict[str, Any], path: Path) -> Path:
    """Accuracy vs defer rate: rejector-score threshold sweep vs confidence and random deferral."""
    c = metrics["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["defer_rate"], c["rejector"], marker=".", label="L2H rejector (score sweep)")
    ax.plot(c["defer_rate"], c["confidence"], marker=".", label="confidence (legacy max-softmax)")
    ax.plot(c["defer_rate"], c["random"], ls="--", label="random")
    ax.scatter([metrics["defer_rate"]], [metrics["system_accuracy"]], color="red", zorder=5,
               label="L2H operating point")
    ax.legend(fontsize=8)
    return _finish(fig, ax, "defer rate", "system accuracy", "Accuracy vs defer rate (final round)", path)


def plot_devices(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per-device legacy-only vs system accuracy (points above the diagonal gained from help)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    groups = sorted({r.get("group", "") for r in rows})
    for g in groups:
        sel = [r for r in rows if r.get("group", "") == g]
        ax.scatter([r["legacy_accuracy"] for r in sel], [r["system_accuracy"] for r in sel], label=g or None, s=18)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    if any(groups):
        ax.legend(fontsize=7)
    return _finish(fig, ax, "legacy-only accuracy", "system accuracy", "Per-device accuracy", path)


def plot_timeline(rounds: list[dict[str, Any]], schedule: list[Any], resilience: dict[str, Any], path: Path) -> Path:
    """System accuracy per round with the failure periods shaded (darker: more servers down), the
    legacy-only and all-servers-up (reference) accuracy as lines, and the failure events marked."""
    ev = [r for r in rounds if r.get("system_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in ev:
        avail = r.get("availability") or []
        down = len(avail) - sum(avail)
        if down:
            ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color="red", alpha=0.12 + 0.5 * down / max(len(avail), 1),
                       lw=0)
    x = [r["round"] for r in ev]
    ax.plot(x, [_nan(r["system_accuracy"]) for r in ev], marker="o", label="system accuracy")
    ax.plot(x, [_nan(r["legacy_accuracy"]) for r in ev], ls=":", color="grey", label="legacy only")
    if resilience.get("all_up_accuracy") is not None:
        ax.axhline(resilience["all_up_accuracy"], color="green", ls="--", lw=1, label="all up (reference, final)")
    for f in schedule:
        for s in f.kill:
            ax.annotate(f"crash {s}", (f.round, ax.get_ylim()[0]), fontsize=7, color="darkred", rotation=90,
                        va="bottom")
        for s in f.restart:
            ax.annotate(f"back {s}", (f.round, ax.get_ylim()[0]), fontsize=7, color="darkgreen", rotation=90,
                        va="bottom")
    ax.legend(fontsize=8, loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"Accuracy under failures ({resilience.get('failures')}; shaded: servers down)"
    return _finish(fig, ax, "round", "accuracy", title, path)


def plot_states(summary: dict[str, Any], path: Path) -> Path:
    """Bars: system accuracy in each availability state of the run, and the servers alone
    (standalone heads and ensembles) on the final test samples."""
    res, table = summary["resilience"], (summary["servers"].get("table") or {})
    labels, values, colors = [], [], []
    if res.get("all_up_accuracy") is not None and res["failures"] != "none":
        # The fair pair: the same test samples after the same number of rounds.
        labels += ["final, all up (reference)", "final, with failures"]
        values += [_nan(res["all_up_accuracy"]), _nan(res["system_accuracy"])]
        colors += ["tab:purple", "tab:red"]
    for k, v in res["accuracy_by_state"].items():
        labels.append(f"rounds {k} (mean)")
        values.append(_nan(v["system_accuracy"]))
        colors.append("tab:blue")
    for k, v in (table.get("standalone") or {}).items():
        labels.append(f"server {k} alone")
        values.append(_nan(v))
        colors.append("tab:orange")
    for k, v in (table.get("ensemble") or {}).items():
        labels.append(f"ensemble {k}")
        values.append(_nan(v))
        colors.append("tab:green")
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    s = summary["servers"]
    return _finish(fig, ax, "", "accuracy", f"Accuracy per failure state ({s['training']} servers)", path)


def plot_mode_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: accuracy per failure state (x) for each server training mode (bars), with the
    spread over seeds as error bars. ``rows``: dicts with ``training``, ``state``, ``mean``, ``std``."""
    import numpy as np

    states = list(dict.fromkeys(r["state"] for r in rows))
    modes = list(dict.fromkeys(r["training"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(states) + 2), 4))
    width = 0.8 / max(len(modes), 1)
    for i, m in enumerate(modes):
        vals = [next((r for r in rows if r["training"] == m and r["state"] == st), None) for st in states]
        ax.bar(np.arange(len(states)) + i * width, [v["mean"] if v else np.nan for v in vals], width,
               yerr=[v["std"] if v else 0 for v in vals], label=m, capsize=3)
    ax.set_xticks(np.arange(len(states)) + width * (len(modes) - 1) / 2)
    ax.set_xticklabels(states, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _finish(fig, ax, "failure state", "system accuracy", "Accuracy per failure state by server training", path)


# ---- report figures (python -m sim.report) ---------------------------------------------------------
def plot_report_curves(groups: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Accuracy vs defer rate: each configuration's curve (top-k of its deferral score, mean over
    seeds) and its operating point (mean defer rate, mean system accuracy, with std error bars)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (g, lab) in enumerate(zip(groups, labels)):
        color = f"C{i % 10}"
        rates, acc = g["_curve"]
        ax.plot(rates, acc, color=color, lw=1.5, label=f"{lab} (n={g['n']})")
        ax.errorbar([g["defer_rate_mean"]], [g["system_accuracy_mean"]], xerr=[g["defer_rate_std"]],
                    yerr=[g["system_accuracy_std"]], color=color, marker="o", ms=7, capsize=3)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.text(0.01, 0.99, "lines: top-k of each method's deferral score\ndots: its own decisions (± std over seeds)",
            transform=ax.transAxes, va="top", fontsize=8)
    return _finish(fig, ax, "defer rate", "system accuracy", "System accuracy vs defer rate", path)


def plot_report_sweep(groups: list[dict[str, Any]], key: str, series_keys: list[str], xlabel: str, path: Path
                      ) -> Path:
    """System accuracy and defer rate vs ``key`` (mean ± std over seeds), one line per setting of
    ``series_keys`` (e.g. per strategy)."""
    series: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        name = ", ".join(f"{g[k]}" if k == "strategy" else f"{k}={g[k]}" for k in series_keys
                         if g[k] is not None) or "runs"
        series.setdefault(name, []).append(g)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, gs) in enumerate(sorted(series.items())):
        gs = sorted(gs, key=lambda g: float(g[key]))
        x = [float(g[key]) for g in gs]
        for a, col in ((ax, "system_accuracy"), (ax2, "defer_rate")):
            a.errorbar(x, [g[f"{col}_mean"] for g in gs], yerr=[g[f"{col}_std"] for g in gs], marker="o",
                       capsize=3, color=f"C{i % 10}", label=name)
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("defer rate")
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, ax, xlabel, "system accuracy", f"System accuracy and defer rate vs {key} (mean ± std)", path)


def plot_report_bounded(groups: list[dict[str, Any]], path: Path) -> Path:
    """Achieved test defer rate vs the requested bound delta, per method, with the line y = x."""
    fig, ax = plt.subplots(figsize=(6, 5))
    bounded = [g for g in groups if g["max_defer_rate"] is not None]
    methods = sorted({str(g["bound"]) for g in bounded})
    for i, m in enumerate(methods):
        gs = sorted((g for g in bounded if str(g["bound"]) == m), key=lambda g: float(g["max_defer_rate"]))
        ax.errorbar([float(g["max_defer_rate"]) for g in gs], [g["defer_rate_mean"] for g in gs],
                    yerr=[g["defer_rate_std"] for g in gs], marker="o", capsize=3, color=f"C{i}", label=m)
    top = max(float(g["max_defer_rate"]) for g in bounded)
    ax.plot([0, top], [0, top], "k--", lw=1, label="achieved = requested")
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, ax, "requested max defer rate delta", "achieved test defer rate",
                   "Bounded reject rate (mean ± std over seeds)", path)
