"""The helper-server pool: S servers as Ray actors, routing, joint training, failover.

Each helper server is a :class:`servers.helper.HelperServer` inside its own Ray actor (with
``servers.resources`` CPUs/GPUs, so a cluster can place servers on GPU nodes); with
``sim.backend=inprocess`` the same objects are called in this process instead. The pool lives
in the ServerApp's process and:

- carries out the failure schedule (:mod:`sim.failures`): a crash is ``ray.kill`` of the actor
  (its state is gone), a recovery starts a new actor from the pool's last checkpoint of that
  server or from scratch, an outage makes the pool stop contacting a server for a round, a slow
  server gets an injected answer delay;
- detects which servers are up by a health check (``ping`` with ``failures.query_timeout_s``):
  a dead actor raises, a slow one times out;
- routes the samples devices defer (``servers.routing``): ``learned`` (the device's rejector
  picked the server), ``round_robin``, ``least_loaded``, ``all`` (every reachable server; the
  answer is their ensemble);
- trains (``servers.training``): ``independent`` -- each server fits its own buffer, all in
  parallel; ``mel`` -- trunks and standalone heads on the actors, MEL combiner heads here, joined
  per minibatch (features go from the actors to the pool, the combiner loss's feature gradients
  go back); ``dml`` -- per minibatch each actor gets its peers' softmax outputs for the mutual KL
  term; ``coop`` -- cooperative learning (arXiv 2312.08532): server 0 is the Leader (labels only),
  the others are Teammates with multi-exit networks (mutual KL with each other and the Leader,
  SFSL distillation into their shallower exits). MEL, DML and coop train on one shared buffer of
  every deferred sample (kept here);
- serves cooperative-learning Teammates at a depth that drops under load or cost pressure
  (:func:`serving_fraction`);
- answers deferred test queries with failover: the ensemble of all servers -> the ensemble of
  the servers that answered (``subset``) -> a surviving standalone server (``standalone``) -> the
  device's own legacy model (``legacy``). Every failover of a deferred sample is counted by kind.
"""
from __future__ import annotations

import time

from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from servers.helper import HelperServer, ReplayBuffer
from servers.losses import mel_combiner_loss
from servers.models import COOP_LEADER, Combiners, all_subsets, depth_fractions, ensemble_probs, subset_key
from sim.engine import check_stop
from sim.failures import RoundFaults
from sim.training import derive_seed, seeded

ROUTINGS = ("learned", "round_robin", "least_loaded", "all")
TRAININGS = ("independent", "mel", "dml", "coop")
FAILOVER_KINDS = ("subset", "standalone", "legacy")


def serving_fraction(load: int, fractions: Sequence[float], max_fraction: float = 1.0,
                     capacity: float | None = None) -> float:
    """The depth a multi-exit (cooperative-learning) server answers at this round.

    Compute per answer is taken as proportional to depth, so a server with ``capacity``
    full-depth answers per round can serve ``load`` answers at depth fraction ``f`` iff
    ``load * f <= capacity``. Returns the deepest exit ``f <= max_fraction`` (cost pressure:
    ``servers.coop.serve_depth``) that fits the capacity (``servers.coop.capacity``; None:
    unlimited), or the shallowest exit when none fits.

    Args:
        load: deferred samples routed to the server this round (>= 0). fractions: the exits'
            depth fractions, ascending, last 1.0.
    """
    allowed = [f for f in fractions if f <= max_fraction + 1e-9] or [min(fractions)]
    if capacity is not None:
        allowed = [f for f in allowed if load * f <= capacity] or [min(fractions)]
    return max(allowed)


class ServerUnavailable(RuntimeError):
    """A server did not answer: dead (actor gone), unreachable, or slower than the timeout."""


class _Done:
    """The result of an in-process call (an exception is kept and raised on :func:`gather`)."""

    def __init__(self, value: Any = None, error: BaseException | None = None, delay: float = 0.0):
        self.value, self.error, self.delay = value, error, delay


