"""A helper server: a trunk + head network trained on the samples devices defer to it.

One :class:`HelperServer` is what each Ray actor of the server pool holds
(:mod:`servers.pool`): its own network, optimizer and replay buffer. Independent servers
train alone (:meth:`HelperServer.fit`); MEL and DML servers train jointly, one minibatch at a
time, driven by the pool (:meth:`HelperServer.forward_batch` then
:meth:`HelperServer.backward_batch`), so the coupling terms travel between actors as features,
gradients and probabilities -- never as models.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from servers.crossfit import FoldCopies
from servers.losses import dml_loss, sfsl_distillation_loss
from servers.models import COOP_LEADER, MultiExitNet, make_server_net
from sim.core.arrays import load_optimizer, optimizer_arrays, prefixed, sub
from sim.core.config import ServersConfig, Training
from sim.core.optim import Adam
from sim.core.seeding import derive_seed, seeded
from sim.core.training import predict_logits, train_minibatch


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
    """One helper server: network ``e`` (trunk + standalone head), replay buffer, persistent Adam.

    Args:
        cfg: the ``servers`` config (arch, hidden, buffer_size, epochs, batch_size, lr, resources).
        in_shape: ``(C, H, W)``. num_classes: K. seed: run seed. index: server index s.
        torch_threads: intra-op threads (1 keeps results identical wherever the server runs).
        folds: K fold copies trained next to the network (``strategy.server_labels=crossfit``,
            :mod:`servers.crossfit`); 0: none.

    The network runs on CUDA when ``servers.resources.num_gpus > 0`` and a GPU is visible, else on
    the CPU; everything it returns is a NumPy array on the CPU.
    """

    def __init__(self, cfg: ServersConfig, in_shape, num_classes: int, seed: int, index: int = 0,
                 torch_threads: int = 1, folds: int = 0):
        torch.set_num_threads(int(torch_threads))
        self.cfg, self.seed, self.index = cfg, seed, index
        self.dev = torch.device("cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available()
                                else "cpu")
        with seeded(derive_seed(seed, "server-init", index)):
            self.model = make_server_net(cfg, tuple(in_shape), num_classes, index).to(self.dev)
        self.folds = FoldCopies(self.model, folds, cfg.lr, seed, index) if folds else None
        # A specialist (servers.known_classes) learns only from samples of the classes it knows.
        self.known = None if cfg.known(index) is None else np.asarray(cfg.known(index), dtype=np.int64)
        # Cooperative learning: the Leader learns from labels only, the Teammates also from their peers.
        self.teammate = cfg.training == Training.coop and index != COOP_LEADER
        self.opt = Adam(self.model.parameters(), lr=cfg.lr)
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.delay_s = 0.0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- health and fault injection ----------------------------------------------------------
    def ping(self) -> int:
        """Answers (after the injected delay) with the server index."""
        time.sleep(self.delay_s)
        return self.index

    def set_delay(self, seconds: float) -> None:
        """Injected slowness: :meth:`ping` and :meth:`predict` answer after ``seconds``."""
        self.delay_s = float(seconds)

    def where(self) -> str:
        """The torch device the network runs on (``cpu`` or ``cuda:N``)."""
        return str(next(self.model.parameters()).device)

    # ---- data ---------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> int:
        """Add samples to the replay buffer (a specialist keeps only those of its known classes);
        returns its size."""
        if self.known is not None:
            keep = np.isin(np.asarray(y), self.known)
            ids, x, y = np.asarray(ids)[keep], np.asarray(x)[keep], np.asarray(y)[keep]
        self.buffer.add(ids, x, y)
        return len(self.buffer)

    # ---- independent training ------------------------------------------------------------------
    def fit(self, server_round: int) -> dict[str, float]:
        """Train ``servers.epochs`` passes over the buffer with cross-entropy (then each fold copy
        over the buffer minus its fold, the same way); returns the network's metrics."""
        if len(self.buffer) == 0:
            return {"server_loss": float("nan"), "buffer_size": 0}
        x = torch.from_numpy(self.buffer.x).to(self.dev)
        y = torch.from_numpy(self.buffer.y).to(self.dev)
        self.model.train()
        loss = train_minibatch(self.opt, (x, y), lambda xb, yb: F.cross_entropy(self.model(xb), yb),
                               epochs=self.cfg.epochs, batch_size=self.cfg.batch_size,
                               seed=derive_seed(self.seed, "server-fit", self.index, server_round))
        self.model.eval()
        if self.folds is not None:
            self.folds.fit(self.buffer.ids, x, y, server_round, self.cfg.epochs, self.cfg.batch_size)
        return {"server_loss": loss, "buffer_size": len(self.buffer)}

    # ---- joint (MEL / DML) training, one minibatch per call pair --------------------------------
    def forward_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start a joint step on ``x: (B, C, H, W)``: returns trunk features ``(B, F)`` and logits
        ``(B, K)``; the graph is kept for :meth:`backward_batch`."""
        self.model.train()
        feats, exits = self.model.forward_exits(torch.from_numpy(x).to(self.dev))
        self._pending = (feats, exits)
        return feats.detach().cpu().numpy(), exits[-1].detach().cpu().numpy()

    def backward_batch(self, y: np.ndarray, feat_grad: np.ndarray | None, weight: float,
                       peer_probs: np.ndarray | None) -> float:
        """Finish the joint step: one optimizer step on
        ``weight * CE(h_s(f_s), y)`` (+ the DML term when ``peer_probs: (P, B, K)`` is given)
        ``+ <feat_grad, f_s>`` (the gradient the pool's MEL combiner heads send back for this
        server's features, ``(B, F)``); a cooperative-learning Teammate adds the SFSL distillation
        into its shallower exits (:func:`servers.losses.sfsl_distillation_loss`). Returns the local
        loss (without the combiner part).

        Raises:
            RuntimeError: no :meth:`forward_batch` preceded this call.
        """
        if self._pending is None:
            raise RuntimeError("backward_batch without forward_batch")
        feats, exits = self._pending
        self._pending = None
        logits = exits[-1]
        yt = torch.from_numpy(y).to(self.dev)
        if peer_probs is not None and len(peer_probs):
            local = dml_loss(logits, yt, torch.from_numpy(peer_probs).to(self.dev))
        else:
            local = F.cross_entropy(logits, yt)
        if self.teammate and len(exits) > 1:
            local = local + sfsl_distillation_loss(exits[:-1], logits, yt, self.model.fractions()[:-1],
                                                   self.cfg.coop.temperature)
        total = weight * local
        if feat_grad is not None:
            total = total + (feats * torch.from_numpy(feat_grad).to(self.dev)).sum()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.model.eval()
        return float(local.detach())

    def step_batch(self, y: np.ndarray, feat_grad: np.ndarray | None, weight: float, peer_probs: np.ndarray | None,
                   next_x: np.ndarray | None) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
        """:meth:`backward_batch` for the pending batch, then :meth:`forward_batch` on ``next_x`` (if
        given), in one call: the pool's joint training needs one round trip per minibatch.

        Returns:
            The local loss of the finished batch, and the next batch's ``(features, logits)``.
        """
        loss = self.backward_batch(y, feat_grad, weight, peer_probs)
        return loss, (self.forward_batch(next_x) if next_x is not None else None)

    # ---- answers and state ------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Trunk features ``(N, F)`` and logits ``(N, K)`` on ``x: (N, C, H, W)`` (after the injected
        delay); a multi-exit (cooperative-learning) server adds every exit's logits ``(D, N, K)``,
        shallowest first, so the pool can serve at a lower depth."""
        time.sleep(self.delay_s)
        self.model.eval()
        with torch.no_grad():
            xt = torch.from_numpy(np.asarray(x)).to(self.dev)
            parts = [self.model.forward_exits(xt[i:i + 4096]) for i in range(0, max(len(xt), 1), 4096)]
            feats = torch.cat([p[0] for p in parts])
            exits = torch.stack([torch.cat([p[1][d] for p in parts]) for d in range(len(parts[0][1]))])
        out = (feats.cpu().numpy(), exits[-1].cpu().numpy())
        return out + (exits.cpu().numpy(),) if isinstance(self.model, MultiExitNet) else out

    def weights(self) -> dict[str, np.ndarray]:
        """The network's ``state_dict`` as NumPy arrays (what devices receive)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def broadcast_weights(self) -> dict[str, np.ndarray]:
        """:meth:`weights` plus the fold copies' (``fold{j}:<param>``, crossfit only): what devices receive."""
        return {**self.weights(), **(self.folds.weights() if self.folds is not None else {})}

    def state(self) -> dict[str, np.ndarray]:
        """A checkpoint: network weights (``net.*``), replay buffer (``buffer.*``) and the fold
        copies' weights (``fold{j}/net.*``, crossfit only)."""
        out = {f"net.{k}": v for k, v in self.weights().items()}
        if self.folds is not None:
            out.update(self.folds.state(with_optimizer=False))
        if len(self.buffer):
            out.update({"buffer.ids": self.buffer.ids.copy(), "buffer.x": self.buffer.x.copy(),
                        "buffer.y": self.buffer.y.copy()})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state` checkpoint (the optimizer starts afresh; a fold copy's too, unless
        the state holds it: :meth:`full_state`). A state without fold copies starts every copy from
        the network's restored weights; a server without copies ignores those in the state (the
        pool's in-process replicas, which only answer)."""
        self.model.load_state_dict({k[4:]: torch.from_numpy(v) for k, v in state.items() if k.startswith("net.")})
        if self.folds is not None:
            self.folds.load_state(state, self.model.state_dict)
        self.buffer = ReplayBuffer(self.buffer.capacity)
        if "buffer.ids" in state:
            self.buffer.add(state["buffer.ids"], state["buffer.x"], state["buffer.y"])
        self.opt = Adam(self.model.parameters(), lr=self.cfg.lr)

    def full_state(self) -> dict[str, np.ndarray]:
        """:meth:`state` plus the optimizers' state (``opt/*``, ``fold{j}/opt/*``): what a resumed run
        needs to continue exactly (a crash-recover checkpoint deliberately leaves the optimizer out)."""
        folds = self.folds.state(with_optimizer=True) if self.folds is not None else {}
        return {**self.state(), **folds, **prefixed("opt", optimizer_arrays(self.opt))}

    def load_full_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`full_state`."""
        self.load_state(state)
        load_optimizer(self.opt, sub(state, "opt"))

    def predict_labels(self, x: np.ndarray) -> np.ndarray:
        """Predicted classes ``(N,)`` (no injected delay; for tests and tools)."""
        return predict_logits(self.model, torch.from_numpy(np.asarray(x)).to(self.dev)).argmax(1).cpu().numpy()
