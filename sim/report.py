"""``python -m sim.report``: aggregate runs into tables with confidence intervals, and figures.

Examples:
    python -m sim.report multirun/2026-11-21/10-00-00               # a sweep (-m): every job in it
    python -m sim.report outputs/A outputs/B multirun/C --out report/
    python -m sim.report multirun/X --baseline strategy.name=confidence

**Runs and configurations.** Every ``summary.json`` under the given directories is one run (an
all-up ``reference/`` run of a failure experiment is skipped). A run's configuration is the
``config`` section of its summary.json (the whole config without ``seed`` and without the
``sim.*`` keys that cannot change results; ``sim.results.build_summary``); for older runs, the
``.hydra/config.yaml`` next to it, stripped the same way. Runs whose configurations are identical
form one group (they differ only in seed); the tables show, as columns, exactly the flattened
config keys (``strategy.weights``, ``data.name``, ...) whose values differ between groups. When
some run has neither (a summary from before ``config`` existed, outside a Hydra run directory),
every run is grouped by the fixed list :data:`GROUP_KEYS` instead, with a warning: runs that
differ in any other key are then merged.

**Statistics.** Per group and metric: the mean over seeds, the sample standard deviation s
(ddof = 1) and the 95% confidence interval of the mean, a Student t-interval
``mean ± t_{0.975, n-1} · s / sqrt(n)`` (n seeds; n = 1: no interval). ``vs confidence @ same
rate`` is, per run, system accuracy minus that of confidence thresholding at the run's own defer
rate on the same test samples (summary.json ``baselines.confidence``): a within-run paired
difference. ``--baseline KEY=VALUE[,KEY=VALUE]`` picks one group by its varying keys' values and
adds, for every other group, the paired differences (group - baseline) on the seeds both have,
with their t-interval (a seed run twice in one group counts once, as its mean).

**Curves.** ``accuracy_vs_defer_rate``: each group's score-ranking curve (the top-k of its
deferral score deferred: how well one trained score ranks samples; away from the operating point it
is *not* what the method would do at another cost) with its operating point. ``cost_coverage``
(when the runs vary ``strategy.c_e``): one point per trained configuration of the c_e sweep at its
own defer rate -- what the method does when the price changes (see :mod:`sim.plots`).

Written into ``--out`` (default: the first directory given):

- ``report.csv``: one row per run: run directory, seed, group, the varying config keys, every metric,
  and (from the run's ``provenance.json``) the CPU, torch's CPU capability and the code's commit.
- ``report.md``: the grouped tables (mean ± CI (s)); the paired table with ``--baseline``.
- ``report.json``: the same numbers for scripts.
- ``rounds.csv`` and ``rounds.parquet``: every run's per-round metrics in one long (tidy) table, one
  row per run, round and metric (:mod:`sim.tidy`): ``pandas.read_parquet("rounds.parquet")``.
- figures, each as ``.pdf`` and ``.png``: ``accuracy_vs_defer_rate``; ``vs_confidence`` (each
  configuration's within-run paired difference against confidence at the same defer rate); with
  ``--baseline``, ``paired_differences`` (system accuracy and defer rate minus the baseline's, seed
  by seed) and ``accuracy_vs_defer_rate_paired`` (each score-ranking curve minus the baseline's, seed
  by seed, one panel per configuration); when the runs vary in them, ``cost_coverage`` and
  ``accuracy_vs_c_e`` (c_e), ``accuracy_vs_staleness`` and ``accuracy_vs_staleness_paired`` (S, log2
  axis; the paired one: each S minus S = 1 on the same seed), ``achieved_vs_requested_defer_rate``
  (``strategy.max_defer_rate``); for runs with failures, ``resilience_kept`` (fraction kept and
  inference kept per configuration). Legends name configurations by the keys in which they differ
  (:mod:`sim.naming`), or as ``--label`` / ``--labels`` say.

A missing directory, a directory without runs, a bad ``--baseline`` or an ``--out`` that cannot be
written is a one-line error (exit 2); a run whose summary.json cannot be read, or holds NaN or an
infinite number (which the simulator never writes), is skipped with a one-line warning. Nothing in
the run directories is modified.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sim.core.cache import atomic_write_text
from sim.core.storage import OutOfSpace
from sim.tidy import write_rounds

GROUP_KEYS = ("strategy.name", "strategy.c_e", "strategy.c_1", "strategy.staleness", "strategy.max_defer_rate",
              "strategy.bound", "servers.count", "servers.coop.serve_depth", "servers.coop.capacity", "failures.name",
              "num_clients", "num_rounds")
"""The fallback identity of a configuration for runs without a recorded config (:func:`fallback_identity`):
config keys, and summary.json's ``num_clients`` and ``num_rounds``."""

METRICS = (("system_accuracy", "system acc"), ("defer_rate", "defer rate"), ("l01_cost", "L01 cost"),
           ("vs_confidence", "vs confidence @ same rate"),
           ("vs_confidence_per_device", "vs per-device conf. @ same rate"),
           ("vs_confidence_calibrated", "vs calibrated conf. @ same rate"), ("legacy_accuracy", "local acc"),
           ("server_accuracy", "server acc"), ("aurc", "AURC"), ("e_aurc", "E-AURC"),
           ("worst_device_accuracy", "worst device"), ("p10_device_accuracy", "10th pct device"),
           ("fraction_kept", "fraction kept"), ("fraction_kept_min", "fraction kept, worst round"),
           ("inference_kept", "inference kept"), ("coverage", "coverage"))
"""Metric columns (name, table header) aggregated over seeds; ``acc@r`` columns are added per fixed defer
rate, and ``vs_<baseline>@r`` columns per operating point (:data:`OPERATING`)."""

OPERATING = (("confidence_per_device", "per device"), ("confidence_calibrated", "calibrated"),
             ("confidence", "global"))
"""The confidence baselines compared at each fixed defer rate of ``operating_points`` (summary.json):
``vs_<name>@<rate>`` = the run's score ranking minus that baseline at the same rate."""

MAIN = ("system_accuracy", "defer_rate", "l01_cost", "vs_confidence", "vs_confidence_per_device",
        "vs_confidence_calibrated")
"""The metrics of the first table (and of the paired table)."""

MORE = ("legacy_accuracy", "server_accuracy", "aurc", "e_aurc", "worst_device_accuracy", "p10_device_accuracy")
"""The metrics of the second table (:data:`RESILIENCE` joins it for runs with failures)."""