class LocalHandle:
    """A helper server called in this process (``sim.backend=inprocess``; tests).

    An injected delay is not slept: a call slower than the timeout fails at once, so in-process
    runs stay fast and give the same results as Ray runs (where the delay is real).
    """

    TIMED = ("ping", "predict")

    def __init__(self, make: Callable[[], HelperServer]):
        self.obj: HelperServer | None = make()

    def submit(self, method: str, *args: Any) -> _Done:
        if self.obj is None:
            return _Done(error=ServerUnavailable("server is dead"))
        obj = self.obj
        delay = obj.delay_s if method in self.TIMED else 0.0
        saved, obj.delay_s = obj.delay_s, 0.0  # the delay is judged against the timeout, not slept
        try:
            return _Done(getattr(obj, method)(*args), delay=delay)
        except Exception as exc:  # noqa: BLE001 -- a server's failure is a result, not a crash
            return _Done(error=exc)
        finally:
            if method != "set_delay":
                obj.delay_s = saved

    def kill(self) -> None:
        self.obj = None


class RayHandle:
    """A helper server in its own Ray actor."""

    def __init__(self, actor: Any):
        self.actor = actor

    def submit(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method).remote(*args)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def gather(futures: dict[int, Any], timeout: float | None) -> tuple[dict[int, Any], dict[int, str]]:
    """Wait for ``server -> future``; returns ``(results, failures)`` with failure reasons
    ``dead`` (the actor is gone or the call raised) or ``timeout``.

    Raises:
        sim.engine.Interrupted: the run is stopping (Ctrl-C / SIGTERM).
    """
    check_stop()
    results: dict[int, Any] = {}
    failed: dict[int, str] = {}
    ray_refs = {s: f for s, f in futures.items() if not isinstance(f, _Done)}
    for s, f in futures.items():
        if isinstance(f, _Done):
            if f.error is not None:
                failed[s] = "dead"
            elif timeout is not None and f.delay > timeout:
                failed[s] = "timeout"
            else:
                results[s] = f.value
    if ray_refs:
        import ray

        refs = list(ray_refs.values())
        # Wait in short slices so a stop (Ctrl-C / SIGTERM) is seen even while an actor call is in
        # flight: once the main thread shuts Ray down, a single unbounded ray.wait never returns.
        deadline = None if timeout is None else time.monotonic() + timeout
        ready: list = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.25 if left is None else min(0.25, left))
            if len(ready) == len(refs) or (left is not None and left <= 0.25):
                break
            check_stop()
        ready_set = set(ready)
        for s, ref in ray_refs.items():
            if ref not in ready_set:
                failed[s] = "timeout"
                continue
            try:
                results[s] = ray.get(ref)
            except Exception:  # noqa: BLE001 -- RayActorError, a raised task error: the server is gone
                failed[s] = "dead"
    return results, failed


