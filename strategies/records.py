"""Helpers every method shares: the evaluation record, what a deferred sample would get from the
servers, and the per-round training metrics."""
from __future__ import annotations

import numpy as np
import torch

from clients.device import Device
from servers.models import ensemble_probs
from servers.view import PoolView
from sim.core.config import Routing, ServersConfig
from strategies.method import EvalResult


def test_record(device: Device, probs: torch.Tensor, score: np.ndarray, defer: np.ndarray, route: np.ndarray,
                calibrated: np.ndarray | None = None) -> EvalResult:
    """A device's evaluation record on its test split (every method returns this).

    Args:
        probs: ``(N_test, K)`` the local model's softmax. score: ``(N_test,)`` deferral score
            (higher = deferred first). defer: ``(N_test,)`` bool. route: ``(N_test,)`` int64.
        calibrated: ``(N_test,)`` the local model's calibrated max softmax (None: the legacy
            model's, after its group's temperature scaling, :meth:`Device.calibrated_confidence`).
    """
    return EvalResult(
        m_conf_cal=device.calibrated_confidence() if calibrated is None else np.asarray(calibrated, np.float32),
        y=device.data.y_test.astype(np.int64),
        m_pred=probs.argmax(1).numpy().astype(np.int64),
        score=np.asarray(score, dtype=np.float32),
        m_conf=probs.max(1).values.numpy().astype(np.float32),
        defer=defer,
        route=route,
        x=device.data.x_test,
    )


def server_error(view: PoolView, feats: dict[int, torch.Tensor], logits: dict[int, torch.Tensor], y: torch.Tensor,
                 reach: list[int], servers: ServersConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """What a deferred sample gets from the reachable servers: ``e_wrong (N,)`` (1 if the answer is
    wrong; the expected error over the servers when the pool picks one) and ``probs (N, K)``.

    ``routing=all`` (MEL, ensembles): the ensemble's answer. Otherwise (one server, or a server
    the pool chooses): the mean over the reachable servers.

    Args:
        view: the servers' networks (for MEL's combiner heads). feats, logits: server -> its trunk
            features ``(N, F)`` and logits ``(N, K)`` on the samples (:meth:`PoolView.outputs`).
        y: ``(N,)`` labels. reach: the servers to use (non-empty).
    """
    if servers.resolved_routing == Routing.all:
        probs = ensemble_probs(reach, feats, logits, view.combiners)
        return (probs.argmax(1) != y).float(), probs
    probs = torch.stack([torch.softmax(logits[s], 1) for s in reach]).mean(0)
    return torch.stack([(logits[s].argmax(1) != y).float() for s in reach]).mean(0), probs


def train_metrics(loss: float, defer: np.ndarray, legacy_wrong: torch.Tensor, server_error_rate: float
                  ) -> dict[str, float]:
    """The metrics a training round reports: ``rejector_loss``, ``train_defer_rate`` (on the rejector
    split), ``train_legacy_error``, ``train_server_error``."""
    return {"rejector_loss": loss, "train_defer_rate": float(np.mean(defer)) if len(defer) else float("nan"),
            "train_legacy_error": float(legacy_wrong.mean()), "train_server_error": server_error_rate}


def no_route(n: int) -> np.ndarray:
    """``(n,)`` int64 of -1: no server chosen (the pool routes)."""
    return np.full(n, -1, dtype=np.int64)
