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
    wrap_label,
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
def plot_timeline(rounds: list[dict[str, Any]], schedule: list[Any], resilience: dict[str, Any], path: Path,
                  reference_rounds: list[dict[str, Any]] | None = None) -> Path:
    """System accuracy per round with the rounds where servers were down shaded (darker: more
    down), the legacy-only accuracy, the all-up reference run's per-round system accuracy (its
    ``reference/metrics.jsonl``: the same seed with every server up; without one, its final accuracy
    as a line, if known), and crashes and recoveries as vertical lines at the start of their round."""
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
    ref = [r for r in (reference_rounds or []) if r.get("system_accuracy") is not None]
    if ref:
        ax.plot([r["round"] for r in ref], [_nan(r["system_accuracy"]) for r in ref], ls="--", marker="s", ms=2.5,
                color=color(2), lw=1, label="all up (reference run)")
    elif resilience.get("all_up_accuracy") is not None:
        ax.axhline(resilience["all_up_accuracy"], color=color(2), ls="--", lw=1, label="all up (reference, final)")
    ax.plot(x, [_nan(r["legacy_accuracy"]) for r in ev], ls=":", color=color(8), label="legacy only")
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


def state_points(rounds: list[dict[str, Any]], reference_rounds: list[dict[str, Any]] | None = None
                 ) -> list[tuple[str, int, float, float]]:
    """Per availability state of the run (in order of first appearance): ``(state, t, accuracy,
    all-up accuracy)`` at ``t``, the *last* evaluated round in that state, where the servers are as
    trained as the run gets them in that state; the all-up value is the reference run's at the same
    round (NaN without one). A mean over a state's rounds would mix in rounds where the servers had
    barely trained (round 1), which no final accuracy can be set beside."""
    from sim.resilience import state_label

    last: dict[str, dict[str, Any]] = {}
    for r in rounds:
        if r.get("system_accuracy") is not None and r.get("availability") is not None:
            last[state_label(list(r["availability"]))] = r
    ref = {int(r["round"]): r for r in (reference_rounds or []) if r.get("system_accuracy") is not None}
    return [(k, int(r["round"]), _nan(r["system_accuracy"]),
             _nan(ref[int(r["round"])]["system_accuracy"]) if int(r["round"]) in ref else float("nan"))
            for k, r in last.items()]


@styled
def plot_states(summary: dict[str, Any], path: Path, rounds: list[dict[str, Any]] | None = None,
                reference_rounds: list[dict[str, Any]] | None = None) -> Path:
    """Dots, one row per availability state of the run: the system accuracy at the last round in
    that state (:func:`state_points`) and, beside it, the all-up reference run's at the same round;
    then each server alone and each ensemble on the final test samples. Without ``rounds`` the final
    round with failures and all up. The accuracy axis is scaled to the data (dots, not bars)."""
    res, table = summary["resilience"], (summary["servers"].get("table") or {})
    rows: list[tuple[str, list[tuple[float, int, str]]]] = []
    fail, up = "with failures", "all up (reference run), same round"
    if rounds:
        for state, t, acc, ref in state_points(rounds, reference_rounds):
            rows.append((f"{state} (last: round {t})", [(acc, 3, fail), (ref, 2, up)]))
    elif res.get("system_accuracy") is not None:
        rows.append(("final round", [(_nan(res["system_accuracy"]), 3, fail),
                                     (_nan(res.get("all_up_accuracy")), 2, up)]))
    rows += [(f"server {k} alone", [(_nan(v), 0, "final test samples, server answers only")])
             for k, v in (table.get("standalone") or {}).items()]
    rows += [(f"ensemble {k}", [(_nan(v), 0, "final test samples, server answers only")])
             for k, v in (table.get("ensemble") or {}).items()]
    fig, ax = figure(SINGLE, 1.2 + 0.22 * len(rows))
    y = np.arange(len(rows))[::-1]
    for yi, (_, dots) in zip(y, rows):
        for v, c, lab in dots:
            if v == v:  # the reference hollow, so an equal value with failures shows through
                ax.scatter([v], [yi], s=30 if c == 2 else 20, zorder=3 if c == 2 else 4, label=lab, marker="D"
                           if c == 2 else "o", **({"facecolors": "none", "edgecolors": color(c), "linewidths": 1.1}
                                                  if c == 2 else {"color": color(c)}))
    ax.set_yticks(y)
    ax.set_yticklabels([lab for lab, _ in rows])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"accuracy ({summary['servers']['training']} servers)")
    legend_outside(fig, ax, "upper center", ncol=1)
    return save(fig, path)


@styled
def plot_report_resilience(groups: list[dict[str, Any]], path: Path) -> Path:
    """MEL's resilience measures per configuration (one row each, its label beside it, never rotated):
    the fraction of the all-up system accuracy kept over the rounds with servers down and the
    inference-only fraction (docs/methods.md §7), each a mean over seeds with its 95% CI as error
    bars, and the line 1 (nothing lost).

    ``groups``: dicts with ``label`` and, per measure, ``fraction_kept`` / ``inference_kept`` =
    ``(mean, lo, hi)`` (NaN where a configuration has no such rounds).
    """
    measures = (("fraction_kept", "system accuracy kept (vs the all-up run)"),
                ("inference_kept", "inference kept (same pool, all up)"))
    extra = sum(wrap_label(g["label"]).count("\n") for g in groups)  # wrapped labels' further lines
    fig, ax = figure(SINGLE, 1.3 + 0.32 * len(groups) + 0.12 * extra)
    ys = np.arange(len(groups))[::-1].astype(float)
    for i, (m, label) in enumerate(measures):
        mean, lo, hi = (np.array([g[m][j] for g in groups], dtype=float) for j in range(3))
        ax.errorbar(mean, ys + (0.12 if i == 0 else -0.12), xerr=half_widths(mean, lo, hi), ls="none", marker="o",
                    ms=4, color=color(i), label=label)
    ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_yticks(ys)
    ax.set_yticklabels([wrap_label(g["label"]) for g in groups])
    ax.set_ylim(ys.min() - 0.6, ys.max() + 0.6)
    ax.grid(axis="y", visible=False)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.set_xlabel("fraction kept (95% CI)")
    legend_outside(fig, ax, "upper center", ncol=1)
    return save(fig, path)


