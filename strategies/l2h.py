"""Learning to Help (L2H): fixed legacy client, trained helper server(s) and a per-device rejector.

Source: Wu, Li, Dong, Sathyavageeswaran, Sarwate, "Learning to Help in Multi-Class Settings",
ICLR 2025 (arXiv 2501.13810); binary case: Wu & Sarwate 2024 (arXiv 2409.16253). The losses are
in :mod:`strategies.l2h_losses`; docs/methods.md gives every formula with its source.

- :class:`strategies.config.L2HConfig`: the method's knobs (``strategy.*``).
- :class:`L2HMethod`: the device side. Each round it computes the legacy model's and each
  routing option's errors on its rejector split, trains the rejector with the stage-switching
  surrogate (with ``servers.routing=learned`` and several servers: one defer output per server
  and per-server prices), and sends the samples it now defers (with the server it chose) plus an
  exploration fraction of those it keeps.
- :class:`L2HStrategy`: the ServerApp side. The pool routes what the devices sent and trains
  the servers (cross-entropy, the server half of the surrogate, or MEL / DML / coop). The
  baselines (:mod:`strategies.baselines`) use it too: only their device-side rule differs.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from clients.device import Device, Rejector
from sim.core.config import Routing, ServersConfig
from sim.core.seeding import derive_seed
from sim.core.training import train_minibatch
from strategies import bounded
from strategies.base import DeviceReplies
from strategies.config import L2HConfig, resolve_surrogate
from strategies.labels import LabelSource, ServerAnswers, answer_memory
from strategies.l2h_losses import (binary_alpha, binary_rejector_loss, l2h_weights, masked_decision,
                                   multi_server_rejector_loss, multiclass_rejector_loss)
from strategies.method import DeviceMethod, EvalResult, RoundContext, TrainResult
from strategies.pool_strategy import PoolStrategy
from strategies.records import test_record, train_metrics

def num_options(servers: ServersConfig) -> int:
    """Rejector outputs: ``1 + S`` for learned routing over S > 1 servers, else 2 (local, defer)."""
    return 1 + servers.count if servers.learned_options else 2


def availability_mask(servers: ServersConfig, reachable: list[int]) -> torch.Tensor:
    """Which rejector options are available: ``(num_options,)`` bool, option 0 (local) always."""
    n = num_options(servers)
    if n == 2:
        return torch.tensor([True, bool(reachable)])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[0] = True
    mask[[1 + s for s in reachable]] = True
    return mask


@torch.no_grad()
def decide(logits: torch.Tensor, avail: torch.Tensor, servers: ServersConfig
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masked decisions from the rejector's logits ``(N, 1+S)`` (one forward pass serves all three):
    ``defer (N,)`` bool, ``route (N,)`` (learned routing: the best available server by the logits,
    whether or not the sample is deferred; -1 otherwise) and the deferral score ``(N,)`` float32,
    ``1 - psi_local`` over the available options (:func:`masked_decision`)."""
    choice, score = masked_decision(logits, avail)
    defer = (choice > 0).numpy()
    route = np.full(len(logits), -1, dtype=np.int64)
    if num_options(servers) > 2 and bool(avail[1:].any()):
        server_logits = logits[:, 1:].masked_fill(~avail[1:], float("-inf"))
        route = server_logits.argmax(1).numpy().astype(np.int64)
    elif servers.resolved_routing == Routing.learned and bool(avail[1]):
        route = np.zeros(len(logits), dtype=np.int64)
    return defer, route, score.numpy()


