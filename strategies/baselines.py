"""Baselines every comparison should carry (docs/methods.md, "Baselines"), as methods of their own.

The helper servers are the same trained pool as in L2H (:class:`strategies.l2h.L2HStrategy`: they
learn from the samples sent to them, plus the exploration fraction); only the device's deferral
rule differs:

- :class:`LegacyOnly`: never defer (defer rate 0): the legacy model alone.
- :class:`ServerOnly`: always defer (defer rate 1): the helper servers alone.
- :class:`RandomDeferral`: defer each sample independently with probability ``strategy.defer_rate``.
- :class:`Confidence`: defer iff the legacy model's max softmax is below ``tau``; ``tau`` is
  ``strategy.tau``, or (null) fitted per device as the ``defer_rate`` quantile of the legacy
  confidence on its rejector split, so about ``defer_rate`` of its samples are deferred.
- :class:`CompareConfidence` (Raghu, Blumer, Corrado, Kleinberg, Obermeyer, Mullainathan 2019,
  "The algorithmic automation problem", arXiv 1903.12220): each device learns
  ``P(server correct | x)`` (a small MLP on the rejector features, binary cross-entropy against
  whether the servers' answer was right on its rejector split) and defers iff that estimate
  exceeds the legacy max softmax.

Each run's summary also carries the confidence and random baselines at the learned rejector's
own defer rate (:mod:`sim.core.metrics`), i.e. "matched".

Deferral scores (for the accuracy-coverage curve; higher = deferred first): ``1 - m_conf`` for
legacy_only, server_only and confidence; the random draw for random;
``P_hat(server correct) - m_conf`` for compare_confidence.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clients.device import Device, Rejector
from sim.core.seeding import derive_seed
from sim.core.training import train_minibatch
from sim.core.config import ServersConfig
from strategies.config import BaselineConfig
from strategies.labels import LabelSource, ServerAnswers, answer_memory, current_answers
from strategies.method import DeviceMethod, EvalResult, RoundContext, TrainResult
from strategies.records import no_route, test_record, train_metrics


class Baseline(DeviceMethod):
    """A fixed deferral rule; subclasses give :meth:`rule`. The servers' error on the rejector split
    is measured (reported as ``train_server_error``) whenever a server is reachable."""

    cfg: BaselineConfig

    def __init__(self, cfg: BaselineConfig, servers: ServersConfig, seed: int, num_classes: int):
        super().__init__(cfg, servers, seed, num_classes)
        self.labels = LabelSource(cfg, seed)

    def rule(self, device: Device, learner: nn.Module | None, split: str, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
        """``defer (N,)`` bool and deferral ``score (N,)`` on ``split`` (``rejector`` | ``test``)."""
        raise NotImplementedError

    def learn(self, ctx: RoundContext, now: ServerAnswers, out_of_fold: ServerAnswers | None) -> float:
        """Train the device's learner from the servers' answers ``now`` (and, with ``crossfit``
        labels, ``out_of_fold``: :meth:`strategies.labels.LabelSource.answers`) (CompareConfidence);
        returns its loss."""
        return float("nan")

    def train(self, ctx: RoundContext) -> TrainResult:
        device = ctx.device
        y = torch.from_numpy(device.data.y_rejector)
        reach = ctx.reachable_in_view()
        loss, e_err, now = float("nan"), float("nan"), None
        if reach and (ctx.learner is not None or not isinstance(self, LegacyOnly)):
            x = torch.from_numpy(device.data.x_rejector)
            if self.learns_from_labels:
                now, out_of_fold = self.labels.answers(ctx.view, x, y, device.data.ids_rejector, reach, self.servers)
            else:
                now, out_of_fold = current_answers(ctx.view, x, y, reach, self.servers), None
            e_err = float(now.pool_wrong.mean())
            loss = self.learn(ctx, now, out_of_fold)
        rng = np.random.default_rng(derive_seed(self.seed, "baseline", self.cfg.name, device.device_id, ctx.round))
        defer, _ = self.rule(device, ctx.learner, "rejector", rng)
        defer &= bool(reach)
        sendable = ~self.labels.held_out(len(defer), device.device_id) if self.learns_from_labels \
            else np.ones(len(defer), dtype=bool)
        explore = (~defer) & (rng.random(len(defer)) < self.cfg.explore) & bool(reach) & sendable
        defer &= sendable
        if now is not None and self.learns_from_labels:
            self.labels.record(ctx.learner, defer | explore, now, ctx.round)
        m_wrong = (device.legacy_rejector.argmax(1) != y).float()
        return TrainResult(defer, no_route(len(defer)), explore, train_metrics(loss, defer, m_wrong, e_err))

    @torch.no_grad()
    def evaluate(self, ctx: RoundContext) -> EvalResult:
        rng = np.random.default_rng(derive_seed(self.seed, "baseline-test", self.cfg.name, ctx.device.device_id))
        defer, score = self.rule(ctx.device, ctx.learner, "test", rng)
        defer &= bool(ctx.reachable)
        return test_record(ctx.device, torch.softmax(ctx.device.legacy_test, 1), score, defer, no_route(len(defer)))


def legacy_confidence(device: Device, split: str) -> np.ndarray:
    """The legacy model's max softmax ``(N,)`` on ``split``."""
    return torch.softmax(getattr(device, f"legacy_{split}"), 1).max(1).values.numpy()


