"""One figure style for every plot of the simulator (``sim.plots``): sizes, fonts, saving, bands.

Figures are made for a two-column paper: :data:`SINGLE` (3.4 in) wide for one column,
:data:`DOUBLE` (7.0 in) for both; fonts 8-9 pt at that size (so they print at 8-9 pt when the
figure is placed at 100%), math labels through matplotlib's mathtext (``$c_e$``, ``$\\delta$``,
``$S$``; no LaTeX installation needed), a colour-blind-safe palette (Okabe & Ito 2008), legends
outside the data (constrained layout keeps the figure's width exact), y axes left to the data
(never a fixed 0-1), and every figure saved twice by :func:`save`: PDF (vector, fonts embedded
as TrueType) and PNG at :data:`DPI`.

Use::

    @styled
    def plot_x(..., path):
        fig, ax = figure()
        band(ax, x, mean, lo, hi, color=color(0), label="...")
        legend_outside(fig)
        return save(fig, path)
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SINGLE = 3.4
"""Width (inches) of a one-column figure."""
DOUBLE = 7.0
"""Width (inches) of a two-column figure."""
DPI = 200
"""Resolution of the PNG copy."""

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442", "#999999")
"""Okabe-Ito colours (colour-blind safe); yellow and grey last (weak on white)."""

RC: dict[str, Any] = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "legend.title_fontsize": 8, "legend.frameon": False, "legend.handlelength": 1.6,
    "lines.linewidth": 1.3, "lines.markersize": 3.5, "errorbar.capsize": 2,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False, "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5, "ytick.major.size": 2.5,
    "mathtext.fontset": "dejavusans", "pdf.fonttype": 42, "ps.fonttype": 42,
    "figure.constrained_layout.use": True, "savefig.dpi": DPI,
}
"""The rcParams every figure is drawn under (see :func:`styled`)."""

STRATEGY_NAMES = {"l2h": "L2H", "l2d": "L2D", "legacy_only": "legacy only", "server_only": "server only",
                  "compare_confidence": "CompareConfidence", "dml": "L2H + DML", "mel": "L2H + MEL",
                  "coop": "L2H + coop"}
"""Human names of the strategies (others are shown as they are)."""

KEY_LABELS = {
    "strategy.name": "", "strategy.c_e": "$c_e$", "strategy.c_1": "$c_1$", "strategy.staleness": "$S$",
    "strategy.max_defer_rate": r"$\delta$", "strategy.bound": "bound", "strategy.weights": "weights",
    "strategy.surrogate": "surrogate", "strategy.rejector.inputs": "rejector inputs", "data.name": "data",
    "data.partition.name": "partition", "data.partition.alpha": r"$\alpha$", "fleet.name": "fleet",
    "fleet.num_clients": "devices", "num_clients": "devices", "sim.num_rounds": "rounds", "num_rounds": "rounds",
    "servers.count": "servers", "servers.routing": "routing", "servers.training": "server training",
    "failures.name": "failures", "failures.round": "failure round", "failures.servers": "failed servers",
    "servers.coop.serve_depth": "serve depth", "servers.coop.capacity": "capacity", "strategy.tau": r"$\tau$",
    "strategy.defer_rate": "defer rate", "servers.c_e": "server $c_e$", "servers.widths": "server widths",
    "servers.known_classes": "known classes",
}
"""Human (math) labels of config keys for legends and axes; ``""``: show the value alone."""


def styled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run a plotting function under :data:`RC` (nothing leaks into other figures)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(RC):
            return fn(*args, **kwargs)
    return wrapper


def figure(width: float = SINGLE, height: float | None = None, nrows: int = 1, ncols: int = 1,
           **kw: Any) -> tuple[Any, Any]:
    """A new figure ``width`` x ``height`` inches (height default: 0.72 x width per row, capped)."""
    if height is None:
        height = min(0.72 * width / ncols, 2.6) * nrows + 0.3
    return plt.subplots(nrows, ncols, figsize=(width, height), **kw)


def color(i: int) -> str:
    """The ``i``-th colour of :data:`PALETTE` (cycled)."""
    return PALETTE[i % len(PALETTE)]


def save(fig: Any, path: Path) -> Path:
    """Save ``fig`` as ``path`` with suffix ``.pdf`` (vector) and ``.png`` (:data:`DPI`), close it.
    Each file is written whole or not at all (:func:`sim.core.cache.atomic_write_bytes`).

    Returns:
        The PNG's path (``path`` with suffix ``.png``).

    Raises:
        OutOfSpace: the disk is full; OSError: the file cannot be written.
    """
    import io

    from sim.core.cache import atomic_write_bytes

    path = Path(path)
    png, pdf = path.with_suffix(".png"), path.with_suffix(".pdf")
    try:
        fit(fig)
        for out, kwargs in ((pdf, {}), (png, {"dpi": DPI})):  # rendered in memory, written atomically
            buf = io.BytesIO()
            fig.savefig(buf, format=out.suffix[1:], **kwargs)
            atomic_write_bytes(out, buf.getvalue(), what="a figure")
    finally:
        plt.close(fig)
    return png


MIN_AXES_IN = (1.5, 1.2)
"""Smallest width and height (inches) of the tallest / widest axes that :func:`fit` keeps."""
PAD_IN = 0.04
"""Margin (inches) :func:`fit` keeps between a legend and the figure's edge."""


