"""Fleet metrics from pooled per-sample evaluation records (docs/methods.md §1, §4, §7).

Every device returns, for each of its test samples: its label ``y``, the legacy prediction
``m_pred`` and confidence ``m_conf`` (max softmax), the rejector's deferral score ``score``
(psi_1) and decision ``defer``; the server pool adds ``e_pred``, the answer the sample gets when
deferred (a server's, or after failover with every server unreachable, the legacy model's own). Metrics are computed here,
once, from the pooled arrays, so every strategy is evaluated identically.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FIELDS = ("device", "y", "m_pred", "e_pred", "score", "m_conf", "defer")


def _acc(correct: np.ndarray) -> float:
    return float(correct.mean()) if correct.size else float("nan")


SKILL_SE = 2.0
"""Standard errors above chance an accuracy must be to count as skill (:func:`chance_floor`)."""


def chance_floor(num_classes: int, n: int) -> float:
    """The highest accuracy on ``n`` test samples that cannot be told apart from guessing.

    Guessing uniformly among ``K = num_classes`` classes is right with probability ``p = 1/K``; its
    measured accuracy on ``n`` samples has standard error ``sqrt(p (1 - p) / n)`` and exceeds
    ``p + 2 SE`` with probability about 2.3% (normal approximation to the binomial). Returns that
    floor, ``p + SKILL_SE * SE``: 0.132 for 10 classes on 360 samples, 0.553 for 2. (Guessing the
    most frequent class can do better on an unbalanced test set; 1/K is the floor for every set.)
    """
    p = 1.0 / max(int(num_classes), 1)
    return p + SKILL_SE * float(np.sqrt(p * (1.0 - p) / max(int(n), 1)))


def ratio_over_reference(num: float, den: float | None, num_classes: int, n: int) -> float | None:
    """``num / den`` for an accuracy ``num`` kept relative to a reference accuracy ``den`` on ``n``
    test samples of ``num_classes`` classes, or None (undefined) when ``den`` is at or below
    :func:`chance_floor`: a reference with no skill has nothing to keep, and the ratio grows without
    bound as it nears 0 (a pool with one untrained server: 0.825 / 0.122 = 6.75 "kept").
    """
    if den is None or num is None or not np.isfinite(den) or not np.isfinite(num) or n <= 0:
        return None
    return float(num / den) if den > chance_floor(num_classes, n) else None


def system_correct(defer: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray) -> np.ndarray:
    return np.where(defer, e_ok, m_ok)


def topk_defer(priority: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask deferring the ``k`` samples of highest ``priority`` (stable ties: earlier first)."""
    mask = np.zeros(len(priority), dtype=bool)
    if k > 0:
        mask[np.argsort(-priority, kind="stable")[:k]] = True
    return mask


def confidence_baseline(rec: dict[str, np.ndarray], k: int, per_device_k: dict[int, int] | None = None
                        ) -> np.ndarray:
    """Confidence deferral (docs/methods.md §4): defer the ``k`` samples whose legacy max-softmax is
    lowest (one global threshold tau), or, with ``per_device_k``, each device's own lowest ``k_d``."""
    if per_device_k is None:
        return topk_defer(-rec["m_conf"], k)
    mask = np.zeros(len(rec["y"]), dtype=bool)
    for dev, kd in per_device_k.items():
        idx = np.flatnonzero(rec["device"] == dev)
        mask[idx[topk_defer(-rec["m_conf"][idx], kd)]] = True
    return mask


