"""Learning to Defer (L2D): fixed expert(s), trained device classifier and deferral outputs.

The reverse of L2H (docs/methods.md, "Learning to Defer"): the helper servers are fixed experts, pretrained once
on the held-out pool (:mod:`servers.experts`) and never updated; each device trains a model with
``K + S`` outputs -- its classifier (initialised from its legacy model) and one deferral logit
per helper server -- with one of the surrogates of :mod:`strategies.l2d_losses`
(``strategy.l2d.loss``: ``ce`` Mozannar-Sontag with alpha, ``ce_cost`` its cost-sensitive form
with the L2H prices ``c_e`` / ``c_1``, ``ova`` one-vs-all). Unavailable experts are masked in
training and at decision time. With ``strategy.rejector.federation=fedavg`` devices of the same
architecture average their models every round (FedAvg; federated L2D).

One round:
1. :class:`L2DStrategy` (as L2H) sends the experts' weights and which are up.
2. :meth:`L2DMethod.train` labels its rejector split with the experts' correctness and trains the
   model (nothing is sent to the experts: they do not learn).
3. The strategy keeps each device's model (and, with ``strategy.rejector.federation``, averages
   them per architecture; the averages go out with the next messages).
4. Evaluation: the device predicts with its trained classifier (``m_pred``, so the "local"
   accuracy of an L2D run is the trained classifier's) and defers to the expert its model picks;
   the pool answers with failover, as for every strategy.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.device import Device
from clients.legacy import assign_groups
from servers.experts import pretrain_experts
from sim.core.config import Config, FederateBy, ServersConfig
from sim.core.seeding import derive_seed, seeded
from sim.core.training import train_minibatch
from strategies import bounded, l2d_losses
from strategies.base import DeviceReplies
from strategies.config import L2DConfig, L2DLoss
from strategies.method import DeviceMethod, EvalResult, RoundContext, TrainResult
from strategies.pool_strategy import PoolStrategy
from strategies.records import test_record

class L2DModel(nn.Module):
    """The device's L2D model: ``x (B, C, H, W) -> (B, K + S)`` logits.

    ``classifier`` (a trainable copy of the legacy model) gives the K class logits; a one-hidden-
    layer MLP gives the S deferral logits from the flattened sample and/or the classifier's softmax
    (``strategy.rejector.inputs``), so the whole model trains jointly as in Mozannar & Sontag.

    Args:
        classifier: ``(B, C, H, W) -> (B, K)``. inputs: sample | legacy | sample+legacy.
        sample_dim: C*H*W. num_classes: K. num_experts: S. hidden: MLP width.
    """

    def __init__(self, classifier: nn.Module, inputs: str, sample_dim: int, num_classes: int, num_experts: int,
                 hidden: int):
        super().__init__()
        self.classifier, self.inputs = classifier, str(inputs)
        d = (sample_dim if self.inputs != "legacy" else 0) + (num_classes if self.inputs != "sample" else 0)
        self.defer = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))
        self.register_buffer("local_bound", torch.full((2,), float("nan")))  # strategies/bounded.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier(x)
        parts = ([x.flatten(1)] if self.inputs != "legacy" else []) + \
                ([torch.softmax(c, 1)] if self.inputs != "sample" else [])
        return torch.cat([c, self.defer(torch.cat(parts, 1))], dim=1)


def available(servers: ServersConfig, reach: list[int]) -> torch.Tensor:
    """``(S,)`` bool: the experts this device can query."""
    mask = torch.zeros(servers.count, dtype=torch.bool)
    mask[list(reach)] = True
    return mask


class L2DMethod(DeviceMethod):
    """The L2D device side: a classifier (from the legacy model) and one deferral logit per expert."""

    cfg: L2DConfig

    def new_learner(self, device: Device) -> L2DModel:
        """The device's L2D model: classifier = its legacy model (copied, trainable), deferral head
        seeded per device."""
        classifier = copy.deepcopy(device.legacy)
        for p in classifier.parameters():
            p.requires_grad_(True)
        rh = self.cfg.rejector
        with seeded(derive_seed(self.seed, "l2d-init", device.device_id)):
            return L2DModel(classifier, rh.inputs, int(np.prod(device.data.x_test.shape[1:])), self.num_classes,
                            self.servers.count, rh.hidden)

    def loss_function(self, model: L2DModel, avail: torch.Tensor):
        """``loss(x, y, expert_ok) -> scalar`` for ``strategy.l2d.loss``."""
        opts, c_1 = self.cfg.l2d, self.cfg.c_1
        prices = self.prices
        if opts.loss == L2DLoss.ce:
            return lambda x, y, ok: l2d_losses.ce_loss(model(x), y, ok, avail, opts.alpha)
        if opts.loss == L2DLoss.ova:
            return lambda x, y, ok: l2d_losses.ova_loss(model(x), y, ok, avail)
        return lambda x, y, ok: l2d_losses.ce_cost_loss(
            model(x), l2d_losses.l2d_costs(y, ok, self.num_classes, prices, c_1), avail)

    @torch.no_grad()
    def decisions(self, model: L2DModel, x: torch.Tensor, avail: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``logits (N, K+S)``, class ``pred (N,)``, best available ``expert (N,)`` and deferral ``score (N,)``."""
        model.eval()
        logits = model(x)
        pred, expert, score = l2d_losses.decide(logits, avail, str(self.cfg.l2d.loss),
                                                self.prices, self.cfg.c_1)
        return logits, pred, expert, score

    def train(self, ctx: RoundContext) -> TrainResult:
        """One device's L2D update on its rejector split. Nothing is sent to the fixed experts, so
        ``defer`` and ``explore`` are all False; the model's own training defer rate is in the metrics."""
        device, model = ctx.device, ctx.learner
        x = torch.from_numpy(device.data.x_rejector)
        y = torch.from_numpy(device.data.y_rejector).long()
        reach = ctx.reachable_in_view()
        avail = available(self.servers, reach)
        ok = torch.zeros(len(y), self.servers.count)
        if reach:
            _, logits = ctx.view.outputs(x, reach)
            for s in reach:
                ok[:, s] = (logits[s].argmax(1) == y).float()
        cal = bounded.calibration_split(self.cfg, len(y), self.seed, device.device_id, ctx.round)
        rh = self.cfg.rejector
        model.train()
        loss = train_minibatch(model.parameters(), (x[~cal], y[~cal], ok[~cal]), self.loss_function(model, avail),
                               epochs=rh.epochs, batch_size=rh.batch_size, lr=rh.lr,
                               seed=derive_seed(self.seed, "l2d", device.device_id, ctx.round))
        _, pred, _, score = self.decisions(model, x, avail)
        if cal.any() and self.cfg.max_defer_rate is not None:
            self.fit_bound(model, score[cal])
        none = np.zeros(len(y), dtype=bool)
        return TrainResult(none, np.full(len(y), -1, dtype=np.int64), none, {
            "rejector_loss": loss, "train_defer_rate": float((score > 0).float().mean()),
            "train_legacy_error": float((pred != y).float().mean()),
            "train_server_error": float(1 - ok[:, reach].mean()) if reach else float("nan")})

    def fit_bound(self, model: L2DModel, score_cal: torch.Tensor) -> None:
        """Fit the reject-rate bound ``(t, rho)`` on the calibration scores ``(M,)`` into ``model.local_bound``."""
        t, rho = bounded.fit(score_cal.numpy(), (score_cal > 0).numpy(), self.cfg.max_defer_rate)
        model.local_bound.copy_(torch.tensor([t, rho]))

    @torch.no_grad()
    def evaluate(self, ctx: RoundContext) -> EvalResult:
        """The device's predictions and deferrals on its test split (``m_pred`` / ``m_conf`` are the
        trained classifier's). A device never trained keeps its legacy model and defers nothing."""
        device, model = ctx.device, ctx.learner
        x = device.data.x_test
        n = len(x)
        if model is None:
            probs = torch.softmax(device.legacy_test, 1)
            defer, route, score = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), np.zeros(n, np.float32)
        else:
            avail = available(self.servers, ctx.reachable)
            if bounded.refit_before_evaluation(self.cfg):  # the group average decides: bound it, not the local model
                x_cal = torch.from_numpy(device.data.x_rejector)
                cal = bounded.calibration_split(self.cfg, len(x_cal), self.seed, device.device_id, ctx.round)
                if cal.any():
                    self.fit_bound(model, self.decisions(model, x_cal[torch.from_numpy(cal)], avail)[3])
            logits, _, expert, score_t = self.decisions(model, torch.from_numpy(x), avail)
            k = logits.shape[1] - self.servers.count
            probs = torch.softmax(logits[:, :k], 1)
            score = score_t.numpy()
            defer = score > 0
            if self.cfg.max_defer_rate is not None:
                rng = np.random.default_rng(derive_seed(self.seed, "bound", device.device_id, 0, "test"))
                defer = bounded.apply(score, defer, model.local_bound, self.cfg, rng)
            route = expert.numpy().astype(np.int64)
        # the trained classifier has no group temperature: its "calibrated" confidence is its own
        own = None if model is None else probs.max(1).values.numpy()
        return test_record(device, probs, score, defer, route, calibrated=own)


