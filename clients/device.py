"""The local view of one legacy device: its data splits, frozen legacy model and rejector.

The rejector is a small MLP with two logits (index 0 = keep LOCAL, 1 = DEFER). Its input is
the flattened sample, and by default also the legacy model's softmax output
(``strategy.rejector.inputs=sample+legacy``): the legacy model's own confidence is the single
most informative signal of whether it is wrong, and each device has only tens to hundreds of
rejector-training samples, too few to relearn that from pixels alone. ``inputs=sample`` gives
the rejector the raw sample only, as in the L2H paper's code (a LeNet on the image);
``inputs=legacy`` the legacy softmax only (a learned, cost-aware confidence function).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sim.core.data import DeviceData
from sim.core.seeding import derive_seed, seeded
from sim.core.training import predict_logits


class Rejector(nn.Module):
    """MLP rejector: features ``(B, D)`` -> logits ``(B, outputs)``: 0 = keep local, 1 = defer
    (``outputs=2``), or ``1 + s`` = defer to server s (learned routing over several servers).

    Buffers named ``local_*`` belong to this device alone and are never federated (averaged):
    ``local_bound`` = ``[t, rho]`` of the reject-rate bound (strategies/bounded.py; NaN: unfitted);
    with ``memory=(N, S, K)``, the servers' answers on each of the device's ``N`` rejector-split
    samples when it was first sent (prequential labels, strategies/labels.py):
    ``local_answer_round (N,)`` (0: never sent), ``local_answer_wrong (N, S)``,
    ``local_answer_pool_wrong (N,)``, ``local_answer_pool_probs (N, K)``.
    """

    def __init__(self, in_dim: int, hidden: int = 64, outputs: int = 2, memory: tuple[int, int, int] | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
        self.register_buffer("local_bound", torch.full((2,), float("nan")))
        if memory is not None:
            n, s, k = memory
            self.register_buffer("local_answer_round", torch.zeros(n, dtype=torch.int64))
            self.register_buffer("local_answer_wrong", torch.full((n, s), float("nan")))
            self.register_buffer("local_answer_pool_wrong", torch.full((n,), float("nan")))
            self.register_buffer("local_answer_pool_probs", torch.full((n, k), float("nan")))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


@dataclass
class Device:
    """One device, as a worker sees it. Legacy outputs are computed once (the model is frozen).

    Attributes:
        device_id: partition id. data: its splits. legacy: the frozen legacy model.
        legacy_rejector / legacy_test: legacy logits ``(N, K)`` on the rejector/test splits.
        temperature: its group's temperature-scaling T (:mod:`clients.calibration`): the calibrated
            confidence baseline uses ``softmax(legacy_test / T)``.
    """

    device_id: int
    data: DeviceData
    legacy: nn.Module
    legacy_rejector: torch.Tensor
    legacy_test: torch.Tensor
    temperature: float = 1.0
    _features: dict = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, device_id: int, data: DeviceData, legacy: nn.Module, temperature: float = 1.0) -> "Device":
        lr_ = predict_logits(legacy, torch.from_numpy(data.x_rejector))
        lt_ = predict_logits(legacy, torch.from_numpy(data.x_test))
        return cls(device_id, data, legacy, lr_, lt_, temperature)

    def calibrated_confidence(self) -> np.ndarray:
        """``(N_test,)`` float32: the legacy model's max softmax on the test split after its group's
        temperature scaling (the calibrated confidence baseline, docs/methods.md §4)."""
        return torch.softmax(self.legacy_test / self.temperature, 1).max(1).values.numpy().astype(np.float32)

    def features(self, split: str, inputs: str) -> torch.Tensor:
        """Rejector inputs for ``split`` (``rejector`` | ``test``): ``(N, D)`` float32, computed once
        (the data and the legacy model are fixed)."""
        key = (split, inputs)
        if key not in self._features:
            x = torch.from_numpy(getattr(self.data, f"x_{split}")).flatten(1)
            probs = torch.softmax(getattr(self, f"legacy_{split}"), dim=1)
            self._features[key] = (x if inputs == "sample" else probs if inputs == "legacy"
                                   else torch.cat([x, probs], dim=1))
        return self._features[key]

    def new_rejector(self, inputs: str, hidden: int, seed: int, outputs: int = 2,
                     memory: tuple[int, int, int] | None = None) -> Rejector:
        """A freshly initialised rejector, seeded per device (independent of worker placement);
        ``memory``: see :class:`Rejector`."""
        with seeded(derive_seed(seed, "rejector-init", self.device_id)):
            return Rejector(self.features("test", inputs).shape[1], hidden, outputs, memory)
