"""Figures of a run (``sim.pipeline.finish``) and of a report (``python -m sim.report``).

Every figure is drawn in the one style of :mod:`sim.style` and saved twice, as PDF (vector) and
PNG (200 dpi), next to the ``path`` given (its suffix replaced); each function returns the PNG's
path. Axes are scaled to the data (never a fixed 0-1), legends sit outside the data.

Two kinds of accuracy-vs-defer-rate curve appear, and they answer different questions:

- the **score-ranking curve** (:func:`plot_defer_curve`, :func:`plot_report_curves`): one trained
  run's deferral score (L2H's psi_1) sorted, the top-k samples deferred, for every k. It shows how
  well that one score *ranks* samples; away from the run's own operating point it is not what the
  method would do if trained at another cost (the L2H surrogate is calibrated only at its own
  threshold, psi_1 = 0.5).
- the **cost-coverage curve** (:func:`plot_cost_curve`): one point per trained configuration of a
  ``strategy.c_e`` sweep (each point: that configuration's own decisions, mean over seeds). That is
  what the method does when the deferral price changes.

Report figures take already-computed statistics (mean and 95% interval bounds per point; NaN
bounds, e.g. one seed, draw no band): ``sim.report`` does the statistics (and clips the drawn
intervals of rates and accuracies to [0, 1]: a t-interval over few seeds can pass them), this
module only draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from sim.style import (
    DOUBLE,
    SINGLE,
    band,
    band_alpha,
    color,
    figure,
    half_widths,
    legend_outside,
    log2_axis,
    save,
    styled,
)

ACCURACY_LABELS = (("system_accuracy", "system"), ("legacy_accuracy", "legacy only"),
                   ("server_accuracy", "server only"), ("oracle_accuracy", "oracle"))


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


@styled
def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> Path:
    """Per evaluated round: system / legacy / server / oracle accuracy (top) and defer rate (bottom)."""
    ev = [r for r in rounds if r.get("system_accuracy") is not None]
    fig, (ax, ax2) = figure(SINGLE, 3.3, nrows=2, sharex=True, height_ratios=[2, 1])
    x = [r["round"] for r in ev]
    for i, (key, lab) in enumerate(ACCURACY_LABELS):
        ax.plot(x, [_nan(r.get(key)) for r in ev], marker="o", color=color(i), label=lab)
    ax2.plot(x, [_nan(r["defer_rate"]) for r in ev], marker="o", color=color(6), label="defer rate")
    ax.set_ylabel("accuracy")
    ax2.set_ylabel("defer rate")
    ax2.set_xlabel("round")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_outside(fig, ax, "upper center", ncol=2)
    return save(fig, path)


@styled
def plot_defer_curve(metrics: dict[str, Any], path: Path) -> Path:
    """One run's score-ranking curves (module docstring): system accuracy when the top-k samples of
    the learned deferral score, of the legacy max-softmax (confidence) or at random are deferred,
    and the run's own operating point."""
    c = metrics["curves"]
    fig, ax = figure(SINGLE, 2.9)
    ax.plot(c["defer_rate"], c["rejector"], color=color(0), label="learned score (top-k)")
    ax.plot(c["defer_rate"], c["confidence"], color=color(1), label="legacy max-softmax (top-k)")
    ax.plot(c["defer_rate"], c["random"], color=color(8), ls="--", label="random")
    ax.plot([metrics["defer_rate"]], [metrics["system_accuracy"]], ls="none", marker="o", ms=6, color=color(3),
            zorder=5, label="operating point")
    ax.set_xlabel("defer rate")
    ax.set_ylabel("system accuracy")
    legend_outside(fig, ax, "upper center")
    return save(fig, path)


