"""Learning to Defer (L2D): fixed expert(s), trained device classifier and deferral outputs.

The reverse of L2H (METHODS.md section 3): the helper servers are fixed experts, pretrained once
on the held-out pool (:mod:`servers.experts`) and never updated; each device trains a model with
``K + S`` outputs -- its classifier (initialised from its legacy model) and one deferral logit
per helper server -- with one of the surrogates of :mod:`strategies.l2d_losses`
(``strategy.l2d.loss``: ``ce`` Mozannar-Sontag with alpha, ``ce_cost`` its cost-sensitive form
with the L2H prices ``c_e`` / ``c_1``, ``ova`` one-vs-all). Unavailable experts are masked in
training and at decision time. With ``strategy.l2d.fedavg=true`` devices of the same
architecture average their models every round with Flower's FedAvg aggregation (federated L2D).

One round:
1. :class:`L2DStrategy.configure_train` (as L2H) sends the experts' weights and which are up.
2. :func:`client_train` labels its rejector split with the experts' correctness and trains the
   model (nothing is sent to the experts: they do not learn).
3. :class:`L2DStrategy.aggregate_train` keeps each device's model (and, with FedAvg, averages them
   per architecture; the averages go out with the next messages).
4. Evaluation: the device predicts with its trained classifier (``m_pred``, so the "local"
   accuracy of an L2D run is the trained classifier's) and defers to the expert its model picks;
   the pool answers with failover, as for every strategy.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from clients.device import Device
from clients.legacy import assign_groups
from servers.view import PoolView
from sim.training import derive_seed, seeded, train_minibatch
from strategies import bounded, l2d_losses
from strategies.l2h import L2HStrategy, calibration_split, record_arrays, server_costs, test_record
from strategies.base import resumable


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
        self.classifier, self.inputs = classifier, inputs
        d = (sample_dim if inputs != "legacy" else 0) + (num_classes if inputs != "sample" else 0)
        self.defer = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))
        self.register_buffer("bound", torch.full((2,), float("nan")))  # strategies/bounded.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier(x)
        parts = ([x.flatten(1)] if self.inputs != "legacy" else []) + \
                ([torch.softmax(c, 1)] if self.inputs != "sample" else [])
        return torch.cat([c, self.defer(torch.cat(parts, 1))], dim=1)


def new_learner(device: Device, spec: dict[str, Any]) -> L2DModel:
    """The device's L2D model: classifier = its legacy model (copied, trainable), deferral head seeded per device."""
    classifier = copy.deepcopy(device.legacy)
    for p in classifier.parameters():
        p.requires_grad_(True)
    rh = spec["strategy"]["rejector"]
    with seeded(derive_seed(spec["seed"], "l2d-init", device.device_id)):
        return L2DModel(classifier, rh["inputs"], int(np.prod(spec["in_shape"])), int(spec["num_classes"]),
                        int(spec["servers"]["count"]), int(rh["hidden"]))


