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