@styled
def plot_devices(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per-device legacy-only vs system accuracy, one colour per fleet group (above the diagonal:
    the device gained from help). Both axes span the data's range, so the diagonal stays at 45°."""
    fig, ax = figure(SINGLE, 3.8)
    groups = sorted({r.get("group", "") for r in rows})
    for i, g in enumerate(groups):
        sel = [r for r in rows if r.get("group", "") == g]
        ax.scatter([r["legacy_accuracy"] for r in sel], [r["system_accuracy"] for r in sel], s=14, color=color(i),
                   label=g or None)
    vals = [float(r[k]) for r in rows for k in ("legacy_accuracy", "system_accuracy")]
    lo, hi = min(vals), max(vals)
    pad = 0.05 * max(hi - lo, 0.02)
    lim = (lo - pad, min(hi + pad, 1.0 + pad))
    ax.plot(lim, lim, color="grey", lw=0.8, label="_no gain")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel("legacy-only accuracy")
    ax.set_ylabel("system accuracy")
    if any(groups):
        legend_outside(fig, ax, "upper center")
    return save(fig, path)


@styled
def plot_timeline(rounds: list[dict[str, Any]], schedule: list[Any], resilience: dict[str, Any], path: Path) -> Path:
    """System accuracy per round with the rounds where servers were down shaded (darker: more
    down), the legacy-only and the all-up reference (final round) accuracy as lines, and crashes
    and recoveries as vertical lines at the start of their round."""
    ev = [r for r in rounds if r.get("system_accuracy") is not None]
    fig, ax = figure(SINGLE, 2.8)
    shaded = False
    for r in ev:
        avail = r.get("availability") or []
        down = len(avail) - sum(avail)
        if down:
            ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color=color(3), lw=0,
                       alpha=0.1 + 0.35 * down / max(len(avail), 1), label="_" if shaded else "servers down")
            shaded = True
    x = [r["round"] for r in ev]
    ax.plot(x, [_nan(r["system_accuracy"]) for r in ev], marker="o", color=color(0), label="system")
    ax.plot(x, [_nan(r["legacy_accuracy"]) for r in ev], ls=":", color=color(8), label="legacy only")
    if resilience.get("all_up_accuracy") is not None:
        ax.axhline(resilience["all_up_accuracy"], color=color(2), ls="--", lw=1, label="all up (reference, final)")
    _mark_events(ax, schedule)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("system accuracy")
    legend_outside(fig, ax, "upper center")
    return save(fig, path)


def _mark_events(ax: Any, schedule: list[Any]) -> None:
    """Crashes (dashed) and recoveries (dotted) as vertical lines where their round starts, one
    legend entry per server and kind (no text over the data)."""
    for f in schedule:
        for verb, servers, ls, col in (("crashes", f.kill, "--", color(3)), ("recovers", f.restart, ":", color(2))):
            for s in servers:
                ax.axvline(f.round - 0.5, color=col, ls=ls, lw=1.1, label=f"server {s} {verb}")


@styled
def plot_states(summary: dict[str, Any], path: Path) -> Path:
    """Dots: system accuracy in each availability state of the run (mean over its rounds), the
    final round with failures vs all up (the same test samples), and each server alone / each
    ensemble on the final test samples. The accuracy axis is scaled to the data (dots, not bars,
    so a range that does not start at 0 misleads no one)."""
    res, table = summary["resilience"], (summary["servers"].get("table") or {})
    items: list[tuple[str, float, int]] = []
    if res.get("all_up_accuracy") is not None and res["failures"] != "none":
        items += [("final, all up (reference)", _nan(res["all_up_accuracy"]), 4),
                  ("final, with failures", _nan(res["system_accuracy"]), 3)]
    items += [(f"rounds {k} (mean)", _nan(v["system_accuracy"]), 0) for k, v in res["accuracy_by_state"].items()]
    items += [(f"server {k} alone", _nan(v), 1) for k, v in (table.get("standalone") or {}).items()]
    items += [(f"ensemble {k}", _nan(v), 2) for k, v in (table.get("ensemble") or {}).items()]
    fig, ax = figure(SINGLE, 0.8 + 0.22 * len(items))
    y = np.arange(len(items))[::-1]
    ax.scatter([v for _, v, _ in items], y, color=[color(c) for _, _, c in items], s=22, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([lab for lab, _, _ in items])
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"accuracy ({summary['servers']['training']} servers)")
    return save(fig, path)


@styled
def plot_report_resilience(groups: list[dict[str, Any]], path: Path) -> Path:
    """MEL's resilience measures per configuration (x): the fraction of the all-up system accuracy
    kept over the rounds with servers down and the inference-only fraction (docs/methods.md §7), each
    a mean over seeds with its 95% CI as error bars, and the line 1 (nothing lost).

    ``groups``: dicts with ``label`` and, per measure, ``fraction_kept`` / ``inference_kept`` =
    ``(mean, lo, hi)`` (NaN where a configuration has no such rounds).
    """
    measures = (("fraction_kept", "system accuracy kept (vs the all-up run)"),
                ("inference_kept", "inference kept (same pool, all up)"))
    fig, ax = figure(SINGLE if len(groups) <= 4 else DOUBLE, 2.8)
    width = 0.6 / len(measures)
    xs = np.arange(len(groups))
    for i, (m, label) in enumerate(measures):
        mean, lo, hi = (np.array([g[m][j] for g in groups], dtype=float) for j in range(3))
        ax.errorbar(xs - 0.3 + width * (i + 0.5), mean, yerr=half_widths(mean, lo, hi), ls="none", marker="o",
                    ms=4, color=color(i), label=label)
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_xticks(xs)
    ax.set_xticklabels([g["label"] for g in groups], rotation=20 if len(groups) > 3 else 0, ha="right"
                       if len(groups) > 3 else "center")
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("fraction kept (95% CI)")
    legend_outside(fig, ax, "upper center", ncol=1)
    return save(fig, path)


