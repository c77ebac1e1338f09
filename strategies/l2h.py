"""Learning to Help (L2H): fixed legacy client, trained helper server and per-device rejector.

Source: Wu, Li, Dong, Sathyavageeswaran, Sarwate, "Learning to Help in Multi-Class Settings",
ICLR 2025 (arXiv 2501.13810); binary case: Wu & Sarwate 2024 (arXiv 2409.16253).

One round (DESIGN.md):
1. :class:`L2HStrategy.configure_train` sends sampled devices the helper server's weights --
   the current ones (synchronous, ``staleness=1``) or a copy refreshed every S rounds
   (asynchronous) -- and the costs.
2. :func:`client_train` (on the device) computes the server's and the legacy model's errors on
   its rejector split, trains the rejector with the stage-switching surrogate
   (:mod:`strategies.l2h_losses`), and returns the samples it now defers plus an exploration
   fraction of the ones it keeps.
3. :class:`L2HStrategy.aggregate_train` adds them to the server's replay buffer and trains the
   server on it (cross-entropy: the server half of the stage-switching surrogate).
4. Evaluation (:func:`client_evaluate`, pooled in :mod:`strategies.base`).
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from clients.device import Device, Rejector
from servers.helper import HelperServer
from sim.training import derive_seed, predict_logits, train_minibatch
from strategies.base import FleetStrategy
from strategies.l2h_losses import (binary_alpha, binary_rejector_loss, l2h_weights, multiclass_rejector_loss)


def resolve_surrogate(name: str, num_classes: int) -> str:
    """``auto`` -> ``binary`` for 2-class data, else ``multiclass``."""
    if name == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    if name == "binary" and num_classes != 2:
        raise ValueError(f"strategy.surrogate=binary needs 2-class data, the dataset has {num_classes} classes")
    return name


def client_train(device: Device, rejector: Rejector, server: nn.Module, hp: dict[str, Any], num_classes: int,
                 server_round: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One device's L2H update: train its rejector against the (possibly stale) server.

    Args:
        device: the device (data, frozen legacy model). rejector: trained in place.
        server: the helper server model e as received this round.
        hp: the ``strategy`` config. num_classes: K. server_round, seed: for seeding.

    Returns:
        ``defer: (N,)`` bool (rejector decisions on the rejector split), ``explore: (N,)`` bool
        (kept samples also sent to the server), and metrics.
    """
    feats = device.features("rejector", hp["rejector"]["inputs"])
    y = torch.from_numpy(device.data.y_rejector)
    m_wrong = (device.legacy_rejector.argmax(1) != y).float()
    e_logits = predict_logits(server, torch.from_numpy(device.data.x_rejector))
    e_wrong = (e_logits.argmax(1) != y).float()
    c_e, c_1 = float(hp["c_e"]), float(hp["c_1"])
    if resolve_surrogate(hp["surrogate"], num_classes) == "multiclass":
        w0, w1 = l2h_weights(m_wrong, e_wrong, c_e, c_1, hp["weights"])
        tensors = (feats, w0, w1)

        def loss_fn(f, a, b):
            return multiclass_rejector_loss(rejector(f), a, b)
    else:
        alpha = binary_alpha(c_e, c_1, float(hp["binary_beta"]), float(hp["binary_p"]))
        margin = 2.0 * torch.softmax(e_logits, 1).gather(1, y[:, None])[:, 0] - 1.0
        tensors = (feats, m_wrong, margin)

        def loss_fn(f, mw, em):
            return binary_rejector_loss(rejector(f), mw, em, c_e, c_1, float(hp["binary_beta"]), alpha)

    rh = hp["rejector"]
    rejector.train()
    loss = train_minibatch(rejector.parameters(), tensors, loss_fn, epochs=int(rh["epochs"]),
                           batch_size=int(rh["batch_size"]), lr=float(rh["lr"]),
                           seed=derive_seed(seed, "rejector", device.device_id, server_round))
    rejector.eval()
    with torch.no_grad():
        defer = (rejector(feats).argmax(1) == 1).numpy()
    rng = np.random.default_rng(derive_seed(seed, "explore", device.device_id, server_round))
    explore = (~defer) & (rng.random(len(defer)) < float(hp["explore"]))
    metrics = {"rejector_loss": loss, "train_defer_rate": float(defer.mean()),
               "train_legacy_error": float(m_wrong.mean()), "train_server_error": float(e_wrong.mean())}
    return defer, explore, metrics


@torch.no_grad()
def client_evaluate(device: Device, rejector: Rejector | None, server: nn.Module, hp: dict[str, Any]
                    ) -> dict[str, np.ndarray]:
    """Per-sample evaluation records of the hybrid system on the device's test split.

    A device whose rejector has never been trained (not yet sampled) keeps every sample local
    (score 0): a deployed device does not defer before it has learned to.

    Returns:
        Arrays of :data:`sim.metrics.FIELDS`, each ``(N_test,)``.
    """
    x = torch.from_numpy(device.data.x_test)
    probs = torch.softmax(device.legacy_test, 1)
    if rejector is None:
        score = torch.zeros(len(x))
    else:
        rejector.eval()
        score = torch.softmax(rejector(device.features("test", hp["rejector"]["inputs"])), 1)[:, 1]
    e_pred = predict_logits(server, x).argmax(1)
    return {
        "device": np.full(len(x), device.device_id, dtype=np.int64),
        "y": device.data.y_test.astype(np.int64),
        "m_pred": probs.argmax(1).numpy().astype(np.int64),
        "e_pred": e_pred.numpy().astype(np.int64),
        "score": score.numpy().astype(np.float32),
        "m_conf": probs.max(1).values.numpy().astype(np.float32),
        "defer": (score > 0.5).numpy(),
    }


def server_record(server: HelperServer) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in server.state_numpy().items()})


class L2HStrategy(FleetStrategy):
    """The ServerApp side of L2H with one helper server (Flower Message-API Strategy).

    Args:
        cfg: run config (plain dict). server: the helper server. on_round: round-record callback.
    """

    def __init__(self, cfg: dict[str, Any], server: HelperServer, on_round):
        super().__init__(cfg, on_round)
        self.server = server
        self.staleness = int(cfg["strategy"]["staleness"])
        self.stale: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        # Asynchronous training: the copy the rejectors train against is refreshed every S rounds.
        if self.stale is None or (server_round - 1) % self.staleness == 0:
            self.stale = arrays
        devices = self.sample(server_round, float(self.cfg["sim"]["fraction_train"]), "train")
        content = RecordDict({"server": self.stale, "config": self.config(server_round)})
        return self.messages(grid, devices, MessageType.TRAIN, content, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, errors = self.ok_replies(replies)
        sent = deferred = explored = 0
        losses = []
        for _, reply in ok:  # sorted by device: the buffer's order never depends on arrival order
            s = reply.content["samples"]
            ids, x, y, explore = (s[k].numpy() for k in ("ids", "x", "y", "explore"))
            self.server.buffer.add(ids, x, y)
            sent += len(ids)
            explored += int(explore.sum())
            deferred += int((~explore.astype(bool)).sum())
            losses.append(float(reply.content["info"]["rejector_loss"]))
        fit = self.server.fit(server_round)
        self.train_record = {
            "train_devices": len(ok), "train_errors": errors, "samples_sent": sent,
            "samples_deferred": deferred, "samples_explored": explored,
            "rejector_loss": float(np.mean(losses)) if losses else float("nan"), **fit,
        }
        return server_record(self.server), MetricRecord({"samples_sent": sent, "train_errors": errors})
