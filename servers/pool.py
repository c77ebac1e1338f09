"""The helper-server pool: S servers behind one facade (lifecycle, faults, routing, training, answers).

The parts: :mod:`servers.handles` (a server in a Ray actor or in-process), :mod:`servers.router`
(``servers.routing``, the same for training and answers), :mod:`servers.trainers`
(``servers.training``), :mod:`servers.failover` (answers with failover, serving depth). The pool
lives in the ServerApp's process and, each round, carries out the failure schedule
(:mod:`sim.core.faults`: a crash kills the server's actor, a recovery starts a new one from the
pool's last checkpoint of it or from scratch, an outage makes the pool stop contacting it, a slow
server gets an injected delay) and finds which servers are up by a health check (``ping`` within
``failures.query_timeout_s``).

A Ray actor answers its calls one at a time, so a server whose call timed out is *busy* until that
call returns: the pool does not queue timed calls behind it (a busy server counts as not answering,
at once) and waits for it, at most :data:`BUSY_GRACE_S` past its delay, only before an untimed call.
A server slowed past the timeout is snapshotted first (``full_state``), so a checkpoint taken while it
sleeps needs no call to it: a slow server costs the round its timeout, not its delay.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from servers.failover import Answers, ServerOutputs, answer, ensemble_table
from servers.handles import ServerUnavailable, gather, new_handle
from servers.helper import HelperServer
from servers.router import Router
from servers.trainers import JointTrainer, make_trainer
from sim.core.arrays import prefixed, sub
from sim.core.config import ServersConfig, Training
from sim.core.faults import RoundFaults
from sim.core.seeding import derive_seed

__all__ = ["ServerPool", "ServerUnavailable"]

READ_ONLY = frozenset({"ping", "set_delay", "where", "predict", "weights", "broadcast_weights", "state", "full_state",
                       "predict_labels"})
"""Server methods that leave a server's state (weights, optimizer, buffer) as it is."""