# ---- report figures (python -m sim.report) ---------------------------------------------------------
def _wide(labels: list[str]) -> tuple[float, float, str]:
    """Figure width, height and legend place: one column with the legend below for a few short
    labels; two columns with the legend on the right for many; the legend below, one label a line,
    when the labels are too long to sit beside the axes."""
    if max((len(lab) for lab in labels), default=0) > 60:
        return DOUBLE, 3.0 + 0.2 * len(labels), "lower center"
    return (SINGLE, 2.9, "lower center") if len(labels) <= 4 else (DOUBLE, 3.2, "right upper")


@styled
def plot_report_curves(curves: list[dict[str, Any]], path: Path) -> Path:
    """Score-ranking curves of every configuration (module docstring): mean over seeds of the system
    accuracy when the top-k of its deferral score are deferred, with the 95% CI band, and its
    operating point (its own decisions; 95% CI bars on both axes).

    ``curves``: dicts with ``label``, ``x`` (defer rates), ``mean``/``lo``/``hi`` (accuracy, one per
    x) and ``point`` = ``{"defer_rate": (mean, lo, hi), "system_accuracy": (mean, lo, hi)}``.
    """
    width, height, where = _wide([c["label"] for c in curves])
    fig, ax = figure(width, height)
    for i, c in enumerate(curves):
        band(ax, c["x"], c["mean"], c["lo"], c["hi"], alpha=band_alpha(len(curves)), color=color(i), label=c["label"])
        (xm, xl, xh), (ym, yl, yh) = c["point"]["defer_rate"], c["point"]["system_accuracy"]
        ax.errorbar([xm], [ym], xerr=half_widths([xm], [xl], [xh]), yerr=half_widths([ym], [yl], [yh]),
                    marker="o", ms=5, color=color(i), mec="white", mew=0.6, zorder=5)
    ax.set_xlabel("defer rate (top-k of the score deferred)")
    ax.set_ylabel("system accuracy")
    legend_outside(fig, ax, where, ncol=1 if height > 3.2 else None)
    return save(fig, path)