def _extent_in(artist: Any, fig: Any) -> Any:
    return artist.get_window_extent(fig.canvas.get_renderer()).transformed(fig.dpi_scale_trans.inverted())


def fit(fig: Any) -> None:
    """Size ``fig`` from its legends and labels, before saving: an outside legend
    (:func:`legend_outside`) that would be wider than the figure is first set in one column, then
    the figure is widened to hold it; a label that still sticks out (an axis label wider than its
    axes, long tick labels) widens or heightens the figure by as much; when legends and labels leave
    the axes less than :data:`MIN_AXES_IN` (tallest axes' height, widest axes' width), the figure
    grows by the difference. So 2-4 configurations with 40-60 character labels never clip at the
    3.4-inch width (tests/test_figures.py checks that everything drawn lies inside the figure)."""
    legends = list(fig.legends)
    if not fig.axes:
        return
    fig.canvas.draw()  # one draw when everything fits (the common case), more only after a change
    changed = False
    for leg in legends:
        if _extent_in(leg, fig).width > fig.get_figwidth() - 2 * PAD_IN and leg._ncols > 1:
            leg.set_ncols(1)
            changed = True
    for _ in range(3):  # constrained layout places again after each change of size
        if changed:
            fig.canvas.draw()
        changed = True
        width, height = fig.get_size_inches()
        need_w = max([_extent_in(leg, fig).width + 2 * PAD_IN for leg in legends] + [width])
        boxes = [_extent_in(ax, fig) for ax in fig.axes if ax.get_visible()]
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, everything drawn
        need_w = max(need_w, width + max(0.0, -drawn.x0) + max(0.0, drawn.x1 - width) + (
            PAD_IN if drawn.x0 < 0 or drawn.x1 > width else 0.0))
        need_w += max(0.0, MIN_AXES_IN[0] - max(b.width for b in boxes))
        need_h = height + max(0.0, -drawn.y0) + max(0.0, drawn.y1 - height) + (
            PAD_IN if drawn.y0 < 0 or drawn.y1 > height else 0.0)
        need_h += max(0.0, MIN_AXES_IN[1] - max(b.height for b in boxes))
        if need_w <= width + 1e-3 and need_h <= height + 1e-3:
            return
        fig.set_size_inches(max(width, need_w), max(height, need_h))


def outputs(path: Path) -> list[Path]:
    """The two files :func:`save` writes for ``path``: ``[.pdf, .png]``."""
    return [Path(path).with_suffix(".pdf"), Path(path).with_suffix(".png")]


def band(ax: Any, x: Sequence[float], mean: Sequence[float], lo: Sequence[float] | None = None,
         hi: Sequence[float] | None = None, alpha: float = 0.2, **line: Any) -> Any:
    """A mean line with a shaded band ``[lo, hi]`` (e.g. the 95% CI over seeds) where it is finite.

    With ``lo``/``hi`` None or all NaN (one seed) only the line is drawn; ``alpha``: the band's
    opacity (:func:`band_alpha` for many overlapping bands). Returns the line.
    """
    (ln,) = ax.plot(x, mean, **line)
    if lo is not None and hi is not None:
        lo_a, hi_a = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        ok = np.isfinite(lo_a) & np.isfinite(hi_a)
        if ok.any():
            ax.fill_between(np.asarray(x, dtype=float), lo_a, hi_a, where=ok, color=ln.get_color(), alpha=alpha,
                            lw=0, interpolate=True)
    return ln