class LegacyOnly(Baseline):
    """Never defer."""

    def rule(self, device, learner, split, rng):
        m_conf = legacy_confidence(device, split)
        return np.zeros(len(m_conf), dtype=bool), 1.0 - m_conf


class ServerOnly(Baseline):
    """Always defer."""

    def rule(self, device, learner, split, rng):
        m_conf = legacy_confidence(device, split)
        return np.ones(len(m_conf), dtype=bool), 1.0 - m_conf


class RandomDeferral(Baseline):
    """Defer each sample with probability ``strategy.defer_rate`` (the smallest method: docs/adding.md)."""

    def rule(self, device, learner, split, rng):
        u = rng.random(len(getattr(device.data, f"y_{split}")))
        return u < self.cfg.defer_rate, u


def confidence_tau(device: Device, cfg: BaselineConfig) -> float:
    """The confidence threshold: ``strategy.tau``, or the ``defer_rate`` quantile of the legacy max
    softmax on the device's rejector split (the legacy model is frozen: the same every round)."""
    if cfg.tau is not None:
        return cfg.tau
    conf = legacy_confidence(device, "rejector")
    return float(np.quantile(conf, cfg.defer_rate)) if len(conf) else 0.0


class Confidence(Baseline):
    """Defer iff the legacy max softmax is below tau."""

    def rule(self, device, learner, split, rng):
        m_conf = legacy_confidence(device, split)
        return m_conf < confidence_tau(device, self.cfg), 1.0 - m_conf


class CompareConfidence(Baseline):
    """Defer iff the learned estimate of P(server correct | x) exceeds the legacy max softmax."""

    learns_from_labels = True

    def new_learner(self, device: Device) -> Rejector:
        """The device's estimator of P(server correct): one logit, seeded per device (with the
        answer memory of prequential labels)."""
        rh = self.cfg.rejector
        memory = answer_memory(self.cfg, len(device.data.y_rejector), self.servers.count, self.num_classes)
        return device.new_rejector(rh.inputs, rh.hidden, self.seed, outputs=1, memory=memory)

    def learn(self, ctx: RoundContext, now: ServerAnswers, out_of_fold: ServerAnswers | None) -> float:
        """Binary cross-entropy of the estimator against ``1 - e_wrong`` on the labelled rows."""
        rh, learner = self.cfg.rejector, ctx.learner
        rows, answers = self.labels.labels(learner, now, ctx.device.device_id, ctx.round, out_of_fold)
        use = torch.from_numpy(rows)
        feats = ctx.device.features("rejector", rh.inputs)
        learner.train()
        return train_minibatch(
            learner.parameters(), (feats[use], 1.0 - answers.pool_wrong[use]),
            lambda f, t: F.binary_cross_entropy_with_logits(learner(f)[:, 0], t),
            epochs=rh.epochs, batch_size=rh.batch_size, lr=rh.lr,
            seed=derive_seed(self.seed, "compare-confidence", ctx.device.device_id, ctx.round))

    @torch.no_grad()
    def rule(self, device, learner, split, rng):
        m_conf = legacy_confidence(device, split)
        if learner is None:  # never trained: nothing known about the servers, keep local
            return np.zeros(len(m_conf), dtype=bool), -m_conf
        learner.eval()
        p_server = torch.sigmoid(learner(device.features(split, self.cfg.rejector.inputs))[:, 0]).numpy()
        score = p_server - m_conf
        return score > 0, score