def load_learner(device: Device, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> L2DModel:
    model = new_learner(device, spec)
    model.load_state_dict(state)
    return model


def available(servers_cfg: dict[str, Any], reach: list[int]) -> torch.Tensor:
    """``(S,)`` bool: the experts this device can query."""
    mask = torch.zeros(int(servers_cfg["count"]), dtype=torch.bool)
    mask[list(reach)] = True
    return mask


def loss_function(model: L2DModel, hp: dict[str, Any], avail: torch.Tensor, num_classes: int, prices: list[float]):
    """``loss(x, y, expert_ok) -> scalar`` for ``strategy.l2d.loss``."""
    name, c_1 = hp["l2d"]["loss"], float(hp["c_1"])
    if name == "ce":
        return lambda x, y, ok: l2d_losses.ce_loss(model(x), y, ok, avail, float(hp["l2d"]["alpha"]))
    if name == "ova":
        return lambda x, y, ok: l2d_losses.ova_loss(model(x), y, ok, avail)
    return lambda x, y, ok: l2d_losses.ce_cost_loss(model(x), l2d_losses.l2d_costs(y, ok, num_classes, prices, c_1),
                                                    avail)


@torch.no_grad()
def decisions(model: L2DModel, x: torch.Tensor, avail: torch.Tensor, hp: dict[str, Any], servers_cfg: dict[str, Any]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits (N, K+S)``, class ``pred (N,)``, best available ``expert (N,)`` and deferral ``score (N,)``."""
    model.eval()
    logits = model(x)
    pred, expert, score = l2d_losses.decide(logits, avail, hp["l2d"]["loss"],
                                            server_costs(servers_cfg, float(hp["c_e"])), float(hp["c_1"]))
    return logits, pred, expert, score


def client_train(device: Device, model: L2DModel, view: PoolView, reachable: list[int], hp: dict[str, Any],
                 servers_cfg: dict[str, Any], num_classes: int, server_round: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One device's L2D update on its rejector split (returns as :func:`strategies.l2h.client_train`;
    nothing is sent to the fixed experts, so ``defer`` and ``explore`` are all False and the
    model's own training defer rate is in the metrics)."""
    x = torch.from_numpy(device.data.x_rejector)
    y = torch.from_numpy(device.data.y_rejector).long()
    reach = [s for s in reachable if s in view.present]
    avail = available(servers_cfg, reach)
    ok = torch.zeros(len(y), int(servers_cfg["count"]))
    if reach:
        _, logits = view.outputs(x, reach)
        for s in reach:
            ok[:, s] = (logits[s].argmax(1) == y).float()
    prices = server_costs(servers_cfg, float(hp["c_e"]))
    cal = calibration_split(hp, len(y), seed, device.device_id, server_round)
    rh = hp["rejector"]
    model.train()
    loss = train_minibatch(model.parameters(), (x[~cal], y[~cal], ok[~cal]),
                           loss_function(model, hp, avail, num_classes, prices), epochs=int(rh["epochs"]),
                           batch_size=int(rh["batch_size"]), lr=float(rh["lr"]),
                           seed=derive_seed(seed, "l2d", device.device_id, server_round))
    _, pred, _, score = decisions(model, x, avail, hp, servers_cfg)
    if cal.any() and hp.get("max_defer_rate") is not None:
        t, rho = bounded.fit(score[cal].numpy(), (score[cal] > 0).numpy(), float(hp["max_defer_rate"]))
        model.bound.copy_(torch.tensor([t, rho]))
    none = np.zeros(len(y), dtype=bool)
    return none, np.full(len(y), -1, dtype=np.int64), none, {
        "rejector_loss": loss, "train_defer_rate": float((score > 0).float().mean()),
        "train_legacy_error": float((pred != y).float().mean()),
        "train_server_error": float(1 - ok[:, reach].mean()) if reach else float("nan")}


@torch.no_grad()
def client_evaluate(device: Device, model: L2DModel | None, reachable: list[int], hp: dict[str, Any],
                    servers_cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """The device's predictions and deferrals on its test split (record as
    :func:`strategies.l2h.client_evaluate`; ``m_pred`` / ``m_conf`` are the trained classifier's).
    A device never trained keeps its legacy model and defers nothing."""
    x = device.data.x_test
    n = len(x)
    if model is None:
        probs = torch.softmax(device.legacy_test, 1)
        defer, route, score = np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), np.zeros(n, np.float32)
    else:
        avail = available(servers_cfg, reachable)
        logits, _, expert, score_t = decisions(model, torch.from_numpy(x), avail, hp, servers_cfg)
        k = logits.shape[1] - int(servers_cfg["count"])
        probs = torch.softmax(logits[:, :k], 1)
        score = score_t.numpy()
        defer = score > 0
        if hp.get("max_defer_rate") is not None:
            rng = np.random.default_rng(derive_seed(seed, "bound", device.device_id, 0, "test"))
            defer = bounded.apply(score, defer, model.bound, hp, rng)
        route = expert.numpy().astype(np.int64)
    return test_record(device, probs, score, defer, route)


def architecture_groups(cfg: dict[str, Any]) -> list[str]:
    """Per device, the key of its model architecture (devices with the same key can average models)."""
    groups = [dict(g) for g in cfg["fleet"]["groups"]]
    assign = assign_groups(int(cfg["fleet"]["num_clients"]), [g["share"] for g in groups])
    return [f"{groups[g]['arch']}-{int(groups[g]['hidden'])}" for g in assign]


class L2DStrategy(L2HStrategy):
    """ServerApp side of L2D: the pool holds the fixed experts (installed before round 1), devices
    train; optional FedAvg of the device models per architecture (``strategy.l2d.fedavg``)."""

    def __init__(self, cfg: dict[str, Any], pool, schedule, on_round):
        super().__init__(cfg, pool, schedule, on_round)
        self.fedavg = bool(cfg["strategy"]["l2d"]["fedavg"])
        self.arch = architecture_groups(cfg)
        self.global_models: dict[str, ArrayRecord] = {}

    def personal(self, device: int) -> ArrayRecord | None:
        """With FedAvg: the latest average of the device's architecture group."""
        return self.global_models.get(self.arch[device]) if self.fedavg else None

    @resumable
    def aggregate_train(self, server_round: int, replies: Iterable) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = self.collect(replies)
        losses = [float(got.info[d]["rejector_loss"]) for d in got.devices]
        defer_rates = [float(got.info[d]["train_defer_rate"]) for d in got.devices]
        by_group: dict[str, list[RecordDict]] = {}
        for dev in got.devices:
            self.rejectors[dev] = record_arrays(got.learners[dev])
            by_group.setdefault(self.arch[dev], []).append(RecordDict({
                "model": got.learners[dev],
                "info": MetricRecord({"num_examples": int(got.info[dev]["num_examples"])})}))
        if self.fedavg:
            for key, records in sorted(by_group.items()):
                self.global_models[key] = aggregate_arrayrecords(records, "num_examples")
            averages = {key: record_arrays(rec) for key, rec in self.global_models.items()}
            for dev in range(self.num_clients):  # every device of a group evaluates with its average
                if self.arch[dev] in averages:
                    self.rejectors[dev] = averages[self.arch[dev]]
        self.pool.end_round()
        finite = [v for v in losses if np.isfinite(v)]
        self.train_record = {
            "train_devices": len(got.devices), "train_errors": got.errors, "samples_sent": 0,
            "rejector_loss": float(np.mean(finite)) if finite else float("nan"),
            "train_defer_rate": float(np.mean(defer_rates)) if defer_rates else float("nan"),
            "fedavg_groups": len(self.global_models),
        }
        return None, MetricRecord({"samples_sent": 0, "train_errors": got.errors})
