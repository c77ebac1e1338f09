"""Each method's configuration (``strategy.*``): one dataclass per method, registered by name.

Kept apart from the methods themselves (which need torch) so that a config error is reported in
well under a second. :func:`register_all` makes every class known to the config schema
(``strategy.name``) and to Hydra (``strategy/base_<schema_name>``, named in the YAMLs' defaults).
Adding a method: its class here, its name in :data:`CONFIGS` (docs/adding.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from sim.core.config import (STRATEGY_SCHEMAS, BoundedConfig, Choice, ServersConfig, StrategyConfig, check_fields,
                             choice, register_strategy)
from sim.core.errors import ConfigError


Weights = choice("Weights", ("shifted", "paper", "repo"))
Surrogate = choice("Surrogate", ("multiclass", "binary"))


@dataclass
class L2HConfig(BoundedConfig):
    """``strategy=l2h`` (and ``dml``, ``mel``, ``coop``: the same device side)."""

    weights: Weights = Weights.shifted  # shifted | paper | repo (docs/methods.md, L2H weights)
    # multiclass (Wu et al. 2025; Bayes-consistent for any K, 2 included) | binary (Wu & Sarwate 2024:
    # calibrated only where P(legacy wrong | x) = binary_p; refuses c_e >= binary_p)
    surrogate: Surrogate = Surrogate.multiclass
    binary_beta: float = 2.0
    binary_p: float = 0.18
    explore: float = 0.2  # fraction of kept samples also sent to the server

    schema_name: ClassVar[str] = "l2h"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, "strategy", {
            "explore": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "binary_beta": (lambda v: v > 0, "must be > 0"),
            "binary_p": (lambda v: 0 < v < 1, "must be in (0, 1)"),
        })

    def check_with(self, servers: ServersConfig) -> None:
        """The weights and the binary surrogate have one defer output: not for learned routing
        over several servers (and the checks every method has)."""
        super().check_with(servers)
        if servers.learned_options and self.weights != Weights.shifted:
            raise ConfigError(f"strategy.weights={self.weights} is defined for one defer output only: "
                              "use strategy.weights=shifted with servers.routing=learned and several servers")
        if servers.learned_options and self.surrogate == Surrogate.binary:
            raise ConfigError("strategy.surrogate=binary has one defer output: use servers.routing=round_robin, "
                              "least_loaded or all with several servers")

    def notes(self) -> list[str]:
        """``paper`` weights with ``c_e + c_1 > 1``: ``w1`` is negative where the server is wrong and
        the rejector loss is unbounded below (docs/methods.md §1)."""
        if self.weights == Weights.paper and self.c_e + self.c_1 > 1:
            return [f"strategy.weights=paper with c_e + c_1 = {self.c_e + self.c_1:g} > 1: w1 = 1 - c_e - c_1 is "
                    "negative where the server is wrong, so the rejector's loss is unbounded below (its logits "
                    "can grow without limit); strategy.weights=shifted is the bounded, Bayes-consistent form"]
        return []

    def check_data(self, num_classes: int) -> None:
        """The binary surrogate needs 2-class data and an alpha its formula can give (c_e < p < c_1 + c_e)."""
        if resolve_surrogate(self.surrogate, num_classes) == "binary":
            from strategies.l2h_losses import binary_alpha

            try:
                binary_alpha(float(self.c_e), float(self.c_1), float(self.binary_beta), float(self.binary_p))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def resolve_surrogate(name: Choice | str, num_classes: int) -> str:
    """The surrogate to train with: ``multiclass`` for any number of classes (the default, also for
    2 classes), ``binary`` only when asked for.

    Raises:
        ConfigError: ``binary`` on data with more than 2 classes.
    """
    if name == Surrogate.binary and num_classes != 2:
        raise ConfigError(f"strategy.surrogate=binary needs 2-class data, the dataset has {num_classes} classes")
    return str(name)


L2DLoss = choice("L2DLoss", ("ce", "ce_cost", "ova"))


@dataclass
class L2DOptions:
    loss: L2DLoss = L2DLoss.ce_cost  # ce (Mozannar-Sontag, alpha) | ce_cost (costs c_e, c_1) | ova (Verma-Nalisnick)
    alpha: float = 1.0  # ce: weight of the classifier term when the expert is right (1 = consistent)
    expert_epochs: int = 30  # pretraining of the fixed expert(s) on the held-out pool (cached)
    expert_lr: float = 0.001

    def __post_init__(self) -> None:
        check_fields(self, "strategy.l2d", {"alpha": (lambda v: v >= 0, "must be >= 0"),
                                            "expert_epochs": (lambda v: v >= 1, "must be >= 1"),
                                            "expert_lr": (lambda v: v > 0, "must be > 0")})


@dataclass
class L2DConfig(BoundedConfig):
    """``strategy=l2d``."""

    l2d: L2DOptions = field(default_factory=L2DOptions)

    schema_name: ClassVar[str] = "l2d"


@dataclass
class BaselineConfig(StrategyConfig):
    """``strategy=legacy_only | server_only | random | confidence | compare_confidence``."""

    explore: float = 0.2  # fraction of kept samples also sent, so the servers learn
    defer_rate: float = 0.3  # random / confidence: the fraction deferred (confidence: unless tau is set)
    tau: Optional[float] = None  # confidence: defer iff the legacy max-softmax < tau (null: fit to defer_rate)

    schema_name: ClassVar[str] = "baseline"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, "strategy", {
            "explore": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "defer_rate": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "tau": (lambda v: v is None or 0 <= v <= 1, "a max-softmax threshold must be in [0, 1] (or null)"),
        })

CONFIGS: dict[str, type[StrategyConfig]] = {
    "l2h": L2HConfig, "dml": L2HConfig, "mel": L2HConfig, "coop": L2HConfig,
    "l2d": L2DConfig,
    **{name: BaselineConfig for name in ("legacy_only", "server_only", "random", "confidence", "compare_confidence")},
}
"""``strategy.name`` -> its config class."""


def register_all() -> None:
    """Register every method's config class (idempotent)."""
    if STRATEGY_SCHEMAS.keys() >= CONFIGS.keys():
        return
    by_schema: dict[type[StrategyConfig], list[str]] = {}
    for name, cls in CONFIGS.items():
        by_schema.setdefault(cls, []).append(name)
    for cls, names in by_schema.items():
        register_strategy(tuple(names), cls)
