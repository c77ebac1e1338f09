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

from sim.core.seeding import mix64

FIELDS = ("device", "y", "m_pred", "e_pred", "score", "m_conf", "defer")
"""Per-sample fields every record has (``m_conf_cal``, ``served`` and ``price`` are optional)."""


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


def tie_keys(device: np.ndarray) -> np.ndarray:
    """``(N,)`` float64 in [0, 1): a pseudo-random key per sample that breaks ties in any ranking.

    The key of a sample is a hash (splitmix64) of its device id and its position among that
    device's rows, so it depends on which sample it is, never on where the device's rows sit in
    the pooled arrays: the same samples in another device order get the same keys, and a ranking
    with ties (a float32 max-softmax of exactly 1.0, an untrained device's score 0) breaks them as
    a seeded random draw would, not by device order."""
    device = np.asarray(device, dtype=np.int64)
    if not len(device):
        return np.zeros(0)
    order = np.argsort(device, kind="stable")
    d = device[order]
    start = np.r_[0, np.flatnonzero(np.diff(d)) + 1]
    pos = np.arange(len(d)) - np.repeat(start, np.diff(np.r_[start, len(d)]))
    z = np.empty(len(d), dtype=np.uint64)
    z[order] = (d.astype(np.uint64) << np.uint64(32)) ^ pos.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = mix64(z + np.uint64(0x9E3779B97F4A7C15))
    return (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def ranking(priority: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices ``(N,)`` from highest ``priority`` to lowest, ties broken by :func:`tie_keys`."""
    return np.lexsort((keys, -np.asarray(priority, dtype=np.float64)))


def topk_defer(priority: np.ndarray, k: int, keys: np.ndarray) -> np.ndarray:
    """Boolean mask deferring the ``k`` samples of highest ``priority`` (ties: :func:`tie_keys`)."""
    mask = np.zeros(len(priority), dtype=bool)
    if k > 0:
        mask[ranking(priority, keys)[:k]] = True
    return mask


def per_device_topk(priority: np.ndarray, device: np.ndarray, counts: dict[int, int], keys: np.ndarray) -> np.ndarray:
    """Boolean mask deferring, on each device ``d``, its ``counts[d]`` samples of highest ``priority``."""
    mask = np.zeros(len(priority), dtype=bool)
    for dev, kd in counts.items():
        idx = np.flatnonzero(device == dev)
        mask[idx[topk_defer(priority[idx], kd, keys[idx])]] = True
    return mask


def device_counts(defer: np.ndarray, device: np.ndarray) -> dict[int, int]:
    """Deferrals per device: ``{device: count}`` over every device present."""
    return {int(d): int(defer[device == d].sum()) for d in np.unique(device)}


def confidence_baselines(rec: dict[str, np.ndarray], defer: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray,
                         keys: np.ndarray) -> dict[str, float]:
    """System accuracy of confidence deferral with exactly as many deferrals as ``defer (N,)`` makes
    (docs/methods.md §4), in three forms: ``confidence`` (one global threshold on the legacy max
    softmax), ``confidence_per_device`` (each device defers as many as ``defer`` does on it: the
    allocation is the method's, only the ranking within a device differs) and
    ``confidence_calibrated`` (one global threshold on the max softmax after each group's
    temperature scaling, ``m_conf_cal``). Ties: :func:`tie_keys`."""
    k = int(defer.sum())
    conf = {"confidence": topk_defer(-rec["m_conf"], k, keys),
            "confidence_per_device": per_device_topk(-rec["m_conf"], rec["device"], device_counts(defer, rec["device"]),
                                                     keys)}
    if "m_conf_cal" in rec:
        conf["confidence_calibrated"] = topk_defer(-rec["m_conf_cal"], k, keys)
    return {name: _acc(system_correct(mask, m_ok, e_ok)) for name, mask in conf.items()}


def accuracy_at_rates(priority: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray, rates: np.ndarray,
                      keys: np.ndarray) -> np.ndarray:
    """System accuracy when deferring the top ``round(rate*N)`` samples by ``priority`` (ties:
    :func:`tie_keys`), per rate. ``(R,)``."""
    n = len(priority)
    order = ranking(priority, keys)
    # gain of deferring sample i = e_ok - m_ok; cumulative over the priority order
    gain = np.concatenate([[0.0], np.cumsum((e_ok[order].astype(float) - m_ok[order]))])
    ks = np.clip(np.round(rates * n).astype(int), 0, n)
    return (m_ok.sum() + gain[ks]) / max(n, 1)


OPERATING_RATES = (0.1, 0.2, 0.3, 0.5)
"""The grid of defer rates at which every run compares its ranking with the baselines'
(:func:`operating_points`), whatever its own operating point."""


def operating_points(rec: dict[str, np.ndarray], m_ok: np.ndarray, e_ok: np.ndarray, keys: np.ndarray,
                     rates: tuple[float, ...] = OPERATING_RATES) -> dict[str, dict[str, float]]:
    """Comparisons at matched operating points: at each defer rate ``r`` of ``rates``, the system
    accuracy when the run's own deferral score defers its top ``k = round(r N)`` samples
    (``method``: a point of its score-ranking curve), against the confidence baselines with the
    same deferrals (:func:`confidence_baselines`: global, per device with the method's per-device
    counts at that rate, calibrated) and random deferral's exact expectation.

    Returns:
        ``{"0.1": {"method": ..., "confidence": ..., "confidence_per_device": ...,
        "confidence_calibrated": ..., "random": ...}, ...}`` (NaN when N = 0).
    """
    n = len(m_ok)
    out = {}
    for r in rates:
        k = int(round(r * n))
        defer = topk_defer(rec["score"], k, keys)
        out[f"{r:.1f}"] = {"method": _acc(system_correct(defer, m_ok, e_ok)),
                           **confidence_baselines(rec, defer, m_ok, e_ok, keys),
                           "random": float(((1 - k / max(n, 1)) * m_ok + k / max(n, 1) * e_ok).mean()) if n
                           else float("nan")}
    return out


FIXED_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def aurc(score: np.ndarray, m_ok: np.ndarray, keys: np.ndarray | None = None) -> dict[str, float]:
    """Area under the risk-coverage curve of the local model, ranked by the deferral score.

    Definition used (the discrete form of Geifman, Uziel & El-Yaniv 2019, "Bias-reduced uncertainty
    estimation for deep neural classifiers", ICLR, section 3): sort the N samples by the deferral
    score, lowest first (kept first); for every coverage k/N, k = 1..N, the selective risk is the
    local model's error rate on the k kept samples; ``AURC = (1/N) * sum_k risk(k)``.
    ``E-AURC = AURC - AURC*``, with AURC* that of the ideal ranking (every sample the local model
    gets right kept before any it gets wrong), so E-AURC is 0 for a perfect ranking and does not
    depend on the local model's accuracy. Ties in the score are broken by ``keys`` (:func:`tie_keys`;
    None: by sample order). Lower is better for both. The local model is the legacy model (L2D: the device's trained classifier).

    Args:
        score: ``(N,)`` deferral score (higher = deferred first). m_ok: ``(N,)`` bool, local model right.
        keys: ``(N,)`` tie-breaking keys (lower first among equal scores).

    Returns:
        ``{"aurc": float, "e_aurc": float}`` (NaN when N = 0).
    """
    n = len(score)
    if n == 0:
        return {"aurc": float("nan"), "e_aurc": float("nan")}
    order = np.argsort(score, kind="stable") if keys is None else ranking(-np.asarray(score, np.float64), keys)
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


def matched_baselines(rec: dict[str, np.ndarray], defer: np.ndarray, m_ok: np.ndarray, e_ok: np.ndarray,
                      keys: np.ndarray) -> dict[str, dict[str, float]]:
    """Confidence (:func:`confidence_baselines`: global threshold, per device, calibrated) and random
    deferral at the rejector's own defer rate ("matched", docs/methods.md §4)."""
    n, k = len(defer), int(defer.sum())
    rate = k / n if n else float("nan")
    # Random deferral at the same rate, in expectation over which k samples are drawn: exact, no noise.
    random_acc = float(((1 - rate) * m_ok + rate * e_ok).mean()) if n else float("nan")
    out = {name: {"system_accuracy": acc, "defer_rate": rate}
           for name, acc in confidence_baselines(rec, defer, m_ok, e_ok, keys).items()}
    out["random"] = {"system_accuracy": random_acc, "defer_rate": rate}
    return out


def oracle_references(m_ok: np.ndarray, e_ok: np.ndarray, defer: np.ndarray, any_right: np.ndarray | None
                      ) -> dict[str, float]:
    """How much a deferral rule could get at the run's own operating point (the headroom a learned
    rejector leaves). With ``k`` deferrals of ``N``:

    - ``at_defer_rate``: the best system accuracy with at most ``k`` deferrals and the answers the
      run's routing gives, ``(sum m_ok + min(k, #(m wrong and e right))) / N``: defer exactly where
      the answer is right and the legacy model wrong, within the budget;
    - with ``any_right (N,)`` (several servers: some reachable server is right), ``routing``: the
      run's own deferrals, each sent to a server that answers it right when there is one, and
      ``routing_at_defer_rate``: both at once.

    Returns:
        ``{"at_defer_rate", ["routing", "routing_at_defer_rate"]}`` (NaN when N = 0).
    """
    n, k = len(m_ok), int(defer.sum())
    if not n:
        return {"at_defer_rate": float("nan")}
    out = {"at_defer_rate": float((m_ok.sum() + min(k, int((~m_ok & e_ok).sum()))) / n)}
    if any_right is not None:
        out["routing"] = _acc(np.where(defer, any_right, m_ok))
        out["routing_at_defer_rate"] = float((m_ok.sum() + min(k, int((~m_ok & any_right).sum()))) / n)
    return out


def by_class(y: np.ndarray, defer: np.ndarray, m_ok: np.ndarray, sys_ok: np.ndarray) -> dict[str, list]:
    """Per true class ``c = 0..max(y)``: test samples ``n``, the share deferred, the legacy model's and
    the system's accuracy (None for a class with no sample). Where help is uneven across classes (a
    server that knows only some), this says where the deferrals went."""
    k = int(y.max()) + 1 if len(y) else 0
    out: dict[str, list] = {"n": [], "defer_rate": [], "legacy_accuracy": [], "system_accuracy": []}
    for c in range(k):
        m = y == c
        out["n"].append(int(m.sum()))
        for key, v in (("defer_rate", defer), ("legacy_accuracy", m_ok), ("system_accuracy", sys_ok)):
            out[key].append(float(v[m].mean()) if m.any() else None)
    return out


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
        ``legacy_accuracy``, ``server_accuracy``, ``oracle_accuracy`` (correct if either model is),
        ``oracle`` (the best at the run's own defer rate, :func:`oracle_references`), ``num_samples``,
        ``accuracy_at_defer_rate`` (system accuracy when the top 10%, ..., 90% of the deferral
        score are deferred), ``aurc`` and ``e_aurc`` (:func:`aurc`),
        ``baselines`` (``confidence`` global threshold, ``confidence_per_device``,
        ``confidence_calibrated``, ``random`` expectation -- all at the same defer rate as the
        rejector), ``operating_points`` (the same comparisons at fixed defer rates,
        :func:`operating_points`), ``table`` (kept/deferred,
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
    keys = tie_keys(rec["device"])
    fixed = accuracy_at_rates(rec["score"], m_ok, e_ok, np.array(FIXED_RATES), keys)
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
        "oracle": oracle_references(m_ok, e_ok, defer, rec["any_right"].astype(bool) if "any_right" in rec else None),
        "baselines": matched_baselines(rec, defer, m_ok, e_ok, keys),
        "operating_points": operating_points(rec, m_ok, e_ok, keys),
        "table": {"kept": subset(~defer), "deferred": subset(defer)},
        "by_class": by_class(y, defer, m_ok, sys_ok),
        "accuracy_at_defer_rate": {f"{r:.1f}": float(a) for r, a in zip(FIXED_RATES, fixed)},
        **aurc(rec["score"], m_ok, keys),
        "curves": {
            "defer_rate": rates.tolist(),
            "rejector": accuracy_at_rates(rec["score"], m_ok, e_ok, rates, keys).tolist(),
            "confidence": accuracy_at_rates(-rec["m_conf"], m_ok, e_ok, rates, keys).tolist(),
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