BUSY_GRACE_S = 60.0
"""How long past its injected delay the pool waits for a busy server before an untimed call to it."""


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
        self.cfg, self.seed, self.timeout = cfg, seed, float(query_timeout_s)
        self.prices = list(prices) if prices is not None else None
        self.num_servers, self.in_shape, self.num_classes = int(cfg.count), tuple(in_shape), num_classes
        self.torch_threads = torch_threads
        self.placement = placement
        self.busy: dict[int, tuple[Any, float]] = {}  # server -> (its call that timed out, its delay then)
        self.resting: dict[int, dict[str, np.ndarray]] = {}  # full_state of a slowed server, taken before
        self.folds = int(folds)
        if self.folds and cfg.training != Training.independent:
            raise ValueError("crossfit fold copies need servers.training=independent")
        self._new = lambda i: new_handle(placement, cfg, self.in_shape, num_classes, seed, i, torch_threads, self.folds)
        self.handles: dict[int, Any] = {i: self._new(i) for i in range(self.num_servers)}
        self.dead: set[int] = set()
        self.outage: set[int] = set()
        self.up: list[int] = []
        self.checkpoints: dict[int, dict[str, np.ndarray]] = {}  # what crash-recover "from checkpoint" restores
        # Per server, rounds (0: none; see :meth:`begin_round`): the last round its weights were trained,
        # the round its crash-recover checkpoint was taken at (0: its start state), and the last round it
        # came back with less training than it went down with (a reset).
        self.trained_round = np.zeros(self.num_servers, dtype=np.int64)
        self.checkpoint_round = np.zeros(self.num_servers, dtype=np.int64)
        self.reset_round = np.zeros(self.num_servers, dtype=np.int64)
        self.masked: dict[int, set[int]] = {}  # this round's evaluation: device -> servers it must not use
        self.initial: dict[int, dict[str, np.ndarray]] = {}  # installed start states (L2D's fixed experts)
        self.trainer = make_trainer(cfg, in_shape, num_classes, seed)
        self.combiners = self.trainer.combiners if isinstance(self.trainer, JointTrainer) else None
        self.load = np.zeros(self.num_servers, dtype=np.int64)  # this round: samples routed per server
        self.router = Router(cfg.resolved_routing, self.load)
        self.failovers: Counter = Counter()  # this round, by kind
        self.train_rerouted = 0
        self.faults = RoundFaults(round=0)
        self.depth: dict[int, float] = {}  # coop: each Teammate's serving depth fraction this round
        self.last_outputs: ServerOutputs | None = None  # the up servers' answers of the last answer() call
        self._replicas: dict[int, tuple[int, HelperServer]] = {}  # what the all-up counterfactual asks

    # ---- lifecycle ----------------------------------------------------------------------------
    def call(self, method: str, servers: Sequence[int], *args: Any, timeout: float | None = None,
             each: Callable[[int], tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on each of ``servers`` in parallel and wait (up to ``timeout``).

        A busy server (its earlier call timed out and has not returned) is not called by a timed call:
        it counts as slower than ``timeout`` at once. Before an untimed call the pool waits for it
        (:meth:`settle`).

        Args:
            args: the same arguments for every server, or ``each(s)``: server s's arguments.

        Returns:
            ``server -> result`` for the servers that answered; those whose actor is gone are
            marked dead, those slower than ``timeout`` are left out (and busy until they answer).
        """
        servers = list(servers)
        if timeout is None:
            self.settle([s for s in servers if s in self.busy])
        ask = [s for s in servers if not self.still_busy(s)]
        futures = {s: self.handles[s].submit(method, *(each(s) if each else args)) for s in ask}
        res, failed = gather(futures, timeout)
        self.dead |= {s for s, why in failed.items() if why == "dead"}
        for s, why in failed.items():
            if why == "timeout" and hasattr(futures[s], "ref"):  # a Ray call still running on the actor
                self.busy[s] = (futures[s], float(self.faults.slow.get(s, 0.0)))
        if method not in READ_ONLY:
            for s in ask:
                self.resting.pop(s, None)
        return res

    def still_busy(self, s: int) -> bool:
        """Whether server ``s``'s call that timed out is still running (checked without waiting)."""
        if s not in self.busy:
            return False
        _, failed = gather({s: self.busy[s][0]}, 0.0)
        if failed.get(s) == "timeout":
            return True
        del self.busy[s]
        if failed.get(s) == "dead":
            self.dead.add(s)
        return False

    def settle(self, servers: Sequence[int]) -> None:
        """Wait until the busy ``servers`` have answered their call that timed out, each at most its
        delay plus :data:`BUSY_GRACE_S` (one that has not by then stays busy)."""
        for s in servers:
            if self.still_busy(s):
                future, delay = self.busy[s]
                _, failed = gather({s: future}, delay + BUSY_GRACE_S)
                if failed.get(s) != "timeout":
                    del self.busy[s]
                    if failed.get(s) == "dead":
                        self.dead.add(s)

    def live(self) -> list[int]:
        """The up servers that are still alive."""
        return [s for s in self.up if s not in self.dead]

    def wait_ready(self, timeout: float) -> None:
        """Wait until every server answers (Ray schedules actors only where their resources fit).

        Raises:
            ServerUnavailable: some server did not start within ``timeout`` seconds.
        """
        _, failed = gather({s: h.submit("ping") for s, h in self.handles.items()}, timeout)
        if failed:
            r = self.cfg.resources
            raise ServerUnavailable(
                f"{len(failed)} of {self.num_servers} helper server actors did not start within {timeout:g}s: "
                f"the Ray cluster may not have servers.resources (num_cpus={r.num_cpus}, "
                f"num_gpus={r.num_gpus}) free for each server")

    def install(self, states: list[dict[str, np.ndarray]]) -> None:
        """Load a start state into every server (``net.<param>`` arrays): L2D's fixed experts. A server
        recovering "from scratch" gets it back."""
        self.initial = dict(enumerate(states))
        self.call("load_state", list(self.initial), each=lambda s: (self.initial[s],))
        self.checkpoints.update(self.initial)

    def where(self) -> dict[str, str]:
        """Which torch device each live server's network runs on (``cpu`` / ``cuda:0``)."""
        res = self.call("where", [s for s in self.handles if s not in self.dead], timeout=30.0)
        return {str(s): v for s, v in sorted(res.items())}

    def shutdown(self) -> None:
        """Kill every server (end of run, or an interrupted one)."""
        for i, h in self.handles.items():
            if i not in self.dead:
                try:
                    h.kill()
                except Exception:  # noqa: BLE001 -- already gone
                    pass
        self.dead = set(self.handles)
        self.busy.clear()

    # ---- a round ------------------------------------------------------------------------------
    def begin_round(self, faults: RoundFaults) -> list[int]:
        """Carry out this round's faults, then health-check every server; returns the servers up
        (alive, not in an outage, answering within the timeout).

        A server that comes back with less training than it had when it went down -- from scratch
        after it had trained, or from a checkpoint older than its last training -- is *reset*:
        :attr:`reset_round` records the round, and what devices learnt about it before no longer
        describes it (docs/methods.md §1, "Synchronous and asynchronous")."""
        self.faults = faults
        self.masked = {}
        for s in faults.kill:
            if s not in self.dead:
                self.handles[s].kill()
                self.dead.add(s)
            self.busy.pop(s, None)
        for s in faults.restart:
            if s in self.dead:
                self.handles[s] = self._new(s)
                self.dead.discard(s)
                self.busy.pop(s, None)
                self.resting.pop(s, None)
                restored = 0  # the round whose end state the server comes back with (0: its start state)
                if faults.recover_from == "checkpoint" and s in self.checkpoints:
                    self.call("load_state", [s], self.checkpoints[s])
                    restored = int(self.checkpoint_round[s])
                elif s in self.initial:  # "scratch": the state the run started with
                    self.call("load_state", [s], self.initial[s])
                if restored < self.trained_round[s]:
                    self.reset_round[s] = faults.round
                    self.trained_round[s] = restored
        self.outage = set(faults.outage)
        live = [s for s in range(self.num_servers) if s not in self.dead]
        delay = {s: float(faults.slow.get(s, 0.0)) for s in live}
        # Slower than the timeout again while still busy: it counts as down without being called.
        asleep = {s for s in live if delay[s] > self.timeout and self.still_busy(s)}
        if self.placement == "ray":  # a checkpoint must not wait for a server about to sleep
            slowing = [s for s in live if delay[s] > self.timeout and s not in asleep and s not in self.resting]
            self.resting.update(self.call("full_state", slowing))
        self.call("set_delay", [s for s in live if s not in asleep], each=lambda s: (delay[s],))
        self.load[:] = 0
        self.failovers, self.train_rerouted = Counter(), 0
        reachable = [s for s in range(self.num_servers) if s not in self.dead and s not in self.outage]
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
            down and went to another).
        """
        batches = [b for b in batches if len(b["ids"]) and self.reachable(int(b["device"]))]
        if batches:
            ids, x, y = (np.concatenate([b[k] for b in batches]) for k in ("ids", "x", "y"))
        else:
            ids, x, y = np.empty(0, np.int64), np.empty((0, *self.in_shape), np.float32), np.empty(0, np.int64)
        rows: dict[int, list[int]] = {s: [] for s in self.up}
        self.router.reset()
        row = 0
        for b in batches:
            reach = self.reachable(int(b["device"]))
            for want, explore in zip(b["route"].tolist(), b["explore"].tolist()):
                targets, rerouted = self.router.pick(reach, want, explore)
                self.train_rerouted += rerouted  # the chosen server went down since the device chose
                for s in targets:
                    self.load[s] += 1
                    rows[s].append(row)
                row += 1
        fit = self.trainer.fit(self.call, self.live, ids, x, y, rows, server_round)
        self.trained_round[self.live()] = server_round
        return {**fit, "train_rerouted": self.train_rerouted}

    def end_round(self) -> None:
        """Checkpoint every up server (what crash-recover ``from checkpoint`` restores)."""
        states = self.call("state", self.up)
        self.checkpoints.update(states)
        self.checkpoint_round[list(states)] = self.faults.round

    # ---- answers ------------------------------------------------------------------------------
    def outputs(self, x: np.ndarray, timeout: float | None) -> ServerOutputs:
        """The answers on ``x`` of every up server that answers within ``timeout``."""
        res = self.call("predict", self.up, x, timeout=timeout)
        tensors = {i: {s: torch.from_numpy(np.array(r[i])) for s, r in sorted(res.items()) if len(r) > i}
                   for i in range(3)}  # np.array copies: Ray hands back read-only arrays
        return ServerOutputs(tensors[0], tensors[1], tensors[2])

    def answer(self, server_round: int, x: np.ndarray, device: np.ndarray, route: np.ndarray, defer: np.ndarray,
               m_pred: np.ndarray) -> Answers:
        """Answer test samples ``x (N, ...)`` with failover (see :func:`servers.failover.answer`)."""
        rng = np.random.default_rng(derive_seed(self.seed, "query-drop", server_round))
        dropped = rng.random((len(x), self.num_servers)) < float(self.faults.query_drop)
        reach_of = {int(d): self.reachable(int(d)) for d in np.unique(device)}
        # Untimed: whether a server is slower than failures.query_timeout_s was decided this round by
        # its health check (``ping`` sleeps its injected delay too). This one call carries the round's
        # every deferred test sample (100,000 at 10,000 devices); timed, a server's compute time on a
        # busy machine made an un-faulted server count as down and its samples fail over to legacy.
        self.last_outputs = self.outputs(x, None)
        out = answer(self.last_outputs, self.router, reach_of, device, route, defer, m_pred, dropped,
                     self.num_servers, self.failovers, self.combiners, self._coop(), self.prices)
        self.depth = out.depth
        return out

    def _coop(self) -> Any:
        return self.cfg.coop if self.cfg.training == Training.coop else None

    def degraded(self) -> bool:
        """Whether this round's answers are not those of every server up (a server down, a network
        partition, or queries dropped)."""
        return len(self.up) < self.num_servers or bool(self.faults.partition) or self.faults.query_drop > 0

    def answer_all_up(self, x: np.ndarray, device: np.ndarray, route: np.ndarray, defer: np.ndarray,
                      m_pred: np.ndarray) -> np.ndarray:
        """The counterfactual of :meth:`answer` (called after it, same samples): ``e_pred (N,)`` if
        every server had been up and reachable with the same trained models -- a server that is down
        answers with its last checkpoint (its state when it was last up; the state it started with
        if it never was), nothing is dropped or cut off. Counters and load are left untouched."""
        out = self.last_outputs
        for s in range(self.num_servers):
            if s not in out.logits:
                r = self._replica(s).predict(x)
                out.feats[s], out.logits[s] = (torch.from_numpy(np.array(v)) for v in r[:2])
                if len(r) > 2:
                    out.exits[s] = torch.from_numpy(np.array(r[2]))
        everyone = list(range(self.num_servers))
        res = answer(out, Router(self.cfg.resolved_routing, self.load.copy()), {int(d): everyone for d in
                     np.unique(device)}, device, route, defer, m_pred, np.zeros((len(x), self.num_servers), bool),
                     self.num_servers, Counter(), self.combiners, self._coop(), self.prices)
        return res.e_pred

    def _replica(self, s: int) -> HelperServer:
        """An in-process copy of server ``s`` with its last checkpoint (cached until that changes)."""
        state = self.checkpoints.get(s, self.initial.get(s))
        cached = self._replicas.get(s)
        if cached is None or cached[0] != id(state):
            server = HelperServer(self.cfg, self.in_shape, self.num_classes, self.seed, s, self.torch_threads)
            if state is not None:
                server.load_state(state)
            self._replicas[s] = cached = (id(state), server)
        return cached[1]

    def table(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """MEL's standalone-vs-ensemble table on ``x, y`` (:func:`servers.failover.ensemble_table`)."""
        return ensemble_table(self.outputs(x, None), y, self.combiners)

    # ---- checkpoint / resume ------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything that determines the pool's future, as ``(arrays, meta)``: each live server's
        weights, optimizer and buffer; the crash-recover checkpoints; the trainer's state (MEL
        combiners and their optimizer, the shared buffer); which servers are dead."""
        live = [s for s in range(self.num_servers) if s not in self.dead]
        states = {s: self.resting[s] for s in live if s in self.resting and self.still_busy(s)}
        states.update(self.call("full_state", [s for s in live if s not in states]))
        arrays: dict[str, np.ndarray] = {}
        for s in sorted(states):
            arrays.update(prefixed(f"server{s}", states[s]))
        for s, st in self.checkpoints.items():
            arrays.update(prefixed(f"recovery{s}", st))
        arrays.update(self.trainer.checkpoint())
        rounds = {"trained": self.trained_round.tolist(), "checkpoint": self.checkpoint_round.tolist(),
                  "reset": self.reset_round.tolist()}
        return arrays, {"dead": sorted(self.dead), "recovery": sorted(self.checkpoints), "rounds": rounds}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Load :meth:`checkpoint`'s output into a freshly built pool."""
        for s in meta["dead"]:
            self.handles[s].kill()
            self.dead.add(s)
        live = [s for s in range(self.num_servers) if s not in self.dead]
        self.call("load_full_state", live, each=lambda s: (sub(arrays, f"server{s}"),))
        self.checkpoints = {int(s): sub(arrays, f"recovery{s}") for s in meta["recovery"]}
        self.trainer.restore(arrays)
        rounds = meta.get("rounds", {})  # absent from checkpoints made before resets were tracked: none known
        for name, target in (("trained", self.trained_round), ("checkpoint", self.checkpoint_round),
                             ("reset", self.reset_round)):
            target[:] = rounds.get(name, [0] * self.num_servers)


def _broadcast_key(server: int, key: str) -> str:
    """A server's weight name in the broadcast: ``s{i}.<param>``, a fold copy's ``fold{j}:s{i}.<param>``."""
    fold, sep, param = key.partition(":")
    return f"{fold}:s{server}.{param}" if sep else f"s{server}.{key}"