class L2HMethod(DeviceMethod):
    """The L2H device side: a rejector trained against the servers' (possibly stale) answers."""

    cfg: L2HConfig
    learns_from_labels = True

    def __init__(self, cfg: L2HConfig, servers: ServersConfig, seed: int, num_classes: int):
        super().__init__(cfg, servers, seed, num_classes)
        self.labels = LabelSource(cfg, seed)

    def new_learner(self, device: Device) -> Rejector:
        """A new rejector for ``device``: ``num_options`` outputs, seeded per device (with the answer
        memory of prequential labels)."""
        rh = self.cfg.rejector
        memory = answer_memory(self.cfg, len(device.data.y_rejector), self.servers.count, self.num_classes)
        return device.new_rejector(rh.inputs, rh.hidden, self.seed, num_options(self.servers), memory)

    def train(self, ctx: RoundContext) -> TrainResult:
        device, rejector = ctx.device, ctx.learner
        feats = device.features("rejector", self.cfg.rejector.inputs)
        y = torch.from_numpy(device.data.y_rejector)
        m_wrong = (device.legacy_rejector.argmax(1) != y).float()
        reach = ctx.reachable_in_view()
        avail = availability_mask(self.servers, reach)
        loss, e_err, now = float("nan"), float("nan"), None
        if reach:  # else nothing to defer to: the rejector is left as it is
            now, out_of_fold = self.labels.answers(ctx.view, torch.from_numpy(device.data.x_rejector), y,
                                                   device.data.ids_rejector, reach, self.servers)
            rows, answers = self.labels.labels(rejector, now, device.device_id, ctx.round, out_of_fold)
            e_err = float((now.wrong[:, reach] if num_options(self.servers) > 2 else now.pool_wrong).mean())
            tensors, loss_fn = self.targets(rejector, feats, y, m_wrong, answers, reach, avail)
            loss = self.fit(ctx, rejector, feats, rows, tensors, loss_fn, avail)
        rejector.eval()
        with torch.no_grad():
            defer, route, score = decide(rejector(feats), avail, self.servers)
        defer = self.bound_decisions(rejector, score, defer, device.device_id, ctx.round, "train")
        sendable = ~self.labels.held_out(len(defer), device.device_id)
        rng = np.random.default_rng(derive_seed(self.seed, "explore", device.device_id, ctx.round))
        explore = (~defer) & (rng.random(len(defer)) < self.cfg.explore) & bool(reach) & sendable
        defer &= sendable
        if now is not None:
            self.labels.record(rejector, defer | explore, now, ctx.round)
        return TrainResult(defer, route, explore, train_metrics(loss, defer, m_wrong, e_err))

    def targets(self, rejector: Rejector, feats: torch.Tensor, y: torch.Tensor, m_wrong: torch.Tensor,
                answers: ServerAnswers, reach: list[int], avail: torch.Tensor
                ) -> tuple[tuple[torch.Tensor, ...], Callable]:
        """The rejector's training tensors (features first, one row per sample of the split) and its
        loss as a function of a batch of them, from the servers' ``answers`` (the labels)."""
        c_1 = self.cfg.c_1
        prices = self.prices
        if num_options(self.servers) > 2:
            costs = torch.zeros(len(y), num_options(self.servers))
            costs[:, 0] = m_wrong
            for s in reach:
                costs[:, 1 + s] = prices[s] + c_1 * answers.wrong[:, s]
            return (feats, costs), lambda f, c: multi_server_rejector_loss(rejector(f), c, avail)
        e_wrong, probs = answers.pool_wrong, answers.pool_probs
        c_defer = float(np.mean([prices[s] for s in reach]))
        if resolve_surrogate(self.cfg.surrogate, self.num_classes) == "multiclass":
            w0, w1 = l2h_weights(m_wrong, e_wrong, c_defer, c_1, str(self.cfg.weights))
            return (feats, w0, w1), lambda f, a, b: multiclass_rejector_loss(rejector(f), a, b)
        beta = self.cfg.binary_beta
        alpha = binary_alpha(c_defer, c_1, beta, self.cfg.binary_p)
        margin = 2.0 * probs.gather(1, y[:, None])[:, 0] - 1.0
        return ((feats, m_wrong, margin),
                lambda f, mw, em: binary_rejector_loss(rejector(f), mw, em, c_defer, c_1, beta, alpha))

    def fit(self, ctx: RoundContext, rejector: Rejector, feats: torch.Tensor, rows: np.ndarray,
            tensors: tuple[torch.Tensor, ...], loss_fn: Callable, avail: torch.Tensor) -> float:
        """Train the rejector on the labelled ``rows`` of the split minus its calibration part, then
        fit the reject-rate bound on the calibration part; returns the last epoch's mean loss."""
        dev = ctx.device.device_id
        cal = bounded.calibration_split(self.cfg, len(feats), self.seed, dev, ctx.round)
        rh = self.cfg.rejector
        rejector.train()
        use = torch.from_numpy(~cal & rows)
        loss = train_minibatch(rejector.parameters(), tuple(t[use] for t in tensors), loss_fn,
                               epochs=rh.epochs, batch_size=rh.batch_size, lr=rh.lr,
                               seed=derive_seed(self.seed, "rejector", dev, ctx.round))
        if cal.any():
            self.fit_bound(rejector, feats[cal], avail)
        return loss

    @torch.no_grad()
    def fit_bound(self, rejector: Rejector, feats_cal: torch.Tensor, avail: torch.Tensor) -> None:
        """Fit the reject-rate bound ``(t, rho)`` on the calibration features ``(M, D)`` into ``rejector.local_bound``."""
        rejector.eval()
        defer, _, score = decide(rejector(feats_cal), avail, self.servers)
        t, rho = bounded.fit(score, defer, self.cfg.max_defer_rate)
        rejector.local_bound.copy_(torch.tensor([t, rho]))

    def bound_decisions(self, rejector: Rejector, score: np.ndarray, defer: np.ndarray, device_id: int,
                        server_round: int, split: str) -> np.ndarray:
        """The rejector's decisions ``(N,)`` after the reject-rate bound (unchanged when none is set);
        ``score (N,)``: the deferral scores :func:`decide` gave with ``defer``."""
        if self.cfg.max_defer_rate is None:
            return defer
        rng = np.random.default_rng(derive_seed(self.seed, "bound", device_id, server_round, split))
        return bounded.apply(score, defer, rejector.local_bound, self.cfg, rng)

    @torch.no_grad()
    def evaluate(self, ctx: RoundContext) -> EvalResult:
        """The device's decisions on its test split; the pool answers the deferred samples.

        A device whose rejector has never been trained (not yet sampled) keeps every sample local
        (score 0): a deployed device does not defer before it has learned to. The score is
        ``1 - psi_local`` over the available options.
        """
        device, rejector = ctx.device, ctx.learner
        n = len(device.data.x_test)
        probs = torch.softmax(device.legacy_test, 1)
        avail = availability_mask(self.servers, ctx.reachable)
        if rejector is None:
            score = np.zeros(n, dtype=np.float32)
            defer, route = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64)
        else:
            rejector.eval()
            if bounded.refit_before_evaluation(self.cfg):  # the group average decides: bound it, not the local model
                cal_feats = device.features("rejector", self.cfg.rejector.inputs)
                cal = bounded.calibration_split(self.cfg, len(cal_feats), self.seed, device.device_id, ctx.round)
                if cal.any():
                    self.fit_bound(rejector, cal_feats[cal], avail)
            feats = device.features("test", self.cfg.rejector.inputs)
            defer, route, score = decide(rejector(feats), avail, self.servers)
            defer = self.bound_decisions(rejector, score, defer, device.device_id, 0, "test")
        return test_record(device, probs, score, defer, route)


class L2HStrategy(PoolStrategy):
    """The ServerApp side of L2H (and of the baselines): the servers learn from what devices send."""

    def train_round(self, server_round: int, got: DeviceReplies) -> dict[str, Any]:
        batches = []
        for dev in got.devices:  # sorted by device: routing and buffers never depend on arrival order
            rows = got.rows(dev)
            if len(rows.get("ids", ())):
                b: dict[str, Any] = {k: rows[k] for k in ("ids", "x", "y", "route", "explore")}
                b["explore"] = b["explore"].astype(bool)
                b["device"] = dev
                batches.append(b)
        sent = int(sum(len(b["ids"]) for b in batches))
        explored = int(sum(b["explore"].sum() for b in batches))
        fit = self.pool.train(server_round, batches)
        self.pool.end_round()
        return {"samples_sent": sent, "samples_deferred": sent - explored, "samples_explored": explored,
                "rejector_loss": self.mean_loss(got), **fit}