@styled
def plot_report_sweep(series: list[dict[str, Any]], xlabel: str, path: Path, log2: bool = False) -> Path:
    """System accuracy (left) and defer rate (right) against a swept key (mean over seeds with its
    95% CI band), one line per setting of the other varying keys.

    ``series``: dicts with ``label`` and ``points``, each point ``{"x": value of the swept key,
    "system_accuracy": (mean, lo, hi), "defer_rate": (mean, lo, hi)}``. ``log2``: a log2 x axis
    (staleness S = 1, 2, 4, ...).
    """
    fig, axes = figure(DOUBLE, 2.6, ncols=2)
    xs = [p["x"] for s in series for p in s["points"]]
    for ax, metric, ylabel in zip(axes, ("system_accuracy", "defer_rate"), ("system accuracy", "defer rate")):
        for i, s in enumerate(series):
            pts = sorted(s["points"], key=lambda p: p["x"])
            m, lo, hi = (np.array([p[metric][j] for p in pts], dtype=float) for j in range(3))
            band(ax, [p["x"] for p in pts], m, lo, hi, alpha=band_alpha(len(series)), color=color(i), marker="o",
                 label=s["label"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log2:
            log2_axis(ax, xs)
    legend_outside(fig, axes[0], "right upper" if len(series) > 3 else "upper center")
    return save(fig, path)


@styled
def plot_report_bounded(series: list[dict[str, Any]], path: Path) -> Path:
    """Bounded reject rate: achieved test defer rate (mean, 95% CI band) vs the requested bound
    $\\delta$, one line per bound method, with the line achieved = requested.

    ``series``: dicts with ``label`` and ``points`` = ``[{"x": delta, "defer_rate": (mean, lo, hi)}]``.
    """
    fig, ax = figure(SINGLE, 2.9)
    top = max(p["x"] for s in series for p in s["points"])
    ax.plot([0, top], [0, top], color="0.4", ls="--", lw=0.9, label="achieved = requested")
    for i, s in enumerate(series):
        pts = sorted(s["points"], key=lambda p: p["x"])
        m, lo, hi = (np.array([p["defer_rate"][j] for p in pts], dtype=float) for j in range(3))
        band(ax, [p["x"] for p in pts], m, lo, hi, color=color(i), marker="o", label=s["label"])
    ax.set_xlabel(r"requested bound $\delta$")
    ax.set_ylabel("achieved test defer rate")
    legend_outside(fig, ax, "upper center")
    return save(fig, path)


@styled
def plot_cost_curve(series: list[dict[str, Any]], path: Path) -> Path:
    """Cost-coverage curves of a ``strategy.c_e`` sweep (module docstring): one point per trained
    configuration at its own mean defer rate, system accuracy (left) and L01 cost (right), 95% CI
    bars on both axes, points joined in order of $c_e$ and labelled with it.

    ``series``: dicts with ``label`` and ``points`` = ``[{"x": c_e, "defer_rate": (mean, lo, hi),
    "system_accuracy": (...), "l01_cost": (...)}]``.
    """
    fig, axes = figure(DOUBLE, 2.7, ncols=2)
    for ax, metric, ylabel in zip(axes, ("system_accuracy", "l01_cost"), ("system accuracy", "L01 cost")):
        for i, s in enumerate(series):
            pts = sorted(s["points"], key=lambda p: p["x"])
            xm, xl, xh = (np.array([p["defer_rate"][j] for p in pts], dtype=float) for j in range(3))
            ym, yl, yh = (np.array([p[metric][j] for p in pts], dtype=float) for j in range(3))
            ax.errorbar(xm, ym, xerr=half_widths(xm, xl, xh), yerr=half_widths(ym, yl, yh), marker="o", ms=4,
                        color=color(i), label=s["label"])
            for p, x, y in zip(pts, xm, ym):  # series alternate above-right / below-left of their points
                ax.annotate(f"{p['x']:g}", (x, y), xytext=(3, 2) if i % 2 == 0 else (-3, -3),
                            textcoords="offset points", ha="left" if i % 2 == 0 else "right",
                            va="bottom" if i % 2 == 0 else "top", fontsize=8, color=color(i))
        ax.set_xlabel("defer rate (1 $-$ coverage)")
        ax.set_ylabel(ylabel)
    axes[0].set_title("labels: $c_e$ of the trained run", loc="left")
    if len(series) > 1 or series[0]["label"]:
        legend_outside(fig, axes[0], "right upper" if len(series) > 3 else "upper center")
    return save(fig, path)


@styled
def plot_partition(y: np.ndarray, owner: np.ndarray, split: np.ndarray, num_classes: int, path: Path,
                   max_devices: int = 100) -> Path:
    """The label distribution per device (each device's legacy + rejector + test samples), so a
    non-IID partition is visible: stacked bars of class shares for up to ``max_devices`` devices
    (the first ones; a larger fleet says how many are shown), bar height = samples.

    Args:
        y: ``(M,)`` labels. owner: ``(M,)`` device of each sample (-1: none). split: ``(M,)``
            unused here but kept with the others. num_classes: K.
    """
    owner = np.asarray(owner)
    devices = np.unique(owner[owner >= 0])
    shown = devices[:max_devices]
    counts = np.zeros((len(shown), num_classes))
    for i, d in enumerate(shown):
        counts[i] = np.bincount(np.asarray(y)[owner == d], minlength=num_classes)[:num_classes]
    fig, ax = figure(DOUBLE if len(shown) > 20 else SINGLE, 2.6)
    bottom = np.zeros(len(shown))
    cmap = __import__("matplotlib").colormaps["tab10" if num_classes <= 10 else "tab20"]
    for k in range(num_classes):
        ax.bar(np.arange(len(shown)), counts[:, k], bottom=bottom, width=0.9, color=cmap(k % cmap.N),
               label=str(k), linewidth=0)
        bottom += counts[:, k]
    ax.set_xlabel("device" + (f" (first {len(shown)} of {len(devices)})" if len(shown) < len(devices) else ""))
    ax.set_ylabel("samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if num_classes <= 10 else 2,
              frameon=False, handlelength=1.0, columnspacing=0.8)
    return save(fig, path)
