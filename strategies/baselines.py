"""Baselines every comparison should carry (METHODS.md section 4), as fleet strategies.

The helper servers are the same trained pool as in L2H (they learn from the samples deferred to
them, plus the exploration fraction); only the device's deferral rule differs:

- ``legacy_only``: never defer (defer rate 0): the legacy model alone.
- ``server_only``: always defer (defer rate 1): the helper servers alone.
- ``random``: defer each sample independently with probability ``strategy.defer_rate``.
- ``confidence``: defer iff the legacy model's max softmax is below ``tau``; ``tau`` is
  ``strategy.tau``, or (null) fitted per device as the ``defer_rate`` quantile of the legacy
  confidence on its rejector split, so about ``defer_rate`` of its samples are deferred.
- ``compare_confidence``: CompareConfidence (Raghu, Blumer, Corrado, Kleinberg, Obermeyer,
  Mullainathan 2019, "The algorithmic automation problem", arXiv 1903.12220): each device learns
  ``P(server correct | x)`` (a small MLP on the rejector features, binary cross-entropy against
  whether the servers' answer was right on its rejector split) and defers iff that estimate
  exceeds the legacy max softmax.

Each run's summary also carries the confidence and random baselines at the learned rejector's
own defer rate (:mod:`sim.metrics`), i.e. "matched" in METHODS.md's sense.

Deferral scores (for the accuracy-coverage curve; higher = deferred first): ``1 - m_conf`` for
legacy_only, server_only and confidence; the random draw for random;
``P_hat(server correct) - m_conf`` for compare_confidence.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clients.device import Device, Rejector
from servers.view import PoolView
from sim.training import derive_seed, train_minibatch
from strategies import l2h


def new_learner(device: Device, spec: dict[str, Any]) -> Rejector | None:
    """compare_confidence: the device's estimator of P(server correct), one logit; others: None."""
    if spec["strategy"]["name"] != "compare_confidence":
        return None
    hp = spec["strategy"]["rejector"]
    return device.new_rejector(hp["inputs"], int(hp["hidden"]), spec["seed"], outputs=1)


def load_learner(device: Device, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> Rejector | None:
    learner = new_learner(device, spec)
    if learner is not None:
        learner.load_state_dict(state)
    return learner


def confidence_tau(device: Device, hp: dict[str, Any]) -> float:
    """The confidence threshold: ``strategy.tau``, or the ``defer_rate`` quantile of the legacy max
    softmax on the device's rejector split (the legacy model is frozen: the same every round)."""
    if hp.get("tau") is not None:
        return float(hp["tau"])
    conf = torch.softmax(device.legacy_rejector, 1).max(1).values.numpy()
    return float(np.quantile(conf, float(hp["defer_rate"]))) if len(conf) else 0.0


@torch.no_grad()
def rule(name: str, device: Device, learner: Rejector | None, split: str, hp: dict[str, Any],
         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's ``defer (N,)`` bool and deferral ``score (N,)`` on ``split`` (rejector | test)."""
    m_conf = torch.softmax(getattr(device, f"legacy_{split}"), 1).max(1).values.numpy()
    n = len(m_conf)
    if name == "legacy_only":
        return np.zeros(n, dtype=bool), 1.0 - m_conf
    if name == "server_only":
        return np.ones(n, dtype=bool), 1.0 - m_conf
    if name == "random":
        u = rng.random(n)
        return u < float(hp["defer_rate"]), u
    if name == "confidence":
        return m_conf < confidence_tau(device, hp), 1.0 - m_conf
    if name == "compare_confidence":
        if learner is None:  # never trained: nothing known about the servers, keep local
            return np.zeros(n, dtype=bool), -m_conf
        learner.eval()
        p_server = torch.sigmoid(learner(device.features(split, hp["rejector"]["inputs"]))[:, 0]).numpy()
        score = p_server - m_conf
        return score > 0, score
    raise ValueError(f"unknown baseline {name!r}")


def client_train(device: Device, learner: Rejector | None, view: PoolView, reachable: list[int], hp: dict[str, Any],
                 servers_cfg: dict[str, Any], num_classes: int, server_round: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """One device's round: decide which rejector-split samples to send (same returns as
    :func:`strategies.l2h.client_train`); compare_confidence also trains its estimator."""
    name = hp["name"]
    y = torch.from_numpy(device.data.y_rejector)
    reach = [s for s in reachable if s in view.present]
    loss, e_err = float("nan"), float("nan")
    if reach and (learner is not None or name != "legacy_only"):
        feats_s, logits = view.outputs(torch.from_numpy(device.data.x_rejector), reach)
        e_wrong, _ = l2h.server_error(feats_s, logits, y, reach, view, servers_cfg)
        e_err = float(e_wrong.mean())
        if learner is not None:
            rh = hp["rejector"]
            feats = device.features("rejector", rh["inputs"])
            learner.train()
            loss = train_minibatch(
                learner.parameters(), (feats, 1.0 - e_wrong),
                lambda f, t: F.binary_cross_entropy_with_logits(learner(f)[:, 0], t),
                epochs=int(rh["epochs"]), batch_size=int(rh["batch_size"]), lr=float(rh["lr"]),
                seed=derive_seed(seed, "compare-confidence", device.device_id, server_round))
    rng = np.random.default_rng(derive_seed(seed, "baseline", name, device.device_id, server_round))
    defer, _ = rule(name, device, learner, "rejector", hp, rng)
    defer &= bool(reach)
    route = np.full(len(defer), -1, dtype=np.int64)
    explore = (~defer) & (rng.random(len(defer)) < float(hp["explore"])) & bool(reach)
    m_wrong = (device.legacy_rejector.argmax(1) != y).float()
    return defer, route, explore, {"rejector_loss": loss, "train_defer_rate": float(defer.mean()),
                                   "train_legacy_error": float(m_wrong.mean()), "train_server_error": e_err}


@torch.no_grad()
def client_evaluate(device: Device, learner: Rejector | None, reachable: list[int], hp: dict[str, Any],
                    servers_cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """The device's decisions on its test split (same record as :func:`strategies.l2h.client_evaluate`)."""
    rng = np.random.default_rng(derive_seed(seed, "baseline-test", hp["name"], device.device_id))
    defer, score = rule(hp["name"], device, learner, "test", hp, rng)
    defer &= bool(reachable)
    return l2h.test_record(device, torch.softmax(device.legacy_test, 1), score, defer,
                           np.full(len(defer), -1, dtype=np.int64))