def band_alpha(n_bands: int) -> float:
    """Band opacity that keeps ``n_bands`` overlapping bands readable (0.2 for up to 3, then less)."""
    return 0.2 if n_bands <= 3 else max(0.07, 0.2 * (3 / n_bands) ** 0.7)


def half_widths(mean: Sequence[float], lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """``[[mean - lo], [hi - mean]]`` for ``errorbar``'s ``xerr``/``yerr``; NaN (no interval) -> 0."""
    m, lo_a, hi_a = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
    return np.nan_to_num(np.vstack([m - lo_a, hi_a - m]), nan=0.0)


LABEL_WIDTH = 46
"""Characters of a legend or tick label line before :func:`wrap_label` breaks it."""


def wrap_label(text: str, width: int = LABEL_WIDTH) -> str:
    """A long configuration label on several lines, broken after its commas (``weights = shifted,
    rejector inputs = sample, ...``) so a one-column figure need not grow to its length; a text that
    already holds a line break, or one part longer than ``width``, is left as it is."""
    if len(text) <= width or "\n" in text:
        return text
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return "\n".join(lines)


def legend_outside(fig: Any, ax: Any | None = None, where: str = "lower center", ncol: int | None = None,
                   **kw: Any) -> Any:
    """The legend of ``ax`` (default: every axis of ``fig``) outside the axes, at ``where``
    (a constrained-layout ``outside`` location: ``lower center``, ``upper center``, ``right upper``).
    Duplicate labels are shown once, long ones on several lines (:func:`wrap_label`); nothing is
    drawn when there are no labels."""
    handles, labels = [], []
    for a in ([ax] if ax is not None else fig.axes):
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if not handles:
        return None
    if ncol is None:
        ncol = 1 if where.startswith(("right", "left")) else min(len(labels), 2 if fig.get_figwidth() < 5 else 4)
    return fig.legend(handles, [wrap_label(lab) for lab in labels], loc=f"outside {where}", ncol=ncol, **kw)


def log2_axis(ax: Any, values: Sequence[float], axis: str = "x") -> None:
    """A log2 axis with a tick at each of ``values`` (e.g. staleness S = 1, 2, 4, 8) labelled plainly."""
    from matplotlib.ticker import FixedLocator, NullLocator, StrMethodFormatter

    ticks = sorted({float(v) for v in values if v is not None and float(v) > 0})
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(StrMethodFormatter("{x:g}"))
    a.set_minor_locator(NullLocator())


def key_label(key: str) -> str:
    """A config key's human label: :data:`KEY_LABELS`, else its last dotted part for a two-part key
    (``strategy.explore`` -> ``explore``) and its last two parts for deeper ones
    (``strategy.rejector.lr`` -> ``rejector lr``, ``fleet.groups.0.arch`` -> ``groups 0 arch``)."""
    if key in KEY_LABELS:
        return KEY_LABELS[key]
    parts = key.split(".")
    tail = parts[-3:] if len(parts) > 3 and parts[-2].isdigit() else parts[-2:] if len(parts) > 2 else parts[-1:]
    return " ".join(tail).replace("_", " ")


def value_text(key: str, value: Any) -> str:
    """A value as shown in legends: strategy names humanised, floats short (``0.1``), None as 'none'."""
    if value is None:
        return "none"
    if key == "strategy.name":
        return STRATEGY_NAMES.get(str(value), str(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_label(values: dict[str, Any]) -> str:
    """A configuration's legend label from its varying keys' values, e.g. ``L2H, $c_e$ = 0.1``."""
    parts = []
    for k, v in values.items():
        lab = key_label(k)
        parts.append(value_text(k, v) if not lab else f"{lab} = {value_text(k, v)}")
    return ", ".join(parts) or "all runs"
