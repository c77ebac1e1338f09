"""The helper-server pool: S servers behind one facade (lifecycle, faults, routing, training, answers).

The parts: :mod:`servers.handles` (a server in a Ray actor or in-process), :mod:`servers.router`
(``servers.routing``, the same for training and answers), :mod:`servers.trainers`
(``servers.training``), :mod:`servers.failover` (answers with failover, serving depth). The pool
lives in the ServerApp's process and, each round, carries out the failure schedule
(:mod:`sim.core.faults`: a crash kills the server's actor, a recovery starts a new one from the
pool's last checkpoint of it or from scratch, an outage makes the pool stop contacting it, a slow
server gets an injected delay) and finds which servers are up by a health check (``ping`` within
``failures.query_timeout_s``). Its calls go through :class:`servers.handles.ServerHandles` (which
servers are dead or busy with a call that timed out: a slow server costs a round its timeout, not
its delay). :meth:`ServerPool.answer` returns the round's whole outcome (:class:`PoolAnswer`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from servers.allup import Replicas, all_up_answers
from servers.failover import PoolAnswer, ServerOutputs, answer, ensemble_table, options
from servers.handles import ServerHandles, ServerUnavailable, new_handle
from servers.recovery import Recovery
from servers.router import Router
from servers.trainers import JointTrainer, make_trainer
from sim.core.arrays import prefixed, sub
from sim.core.config import ServersConfig, Training
from sim.core.faults import RoundFaults
from sim.core.seeding import derive_seed

__all__ = ["PoolAnswer", "ServerPool", "ServerUnavailable"]


class ServerPool:
    """S helper servers with routing, training and failover.

    Args:
        cfg: the ``servers`` config. in_shape: ``(C, H, W)``. num_classes: K. seed: the run seed.
        query_timeout_s: a server slower than this counts as down (``failures.query_timeout_s``).
        placement: ``ray`` (one actor per server; Ray must be initialised) or ``local``.
        torch_threads: intra-op threads of each server. prices: each server's price of one answer
        (``servers.c_e``, else ``strategy.c_e``; None: answers are free). folds: each server's
        crossfit fold copies (``strategy.crossfit_folds`` with ``server_labels=crossfit``; 0: none,
        :mod:`servers.crossfit`), trained with it, broadcast with it and kept in its checkpoints.
    """

    def __init__(self, cfg: ServersConfig, in_shape: Sequence[int], num_classes: int, seed: int,
                 query_timeout_s: float, placement: str, torch_threads: int = 1,
                 prices: Sequence[float] | None = None, folds: int = 0):
        self.cfg, self.seed, self.timeout = cfg, seed, query_timeout_s
        self.prices = list(prices) if prices is not None else None
        self.num_servers, self.in_shape, self.num_classes = cfg.count, tuple(in_shape), num_classes
        self.folds = folds
        if self.folds and cfg.training != Training.independent:
            raise ValueError("crossfit fold copies need servers.training=independent")
        self.servers = ServerHandles(lambda i: new_handle(placement, cfg, self.in_shape, num_classes, seed, i,
                                                          torch_threads, folds), self.num_servers, placement == "ray")
        self.call = self.servers.call
        self.up: list[int] = []
        self.recovery = Recovery(self.num_servers)  # what a crashed server comes back with; reset rounds
        self.masked: dict[int, set[int]] = {}  # this round's evaluation: device -> servers it must not use
        self.trainer = make_trainer(cfg, in_shape, num_classes, seed)
        self.combiners = self.trainer.combiners if isinstance(self.trainer, JointTrainer) else None
        self.load = np.zeros(self.num_servers, dtype=np.int64)  # this round: samples routed per server
        self.router = Router(cfg.resolved_routing, self.load)
        self.faults = RoundFaults(round=0)
        self.replicas = Replicas(cfg, self.in_shape, num_classes, seed, torch_threads)

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def dead(self) -> set[int]:
        """The servers whose actor is gone (killed by the failure schedule, or lost)."""
        return self.servers.dead

    def live(self) -> list[int]:
        """The up servers that are still alive."""
        return [s for s in self.up if s not in self.dead]

    def wait_ready(self, timeout: float) -> None:
        """Wait until every server answers (:meth:`servers.handles.ServerHandles.wait_ready`).

        Raises:
            ServerUnavailable: some server did not start within ``timeout`` seconds.
        """
        self.servers.wait_ready(timeout, self.cfg.resources)

    def install(self, states: list[dict[str, np.ndarray]]) -> None:
        """Load a start state into every server (``net.<param>`` arrays): L2D's fixed experts. A server
        recovering "from scratch" gets it back."""
        self.recovery.install(states)
        self.call("load_state", list(range(len(states))), each=lambda s: (states[s],))

    def shutdown(self) -> None:
        """Kill every server (end of run, or an interrupted one)."""
        self.servers.shutdown()

    # ---- a round ------------------------------------------------------------------------------
    def begin_round(self, faults: RoundFaults) -> list[int]:
        """Carry out this round's faults, then health-check every server; returns the servers up
        (alive, not in an outage, answering within the timeout).

        A server that comes back with less training than it had when it went down is *reset*
        (:meth:`servers.recovery.Recovery.restart`)."""
        self.faults = faults
        self.masked = {}
        for s in faults.kill:
            self.servers.kill(s)
        for s in faults.restart:
            if s in self.dead:
                self.servers.revive(s)
                self.recovery.restart(s, faults.recover_from, faults.round,
                                      lambda state: self.call("load_state", [s], state))
        self.servers.slow_down(faults.slow, self.timeout)
        self.load[:] = 0
        reachable = [s for s in range(self.num_servers) if s not in self.dead and s not in faults.outage]
        self.up = sorted(self.call("ping", reachable, timeout=self.timeout))
        return self.up

    def begin_eval(self, masked: dict[int, set[int]] | None = None) -> None:
        """Start counting this round's evaluation load (training load was reported already).

        Args:
            masked: device -> servers it must not defer to in this evaluation (servers reset since
                the device last trained against them): neither the device's decision nor the pool's
                routing of its samples uses them, as if a partition cut them off.
        """
        self.load[:] = 0
        self.masked = dict(masked or {})

    def reachable(self, device: int) -> list[int]:
        """Servers ``device`` can use this round: up, not cut off by a network partition and, in
        evaluation, not masked for it (:meth:`begin_eval`)."""
        cut = self.faults.cut_servers(device) | self.masked.get(device, set())
        return [s for s in self.up if s not in cut]

    def availability(self) -> list[int]:
        """Per server: 1 if up this round, else 0."""
        return [int(s in self.up) for s in range(self.num_servers)]

    def snapshot(self) -> dict[str, np.ndarray]:
        """What a device needs to predict every routing option itself: the up servers' weights
        (``s{i}.<param>``), their crossfit fold copies' (``fold{j}:s{i}.<param>``) and, for MEL, the
        combiner heads (``comb.<param>``)."""
        res = self.call("broadcast_weights" if self.folds else "weights", self.up)
        out = {_broadcast_key(s, k): v for s, w in sorted(res.items()) for k, v in w.items()}
        if self.combiners is not None:
            out.update({f"comb.{k}": v.detach().numpy().copy() for k, v in self.combiners.state_dict().items()})
        return out

    def train(self, server_round: int, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Route the devices' samples (one dict per device, sorted by device: ``device``, ``ids (M,)``,
        ``x (M, ...)``, ``y (M,)``, ``route (M,)``, ``explore (M,)`` bool) and train the servers.

        Returns:
            ``server_loss``, ``buffer_size``, ``train_rerouted`` (samples whose chosen server was
            down and went to another), ``train_load`` (samples routed to each server).
        """
        batches = [b for b in batches if len(b["ids"]) and self.reachable(int(b["device"]))]
        if batches:
            ids, x, y = (np.concatenate([b[k] for b in batches]) for k in ("ids", "x", "y"))
        else:
            ids, x, y = np.empty(0, np.int64), np.empty((0, *self.in_shape), np.float32), np.empty(0, np.int64)
        rows, rerouted = self.router.route(batches, self.reachable, self.up)
        fit = self.trainer.fit(self.call, self.live, ids, x, y, rows, server_round)
        self.recovery.trained_round[self.live()] = server_round
        return {**fit, "train_rerouted": rerouted, "train_load": self.load.tolist()}

    def end_round(self) -> None:
        """Checkpoint every up server (what crash-recover ``from checkpoint`` restores)."""
        self.recovery.saved(self.call("state", self.up), self.faults.round)

    # ---- answers ------------------------------------------------------------------------------
    def outputs(self, x: np.ndarray, timeout: float | None) -> ServerOutputs:
        """The answers on ``x`` of every up server that answers within ``timeout``."""
        res = self.call("predict", self.up, x, timeout=timeout)
        tensors = {i: {s: torch.from_numpy(np.array(r[i])) for s, r in sorted(res.items()) if len(r) > i}
                   for i in range(3)}  # np.array copies: Ray hands back read-only arrays
        return ServerOutputs(tensors[0], tensors[1], tensors[2])

    def answer(self, server_round: int, x: np.ndarray, device: np.ndarray, route: np.ndarray, defer: np.ndarray,
               m_pred: np.ndarray) -> PoolAnswer:
        """Answer test samples ``x (N, ...)`` with failover (:func:`servers.failover.answer`); when
        the round is degraded (a server down, a partition, dropped queries), also as every server up
        (:func:`servers.allup.all_up_answers`). ``device, route, defer, m_pred``: ``(N,)`` per sample.

        Returns:
            The round's outcome: every sample's answer and the pool's counts (:class:`PoolAnswer`).
        """
        rng = np.random.default_rng(derive_seed(self.seed, "query-drop", server_round))
        dropped = rng.random((len(x), self.num_servers)) < self.faults.query_drop
        reach_of = {int(d): self.reachable(int(d)) for d in np.unique(device)}
        # Untimed: whether a server is slower than failures.query_timeout_s was decided this round by
        # its health check (``ping`` sleeps its injected delay too). This one call carries the round's
        # every deferred test sample (100,000 at 10,000 devices); timed, a server's compute time on a
        # busy machine made an un-faulted server count as down and its samples fail over to legacy.
        outs = self.outputs(x, None)
        failovers: Counter = Counter()
        coop = self.cfg.coop if self.cfg.training == Training.coop else None
        answers = answer(outs, self.router, reach_of, device, route, defer, m_pred, dropped, self.num_servers,
                         failovers, self.combiners, coop, self.prices)
        opts = options(outs, reach_of, device, self.num_servers)
        degraded = len(self.up) < self.num_servers or bool(self.faults.partition) or self.faults.query_drop > 0
        all_up, stand_ins = None, []
        if degraded:
            states = {s: self.recovery.state(s) for s in range(self.num_servers)}
            all_up = all_up_answers(outs, self.replicas, states, x, device, route, defer, m_pred,
                                    Router(self.cfg.resolved_routing, self.load.copy()), self.combiners, coop,
                                    self.prices)
            stand_ins = self.recovery.untrained(self.up)
        return PoolAnswer(answers, opts, all_up, stand_ins, degraded, self.availability(), self.load.tolist(),
                          {k: int(v) for k, v in sorted(failovers.items())}, answers.depth, sorted(self.dead))

    def table(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """MEL's standalone-vs-ensemble table on ``x, y`` (:func:`servers.failover.ensemble_table`)."""
        return ensemble_table(self.outputs(x, None), y, self.combiners)

    # ---- checkpoint / resume ------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything that determines the pool's future, as ``(arrays, meta)``: each live server's
        weights, optimizer and buffer; the crash-recover checkpoints; the trainer's state (MEL
        combiners and their optimizer, the shared buffer); which servers are dead."""
        states = self.servers.full_states()
        arrays: dict[str, np.ndarray] = {}
        for s in sorted(states):
            arrays.update(prefixed(f"server{s}", states[s]))
        recovery, meta = self.recovery.checkpoint()
        arrays.update(recovery)
        arrays.update(self.trainer.checkpoint())
        return arrays, {"dead": sorted(self.dead), **meta}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Load :meth:`checkpoint`'s output into a freshly built pool."""
        for s in meta["dead"]:
            self.servers.kill(s)
        self.call("load_full_state", self.servers.alive(), each=lambda s: (sub(arrays, f"server{s}"),))
        self.recovery.restore(arrays, meta)
        self.trainer.restore(arrays)


def _broadcast_key(server: int, key: str) -> str:
    """A server's weight name in the broadcast: ``s{i}.<param>``, a fold copy's ``fold{j}:s{i}.<param>``."""
    fold, sep, param = key.partition(":")
    return f"{fold}:s{server}.{param}" if sep else f"s{server}.{key}"
