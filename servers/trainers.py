"""How the helper servers learn from the samples routed to them (``servers.training``).

- :class:`IndependentTrainer` (``independent``): each server fits its own replay buffer, all in
  parallel (cross-entropy: the server half of L2H's stage-switching surrogate).
- :class:`JointTrainer` (``mel``, ``dml``, ``coop``): every up server trains on one shared buffer
  of every deferred sample (kept here), one minibatch at a time, in step:
  MEL (Gudipaty et al. 2025, arXiv 2506.20094) -- trunks and standalone heads on the servers,
  combiner heads here, the combiner loss's feature gradients sent back; DML (Zhang et al. 2018,
  arXiv 1706.00384) -- each server also gets its peers' softmax outputs for the mutual KL term;
  coop (arXiv 2312.08532) -- server 0 is the Leader (labels only), the others are Teammates
  that learn from each other and the Leader and distil into their shallower exits.
  docs/methods.md gives the losses.

A trainer talks to the servers only through ``call(method, servers, *args, each=...)`` (the
pool's parallel call, which marks servers that fail as dead).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from servers.helper import HelperServer, ReplayBuffer
from servers.losses import mel_combiner_loss
from servers.models import COOP_LEADER, Combiners, all_subsets, make_server_net
from sim.core.arrays import load_optimizer, optimizer_arrays, prefixed, sub
from sim.core.config import ServersConfig, Training
from sim.core.optim import Adam
from sim.core.seeding import derive_seed, seeded

Call = Callable[..., dict[int, Any]]


class IndependentTrainer:
    """Each server fits its own buffer of the samples routed to it."""

    def fit(self, call: Call, live: Callable[[], list[int]], ids: np.ndarray, x: np.ndarray, y: np.ndarray,
            rows: dict[int, list[int]], server_round: int) -> dict[str, Any]:
        """Add each server's rows to its buffer and train every up server still alive (``live()``).

        Returns:
            ``server_loss`` (mean over servers), ``buffer_size`` (total).
        """
        call("add", [s for s, r in rows.items() if r], each=lambda s: (ids[rows[s]], x[rows[s]], y[rows[s]]))
        res = call("fit", live(), server_round)
        losses = [r["server_loss"] for r in res.values() if np.isfinite(r["server_loss"])]
        return {"server_loss": float(np.mean(losses)) if losses else float("nan"),
                "buffer_size": int(sum(r["buffer_size"] for r in res.values()))}

    def checkpoint(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        pass


class JointTrainer:
    """MEL / DML / coop: ``servers.epochs`` passes over one shared buffer, every up server in step.

    Args:
        cfg: the ``servers`` config. in_shape, num_classes: the servers' input and output. seed:
            the run seed (combiner initialisation, minibatch order).
    """

    def __init__(self, cfg: ServersConfig, in_shape: Sequence[int], num_classes: int, seed: int):
        self.cfg, self.seed = cfg, seed
        self.shared = ReplayBuffer(cfg.buffer_size)
        self.combiners: Combiners | None = None
        self.comb_opt: torch.optim.Optimizer | None = None
        if cfg.training == Training.mel and cfg.count >= 2:
            with torch.random.fork_rng(devices=[]):  # building nets to read their widths draws nothing that counts
                dims = [make_server_net(cfg, in_shape, num_classes, s).feature_dim for s in range(cfg.count)]
            with seeded(derive_seed(seed, "combiner-init")):
                self.combiners = Combiners(cfg.count, dims, num_classes)
            self.comb_opt = Adam(self.combiners.parameters(), lr=cfg.lr)

    def fit(self, call: Call, live: Callable[[], list[int]], ids: np.ndarray, x: np.ndarray, y: np.ndarray,
            rows: dict[int, list[int]], server_round: int) -> dict[str, Any]:
        """Add every routed sample to the shared buffer, then train the live up servers jointly.

        Returns:
            ``server_loss`` (the last epoch's mean), ``buffer_size``.
        """
        if len(ids):
            self.shared.add(ids, x, y)
        return {"server_loss": self._epochs(call, live(), server_round), "buffer_size": len(self.shared)}

    def _batches(self, server_round: int) -> list[tuple[int, np.ndarray]]:
        """``(epoch, sample indices)`` of every minibatch, in training order (seeded per round)."""
        n, bs = len(self.shared), self.cfg.batch_size
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "pool-fit", server_round))
        out = []
        for epoch in range(self.cfg.epochs):
            order = torch.randperm(n, generator=gen).numpy()
            out += [(epoch, np.sort(order[start:start + bs])) for start in range(0, n, bs)]
        return out

    def _epochs(self, call: Call, members: list[int], server_round: int) -> float:
        """The joint minibatch loop. Loss: MEL ``sum_A lambda_A CE(h_A, y)`` over the standalone heads
        (on the servers, weight ``servers.mel.standalone_weight``) and the combiner heads of every
        subset of >= 2 up servers (here, ``servers.mel.combiner_weight``); DML: each server's CE plus
        the mean KL from its peers; coop: as DML for the Teammates, labels only for the Leader."""
        if len(self.shared) == 0 or not members:
            return float("nan")
        x_all, y_all = self.shared.x, self.shared.y
        batches = self._batches(server_round)
        training = self.cfg.training
        weight = self.cfg.mel.standalone_weight if training == Training.mel else 1.0
        learners = [s for s in members if training == Training.dml or (training == Training.coop and s != COOP_LEADER)]
        subsets = all_subsets(members) if self.combiners is not None else []
        # One server call per minibatch: finishing batch k and starting batch k+1 travel together,
        # and each server still runs backward(k) before forward(k+1), so the arithmetic is the same.
        out = call("forward_batch", members, x_all[batches[0][1]])
        last, total, count = float("nan"), 0.0, 0
        for k, (epoch, idx) in enumerate(batches):
            members = [s for s in members if s in out]
            subsets = [a for a in subsets if set(a) <= set(members)]
            if not members:
                return last
            yb = y_all[idx]
            grads, comb_loss = self._combiner_step(out, members, subsets, yb)
            peers = self._peer_probs(out, members, learners)
            x_next = x_all[batches[k + 1][1]] if k + 1 < len(batches) else None
            res = call("step_batch", members, each=lambda s: (yb, grads[s], weight, peers[s], x_next))
            total += (sum(r[0] for r in res.values()) + comb_loss) * len(idx)
            count += len(idx)
            out = {s: r[1] for s, r in res.items()}
            if k + 1 == len(batches) or batches[k + 1][0] != epoch:
                last, total, count = total / max(count, 1), 0.0, 0
        return last

    def _combiner_step(self, out: dict[int, Any], members: list[int], subsets: list[tuple[int, ...]],
                       yb: np.ndarray) -> tuple[dict[int, np.ndarray | None], float]:
        """MEL: one step of the combiner heads; returns each member's feature gradient and the loss."""
        if not subsets:
            return {s: None for s in members}, 0.0
        feats = {s: torch.from_numpy(np.array(out[s][0])).requires_grad_(True) for s in members}
        loss = mel_combiner_loss(self.combiners, feats, torch.from_numpy(yb), subsets,
                                 self.cfg.mel.combiner_weight)
        self.comb_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.comb_opt.step()
        return {s: feats[s].grad.numpy() for s in members}, float(loss.detach())

    @staticmethod
    def _peer_probs(out: dict[int, Any], members: list[int], learners: list[int]) -> dict[int, np.ndarray | None]:
        """DML / coop: for each learning member, its peers' softmax outputs ``(P, B, K)``."""
        peers: dict[int, np.ndarray | None] = {s: None for s in members}
        if learners and len(members) > 1:  # DML: every peer; coop: Teammates learn from peers and Leader
            probs = {s: torch.softmax(torch.from_numpy(np.array(out[s][1])), 1).numpy() for s in members}
            peers.update({s: np.stack([probs[p] for p in members if p != s]) for s in learners if s in members})
        return peers

    def checkpoint(self) -> dict[str, np.ndarray]:
        """The combiner heads, their optimizer and the shared buffer, as arrays."""
        arrays: dict[str, np.ndarray] = {}
        if self.combiners is not None:
            arrays.update(prefixed("combiners", {k: v.detach().numpy().copy()
                                                 for k, v in self.combiners.state_dict().items()}))
            arrays.update(prefixed("combiners_opt", optimizer_arrays(self.comb_opt)))
        if len(self.shared):
            arrays.update({"shared/ids": self.shared.ids, "shared/x": self.shared.x, "shared/y": self.shared.y})
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Load :meth:`checkpoint`'s arrays."""
        if self.combiners is not None:
            self.combiners.load_state_dict({k: torch.from_numpy(np.array(v))
                                            for k, v in sub(arrays, "combiners").items()})
            load_optimizer(self.comb_opt, sub(arrays, "combiners_opt"))
        if "shared/ids" in arrays:
            self.shared.add(arrays["shared/ids"], arrays["shared/x"], arrays["shared/y"])


def make_trainer(cfg: ServersConfig, in_shape: Sequence[int], num_classes: int, seed: int
                 ) -> IndependentTrainer | JointTrainer:
    """The trainer of ``servers.training``."""
    if cfg.training == Training.independent:
        return IndependentTrainer()
    return JointTrainer(cfg, in_shape, num_classes, seed)
