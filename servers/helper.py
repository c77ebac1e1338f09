"""A helper server: a model trained on the samples devices defer to it, kept in a replay buffer."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clients.zoo import build_model
from sim.training import derive_seed, predict_logits, train_minibatch


class ReplayBuffer:
    """Bounded buffer of deferred samples keyed by global sample id.

    A sample sent again replaces its earlier copy (and counts as newest); past ``capacity``
    the oldest samples are evicted (FIFO).

    Args:
        capacity: maximum number of samples (>= 1).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("replay buffer capacity must be >= 1")
        self.capacity = capacity
        self.ids = np.empty(0, dtype=np.int64)
        self.x: np.ndarray | None = None
        self.y = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Append samples ``ids: (M,)``, ``x: (M, C, H, W)``, ``y: (M,)``; later duplicates win."""
        if len(ids) == 0:
            return
        ids = np.asarray(ids, dtype=np.int64)
        # Keep the last occurrence of each id within the batch.
        _, last = np.unique(ids[::-1], return_index=True)
        keep_new = np.sort(len(ids) - 1 - last)
        ids, x, y = ids[keep_new], np.asarray(x)[keep_new], np.asarray(y, dtype=np.int64)[keep_new]
        old = ~np.isin(self.ids, ids)
        self.ids = np.concatenate([self.ids[old], ids])
        self.x = x.copy() if self.x is None else np.concatenate([self.x[old], x])
        self.y = np.concatenate([self.y[old], y])
        if len(self.ids) > self.capacity:
            cut = len(self.ids) - self.capacity
            self.ids, self.x, self.y = self.ids[cut:], self.x[cut:], self.y[cut:]


class HelperServer:
    """One helper server: model ``e``, replay buffer and a persistent Adam optimizer.

    Args:
        cfg: the ``servers`` config (arch, hidden, buffer_size, epochs, batch_size, lr).
        in_shape: ``(C, H, W)``; num_classes: K; seed: run seed; index: server index.
    """

    def __init__(self, cfg: dict[str, Any], in_shape, num_classes: int, seed: int, index: int = 0):
        self.cfg, self.seed, self.index = cfg, seed, index
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(seed, "server-init", index))
            self.model = build_model(cfg["arch"], tuple(in_shape), num_classes, hidden=int(cfg["hidden"]))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(cfg["lr"]))
        self.buffer = ReplayBuffer(int(cfg["buffer_size"]))

    def fit(self, server_round: int) -> dict[str, float]:
        """Train ``servers.epochs`` passes over the buffer with cross-entropy; returns metrics."""
        if len(self.buffer) == 0:
            return {"server_loss": float("nan"), "buffer_size": 0}
        x, y = torch.from_numpy(self.buffer.x), torch.from_numpy(self.buffer.y)
        self.model.train()
        loss = train_minibatch(self.opt, (x, y), lambda xb, yb: F.cross_entropy(self.model(xb), yb),
                               epochs=int(self.cfg["epochs"]), batch_size=int(self.cfg["batch_size"]),
                               seed=derive_seed(self.seed, "server-fit", self.index, server_round))
        self.model.eval()
        return {"server_loss": loss, "buffer_size": len(self.buffer)}

    def state_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict_logits(self.model, torch.from_numpy(np.asarray(x))).argmax(1).numpy()