def architecture_groups(cfg: Config) -> list[str]:
    """Per device, the key of its model architecture (devices with the same key can average models)."""
    groups = list(cfg.fleet.groups)
    assign = assign_groups(cfg.fleet.num_clients, [g.share for g in groups])
    return [f"{groups[g].arch}-{int(groups[g].hidden)}" for g in assign]


class L2DStrategy(PoolStrategy):
    """ServerApp side of L2D: the pool holds the fixed experts (installed before round 1), devices
    train; with ``strategy.rejector.federation`` the devices' models are federated (FedAvg) within
    groups of the same architecture (``federate_by=group``: a fleet group; ``fleet``: every device
    of the same architecture and width)."""

    def federation_keys(self, cfg: Config) -> list[str]:
        if cfg.strategy.rejector.federate_by == FederateBy.fleet:
            return architecture_groups(cfg)
        return super().federation_keys(cfg)

    @classmethod
    def prepare_servers(cls, cfg: Config, prep: Any, fleet: Any, cache_dir: Path, console: Any
                        ) -> list[dict[str, np.ndarray]]:
        """The fixed experts, pretrained once on the held-out pool (:mod:`servers.experts`, cached)."""
        opts = cfg.strategy.l2d
        experts, meta = pretrain_experts(cfg.servers, opts.expert_epochs, opts.expert_lr, cfg.data, prep, fleet,
                                         cfg.seed, cache_dir)
        console.print(f"L2D experts (fixed): pretrained on the held-out pool of {meta['pool_size']} samples, "
                      f"train accuracy {', '.join(f'{a:.3f}' for a in meta['train_accuracy'])}", soft_wrap=True)
        return experts

    def train_round(self, server_round: int, got: DeviceReplies) -> dict[str, Any]:
        defer_rates = [float(got.info[d]["train_defer_rate"]) for d in got.devices]
        self.pool.end_round()
        return {"samples_sent": 0, "rejector_loss": self.mean_loss(got),
                "train_defer_rate": float(np.mean(defer_rates)) if defer_rates else float("nan"),
                "fedavg_groups": len(self.averages)}