RESILIENCE = ("fraction_kept", "fraction_kept_min", "inference_kept")
"""MEL's resilience measures (docs/methods.md §7): over the rounds with servers down, the system accuracy
kept against the all-up reference run (mean, worst round), and the same trained pool answering with the
failure state against all up (inference only, the number comparable to MEL's 95.6%)."""

LEVEL = 0.95
"""Confidence level of every interval."""

INTERVAL_TEXT = ("mean ± half-width of the 95% confidence interval over seeds (Student t-interval: "
                 "t(0.975, n-1) · s / √n), and in parentheses the sample standard deviation s (ddof = 1); "
                 "n = 1: the mean alone, 'no CI'")


class ReportError(ValueError):
    """Bad report input; the message is one line."""


# ---- reading runs ------------------------------------------------------------------------------------
def find_runs(dirs: list[Path]) -> list[Path]:
    """Run directories (holding summary.json) under ``dirs``, sorted; ``reference/`` runs skipped.

    Raises:
        ReportError: a directory does not exist, or none holds a run.
    """
    runs: set[Path] = set()
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory: give run directories (outputs/...) or sweeps (multirun/...)")
        for p in d.rglob("summary.json"):
            if p.parent.name != "reference":
                runs.add(p.parent)
    if not runs:
        raise ReportError(f"no summary.json under {', '.join(map(str, dirs))}: nothing to report "
                          "(a run writes summary.json when it finishes)")
    return sorted(runs)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted.key: value}``: dicts recursed, lists of dicts recursed by index
    (``fleet.groups.0.arch``), other lists kept as values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: value}


def hydra_config(path: Path) -> tuple[dict[str, Any], bool]:
    """A run's ``.hydra/config.yaml`` as :func:`sim.results.build_summary` records it: typed through
    today's schema, ``servers.routing`` resolved, without ``seed`` and the result-free ``sim.*``
    keys (:func:`sim.checkpoint.comparable`). A file the schema no longer reads (an option renamed
    since the run) is kept as composed, with the same keys removed but nothing resolved.

    Returns:
        ``(config, typed)``; ``typed`` is False for the as-composed fallback.

    Raises:
        OSError / ValueError: the file cannot be read or parsed (the caller falls back).
    """
    from omegaconf import OmegaConf

    from sim.checkpoint import RESUME_FREE, comparable
    from sim.core.config import Config, from_plain

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a mapping")
    try:
        return {k: v for k, v in comparable(from_plain(Config, raw)).items() if k != "seed"}, True
    except Exception:  # noqa: BLE001 -- any schema mismatch: the same stripping on the composed values
        raw.pop("seed", None)
        for k in RESUME_FREE:
            (raw.get("sim") or {}).pop(k, None)
        return raw, False


def metrics_of(s: dict[str, Any]) -> dict[str, Any]:
    """A summary's metrics as one flat dict (:data:`METRICS`, ``acc@r``, ``num_test_samples``).

    Raises:
        KeyError / TypeError: a required field is missing.
    """
    row = {k: s[k] for k in ("system_accuracy", "defer_rate", "coverage", "l01_cost", "legacy_accuracy",
                             "server_accuracy")}
    for name in ("confidence", "confidence_per_device", "confidence_calibrated"):
        base = ((s.get("baselines") or {}).get(name) or {}).get("system_accuracy")
        row[f"vs_{name}"] = None if base is None or s["system_accuracy"] is None else s["system_accuracy"] - base
    for rate, point in (s.get("operating_points") or {}).items():
        for name, _ in OPERATING:
            a, b = point.get("method"), point.get(name)
            row[f"vs_{name}@{rate}"] = None if a is None or b is None else a - b
    row.update({
                "aurc": s.get("aurc"), "e_aurc": s.get("e_aurc"),
                "worst_device_accuracy": (s.get("fairness") or {}).get("worst"),
                "p10_device_accuracy": (s.get("fairness") or {}).get("p10"),
                **{k: (s.get("resilience") or {}).get(k) for k in RESILIENCE},
                "num_test_samples": s["num_test_samples"]})
    for r, a in (s.get("accuracy_at_defer_rate") or {}).items():
        row[f"acc@{r}"] = a
    return row


