"""Every method by name: its device side, its ServerApp side and its config class.

``strategy=<name>`` picks one. ``dml``, ``mel`` and ``coop`` are L2H with mutually learning helper
servers (their YAMLs also set ``servers.training`` and ``servers.count``). Adding a method is one
module in strategies/, its config class in :mod:`strategies.config`, one YAML in configs/strategy/
and one line here (docs/adding.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from sim.core.config import StrategyConfig
from strategies.baselines import CompareConfidence, Confidence, LegacyOnly, RandomDeferral, ServerOnly
from strategies.config import CONFIGS, BaselineConfig, L2DConfig, L2HConfig
from strategies.l2d import L2DMethod, L2DStrategy
from strategies.l2h import L2HMethod, L2HStrategy
from strategies.method import DeviceMethod
from strategies.pool_strategy import PoolStrategy


@dataclass(frozen=True)
class Method:
    """A method's parts: ``device`` (runs on every device), ``server`` (the ServerApp strategy),
    ``config`` (its ``strategy`` config class)."""

    device: type[DeviceMethod]
    server: type[PoolStrategy]
    config: type[StrategyConfig]


METHODS: dict[str, Method] = {
    "l2h": Method(L2HMethod, L2HStrategy, L2HConfig),
    "dml": Method(L2HMethod, L2HStrategy, L2HConfig),
    "mel": Method(L2HMethod, L2HStrategy, L2HConfig),
    "coop": Method(L2HMethod, L2HStrategy, L2HConfig),
    "l2d": Method(L2DMethod, L2DStrategy, L2DConfig),
    "legacy_only": Method(LegacyOnly, L2HStrategy, BaselineConfig),
    "server_only": Method(ServerOnly, L2HStrategy, BaselineConfig),
    "random": Method(RandomDeferral, L2HStrategy, BaselineConfig),
    "confidence": Method(Confidence, L2HStrategy, BaselineConfig),
    "compare_confidence": Method(CompareConfidence, L2HStrategy, BaselineConfig),
}


def method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        KeyError: an unknown name (the config schema refuses it first: ``strategy.name``).
    """
    return METHODS[name]

assert METHODS.keys() == CONFIGS.keys(), "strategies.config.CONFIGS and METHODS name the same methods"
