"""The methods' configurations (``strategy.*``): dataclasses that hold every knob's default.

A method's YAML (``configs/strategy/<name>.yaml``) names its class here by dotted path
(``- /schema@_here_: strategies.config.L2HConfig``, :mod:`sim.core.schemas`) and sets no knob of
its own: the defaults are the dataclass's (tests/test_methods.py). Kept apart from the methods
themselves (which need torch), so that a config error is reported before any method is imported.
Adding a method: docs/adding.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sim.core.config import (BoundedConfig, Choice, Federation, RejectorConfig, ServersConfig, StrategyConfig,
                             check_fields, choice)
from sim.core.errors import ConfigError


Weights = choice("Weights", ("shifted", "paper", "repo"))
Surrogate = choice("Surrogate", ("multiclass", "binary"))


@dataclass
class L2HConfig(BoundedConfig):
    """``strategy=l2h`` (and ``dml``, ``mel``, ``coop``: the same device side)."""

    # The devices of a fleet group train one rejector together (FedAvg, docs/methods.md §8): measured
    # lower L01 cost than local rejectors on digits (-0.018 +- 0.014) and MNIST-1D (-0.024 +- 0.011),
    # 5 seeds, paired (README "Findings"). strategy.rejector.federation=local: each device alone.
    rejector: RejectorConfig = field(default_factory=lambda: RejectorConfig(federation=Federation.fedavg))
    weights: Weights = Weights.shifted  # shifted | paper | repo (docs/methods.md, L2H weights)
    # multiclass (Wu et al. 2025; Bayes-consistent for any K, 2 included) | binary (Wu & Sarwate 2024:
    # calibrated only where P(legacy wrong | x) = binary_p; refuses c_e >= binary_p)
    surrogate: Surrogate = Surrogate.multiclass
    binary_beta: float = 2.0
    binary_p: float = 0.18
    explore: float = 0.2  # fraction of kept samples also sent to the server

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
                binary_alpha(self.c_e, self.c_1, self.binary_beta, self.binary_p)
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
    """``strategy.l2d``: L2D's surrogate loss and its fixed experts' pretraining."""

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
    """``strategy=l2d``: ``rejector`` is the device's classifier + deferral model (federated L2D with
    ``rejector.federation=fedavg``: devices of one architecture average their models)."""

    rejector: RejectorConfig = field(default_factory=lambda: RejectorConfig(lr=0.001))
    l2d: L2DOptions = field(default_factory=L2DOptions)


@dataclass
class BaselineConfig(StrategyConfig):
    """``strategy=legacy_only | server_only | random | confidence | compare_confidence``."""

    explore: float = 0.2  # fraction of kept samples also sent, so the servers learn
    defer_rate: float = 0.3  # random / confidence: the fraction deferred (confidence: unless tau is set)
    tau: Optional[float] = None  # confidence: defer iff the legacy max-softmax < tau (null: fit to defer_rate)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, "strategy", {
            "explore": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "defer_rate": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
            "tau": (lambda v: v is None or 0 <= v <= 1, "a max-softmax threshold must be in [0, 1] (or null)"),
        })