def finite_json(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and numbers beyond float range (``1e999``):
    Python's json reads them, the simulator never writes them (``null`` stands for "undefined"), so a
    summary that holds one was written by something else and its means would be NaN or infinite.

    Raises:
        ValueError: a non-finite number (naming it), or the text is not JSON.
    """
    def refuse(token: str) -> float:
        raise ValueError(f"it holds the non-finite number {token} (the simulator writes null for an undefined value)")

    def number(token: str) -> float:
        value = float(token)
        return value if math.isfinite(value) else refuse(token)

    return json.loads(text, parse_constant=refuse, parse_float=number)


def read_run(run: Path) -> dict[str, Any]:
    """One run: ``run``, ``seed``, ``metrics``, ``curve`` (defer rates, accuracies), ``legacy``
    (its :data:`GROUP_KEYS` values) and ``config`` (flattened; None when not recorded) with ``source``.

    Raises:
        ReportError: the summary cannot be read or lacks a field (one line).
    """
    from sim.results import upgrade_summary

    try:
        s = upgrade_summary(finite_json((run / "summary.json").read_text()))
        out = {"run": str(run), "seed": s["seed"], "metrics": metrics_of(s),
               "curve": (s["curves"]["defer_rate"], s["curves"]["rejector"]), "legacy": fallback_identity(s)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{run / 'summary.json'} is unreadable ({type(exc).__name__}: {exc}); skipped") from None
    out["machine"] = machine_of(run)
    out["config"], out["source"] = None, None
    if isinstance(s.get("config"), dict):
        out["config"], out["source"] = flatten(s["config"]), "summary.json"
    elif (run / ".hydra" / "config.yaml").is_file():
        try:
            config, typed = hydra_config(run / ".hydra" / "config.yaml")
            out["config"] = flatten(config)
            out["source"] = ".hydra/config.yaml" if typed else ".hydra/config.yaml (as composed)"
        except Exception:  # noqa: BLE001, S110 -- unreadable: the run counts as recording no config
            pass
    return out


def fallback_identity(s: dict[str, Any]) -> dict[str, Any]:
    """A run's :data:`GROUP_KEYS` values, from its upgraded summary (:func:`sim.results.upgrade_summary`):
    its flattened ``config``, or for a summary without one the values kept under the same names. As
    summary.json stated them before ``config`` existed: no ``strategy.bound`` without a
    ``strategy.max_defer_rate``, no serving-depth limits unless ``servers.training`` is ``coop``.

    Raises:
        KeyError: a summary without ``config`` names no strategy, c_e or c_1; no ``num_clients`` /
            ``num_rounds``.
    """
    recorded = isinstance(s.get("config"), dict)
    src = flatten(s["config"]) if recorded else s
    out = {k: src[k] if not recorded and k in ("strategy.name", "strategy.c_e", "strategy.c_1") else src.get(k)
           for k in GROUP_KEYS[:-2]}
    if out["strategy.max_defer_rate"] is None:
        out["strategy.bound"] = None
    if src.get("servers.training", "coop") != "coop":
        out["servers.coop.serve_depth"] = out["servers.coop.capacity"] = None
    return {**out, "num_clients": s["num_clients"], "num_rounds": s["num_rounds"]}


def machine_of(run: Path) -> dict[str, Any]:
    """The CPU and torch CPU capability a run started on (its ``provenance.json``; empty if it has
    none), so per-seed values in ``report.csv`` can be compared with a re-run elsewhere."""
    try:
        started = json.loads((run / "provenance.json").read_text())["started"]
        return {"cpu": started.get("cpu"), "torch_cpu_capability": started.get("torch_cpu_capability"),
                "commit": started.get("commit")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def load_runs(dirs: list[Path]) -> tuple[list[dict[str, Any]], list[str], str]:
    """Read every run under ``dirs`` and give each its identity (``ident``: the keys grouping uses).

    Returns:
        ``(runs, warnings, grouped_by)``; ``grouped_by`` is ``"config"`` (every run has a recorded
        config) or ``"GROUP_KEYS"`` (the fallback, with a one-line warning).

    Raises:
        ReportError: no runs, a missing directory, or no readable summary.
    """
    paths = find_runs(dirs)
    runs, warnings = [], []
    for p in paths:
        try:
            runs.append(read_run(p))
        except ReportError as exc:
            warnings.append(str(exc))
    if not runs:
        raise ReportError(f"none of the {len(paths)} runs has a readable summary.json")
    missing = [r for r in runs if r["config"] is None]
    if missing:
        warnings.append(f"{len(missing)} of {len(runs)} runs record no config (no 'config' in summary.json, no "
                        f"readable .hydra/config.yaml; e.g. {missing[0]['run']}): grouping every run by the fixed "
                        f"keys {', '.join(GROUP_KEYS)} -- runs that differ in any other key are merged")
    raw = [r for r in runs if r["source"] == ".hydra/config.yaml (as composed)"]
    if raw and not missing:
        warnings.append(f"{len(raw)} of {len(runs)} runs record their config only in a .hydra/config.yaml that "
                        f"today's schema no longer reads (e.g. {raw[0]['run']}): grouped by that config as composed "
                        "(servers.routing=auto not resolved), so they never share a group with newer runs")
    grouped_by = "GROUP_KEYS" if missing else "config"
    for r in runs:
        r["ident"] = r["legacy"] if missing else r["config"]
    return runs, warnings, grouped_by


# ---- grouping ----------------------------------------------------------------------------------------
def _dump(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _order(v: Any) -> tuple:
    if v is None:
        return (2, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, _dump(v))


def varying_keys(idents: list[dict[str, Any]]) -> list[str]:
    """The keys whose values differ between the given identities (one per group).

    A key that some identities lack (a field of one strategy's config class only, e.g.
    ``strategy.rejector.hidden``) counts when its value differs among those that have it, or when
    the other varying keys alone would not tell the groups apart. ``strategy.name`` comes first;
    with one group, ``strategy.name`` is returned so the table names it.
    """
    keys: list[str] = list(dict.fromkeys(k for i in idents for k in i))
    differ = [k for k in keys if len({_dump(i[k]) for i in idents if k in i}) > 1]
    if len({tuple(_dump(i.get(k)) for k in differ) for i in idents}) < len(idents):
        differ += [k for k in keys if k not in differ and any(k not in i for i in idents)]
    if not differ:
        differ = [k for k in ("strategy.name",) if k in keys]
    return sorted(differ, key=lambda k: (k != "strategy.name", keys.index(k)))


def group_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Runs grouped by identical identity, sorted by their varying keys' values.

    Returns:
        ``(groups, varying)``: each group ``{"id": "g1", "values": {varying key: value}, "label",
        "runs": [run dicts], "seeds": [...], "n"}``; ``varying`` from :func:`varying_keys`.
    """
    from sim.style import setting_label

    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(_dump(r["ident"]), []).append(r)
    members = list(by.values())
    varying = varying_keys([m[0]["ident"] for m in members])
    groups = [{"values": {k: m[0]["ident"].get(k) for k in varying}, "runs": m,
               "seeds": sorted(r["seed"] for r in m), "n": len(m)} for m in members]
    groups.sort(key=lambda g: tuple(_order(g["values"][k]) for k in varying))
    for i, g in enumerate(groups):
        g["id"] = f"g{i + 1}"
        g["label"] = setting_label(g["values"])
        for r in g["runs"]:
            r["group"] = g["id"]
    return groups, varying


def runs_frame(runs: list[dict[str, Any]], varying: list[str]) -> pd.DataFrame:
    """One row per run: ``run``, ``seed``, ``group``, the varying keys, every metric (pandas)."""
    rows = [{"run": r["run"], "seed": r["seed"], "group": r["group"],
             **{k: r["ident"].get(k) for k in varying}, **r["metrics"], **r.get("machine", {})} for r in runs]
    df = pd.DataFrame(rows)
    for c in metric_columns(df):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.sort_values(["group", "seed", "run"], kind="stable").reset_index(drop=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric columns present in ``df``: :data:`METRICS`, then ``acc@r`` by rate, then the
    operating-point differences ``vs_<baseline>@r`` by rate and baseline."""
    acc = sorted((c for c in df.columns if str(c).startswith("acc@")), key=lambda c: float(c[4:]))
    ops = sorted((c for c in df.columns if str(c).startswith("vs_") and "@" in str(c)),
                 key=lambda c: (float(c.split("@")[1]), [n for n, _ in OPERATING].index(c[3:].split("@")[0])))
    return [m for m, _ in METRICS if m in df.columns] + acc + ops


# ---- statistics --------------------------------------------------------------------------------------
def t_interval(mean: Any, std: Any, n: Any, level: float = LEVEL) -> tuple[Any, Any]:
    """The Student t confidence interval of a mean: ``mean ± t_{(1+level)/2, n-1} · std / sqrt(n)``.

    Args:
        mean, std, n: scalars or arrays (std: the sample std, ddof = 1). level: e.g. 0.95.

    Returns:
        ``(low, high)``; NaN where n < 2 (no interval from one value).
    """
    from scipy.stats import t

    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(n >= 2, t.ppf((1 + level) / 2, np.maximum(n - 1, 1)), np.nan)
        half = q * np.asarray(std, dtype=float) / np.sqrt(n)
    return np.asarray(mean, dtype=float) - half, np.asarray(mean, dtype=float) + half


def mean_ci(values: Any, level: float = LEVEL) -> dict[str, float]:
    """``{"n", "mean", "std", "lo", "hi"}`` of the finite ``values`` (sample std, t-interval)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = v.size
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    lo, hi = t_interval(mean, std, n, level)
    return {"n": int(n), "mean": mean, "std": std, "lo": float(lo), "hi": float(hi)}


def group_stats(df: pd.DataFrame, cols: list[str], by: str = "group") -> pd.DataFrame:
    """Per ``by`` value and metric: ``n`` (finite values), ``mean``, ``std`` (ddof = 1), ``lo``/``hi``
    (95% t-interval). A long frame indexed by ``(by, metric)``."""
    g = df.groupby(by, sort=False)[cols]
    out = pd.concat({"n": g.count(), "mean": g.mean(), "std": g.std(ddof=1)}, axis=1).stack(future_stack=True)
    out.index.names = [by, "metric"]
    lo, hi = t_interval(out["mean"], out["std"], out["n"])
    return out.assign(lo=lo, hi=hi)


def paired_stats(df: pd.DataFrame, base: str, cols: list[str]) -> tuple[pd.DataFrame, dict[str, list]]:
    """Paired differences (group - baseline group ``base``) on the seeds both have.

    Returns:
        ``(stats, seeds)``: ``stats`` as :func:`group_stats` (n = common seeds with a finite
        difference) for every group but ``base``; ``seeds[group]``: the common seeds. A seed run
        more than once in a group counts once, as the mean of its runs.
    """
    per_seed = df.groupby(["group", "seed"])[cols].mean()
    ref = per_seed.loc[base]
    diffs, seeds = [], {}
    for gid in df["group"].unique():
        if gid == base:
            continue
        mine = per_seed.loc[gid]
        common = mine.index.intersection(ref.index)
        seeds[gid] = sorted(common.tolist())
        d = (mine.loc[common] - ref.loc[common]).assign(group=gid)
        diffs.append(d if len(d) else pd.DataFrame({"group": [gid]}))
    stats = group_stats(pd.concat(diffs, ignore_index=True).reindex(columns=["group", *cols]), cols) \
        if diffs else pd.DataFrame()
    return stats, seeds


def parse_baseline(text: str) -> dict[str, str]:
    """``"strategy.name=confidence,strategy.c_e=0.1"`` -> ``{key: value}``.

    Raises:
        ReportError: not KEY=VALUE pairs.
    """
    out = {}
    for part in [p for p in text.split(",") if p.strip()]:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ReportError(f"--baseline {text!r}: give KEY=VALUE[,KEY=VALUE] (e.g. strategy.name=confidence)")
        out[key.strip()] = value.strip()
    if not out:
        raise ReportError("--baseline is empty: give KEY=VALUE[,KEY=VALUE] (e.g. strategy.name=confidence)")
    return out


def _matches(value: Any, text: str) -> bool:
    if value is None:
        return text.lower() in ("none", "null", "")
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return str(value) == text or _dump(value) == text


def pick_baseline(groups: list[dict[str, Any]], varying: list[str], spec: dict[str, str]) -> dict[str, Any]:
    """The one group whose varying keys have the values ``spec`` gives.

    Raises:
        ReportError: a key that does not vary, or not exactly one group matching (one line).
    """
    bad = [k for k in spec if k not in varying]
    if bad:
        raise ReportError(f"--baseline key {bad[0]} does not vary between the configurations; "
                          f"the varying keys are: {', '.join(varying)}")
    hits = [g for g in groups if all(_matches(g["values"][k], v) for k, v in spec.items())]
    if len(hits) != 1:
        options = "; ".join(_text(g["values"]) for g in groups)
        raise ReportError(f"--baseline {','.join(f'{k}={v}' for k, v in spec.items())} matches {len(hits)} "
                          f"configurations (it must match one); the configurations are: {options}")
    return hits[0]


# ---- tables ------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return v if isinstance(v, str) else _dump(v)


def _text(values: dict[str, Any]) -> str:
    """A configuration in plain text: ``key=value, key=value`` (its varying keys)."""
    return ", ".join(f"{k}={_cell(v)}" for k, v in values.items())


def fmt_stat(st: Any, digits: int = 3) -> str:
    """One table cell: ``mean ± CI half-width (s)``; ``mean (no CI)`` for n = 1; ``–`` for none."""
    n, mean = int(st["n"]), float(st["mean"])
    if n == 0 or not math.isfinite(mean):
        return "–"
    if n == 1:
        return f"{mean:.{digits}f} (no CI)"
    return f"{mean:.{digits}f} ± {float(st['hi']) - mean:.{digits}f} ({float(st['std']):.{digits}f})"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def stat_table(groups: list[dict[str, Any]], varying: list[str], stats: pd.DataFrame, cols: list[str],
               headers: dict[str, str], n_col: str = "n", counts: dict[str, int] | None = None) -> list[str]:
    """Markdown lines: one row per group in ``stats`` (varying-key values, n, one cell per metric)."""
    rows = []
    for g in groups:
        if g["id"] not in stats.index.get_level_values(0):
            continue
        n = counts[g["id"]] if counts is not None else g["n"]
        rows.append([_cell(g["values"][k]) for k in varying] + [str(n)]
                    + [fmt_stat(stats.loc[(g["id"], c)]) for c in cols])
    return _table(varying + [n_col] + [headers.get(c, c) for c in cols], rows)


def markdown(ctx: dict[str, Any]) -> str:
    """The report as markdown: the main and second tables, accuracy at fixed defer rates, the
    paired table (with a baseline), the bounded-reject table, and what the figures mean."""
    groups, varying, stats, df = ctx["groups"], ctx["varying"], ctx["stats"], ctx["df"]
    headers = dict(METRICS)
    how = ("their recorded configs: runs in one configuration differ only in seed" if ctx["grouped_by"] == "config"
           else f"the fixed keys {', '.join(GROUP_KEYS)} (some runs record no config)")
    lines = [f"# Report: {len(df)} runs in {len(groups)} configurations", "",
             (f"Grouped by {how}. The columns before n are the config keys that vary between configurations; "
              "n is the number of seeds."), "",
             f"Each cell: {INTERVAL_TEXT}.", "",
             ("`vs confidence @ same rate`: the run's system accuracy minus confidence thresholding's (legacy "
              "max-softmax) at the run's own defer rate on the same test samples, a within-run paired difference."),
             ""]
    lines += stat_table(groups, varying, stats, list(MAIN), headers)
    more = list(MORE) + (list(RESILIENCE) if any(map(has_failures, groups)) else [])
    lines += ["", "More metrics (same cells):", ""] + stat_table(groups, varying, stats, more, headers)
    rates = [c for c in metric_columns(df) if c.startswith("acc@")]
    if rates:
        lines += ["", ("System accuracy when the top-k of each configuration's deferral score are deferred (the "
                       "score-ranking curve at fixed defer rates; same cells):"), ""]
        lines += stat_table(groups, varying, stats, rates, {c: c.replace("acc@", "defer ") for c in rates})
    lines += operating_section(ctx) + paired_section(ctx) + bounded_section(ctx) + figures_section(ctx)
    return "\n".join(lines) + "\n"


def operating_section(ctx: dict[str, Any]) -> list[str]:
    """Markdown lines of the matched-operating-point table: at each fixed defer rate, the run's own
    score ranking minus each confidence baseline's at the same rate (within-run paired differences,
    then mean and t-interval over seeds); empty for runs that record no ``operating_points``."""
    cols = [c for c in metric_columns(ctx["df"]) if c.startswith("vs_") and "@" in c]
    if not cols:
        return []
    names = dict(OPERATING)
    headers = {c: f"{names[c[3:].split('@')[0]]} @ {float(c.split('@')[1]):.0%}" for c in cols}
    return ["", "## At matched operating points", "",
            ("At each defer rate, the configuration's own deferral score defers its top-k test samples, and each "
             "confidence baseline defers exactly as many on the same samples: `per device` with the same count on "
             "every device as the score (only the ranking within a device differs), `calibrated` with one global "
             "threshold on each group's temperature-scaled confidence, `global` with one threshold on the raw "
             f"confidence. Cells: score minus baseline, {INTERVAL_TEXT}. An interval that excludes 0 is a ranking "
             "difference at the 5% level."), ""] + stat_table(ctx["groups"], ctx["varying"], ctx["stats"], cols,
                                                                headers)


def has_failures(group: dict[str, Any]) -> bool:
    """Whether a configuration group's runs injected failures (its ``failures`` preset is not ``none``)."""
    return group["runs"][0]["ident"].get("failures.name") not in (None, "none")


def paired_section(ctx: dict[str, Any]) -> list[str]:
    """Markdown lines of the paired table (empty without ``--baseline``)."""
    base = ctx.get("baseline")
    if base is None:
        return []
    counts = {gid: len(s) for gid, s in ctx["paired_seeds"].items()}
    head = ["", f"## Paired differences against {_text(base['values'])} (n = {base['n']} seeds)", "",
            ("Each row: the configuration minus the baseline, seed by seed, on the seeds both have (n common "
             f"seeds); cells: {INTERVAL_TEXT}. An interval that excludes 0 is a difference at the 5% level."), ""]
    metrics = list(MAIN) + (list(RESILIENCE) if any(map(has_failures, ctx["groups"])) else [])
    return head + stat_table(ctx["groups"], ctx["varying"], ctx["paired"], metrics, dict(METRICS), "n common", counts)


def bounded_section(ctx: dict[str, Any]) -> list[str]:
    """Markdown lines of the bounded-reject table (achieved vs requested delta); empty without such runs."""
    bounded = [g for g in ctx["groups"] if g["runs"][0]["ident"].get("strategy.max_defer_rate") is not None]
    if not bounded:
        return []
    lines = ["", ("Bounded reject rate: achieved test defer rate vs the requested bound delta (same cells). 'noise' is "
                  "the binomial standard error sqrt(delta(1-delta)/N) of a rate measured on N test samples; 'over by' "
                  "is (achieved mean - delta) in those units (above +2: the bound is exceeded by more than sampling "
                  "noise)."), ""]
    rows = []
    for g in bounded:
        ident, st = g["runs"][0]["ident"], ctx["stats"]
        d = float(ident["strategy.max_defer_rate"])
        n_test = float(np.mean([r["metrics"]["num_test_samples"] for r in g["runs"]]))
        se = math.sqrt(max(d * (1 - d), 1e-12) / n_test)
        over = (st.loc[(g["id"], "defer_rate"), "mean"] - d) / se
        rows.append([_cell(g["values"][k]) for k in ctx["varying"]]
                    + [f"{d:g}", str(g["n"]), fmt_stat(st.loc[(g["id"], "defer_rate")]), f"{se:.3f}", f"{over:+.1f}",
                       fmt_stat(st.loc[(g["id"], "system_accuracy")])])
    head = ctx["varying"] + ["delta", "n", "achieved defer rate", "noise", "over by (noise units)", "system acc"]
    return lines + _table(head, rows)


def figures_section(ctx: dict[str, Any]) -> list[str]:
    """Markdown lines saying what each written figure shows."""
    names = {Path(f).stem for f in ctx["files"] if str(f).endswith(".png")}
    text = {
        "accuracy_vs_defer_rate": "each configuration's score-ranking curve: system accuracy when the top-k of its "
        "deferral score are deferred (mean over seeds, 95% CI band), and its operating point (its own decisions, "
        "95% CI bars). It shows how well one trained score ranks samples; away from the operating point it is not "
        "what the method would do at another deferral cost (the L2H surrogate is calibrated at its own threshold "
        "only).",
        "cost_coverage": "the cost-coverage curve of the c_e sweep: one point per trained configuration (labelled "
        "with its c_e) at its own mean defer rate, system accuracy and L01 cost, 95% CI bars on both axes. This is "
        "what the method does when the deferral price changes.",
        "accuracy_vs_c_e": "system accuracy and defer rate against c_e (mean, 95% CI band).",
        "accuracy_vs_staleness": "system accuracy and defer rate against the staleness S (log2 axis; mean, 95% CI "
        "band).",
        "achieved_vs_requested_defer_rate": "achieved test defer rate against the requested bound delta (mean, 95% "
        "CI band).",
        "vs_confidence": "per configuration, system accuracy minus confidence thresholding's at the run's own "
        "defer rate on the same test samples (a within-run paired difference; mean over seeds, 95% CI bars; the "
        "line 0: no difference).",
        "paired_differences": "per configuration, system accuracy and defer rate minus the baseline's on the same "
        "seed (paired differences on the seeds both have; mean, 95% CI bars; the line 0: no difference).",
        "accuracy_vs_defer_rate_paired": "one panel per configuration: its score-ranking curve minus the "
        "baseline's on the same seed at every defer rate (mean, 95% CI band): where overlapping bands of the "
        "curves themselves show nothing, a band clear of 0 is a difference at that defer rate.",
        "accuracy_vs_staleness_paired": "system accuracy and defer rate at each staleness S minus the same "
        "seed's at the smallest S (paired differences; mean, 95% CI band): seed-to-seed spread, which makes "
        "the bands of accuracy_vs_staleness wide, cancels.",
        "resilience_kept": "per configuration with failures, over the rounds with servers down: the system accuracy "
        "kept against the all-up reference run (models trained with the failure) and the inference-only fraction "
        "(the same trained pool answering with the failure state vs all up: MEL's measure); mean over seeds, 95% "
        "CI bars.",
    }
    shown = [f"- `{n}` (.pdf, .png): {t}" for n, t in text.items() if n in names]
    return ["", "## Figures", "", *shown] if shown else []


# ---- outputs -----------------------------------------------------------------------------------------
def write_json(ctx: dict[str, Any], path: Path) -> None:
    """``report.json``: the tables' numbers (per group and metric: n, mean, std, ci_low, ci_high)."""
    from sim.results import jsonable

    def block(stats: pd.DataFrame, gid: str) -> dict[str, Any]:
        sub = stats.loc[gid]
        return {m: {"n": int(r["n"]), "mean": r["mean"], "std": r["std"], "ci_low": r["lo"], "ci_high": r["hi"]}
                for m, r in sub.iterrows()}

    out: dict[str, Any] = {
        "interval": f"{LEVEL:.0%} Student t-interval over seeds: mean ± t(0.975, n-1) s / sqrt(n); s = sample std "
                    "(ddof=1); null when n < 2",
        "grouped_by": ctx["grouped_by"], "varying": ctx["varying"], "warnings": ctx["warnings"],
        "groups": [{"id": g["id"], "label": g["label"], "config": g["values"], "n": g["n"], "seeds": g["seeds"],
                    "runs": [r["run"] for r in g["runs"]], "metrics": block(ctx["stats"], g["id"])}
                   for g in ctx["groups"]],
        "baseline": None, "paired": []}
    if ctx.get("baseline") is not None:
        out["baseline"] = {"id": ctx["baseline"]["id"], "config": ctx["baseline"]["values"]}
        out["paired"] = [{"id": gid, "common_seeds": s, "n_common": len(s),
                          "metrics": block(ctx["paired"], gid) if gid in ctx["paired"].index.get_level_values(0)
                          else {}} for gid, s in ctx["paired_seeds"].items()]
    atomic_write_text(path, json.dumps(jsonable(out), indent=2, sort_keys=True) + "\n")


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """``report.csv``: one row per run (run, seed, group, the varying keys, every metric)."""
    out = df.copy()
    for c in out.columns:
        if out[c].map(lambda v: isinstance(v, (list, dict))).any():
            out[c] = out[c].map(_cell)
    atomic_write_text(path, out.to_csv(index=False))


# ---- figures -----------------------------------------------------------------------------------------
def _num_list(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


RANGES = {"system_accuracy": (0.0, 1.0), "defer_rate": (0.0, 1.0), "coverage": (0.0, 1.0), "l01_cost": (0.0, math.inf)}
"""Feasible values of some metrics: figures draw intervals clipped to them (tables keep the t-interval as is)."""


def _point(stats: pd.DataFrame, gid: str, metric: str) -> tuple[float, float, float]:
    st = stats.loc[(gid, metric)]
    a, b = RANGES.get(metric, (-math.inf, math.inf))
    return float(st["mean"]), float(np.clip(st["lo"], a, b)), float(np.clip(st["hi"], a, b))


def curve_data(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Per group, the score-ranking curve over seeds (mean and 95% t-interval at every defer rate of
    the first run's grid; other grids interpolated) and its operating point (for
    :func:`sim.plots.plot_report_curves`; intervals clipped to [0, 1])."""
    out = []
    for g in ctx["groups"]:
        grid = _num_list(g["runs"][0]["curve"][0])
        ys = np.vstack([np.interp(grid, _num_list(r["curve"][0]), _num_list(r["curve"][1])) for r in g["runs"]])
        n = ys.shape[0]
        mean = ys.mean(axis=0)
        std = ys.std(axis=0, ddof=1) if n > 1 else np.full_like(mean, math.nan)
        lo, hi = (np.clip(v, 0.0, 1.0) for v in t_interval(mean, std, n))
        out.append({"label": f"{g['label']} (n={n})", "x": grid, "mean": mean, "lo": lo, "hi": hi,
                    "point": {m: _point(ctx["stats"], g["id"], m) for m in ("defer_rate", "system_accuracy")}})
    return out


def sweep_series(ctx: dict[str, Any], name: str, metrics: tuple[str, ...],
                 groups: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Groups as series of points along the config key ``name``: one series per setting of
    the other varying keys, one point per group ``{"x": value, metric: (mean, lo, hi), ...}``."""
    from sim.naming import short_labels
    from sim.style import setting_label

    others = [k for k in ctx["varying"] if k != name]
    series: dict[str, dict[str, Any]] = {}
    for g in groups if groups is not None else ctx["groups"]:
        x = g["runs"][0]["ident"].get(name)
        if x is None:
            continue
        label = setting_label({k: g["values"][k] for k in others}) if others else ""
        s = series.setdefault(label, {"label": label, "values": {k: g["values"][k] for k in others}, "points": [],
                                      "groups": []})
        s["points"].append({"x": float(x), **{m: _point(ctx["stats"], g["id"], m) for m in metrics}})
        s["groups"].append((float(x), g["id"]))
    out = list(series.values())
    if others and len(out) > 1:  # only the keys in which the series differ (sim/naming.py)
        for s, lab in zip(out, short_labels([s["values"] for s in out])):
            s["label"] = lab
    return out


def paired_sweep_series(ctx: dict[str, Any], name: str, metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """:func:`sweep_series` as paired differences: in each series, every point's metrics minus those of
    the series' smallest value of ``name`` (S = 1 for the staleness), seed by seed on the seeds both
    have (mean and 95% t-interval over those seeds); the reference point itself is 0."""
    out = []
    for s in sweep_series(ctx, name, metrics):
        base_x, base = min(s["groups"])
        stats, _ = paired_stats(ctx["df"][ctx["df"]["group"].isin([g for _, g in s["groups"]])], base, list(metrics))
        points = [{"x": base_x, **{m: (0.0, math.nan, math.nan) for m in metrics}}]
        for x, gid in s["groups"]:
            if gid != base and gid in stats.index.get_level_values(0):
                points.append({"x": x, **{m: _diff_point(stats, gid, m) for m in metrics}})
        out.append({**s, "points": points, "reference": base_x})
    return out


def _diff_point(stats: pd.DataFrame, gid: str, metric: str) -> tuple[float, float, float]:
    """A difference's mean and interval (not clipped: a difference may be negative)."""
    st = stats.loc[(gid, metric)]
    return float(st["mean"]), float(st["lo"]), float(st["hi"])


def difference_rows(ctx: dict[str, Any], metrics: tuple[str, ...], paired: bool) -> list[dict[str, Any]]:
    """Rows of a differences figure, one per configuration: ``{"label", metric: (mean, lo, hi)}``.
    ``paired``: the paired differences against the baseline (every group but the baseline);
    else the within-run differences in ``ctx["stats"]`` (e.g. ``vs_confidence``)."""
    rows = []
    for g in ctx["groups"]:
        if paired:
            if g["id"] == ctx["baseline"]["id"] or g["id"] not in ctx["paired"].index.get_level_values(0):
                continue
            rows.append({"label": g["label"], **{m: _diff_point(ctx["paired"], g["id"], m) for m in metrics}})
        else:
            rows.append({"label": g["label"], **{m: _diff_point(ctx["stats"], g["id"], m) for m in metrics}})
    return rows


def curve_differences(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration but the baseline, its score-ranking curve minus the baseline's on the same
    seed (both on the baseline's first grid), mean and 95% t-interval over the common seeds."""
    base = next(g for g in ctx["groups"] if g["id"] == ctx["baseline"]["id"])
    grid = _num_list(base["runs"][0]["curve"][0])

    def per_seed(g: dict[str, Any]) -> dict[Any, np.ndarray]:
        by: dict[Any, list[np.ndarray]] = {}
        for r in g["runs"]:
            by.setdefault(r["seed"], []).append(np.interp(grid, _num_list(r["curve"][0]), _num_list(r["curve"][1])))
        return {seed: np.mean(v, axis=0) for seed, v in by.items()}

    ref = per_seed(base)
    out = []
    for g in ctx["groups"]:
        if g is base:
            continue
        mine = per_seed(g)
        seeds = sorted(set(mine) & set(ref))
        if not seeds:
            continue
        d = np.vstack([mine[k] - ref[k] for k in seeds])
        mean = d.mean(axis=0)
        std = d.std(axis=0, ddof=1) if len(seeds) > 1 else np.full_like(mean, math.nan)
        lo, hi = t_interval(mean, std, len(seeds))
        out.append({"label": f"{g['label']} (n={len(seeds)})", "x": grid, "mean": mean, "lo": lo, "hi": hi})
    return out


def figures(ctx: dict[str, Any], out: Path) -> list[Path]:
    """Draw the report's figures into ``out`` (each .pdf and .png); returns the files written."""
    from sim import plots as P
    from sim.style import outputs

    made = [P.plot_report_curves(curve_data(ctx), out / "accuracy_vs_defer_rate.png")]
    if "strategy.c_e" in ctx["varying"]:
        made.append(P.plot_cost_curve(sweep_series(ctx, "strategy.c_e", ("defer_rate", "system_accuracy", "l01_cost")),
                                      out / "cost_coverage.png"))
        made.append(P.plot_report_sweep(sweep_series(ctx, "strategy.c_e", ("system_accuracy", "defer_rate")),
                                        "deferral price $c_e$", out / "accuracy_vs_c_e.png"))
    if "strategy.staleness" in ctx["varying"]:
        made.append(P.plot_report_sweep(sweep_series(ctx, "strategy.staleness", ("system_accuracy", "defer_rate")),
                                        "staleness $S$ (rounds between server refreshes)",
                                        out / "accuracy_vs_staleness.png", log2=True))
    bounded = [g for g in ctx["groups"] if g["runs"][0]["ident"].get("strategy.max_defer_rate") is not None]
    if bounded:
        made.append(P.plot_report_bounded(sweep_series(ctx, "strategy.max_defer_rate", ("defer_rate",), bounded),
                                          out / "achieved_vs_requested_defer_rate.png"))
    if "strategy.staleness" in ctx["varying"]:
        made.append(P.plot_report_sweep(paired_sweep_series(ctx, "strategy.staleness",
                                                            ("system_accuracy", "defer_rate")),
                                        "staleness $S$ (rounds between server refreshes)",
                                        out / "accuracy_vs_staleness_paired.png", log2=True, paired=True))
    if len(ctx["groups"]) > 1 and any(np.isfinite(_diff_point(ctx["stats"], g["id"], "vs_confidence")[0])
                                      for g in ctx["groups"]):
        made.append(P.plot_report_differences(
            difference_rows(ctx, ("vs_confidence",), paired=False),
            [("vs_confidence", "system accuracy $-$ confidence's\nat the same defer rate (same run)")],
            out / "vs_confidence.png"))
    if ctx.get("baseline") is not None and len(ctx["groups"]) > 1:
        base = ctx["baseline"]["label"].removesuffix(" (baseline)")
        made.append(P.plot_report_differences(
            difference_rows(ctx, ("system_accuracy", "defer_rate"), paired=True),
            [("system_accuracy", "system accuracy $-$ baseline's"), ("defer_rate", "defer rate $-$ baseline's")],
            out / "paired_differences.png", title=f"paired by seed against: {base}"))
        made.append(P.plot_report_curve_differences(curve_differences(ctx), base,
                                                    out / "accuracy_vs_defer_rate_paired.png"))
    failed = [g for g in ctx["groups"] if has_failures(g)]
    if failed:
        made.append(P.plot_report_resilience(
            [{"label": g["label"], **{m: _point(ctx["stats"], g["id"], m) for m in ("fraction_kept", "inference_kept")}}
             for g in failed], out / "resilience_kept.png"))
    return [f for png in made for f in outputs(png)]


# ---- the command -------------------------------------------------------------------------------------
def name_groups(groups: list[dict[str, Any]], varying: list[str], baseline: dict[str, Any] | None,
                labels: list[str]) -> None:
    """Each group's legend ``label``: the short label of the keys in which it differs (from the
    baseline's values, or the common ones), then the ``labels`` given (:mod:`sim.naming`).

    Raises:
        ReportError: a bad label (one line).
    """
    from sim.naming import LabelError, apply_labels, short_labels

    for g, lab in zip(groups, short_labels([g["values"] for g in groups],
                                           baseline["values"] if baseline is not None else None)):
        g["label"] = lab
    try:
        apply_labels(groups, varying, labels, _matches, _text)
    except LabelError as exc:
        raise ReportError(str(exc)) from None


def report(dirs: list[Path], out: Path | None = None, plots: bool = True, baseline: str | None = None,
           labels: list[str] | None = None) -> dict[str, Any]:
    """Build the report of the runs under ``dirs`` into ``out`` (default ``dirs[0]``).

    Args:
        baseline: ``KEY=VALUE[,KEY=VALUE]`` choosing the group the paired table compares against.
        labels: ``WHICH=TEXT`` legend labels of configurations (:mod:`sim.naming`); the others get
            short labels of the keys in which they differ.

    Returns:
        ``{"frame": runs DataFrame, "groups": [...], "varying": [...], "stats": DataFrame,
        "paired": DataFrame | None, "files": [paths written], "warnings": [one-line messages]}``.

    Raises:
        ReportError: no runs, a missing directory, no readable summary, a bad ``baseline``, an ``out``
            that cannot be written (a full disk included).
    """
    spec = parse_baseline(baseline) if baseline is not None else None
    runs, warnings, grouped_by = load_runs([Path(d) for d in dirs])
    groups, varying = group_runs(runs)
    for g in groups:
        twice = sorted({s for s in g["seeds"] if g["seeds"].count(s) > 1})
        if twice:
            warnings.append(f"{_text(g['values'])}: seed(s) {', '.join(map(str, twice))} ran more than once; each run counts "
                            "as one sample in the tables (the paired table uses their mean)")
    df = runs_frame(runs, varying)
    ctx: dict[str, Any] = {"groups": groups, "varying": varying, "df": df, "grouped_by": grouped_by,
                           "warnings": warnings, "stats": group_stats(df, metric_columns(df)), "files": [],
                           "baseline": None, "paired": None}
    if spec is not None:
        ctx["baseline"] = pick_baseline(groups, varying, spec)
        ctx["paired"], ctx["paired_seeds"] = paired_stats(df, ctx["baseline"]["id"], metric_columns(df))
    name_groups(groups, varying, ctx["baseline"], labels or [])
    out = Path(out) if out is not None else Path(dirs[0])
    try:
        out.mkdir(parents=True, exist_ok=True)
        ctx["files"] = [out / "report.csv", out / "report.md", out / "report.json"]
        if plots:
            ctx["files"] += figures(ctx, out)
        ctx["files"] += write_rounds(groups, varying, out)
        write_csv(df, out / "report.csv")
        atomic_write_text(out / "report.md", markdown(ctx))
        write_json(ctx, out / "report.json")
    except OutOfSpace as exc:
        raise ReportError(str(exc)) from None
    except OSError as exc:
        raise ReportError(f"--out {out} cannot be written ({exc.strerror or type(exc).__name__}"
                          f"{': ' + str(exc.filename) if exc.filename else ''}): give a directory you can write") from None
    return {"frame": df, "groups": groups, "varying": varying, "stats": ctx["stats"], "paired": ctx["paired"],
            "files": ctx["files"], "warnings": warnings}


def parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (also what tests/test_doc_commands.py checks the docs' commands on)."""
    prog = "l2h-report" if Path(sys.argv[0]).name == "l2h-report" else "python -m sim.report"
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run directories or multirun sweep directories")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the first directory)")
    ap.add_argument("--baseline", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                    help="the configuration to compare every other against, seed by seed "
                         "(its varying keys' values, e.g. strategy.name=confidence)")
    ap.add_argument("--label", action="append", default=[], metavar="WHICH=TEXT",
                    help="a configuration's legend label (repeatable); WHICH: its id (g3, in report.json) or "
                         "KEY=VALUE[,KEY=VALUE] of its varying keys, e.g. strategy.name=confidence=Confidence")
    ap.add_argument("--labels", type=Path, default=None, metavar="FILE",
                    help="a file of WHICH=TEXT lines, as --label (# comments)")
    ap.add_argument("--no-plots", action="store_true",
                    help="write only report.csv, report.md, report.json and rounds.csv/.parquet")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m sim.report DIR... [--out DIR] [--baseline KEY=VALUE,...] [--label WHICH=TEXT]... [--labels FILE]
    [--no-plots]`` (also ``l2h-report``); exit 2 on bad input."""
    args = parser().parse_args(argv)
    try:
        labels = list(args.label)
        if args.labels is not None:
            from sim.naming import LabelError, read_labels_file

            try:
                labels = read_labels_file(args.labels) + labels
            except LabelError as exc:
                raise ReportError(str(exc)) from None
        res = report(args.dirs, args.out, plots=not args.no_plots, baseline=args.baseline, labels=labels)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for msg in res["warnings"]:
        print(f"warning: {msg}", file=sys.stderr)
    print(Path(res["files"][1]).read_text())
    print("wrote " + ", ".join(str(f) for f in res["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
