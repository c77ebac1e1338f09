"""Bounded reject rate: defer at most a fraction delta of the samples (L2H scenario 3).

Source: Wu et al., ICLR 2025 (arXiv 2501.13810), the "bounded reject rate" scenario; the post-hoc
rules are those of the authors' public code (docs/methods.md, "Bounded reject rate"). Two methods, chosen with
``strategy.bound`` and applied after the rejector is trained (``strategy.max_defer_rate = delta``):

- ``quantile``: on a calibration split held out of the device's rejector split
  (``strategy.calibration``), ``t`` = the ``1 - delta`` quantile of the deferral score; a sample
  is deferred iff the rejector defers it **and** its score exceeds ``t``. At most a fraction delta
  of the calibration samples pass, so the test rate exceeds delta only by sampling noise.
- ``stochastic``: ``rho`` = the rejector's defer rate on the calibration split. If ``rho > delta``
  each deferral is kept with probability ``delta / rho``; otherwise each local decision is flipped
  to defer with probability ``(delta - rho) / (1 - rho)`` (the authors' code fills the budget).
  The expected rate is delta whenever the test rate matches the calibration rate.

The fitted ``(t, rho)`` live in the rejector's ``bound`` buffer, so they travel with its state.
"""
from __future__ import annotations

import numpy as np
import torch

from sim.core.config import Bound, BoundedConfig, Federation
from sim.core.seeding import derive_seed


def calibration_mask(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` bool: a seeded ``fraction`` of the samples (at least one, and never all of them when n > 1)."""
    k = int(round(fraction * n))
    k = min(max(k, 1), max(n - 1, 1))
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:k]] = True
    return mask


def fit(score_cal: np.ndarray, defer_cal: np.ndarray, delta: float) -> tuple[float, float]:
    """``(t, rho)`` from calibration scores ``(M,)`` and the rejector's decisions ``(M,)`` bool.

    ``t`` is the smallest score such that at most ``floor(delta * M)`` calibration samples score above
    it (so ``score > t`` defers at most a fraction delta of them).
    """
    m = len(score_cal)
    if m == 0:
        return float("inf"), 0.0
    k = int(np.floor(delta * m + 1e-9))
    s = np.sort(np.asarray(score_cal, dtype=np.float64))[::-1]
    t = float(s[k]) if k < m else float("-inf")
    return t, float(np.mean(defer_cal))


def apply(score: np.ndarray, defer: np.ndarray, bound: torch.Tensor, cfg: BoundedConfig, rng: np.random.Generator
          ) -> np.ndarray:
    """The bounded decisions ``(N,)`` bool from the rejector's ``score (N,)`` and ``defer (N,)``.

    Args:
        bound: the rejector's ``(2,)`` buffer ``[t, rho]`` (NaN: never fitted -> no bound applied).
        cfg: the method's config (``max_defer_rate``, ``bound``). rng: seeded per device/round.
    """
    delta = cfg.max_defer_rate
    t, rho = float(bound[0]), float(bound[1])
    if delta is None or not np.isfinite(rho):
        return defer
    if cfg.bound == Bound.quantile:
        return defer & (score > t)
    u = rng.random(len(defer))
    if rho > delta:
        return defer & (u < delta / rho)
    fill = (delta - rho) / (1.0 - rho) if rho < 1 else 0.0
    return defer | (u < fill)


def refit_before_evaluation(cfg: BoundedConfig) -> bool:
    """True when a device evaluates with a model other than the one its bound was fitted on: with
    ``strategy.rejector.federation=fedavg`` it trains (and fits ``(t, rho)`` on) its own model, then
    evaluates with its group's FedAvg average, whose scores a threshold fitted on the local model
    does not bound (measured: the quantile rule deferred 0.19 of test samples at delta = 0.05). The
    bound is then fitted again, on the same calibration split, with the model that decides."""
    rejector = getattr(cfg, "rejector", None)
    return cfg.max_defer_rate is not None and getattr(rejector, "federation", None) == Federation.fedavg


def calibration_split(cfg: BoundedConfig, n: int, seed: int, device_id: int, server_round: int) -> np.ndarray:
    """``(n,)`` bool: the calibration samples held out of the rejector split when a reject-rate
    bound is set (``strategy.max_defer_rate``), else all False."""
    if cfg.max_defer_rate is None or n < 2:
        return np.zeros(n, dtype=bool)
    rng = np.random.default_rng(derive_seed(seed, "calibration", device_id, server_round))
    return calibration_mask(n, cfg.calibration, rng)