def accuracy_at_rates(priority: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """System accuracy when deferring the top ``round(rate*N)`` samples by ``priority``, per rate. ``(R,)``."""
    n = len(priority)
    order = np.argsort(-priority, kind="stable")
    # gain of deferring sample i = e_ok - m_ok; cumulative over the priority order
    gain = np.concatenate([[0.0], np.cumsum((e_ok[order].astype(float) - m_ok[order]))])
    ks = np.clip(np.round(rates * n).astype(int), 0, n)
    return (m_ok.sum() + gain[ks]) / max(n, 1)


FIXED_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def aurc(score: np.ndarray, m_ok: np.ndarray) -> dict[str, float]:
    """Area under the risk-coverage curve of the local model, ranked by the deferral score.

    Definition used (the discrete form of Geifman, Uziel & El-Yaniv 2019, "Bias-reduced uncertainty
    estimation for deep neural classifiers", ICLR, section 3): sort the N samples by the deferral
    score, lowest first (kept first); for every coverage k/N, k = 1..N, the selective risk is the
    local model's error rate on the k kept samples; ``AURC = (1/N) * sum_k risk(k)``.
    ``E-AURC = AURC - AURC*``, with AURC* that of the ideal ranking (every sample the local model
    gets right kept before any it gets wrong), so E-AURC is 0 for a perfect ranking and does not
    depend on the local model's accuracy. Ties in the score are broken by sample order. Lower is
    better for both. The local model is the legacy model (L2D: the device's trained classifier).

    Args:
        score: ``(N,)`` deferral score (higher = deferred first). m_ok: ``(N,)`` bool, local model right.

    Returns:
        ``{"aurc": float, "e_aurc": float}`` (NaN when N = 0).
    """
    n = len(score)
    if n == 0:
        return {"aurc": float("nan"), "e_aurc": float("nan")}
    order = np.argsort(score, kind="stable")
    k = np.arange(1, n + 1)
    risk = np.cumsum(~m_ok[order]) / k
    ideal = np.cumsum(np.sort(~m_ok)) / k  # False (right) first
    a, a_star = float(risk.mean()), float(ideal.mean())
    return {"aurc": a, "e_aurc": a - a_star}


def fairness(rows: list[dict[str, Any]], key: str = "system_accuracy") -> dict[str, float]:
    """Per-device spread of ``key`` over the fleet's devices: worst, 10th percentile (linear
    interpolation), median, mean and standard deviation. ``rows``: :func:`per_device` output."""
    v = np.array([r[key] for r in rows if r[key] is not None and np.isfinite(r[key])], dtype=float)
    if not v.size:
        return {k: float("nan") for k in ("worst", "p10", "median", "mean", "std")}
    return {"worst": float(v.min()), "p10": float(np.percentile(v, 10)), "median": float(np.median(v)),
            "mean": float(v.mean()), "std": float(v.std())}


def matched_baselines(rec: dict[str, np.ndarray], defer: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray
                      ) -> dict[str, dict[str, float]]:
    """Confidence (one global threshold, and each device's own count of deferrals) and random
    deferral at the rejector's own defer rate ("matched", docs/methods.md "Baselines")."""
    n, k = len(defer), int(defer.sum())
    rate = k / n if n else float("nan")
    per_dev_k = {int(d): int(defer[rec["device"] == d].sum()) for d in np.unique(rec["device"])}
    conf_global = confidence_baseline(rec, k)
    conf_dev = confidence_baseline(rec, k, per_dev_k)
    # Random deferral at the same rate, in expectation over which k samples are drawn: exact, no noise.
    random_acc = float(((1 - rate) * m_ok + rate * e_ok).mean()) if n else float("nan")
    return {
        "confidence": {"system_accuracy": _acc(system_correct(conf_global, m_ok, e_ok)), "defer_rate": rate},
        "confidence_per_device": {"system_accuracy": _acc(system_correct(conf_dev, m_ok, e_ok)), "defer_rate": rate},
        "random": {"system_accuracy": random_acc, "defer_rate": rate},
    }


def l01_costs(defer: np.ndarray, served: np.ndarray, price: np.ndarray, sys_ok: np.ndarray, e_ok: np.ndarray,
              c_1: float) -> np.ndarray:
    """Per-sample 0-1 L2H cost with per-server prices and failovers (docs/methods.md §7), ``(N,)``.

    A kept sample costs ``1[legacy wrong]``. A deferred sample a server answered costs the price of
    that answer (``servers.c_e`` of the server; the mean price of the members of an ensemble
    answer) plus ``c_1 * 1[answer wrong]`` (Wu et al. 2025, the L01 loss). A deferred sample no
    server answered (every server down, unreachable or its query dropped) falls back to the legacy
    model: it is charged nothing for the request and scored like a kept sample.

    Args:
        defer, served: ``(N,)`` bool. price: ``(N,)`` the answer's price. sys_ok: ``(N,)`` the
            system's answer right. e_ok: ``(N,)`` the answer a deferral gets right. c_1: >= 0.
    """
    return np.where(defer & served, price + c_1 * (~e_ok), (~sys_ok).astype(float))


def pooled_metrics(rec: dict[str, np.ndarray], c_e: float, c_1: float, curve_points: int = 21) -> dict[str, Any]:
    """All fleet metrics from pooled evaluation records.

    Args:
        rec: arrays of :data:`FIELDS`, each ``(N,)`` over all evaluated test samples.
        c_e, c_1: L2H costs for the L01 cost (``c_e`` is used where ``rec`` has no ``price``).
        curve_points: points of the accuracy-vs-defer-rate curves (rates 0..1).

    Returns:
        Dict with ``system_accuracy``, ``defer_rate``, ``served_defer_rate`` (deferred and answered
        by a server, not by the legacy fallback), ``coverage``, ``l01_cost``,
        ``legacy_accuracy``, ``server_accuracy``, ``oracle_accuracy``, ``num_samples``,
        ``accuracy_at_defer_rate`` (system accuracy when the top 10%, ..., 90% of the deferral
        score are deferred), ``aurc`` and ``e_aurc`` (:func:`aurc`),
        ``baselines`` (``confidence`` global threshold, ``confidence_per_device``, ``random``
        expectation -- all at the same defer rate as the rejector), ``table`` (kept/deferred,
        docs/methods.md §1) and ``curves`` (accuracy vs defer rate: rejector score threshold
        sweep, confidence, random).
    """
    y = rec["y"]
    n = len(y)
    m_ok = rec["m_pred"] == y
    e_ok = rec["e_pred"] == y
    defer = rec["defer"].astype(bool)
    k = int(defer.sum())
    sys_ok = system_correct(defer, m_ok, e_ok)
    served = rec["served"].astype(bool) if "served" in rec else np.ones(n, dtype=bool)
    cost = l01_costs(defer, served, rec.get("price", np.full(n, c_e)), sys_ok, e_ok, c_1)
    rate = k / n if n else float("nan")

    def subset(mask: np.ndarray) -> dict[str, Any]:
        ma, ea = _acc(m_ok[mask]), _acc(e_ok[mask])
        return {"n": int(mask.sum()), "legacy_accuracy": ma, "server_accuracy": ea,
                "difference": (ea - ma) if mask.any() else float("nan")}

    rates = np.linspace(0.0, 1.0, curve_points)
    fixed = accuracy_at_rates(rec["score"], m_ok, e_ok, np.array(FIXED_RATES))
    return {
        "served_defer_rate": float((defer & served).mean()) if n else float("nan"),
        "num_samples": int(n),
        "system_accuracy": _acc(sys_ok),
        "defer_rate": rate,
        "coverage": 1.0 - rate,
        "l01_cost": float(cost.mean()) if n else float("nan"),
        "legacy_accuracy": _acc(m_ok),
        "server_accuracy": _acc(e_ok),
        "oracle_accuracy": _acc(m_ok | e_ok),
        "baselines": matched_baselines(rec, defer, m_ok, e_ok),
        "table": {"kept": subset(~defer), "deferred": subset(defer)},
        "accuracy_at_defer_rate": {f"{r:.1f}": float(a) for r, a in zip(FIXED_RATES, fixed)},
        **aurc(rec["score"], m_ok),
        "curves": {
            "defer_rate": rates.tolist(),
            "rejector": accuracy_at_rates(rec["score"], m_ok, e_ok, rates).tolist(),
            "confidence": accuracy_at_rates(-rec["m_conf"], m_ok, e_ok, rates).tolist(),
            "random": ((1 - rates) * _acc(m_ok) + rates * _acc(e_ok)).tolist(),
        },
    }


def per_device(rec: dict[str, np.ndarray], legacy_meta: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Final per-device metrics (rows for ``clients.csv``), sorted by device id."""
    rows = []
    for dev in np.unique(rec["device"]):
        m = rec["device"] == dev
        y, d = rec["y"][m], rec["defer"][m].astype(bool)
        m_ok, e_ok = rec["m_pred"][m] == y, rec["e_pred"][m] == y
        rows.append({
            "device": int(dev), **legacy_meta.get(int(dev), {}),
            "num_test": int(m.sum()),
            "legacy_accuracy": _acc(m_ok),
            "server_accuracy": _acc(e_ok),
            "system_accuracy": _acc(system_correct(d, m_ok, e_ok)),
            "defer_rate": float(d.mean()),
        })
    return rows
