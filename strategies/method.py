"""What a method does on a device: the :class:`DeviceMethod` every method implements.

A Flower node calls the method ``strategy.device`` names once per round for each of its sampled
devices: :meth:`DeviceMethod.train` on the device's rejector split (it decides what to send to
the helper servers and trains the device's own part: a rejector, an estimator, an L2D model),
and :meth:`DeviceMethod.evaluate` on its test split (it decides what to defer; the server pool
answers the deferred samples). The device's trained part ("learner") is kept by the node between
rounds and handed in through the :class:`RoundContext`.

Adding a method: one class and one YAML that names it (``strategy.device``), docs/adding.md (the
smallest example is :class:`strategies.baselines.RandomDeferral`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from torch import nn

from clients.device import Device
from servers.view import PoolView
from sim.core.config import ServersConfig, StrategyConfig


@dataclass
class RoundContext:
    """One device's round, as its method sees it.

    Attributes:
        device: the device (its data splits, frozen legacy model and its outputs).
        learner: the device's trained part from earlier rounds (None: none yet, or the method has
            none).
        reachable: the helper servers the device can reach this round (up, not cut off).
        round: the round (1-based), in training and in evaluation (evaluation seeds its draws with
            round 0 itself: a device's test decisions do not depend on when it is evaluated).
        view: the servers' networks as received this round (training only; None in evaluation).
    """

    device: Device
    learner: nn.Module | None
    reachable: list[int]
    round: int
    view: PoolView | None = None

    def reachable_in_view(self) -> list[int]:
        """The reachable servers whose networks the device received."""
        present = self.view.present if self.view is not None else []
        return [s for s in self.reachable if s in present]


@dataclass
class TrainResult:
    """What a device's training round decided, per sample of its rejector split (``N`` samples).

    Attributes:
        defer: ``(N,)`` bool, the samples it now defers (sent to the servers, which learn from them).
        route: ``(N,)`` int64, the server a learned rejector chose (-1: none; the pool routes).
        explore: ``(N,)`` bool, kept samples also sent, so a cold server has something to learn.
        metrics: ``rejector_loss``, ``train_defer_rate``, ``train_legacy_error``,
            ``train_server_error`` (floats; NaN where not defined).
    """

    defer: np.ndarray
    route: np.ndarray
    explore: np.ndarray
    metrics: dict[str, float]


@dataclass
class EvalResult:
    """What a device decided on its test split, per sample (``N`` test samples); built by
    :func:`strategies.records.test_record`.

    Attributes:
        y: ``(N,)`` int64, the labels.
        m_pred: ``(N,)`` int64, the local (legacy) model's prediction.
        score: ``(N,)`` float32, the deferral score (higher = deferred first).
        m_conf: ``(N,)`` float32, the local model's max softmax.
        m_conf_cal: ``(N,)`` float32, its calibrated max softmax.
        defer: ``(N,)`` bool, the samples it defers (the server pool answers them).
        route: ``(N,)`` int64, the server a learned rejector chose (-1: none; the pool routes).
        x: ``(N, C, H, W)`` the samples as the device sensed them (what the pool answers).
    """

    y: np.ndarray
    m_pred: np.ndarray
    score: np.ndarray
    m_conf: np.ndarray
    m_conf_cal: np.ndarray
    defer: np.ndarray
    route: np.ndarray
    x: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        """The per-sample columns a node's reply carries for the device (the one place they are
        named: :data:`strategies.base.DEVICE_FIELDS` less ``device``, plus ``x``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class DeviceMethod(ABC):
    """The device side of a method (one instance per worker process and run).

    Args:
        cfg: the method's ``strategy`` config (its own subclass of StrategyConfig).
        servers: the ``servers`` config. seed: the run seed. num_classes: K.
    """

    learns_from_labels: ClassVar[bool] = False
    """True for a method that learns from the servers' answers on its split (``strategy.server_labels``
    applies; with ``crossfit`` the pool trains fold copies of the servers for it)."""

    def __init__(self, cfg: StrategyConfig, servers: ServersConfig, seed: int, num_classes: int):
        self.cfg, self.servers, self.seed, self.num_classes = cfg, servers, seed, num_classes
        self.prices = servers.prices(cfg.c_e)  # per-server deferral prices, resolved once here

    def new_learner(self, device: Device) -> nn.Module | None:
        """A freshly initialised trained part for ``device`` (None: the method trains nothing)."""
        return None

    @abstractmethod
    def train(self, ctx: RoundContext) -> TrainResult:
        """One training round on the device's rejector split (trains ``ctx.learner`` in place)."""

    @abstractmethod
    def evaluate(self, ctx: RoundContext) -> EvalResult:
        """The device's decisions on its test split (:func:`strategies.records.test_record`)."""