class ServerPool:
    """S helper servers with routing, joint training and failover.

    Args:
        cfg: the run config (plain dict); uses ``servers``, ``failures.query_timeout_s``, ``seed``,
            ``sim.torch_threads``, ``sim.backend``.
        in_shape: ``(C, H, W)``. num_classes: K.
        placement: ``ray`` (one actor per server; Ray must be initialised) or ``local``.
    """

    def __init__(self, cfg: dict[str, Any], in_shape: Sequence[int], num_classes: int, placement: str):
        s = cfg["servers"]
        self.cfg, self.scfg = cfg, s
        self.num_servers = int(s["count"])
        self.routing, self.training = str(s["routing"]), str(s["training"])
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.seed = int(cfg["seed"])
        self.timeout = float(cfg["failures"]["query_timeout_s"])
        self.placement = placement
        self.handles: dict[int, Any] = {i: self._new_handle(i) for i in range(self.num_servers)}
        self.dead: set[int] = set()
        self.outage: set[int] = set()
        self.up: list[int] = []
        self.checkpoints: dict[int, dict[str, np.ndarray]] = {}
        self.initial: dict[int, dict[str, np.ndarray]] = {}  # installed start states (L2D's fixed experts)
        self.combiners: Combiners | None = None
        self.comb_opt: torch.optim.Optimizer | None = None
        self.shared = ReplayBuffer(int(s["buffer_size"])) if self.training != "independent" else None
        if self.training == "mel" and self.num_servers >= 2:
            with seeded(derive_seed(self.seed, "combiner-init")):
                feat = HelperServer(s, in_shape, num_classes, self.seed).model.feature_dim
                self.combiners = Combiners(self.num_servers, feat, num_classes)
            self.comb_opt = torch.optim.Adam(self.combiners.parameters(), lr=float(s["lr"]))
        self.load = np.zeros(self.num_servers, dtype=np.int64)  # this round: samples routed per server
        self.failovers: Counter = Counter()  # this round, by kind
        self.train_rerouted = 0
        self.faults = RoundFaults(round=0)
        self.exits: dict[int, torch.Tensor] = {}  # coop: every exit's test logits (D, N, K), per server
        self.depth: dict[int, float] = {}  # coop: each Teammate's serving depth fraction this round

    # ---- lifecycle ----------------------------------------------------------------------------
    def _new_handle(self, index: int) -> Any:
        s = self.scfg
        args = (s, list(self.in_shape), self.num_classes, self.seed, index, int(self.cfg["sim"]["torch_threads"]))
        if self.placement == "local":
            return LocalHandle(lambda: HelperServer(*args))
        import ray

        actor_cls = ray.remote(HelperServer).options(
            num_cpus=float(s["resources"]["num_cpus"]), num_gpus=float(s["resources"]["num_gpus"]),
            max_restarts=0, max_task_retries=0)
        return RayHandle(actor_cls.remote(*args))

    def wait_ready(self, timeout: float) -> None:
        """Wait until every server actor answers (Ray schedules actors only where their resources fit).

        Raises:
            ServerUnavailable: some actor did not start within ``timeout`` seconds.
        """
        _, failed = gather({s: h.submit("ping") for s, h in self.handles.items()}, timeout)
        if failed:
            r = self.scfg["resources"]
            raise ServerUnavailable(
                f"{len(failed)} of {self.num_servers} helper server actors did not start within {timeout:g}s: "
                f"the Ray cluster may not have servers.resources (num_cpus={r['num_cpus']}, "
                f"num_gpus={r['num_gpus']}) free for each server")

    def install(self, states: list[dict[str, np.ndarray]]) -> None:
        """Load a start state into every server (``net.<param>`` arrays, as :meth:`HelperServer.state`):
        L2D's pretrained fixed experts. A server recovering "from scratch" gets it back."""
        self.initial = {s: st for s, st in enumerate(states)}
        self.call("load_state", list(self.initial), each=lambda s: (self.initial[s],))
        self.checkpoints.update(self.initial)

    def where(self) -> dict[str, str]:
        """Which torch device each live server's network runs on (``cpu`` / ``cuda:0``)."""
        res = self.call("where", [s for s in self.handles if s not in self.dead], timeout=30.0)
        return {str(s): v for s, v in sorted(res.items())}

    def call(self, method: str, servers: Sequence[int], *args: Any, timeout: float | None = None,
             each: Callable[[int], tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on each of ``servers`` in parallel and wait (up to ``timeout``).

        Args:
            args: the same arguments for every server, or ``each(s)``: server s's arguments.

        Returns:
            ``server -> result`` for the servers that answered; those whose actor is gone are
            marked dead, those slower than ``timeout`` are left out.
        """
        res, failed = gather({s: self.handles[s].submit(method, *(each(s) if each else args)) for s in servers},
                             timeout)
        self.dead |= {s for s, why in failed.items() if why == "dead"}
        return res

    def shutdown(self) -> None:
        """Kill every server actor (end of run, or an interrupted one)."""
        for i, h in self.handles.items():
            if i not in self.dead:
                try:
                    h.kill()
                except Exception:  # noqa: BLE001 -- already gone
                    pass
        self.dead = set(self.handles)

    def begin_round(self, faults: RoundFaults) -> list[int]:
        """Carry out this round's faults, then health-check every server.

        Returns:
            The servers up this round (alive, not in an outage, answering within the timeout).
        """
        self.faults = faults
        for s in faults.kill:
            if s not in self.dead:
                self.handles[s].kill()
                self.dead.add(s)
        for s in faults.restart:
            if s in self.dead:
                self.handles[s] = self._new_handle(s)
                self.dead.discard(s)
                if faults.recover_from == "checkpoint" and s in self.checkpoints:
                    self.call("load_state", [s], self.checkpoints[s])
                elif s in self.initial:  # "scratch": the state the run started with
                    self.call("load_state", [s], self.initial[s])
        self.outage = set(faults.outage)
        live = [s for s in range(self.num_servers) if s not in self.dead]
        self.call("set_delay", live, each=lambda s: (float(faults.slow.get(s, 0.0)),))
        self.load[:] = 0
        self.failovers = Counter()
        self.train_rerouted = 0
        self.up = self.health()
        return self.up

    def begin_eval(self) -> None:
        """Start counting this round's evaluation load (training load was reported already)."""
        self.load[:] = 0

    def health(self) -> list[int]:
        """Ping every live, reachable server; a dead actor is marked dead, a slow one is down."""
        live = [s for s in range(self.num_servers) if s not in self.dead and s not in self.outage]
        return sorted(self.call("ping", live, timeout=self.timeout))

    def reachable(self, device: int) -> list[int]:
        """Servers ``device`` can reach this round: up, and not cut off by a network partition."""
        cut = self.faults.cut_servers(device)
        return [s for s in self.up if s not in cut]

    def availability(self) -> list[int]:
        """Per server: 1 if up this round, else 0."""
        return [int(s in self.up) for s in range(self.num_servers)]

    # ---- what devices receive -----------------------------------------------------------------
    def snapshot(self) -> dict[str, np.ndarray]:
        """Weights of the up servers (``s{i}.<param>``) and, for MEL, the combiner heads
        (``comb.<param>``): what a device needs to predict every routing option itself."""
        res = self.call("weights", self.up)
        out = {f"s{s}.{k}": v for s, w in sorted(res.items()) for k, v in w.items()}
        if self.combiners is not None:
            out.update({f"comb.{k}": v.detach().numpy().copy() for k, v in self.combiners.state_dict().items()})
        return out

    # ---- training -----------------------------------------------------------------------------
    def _assign(self, candidates: Sequence[int], rr_index: int) -> int:
        """One server among ``candidates`` for the pool-chosen routings."""
        if self.routing == "least_loaded":
            return min(candidates, key=lambda s: (self.load[s], s))
        return candidates[rr_index % len(candidates)]

    def train(self, server_round: int, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Route the devices' samples to servers and train them.

        Args:
            batches: one dict per device (sorted by device): ``device`` (int), ``ids (M,)``,
                ``x (M, C, H, W)``, ``y (M,)``, ``route (M,)`` (the server a learned rejector chose,
                -1 otherwise), ``explore (M,)`` bool.

        Returns:
            Metrics: ``server_loss``, ``buffer_size``, ``train_rerouted`` (samples whose chosen
            server was down and went to another).
        """
        batches = [b for b in batches if len(b["ids"]) and self.reachable(int(b["device"]))]
        if not batches:
            ids = np.empty(0, dtype=np.int64)
            x = np.empty((0, *self.in_shape), dtype=np.float32)
            y = np.empty(0, dtype=np.int64)
        else:
            ids, x, y = (np.concatenate([b[k] for b in batches]) for k in ("ids", "x", "y"))
        rows: dict[int, list[int]] = {s: [] for s in self.up}
        row, rr = 0, 0
        for b in batches:
            reach = self.reachable(int(b["device"]))
            for want, explore in zip(b["route"].tolist(), b["explore"].tolist()):
                if self.routing == "all" and not explore:
                    targets = reach
                elif want in reach and not explore:
                    targets = [want]
                else:
                    if want >= 0 and not explore:
                        self.train_rerouted += 1  # the chosen server went down since the device chose
                    targets = [self._assign(reach, rr)]
                    rr += 1
                for s in targets:
                    self.load[s] += 1
                    rows[s].append(row)
                row += 1
        if self.training == "independent":
            self.call("add", [s for s, r in rows.items() if r], each=lambda s: (ids[rows[s]], x[rows[s]], y[rows[s]]))
            res = self.call("fit", [s for s in self.up if s not in self.dead], server_round)
            losses = [r["server_loss"] for r in res.values() if np.isfinite(r["server_loss"])]
            size = int(sum(r["buffer_size"] for r in res.values()))
            return {"server_loss": float(np.mean(losses)) if losses else float("nan"), "buffer_size": size,
                    "train_rerouted": self.train_rerouted}
        if len(ids):
            self.shared.add(ids, x, y)
        loss = self._joint_fit(server_round)
        return {"server_loss": loss, "buffer_size": len(self.shared), "train_rerouted": self.train_rerouted}

    def _joint_fit(self, server_round: int) -> float:
        """MEL or DML: ``servers.epochs`` passes over the shared buffer, every up server in step.

        MEL (arXiv 2506.20094; METHODS.md section 5): loss ``sum_A lambda_A CE(h_A, y)`` over the
        standalone heads (on the actors, weight ``servers.mel.standalone_weight``) and the
        combiner heads of every subset of >= 2 up servers (here, ``servers.mel.combiner_weight``).
        DML (arXiv 1706.00384): each server's loss is CE plus the mean KL from its peers.
        """
        members = [s for s in self.up if s not in self.dead]
        if len(self.shared) == 0 or not members:
            return float("nan")
        x_all, y_all = self.shared.x, self.shared.y
        n, bs = len(y_all), int(self.scfg["batch_size"])
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "pool-fit", server_round))
        batches = []  # (epoch, sample indices), in training order
        for epoch in range(int(self.scfg["epochs"])):
            order = torch.randperm(n, generator=gen).numpy()
            batches += [(epoch, np.sort(order[start:start + bs])) for start in range(0, n, bs)]
        mel = self.scfg["mel"]
        weight = float(mel["standalone_weight"]) if self.training == "mel" else 1.0
        learners = [s for s in members if self.training == "dml" or (self.training == "coop" and s != COOP_LEADER)]
        subsets = all_subsets(members) if self.combiners is not None else []
        # One actor call per minibatch: finishing batch k and starting batch k+1 travel together,
        # and each actor still runs backward(k) before forward(k+1), so the arithmetic is the same.
        out = self.call("forward_batch", members, x_all[batches[0][1]])
        last, total, count = float("nan"), 0.0, 0
        for k, (epoch, idx) in enumerate(batches):
            members = [s for s in members if s in out]
            subsets = [a for a in subsets if set(a) <= set(members)]
            if not members:
                return last
            yb = y_all[idx]
            grads: dict[int, np.ndarray | None] = {s: None for s in members}
            comb_loss = 0.0
            if subsets:
                feats = {s: torch.from_numpy(np.array(out[s][0])).requires_grad_(True) for s in members}
                loss = mel_combiner_loss(self.combiners, feats, torch.from_numpy(yb), subsets,
                                         float(mel["combiner_weight"]))
                self.comb_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.comb_opt.step()
                comb_loss = float(loss.detach())
                grads = {s: feats[s].grad.numpy() for s in members}
            peers: dict[int, np.ndarray | None] = {s: None for s in members}
            if learners and len(members) > 1:  # DML: every peer; coop: Teammates learn from peers and Leader
                probs = {s: torch.softmax(torch.from_numpy(np.array(out[s][1])), 1).numpy() for s in members}
                peers.update({s: np.stack([probs[p] for p in members if p != s]) for s in learners if s in members})
            x_next = x_all[batches[k + 1][1]] if k + 1 < len(batches) else None
            res = self.call("step_batch", members, each=lambda s: (yb, grads[s], weight, peers[s], x_next))
            total += (sum(r[0] for r in res.values()) + comb_loss) * len(idx)
            count += len(idx)
            out = {s: r[1] for s, r in res.items()}
            if k + 1 == len(batches) or batches[k + 1][0] != epoch:
                last, total, count = total / max(count, 1), 0.0, 0
        return last

    def end_round(self) -> None:
        """Checkpoint every up server (what crash-recover ``from checkpoint`` restores)."""
        self.checkpoints.update(self.call("state", self.up))

    # ---- checkpoint / resume ------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything that determines the pool's future, as ``(arrays, meta)``: each live server's
        weights, optimizer and buffer; the crash-recover checkpoints; MEL combiners and their
        optimizer; the shared buffer; which servers are dead."""
        from sim.checkpoint import optimizer_arrays, prefixed

        live = [s for s in range(self.num_servers) if s not in self.dead]
        res = self.call("full_state", live)
        arrays: dict[str, np.ndarray] = {}
        for s, st in res.items():
            arrays.update(prefixed(f"server{s}", st))
        for s, st in self.checkpoints.items():
            arrays.update(prefixed(f"recovery{s}", st))
        if self.combiners is not None:
            arrays.update(prefixed("combiners", {k: v.detach().numpy().copy()
                                                 for k, v in self.combiners.state_dict().items()}))
            arrays.update(prefixed("combiners_opt", optimizer_arrays(self.comb_opt)))
        if self.shared is not None and len(self.shared):
            arrays.update({"shared/ids": self.shared.ids, "shared/x": self.shared.x, "shared/y": self.shared.y})
        return arrays, {"dead": sorted(self.dead), "recovery": sorted(self.checkpoints)}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Load :meth:`checkpoint`'s output into a freshly built pool."""
        from sim.checkpoint import load_optimizer, sub

        for s in meta["dead"]:
            self.handles[s].kill()
            self.dead.add(s)
        live = [s for s in range(self.num_servers) if s not in self.dead]
        self.call("load_full_state", live, each=lambda s: (sub(arrays, f"server{s}"),))
        self.checkpoints = {int(s): sub(arrays, f"recovery{s}") for s in meta["recovery"]}
        if self.combiners is not None:
            self.combiners.load_state_dict({k: torch.from_numpy(np.array(v))
                                            for k, v in sub(arrays, "combiners").items()})
            load_optimizer(self.comb_opt, sub(arrays, "combiners_opt"))
        if self.shared is not None and "shared/ids" in arrays:
            self.shared.add(arrays["shared/ids"], arrays["shared/x"], arrays["shared/y"])

    # ---- answering deferred queries -------------------------------------------------------------
    def outputs(self, x: np.ndarray, timeout: float | None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Trunk features ``(N, F)`` and logits ``(N, K)`` on ``x`` of every up server that answers
        within ``timeout``, as ``server -> tensor`` dicts."""
        res = self.call("predict", self.up, x, timeout=timeout)
        self.exits = {s: torch.from_numpy(np.array(r[2])) for s, r in sorted(res.items()) if len(r) > 2}
        # np.array copies: Ray hands back read-only arrays.
        return ({s: torch.from_numpy(np.array(r[0])) for s, r in sorted(res.items())},
                {s: torch.from_numpy(np.array(r[1])) for s, r in sorted(res.items())})

    def answer(self, server_round: int, x: np.ndarray, device: np.ndarray, route: np.ndarray, defer: np.ndarray,
               m_pred: np.ndarray) -> dict[str, np.ndarray]:
        """Answer test samples with failover.

        Every sample is answered as if deferred (the curves and baselines need the answer a
        deferred sample would get); only deferred ones count towards load and failovers.

        Args:
            x: ``(N, C, H, W)``. device: ``(N,)`` device ids. route: ``(N,)`` server chosen by a
            learned rejector (-1: none or pool-chosen). defer: ``(N,)`` bool. m_pred: ``(N,)`` the
            legacy prediction (the last fallback).

        Returns:
            ``e_pred (N,)`` (the prediction the sample gets when deferred), ``served (N,)`` (a
            server answered it), ``failover (N,)`` (kind index into ``("none",) + FAILOVER_KINDS``).
        """
        n = len(x)
        feats, logits = self.outputs(x, self.timeout)  # the servers that answered
        rng = np.random.default_rng(derive_seed(self.seed, "query-drop", server_round))
        dropped = rng.random((n, self.num_servers)) < float(self.faults.query_drop)
        kinds = ("none",) + FAILOVER_KINDS
        e_pred = m_pred.astype(np.int64).copy()
        served = np.zeros(n, dtype=bool)
        kind = np.zeros(n, dtype=np.int64)
        groups: dict[tuple[int, ...], list[int]] = {}
        reach_of = {int(d): self.reachable(int(d)) for d in np.unique(device)}
        rr = 0
        order = np.concatenate([np.flatnonzero(defer), np.flatnonzero(~defer)])  # deferred first: they load
        for i in order:
            reach = reach_of[int(device[i])]
            if not reach:  # nothing reachable: the legacy model answers
                kind[i] = kinds.index("legacy")
                if defer[i]:
                    self.failovers["legacy"] += 1
                continue
            if self.routing == "all":
                want = list(reach)
            elif self.routing == "learned" and int(route[i]) in reach:
                want = [int(route[i])]
            else:
                want = [self._assign(reach, rr)]
                rr += 1
            got = [s for s in want if s in logits and not dropped[i, s]]
            # MEL's chain is judged against the whole pool: an ensemble of fewer than all S servers
            # is a failover; a single-server request fails over only if that server did not answer.
            full = self.num_servers if self.routing == "all" else len(want)
            if got:
                k = "none" if len(got) == full else ("subset" if len(got) >= 2 else "standalone")
            else:
                others = [s for s in reach if s in logits and not dropped[i, s]]
                got = [min(others, key=lambda s: (self.load[s], s))] if others else []
                k = "standalone" if got else "legacy"
            if defer[i]:
                for s in got:
                    self.load[s] += 1
                if k != "none":
                    self.failovers[k] += 1
            kind[i] = kinds.index(k)
            if got:
                served[i] = True
                groups.setdefault(tuple(got), []).append(int(i))
        self.depth = {}
        if self.training == "coop":  # Teammates answer at the depth their load allows; the Leader at full depth
            c = self.scfg["coop"]
            for s, ex in self.exits.items():
                if s == COOP_LEADER:
                    continue
                fracs = depth_fractions(len(ex))
                f = serving_fraction(int(self.load[s]), fracs, float(c["serve_depth"]), c["capacity"])
                self.depth[s] = f
                logits[s] = ex[fracs.index(f)]
        for subset, rows in groups.items():
            idx = torch.tensor(rows)
            probs = ensemble_probs(subset, {s: feats[s][idx] for s in subset}, {s: logits[s][idx] for s in subset},
                                   self.combiners)
            e_pred[rows] = probs.argmax(1).numpy()
        return {"e_pred": e_pred, "served": served, "failover": kind}

    def table(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Server-only accuracy of each up standalone server and each ensemble of >= 2 up servers on
        ``x, y`` (the standalone-vs-ensemble table of MEL), and MEL's resilience ratio: mean
        standalone accuracy / accuracy of the ensemble of all up servers."""
        feats, logits = self.outputs(x, None)
        out: dict[str, Any] = {"standalone": {}, "ensemble": {}}
        for s in sorted(logits):
            out["standalone"][str(s)] = float((logits[s].argmax(1).numpy() == y).mean())
        for a in all_subsets(sorted(logits)):
            out["ensemble"][subset_key(a)] = float(
                (ensemble_probs(a, feats, logits, self.combiners).argmax(1).numpy() == y).mean())
        if self.exits:  # coop: accuracy of every Teammate exit (the accuracy-vs-depth curve)
            out["exits"] = {str(s): {f"{f:g}": float((ex[d].argmax(1).numpy() == y).mean())
                                     for d, f in enumerate(depth_fractions(len(ex)))}
                            for s, ex in self.exits.items() if s != COOP_LEADER}
        full = subset_key(sorted(logits))
        if len(logits) >= 2:
            mean_alone = float(np.mean(list(out["standalone"].values())))
            out["standalone_over_ensemble"] = mean_alone / out["ensemble"][full] if out["ensemble"][full] else None
        return out
