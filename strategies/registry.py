"""Which module implements each strategy's device side and which class its ServerApp side.

A strategy's device module provides ``new_learner(device, spec)``, ``load_learner(device, spec,
state)`` (the device's trained part: a rejector, an estimator, the L2D model; None for rules with
nothing to learn), ``client_train(...)`` and ``client_evaluate(...)`` with the signatures of
:mod:`strategies.l2h`.
"""
from __future__ import annotations

from types import ModuleType


def device_side(name: str) -> ModuleType:
    """The device-side module of ``strategy.name``. Raises ValueError for an unknown name."""
    from strategies import baselines, l2d, l2h

    if name in ("l2h", "dml", "mel", "coop"):
        return l2h
    if name == "l2d":
        return l2d
    if name in ("legacy_only", "server_only", "random", "confidence", "compare_confidence"):
        return baselines
    raise ValueError(f"unknown strategy {name!r}")


def server_side(name: str) -> type:
    """The ServerApp strategy class of ``strategy.name``."""
    from strategies.l2d import L2DStrategy
    from strategies.l2h import L2HStrategy

    return L2DStrategy if name == "l2d" else L2HStrategy