@styled
def plot_report_differences(rows: list[dict[str, Any]], panels: list[tuple[str, str]], path: Path,
                            title: str | None = None) -> Path:
    """Differences per configuration (one row each, its label beside it): for each panel's metric the
    mean difference with its 95% CI as error bars, and the line 0 (no difference). Used for paired
    differences (against ``--baseline``, seed by seed) and within-run ones (vs confidence at the same
    defer rate), where the configurations' own bands overlap and show nothing.

    ``rows``: dicts with ``label`` and, per panel metric, ``(mean, lo, hi)``; ``panels``: ``(metric,
    x label)`` pairs, one axis each, side by side.
    """
    extra = sum(wrap_label(r["label"]).count("\n") for r in rows)  # wrapped labels' further lines
    fig, axes = figure(SINGLE if len(panels) == 1 else DOUBLE, 1.2 + 0.26 * len(rows) + 0.12 * extra, ncols=len(panels),
                       sharey=True, squeeze=False)
    ys = np.arange(len(rows))[::-1].astype(float)
    for k, (ax, (metric, xlabel)) in enumerate(zip(axes[0], panels)):
        mean, lo, hi = (np.array([r[metric][j] for r in rows], dtype=float) for j in range(3))
        ax.axvline(0.0, color="0.4", lw=0.8, ls=":")
        ax.errorbar(mean, ys, xerr=half_widths(mean, lo, hi), ls="none", marker="o", ms=4, color=color(k))
        ax.set_xlabel(xlabel)
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([wrap_label(r["label"]) for r in rows])
    axes[0][0].set_ylim(ys.min() - 0.6, ys.max() + 0.6)
    if title:
        fig.suptitle(title, fontsize=8, x=0.02, ha="left")
    return save(fig, path)


@styled
def plot_report_curve_differences(curves: list[dict[str, Any]], baseline: str, path: Path) -> Path:
    """One small panel per configuration: its score-ranking curve minus the baseline's on the same
    seed, at every defer rate (mean, 95% CI band), and the line 0; panels share both axes, titled
    with the configuration's label (no legend to clip).

    ``curves``: dicts with ``label``, ``x`` (defer rates) and ``mean``/``lo``/``hi`` (differences).
    """
    n = max(len(curves), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = figure(SINGLE if cols <= 2 else DOUBLE, 0.5 + 1.55 * rows, nrows=rows, ncols=cols, sharex=True,
                       sharey=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(curves):
            ax.set_visible(False)
            continue
        c = curves[i]
        ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
        band(ax, c["x"], c["mean"], c["lo"], c["hi"], color=color(i))
        ax.set_title(c["label"], fontsize=7, loc="left", wrap=True)
        if i % cols == 0:
            ax.set_ylabel("accuracy $-$ baseline")
        if i >= len(curves) - cols:
            ax.set_xlabel("defer rate")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(f"score-ranking curve minus the baseline's, same seed (baseline: {baseline})", fontsize=8,
                 x=0.02, ha="left")
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
def plot_report_sweep(series: list[dict[str, Any]], xlabel: str, path: Path, log2: bool = False,
                      paired: bool = False) -> Path:
    """System accuracy (left) and defer rate (right) against a swept key (mean over seeds with its
    95% CI band), one line per setting of the other varying keys.

    ``series``: dicts with ``label`` and ``points``, each point ``{"x": value of the swept key,
    "system_accuracy": (mean, lo, hi), "defer_rate": (mean, lo, hi)}``. ``log2``: a log2 x axis
    (staleness S = 1, 2, 4, ...). ``paired``: the points are paired differences against each
    series' ``reference`` value (:func:`sim.report.paired_sweep_series`): the axes say so and the
    line 0 is drawn.
    """
    fig, axes = figure(DOUBLE, 2.6, ncols=2)
    xs = [p["x"] for s in series for p in s["points"]]
    ref = f" at {xlabel.split(' (')[0]} = {series[0]['reference']:g}" if paired and series else ""
    names = (("system accuracy", "defer rate") if not paired else
             (f"system accuracy $-$ same seed's\n{ref.strip()}", f"defer rate $-$ same seed's\n{ref.strip()}"))
    for ax, metric, ylabel in zip(axes, ("system_accuracy", "defer_rate"), names):
        if paired:
            ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
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
            for p, x, y in zip(pts, xm, ym):  # series alternate above-left / below-right of their points,
                # clear of the marker and its error bars, on a white box where they cross a line
                ax.annotate(f"{p['x']:g}", (x, y), xytext=(-6, 6) if i % 2 == 0 else (6, -6),
                            textcoords="offset points", ha="right" if i % 2 == 0 else "left",
                            va="bottom" if i % 2 == 0 else "top", fontsize=7, color=color(i), zorder=6,
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
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
