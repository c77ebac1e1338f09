"""The ServerApp side every method shares: a Flower strategy that drives the helper-server pool.

One round (docs/architecture.md, "A round"):

1. :meth:`PoolStrategy.configure_train` carries out the round's faults on the pool and sends the
   sampled devices the up servers' weights -- the current ones (``staleness=1``) or a copy
   refreshed every S rounds (asynchronous) -- and which servers they can reach.
2. Each device runs its method's :meth:`~strategies.method.DeviceMethod.train`.
3. :meth:`PoolStrategy.aggregate_train` keeps each device's trained part (for checkpoints and
   resumes) and hands the round to the method's :meth:`train_round` (L2H: route the samples the
   devices sent and train the servers; L2D: the experts are fixed).
4. Evaluation: each device decides on its test split; :meth:`answer` has the pool answer the
   deferred samples with failover; the metrics are pooled in :mod:`strategies.base`.
"""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.legacy import assign_groups
from servers.pool import ServerPool
from sim.core.arrays import stack_states, sub, unstack_states
from sim.core.config import Config, FederateBy, Federation
from sim.core.faults import NodeFaults, RoundFaults
from sim.core.round_record import RoundRecord
from strategies.base import DeviceReplies, FleetStrategy, resumable
from strategies.federation import weighted_mean


class CheckpointMismatch(ValueError):
    """A checkpoint's device states do not fit this run (missing, or an older format)."""


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays by name (decoded once)."""
    return {k: record[k].numpy() for k in record.keys()}


def faults_config(faults: RoundFaults, up: list[int], final: bool,
                  masked: dict[int, list[int]] | None = None) -> str:
    """What devices learn of this round's faults (a :class:`NodeFaults`, as the JSON text in the message
    config): the servers up, the network partition, and which devices drop out (none in the final
    evaluation, so the final metrics always cover every device's test samples).

    Args:
        masked: server -> devices that must not defer to it (evaluation: it was reset since they
            last trained against it, :meth:`PoolStrategy.masked`); sent as extra partition cuts
            ``[devices, [server]]``, which devices apply as they apply the partition's.
    """
    cuts = list(faults.partition) + [[devs, [s]] for s, devs in sorted((masked or {}).items()) if devs]
    return NodeFaults(tuple(up), tuple((tuple(d), tuple(s)) for d, s in cuts),
                      () if final else tuple(faults.dropout)).to_json()


def broadcast_head(key: str) -> str:
    """Whose entry a broadcast weight is: ``s{i}`` for server i's network and for its cross-fitting
    fold copies (``fold{j}:s{i}.<param>``), ``comb`` for MEL's combiner heads."""
    head = key.split(".", 1)[0]
    return head.split(":", 1)[1] if ":" in head else head


class PoolStrategy(FleetStrategy):
    """A Flower Message-API strategy over a pool of helper servers.

    Args:
        cfg: the run config. pool: the helper servers. schedule: the failure schedule (one
        :class:`RoundFaults` per round). on_round: round-record callback.
    """

    def __init__(self, cfg: Config, pool: ServerPool, schedule: list[RoundFaults],
                 on_round: Callable[[RoundRecord], None]):
        super().__init__(cfg, on_round)
        self.pool = pool
        self.schedule = schedule
        self.staleness = cfg.strategy.staleness
        self.stale: ArrayRecord | None = None
        # Per server, the round its entry in the stale copy was taken (-1: not in it); per device and
        # server, that round for the copy the device last trained against (-1: never). Together with
        # the pool's reset rounds they say what a device knows of each server's current state.
        self.stale_round = np.full(cfg.servers.count, -1, dtype=np.int64)
        self.known = np.full((self.num_clients, cfg.servers.count), -1, dtype=np.int64)
        self.faults_json = "{}"
        # Each device's latest trained part (for checkpoints), as arrays: converted once on receipt.
        self.states: dict[int, dict[str, np.ndarray]] = {}
        rh = cfg.strategy.rejector
        self.federation = rh.federation
        self.fed_keys = self.federation_keys(cfg) if rh.federation != Federation.local else None
        self.averages: dict[str, dict[str, np.ndarray]] = {}  # federation group -> its FedAvg average

    @classmethod
    def prepare_servers(cls, cfg: Config, prep: Any, fleet: Any, cache_dir: Path, console: Any
                        ) -> list[dict[str, np.ndarray]] | None:
        """Start states for the servers, made before the federation starts (None: train from scratch).
        L2D overrides it with its pretrained fixed experts."""
        return None

    def config(self, server_round: int) -> ConfigRecord:
        rec = super().config(server_round)
        rec["faults"] = self.faults_json
        return rec

    @resumable
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        faults = self.schedule[server_round - 1]
        up = self.pool.begin_round(faults)
        self.faults_json = faults_config(faults, up, final=False)
        self.refresh_stale(server_round)
        devices = self.sample(server_round, self.cfg.sim.fraction_train, "train")
        content = RecordDict({"server": self.stale, "config": self.config(server_round)})
        return self.messages(grid, devices, MessageType.TRAIN, content, server_round)

    def refresh_stale(self, server_round: int) -> None:
        """The server copy devices train against this round (docs/methods.md §1, "Synchronous and
        asynchronous"): every up server's current weights every S rounds (``strategy.staleness``;
        S = 1: every round). In between, the entry of a server reset since its entry was taken
        (:attr:`servers.recovery.Recovery.reset_round`) is replaced by its current weights as soon as it
        is up: S delays what devices learn of a server's training, not that it lost it."""
        if self.stale is None or (server_round - 1) % self.staleness == 0:
            self.stale = ArrayRecord({k: Array(v) for k, v in self.pool.snapshot().items()})
            self.stale_round[:] = -1
            self.stale_round[self.pool.up] = server_round
            return
        reset = self.pool.recovery.reset_round
        outdated = [s for s in self.pool.up if reset[s] > 0 and self.stale_round[s] < reset[s]]
        if outdated:
            fresh = self.pool.snapshot()
            heads = {f"s{s}" for s in outdated}
            entries = {k: self.stale[k] for k in self.stale.keys() if broadcast_head(k) not in heads}
            entries.update({k: Array(v) for k, v in fresh.items() if broadcast_head(k) in heads})
            self.stale = ArrayRecord(dict(sorted(entries.items())))
            self.stale_round[outdated] = server_round

    def masked(self) -> dict[int, list[int]]:
        """Server -> the devices that must not defer to it in this evaluation: devices with a trained
        part (the others keep every sample anyway) that never trained against the server, or last
        trained against a copy of it taken before it was reset (:meth:`refresh_stale`)."""
        devices = np.array(sorted(self.states), dtype=np.int64)
        if not len(devices):
            return {}
        out = {}
        for s in self.pool.up:
            stale = devices[self.known[devices, s] < self.pool.recovery.reset_round[s]]  # -1 (never) < any reset
            if len(stale):
                out[s] = stale.tolist()
        return out

    @resumable
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        got = self.collect(replies)
        for dev in got.devices:
            if dev in got.learners:
                self.states[dev] = record_arrays(got.learners[dev])
            for s in self.pool.reachable(dev):  # the servers it trained against: reachable, in its copy
                if self.stale_round[s] >= 0:
                    self.known[dev, s] = self.stale_round[s]
        if self.fed_keys is not None:
            self.federate(got)
        record = self.train_round(server_round, got)
        self.train_record = {"train_devices": len(got.devices), "train_errors": got.errors, **record}
        return None, MetricRecord({"samples_sent": record["samples_sent"], "train_errors": got.errors})

    @abstractmethod
    def train_round(self, server_round: int, got: DeviceReplies) -> dict[str, Any]:
        """The method's part of a training round, after the devices answered; returns the round's
        training record (at least ``samples_sent``)."""

    @staticmethod
    def mean_loss(got: DeviceReplies) -> float:
        """The mean of the devices' finite ``rejector_loss`` (NaN when none)."""
        finite = [v for v in (float(got.info[d]["rejector_loss"]) for d in got.devices) if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    # ---- federated trained parts (strategy.rejector.federation) --------------------------------
    def federation_keys(self, cfg: Config) -> list[str]:
        """Per device, its federation group: its fleet group (``federate_by=group``) or one group for
        the whole fleet (``fleet``)."""
        if cfg.strategy.rejector.federate_by == FederateBy.fleet:
            return ["fleet"] * self.num_clients
        shares = [g.share for g in cfg.fleet.groups]
        return [cfg.fleet.groups[g].name for g in assign_groups(self.num_clients, shares)]

    def federate(self, got: DeviceReplies) -> None:
        """FedAvg (McMahan et al. 2017, arXiv 1602.05629) of the trained parts of this round's devices
        within each federation group, weighted by their training samples; a device's own ``local_*``
        buffers (its reject-rate bound, its labels) are never averaged. With ``fedavg`` every device
        of a group then evaluates with the average; with ``fedavg_finetune`` it keeps the model it
        fine-tuned from the previous average."""
        by_key: dict[str, list[int]] = {}
        for dev in got.devices:
            if dev in got.learners:
                by_key.setdefault(self.fed_keys[dev], []).append(dev)
        for key, devs in sorted(by_key.items()):
            shared = [{k: v for k, v in self.states[d].items() if not k.startswith("local_")} for d in devs]
            self.averages[key] = weighted_mean(shared, [float(got.info[d]["num_examples"]) for d in devs])
        if self.federation == Federation.fedavg:
            for dev in range(self.num_clients):
                if self.fed_keys[dev] in self.averages:
                    self.states[dev] = {**self.states.get(dev, {}), **self.averages[self.fed_keys[dev]]}

    def federated(self, devices: list[int], msg_type: str) -> tuple[dict[int, str], dict[str, ArrayRecord]]:
        """The group averages the devices load: before training (both modes) and, with ``fedavg``,
        before evaluation too."""
        if self.fed_keys is None or (msg_type == MessageType.EVALUATE and self.federation != Federation.fedavg):
            return {}, {}
        keys = {d: self.fed_keys[d] for d in devices if self.fed_keys[d] in self.averages}
        return keys, {k: ArrayRecord({n: Array(v) for n, v in self.averages[k].items()}) for k in set(keys.values())}

    # ---- evaluation ---------------------------------------------------------------------------
    def eval_content(self, server_round: int, arrays: ArrayRecord) -> RecordDict:
        faults = self.schedule[server_round - 1]
        masked = self.masked()
        self.faults_json = faults_config(faults, self.pool.up, final=server_round == self.num_rounds, masked=masked)
        per_device: dict[int, set[int]] = {}
        for s, devs in masked.items():
            for d in devs:
                per_device.setdefault(d, set()).add(s)
        self.pool.begin_eval(per_device)
        return RecordDict({"config": self.config(server_round)})

    def answer(self, server_round: int, pooled: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
        """The pool answers the test samples (with failover, :meth:`servers.pool.ServerPool.answer`);
        fills ``pooled``'s ``e_pred``, ``served``, ``price`` and ``any_right`` (a server the sample's
        device could reach answers it right, or its deferral's actual answer is right: the
        oracle-routing reference, :func:`sim.core.metrics.oracle_references`); returns the round's
        server metrics, with the all-up counterfactual (MEL's resilience measure, docs/methods.md
        §7): ``server_accuracy_all_up`` (every sample deferred) and ``system_accuracy_all_up`` (the
        devices' own decisions kept) of the same trained pool with every server up and reachable
        (exactly the round's own in a round with no failure); ``all_up_untrained``: the servers
        whose all-up stand-in never learnt anything (the ratios are then undefined)."""
        out = self.pool.answer(server_round, x, pooled["device"], pooled["route"], pooled["defer"], pooled["m_pred"])
        a, y = out.answers, pooled["y"]
        pooled.update(e_pred=a.e_pred, served=a.served, price=a.price)
        pooled["any_right"] = (a.e_pred == y) | (out.options == y[:, None]).any(1)
        e_ok = (out.all_up if out.all_up is not None else a.e_pred) == y
        m_ok, defer = pooled["m_pred"] == y, pooled["defer"].astype(bool)
        return {
            "degraded": out.degraded, "server_accuracy_all_up": float(e_ok.mean()),
            "system_accuracy_all_up": float(np.where(defer, e_ok, m_ok).mean()), "all_up_untrained": out.all_up_untrained,
            "availability": out.availability, "load": out.load, "failovers": out.failovers, "servers_dead": out.dead,
            # coop: each Teammate's serving depth fraction this round (drops under load / cost pressure)
            **({"serve_depth": {str(k): v for k, v in out.depth.items()}} if out.depth else {}),
        }

    # ---- checkpoint / resume ------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The strategy's part of a checkpoint: every device's latest trained part and the stale
        server copy devices train against (``staleness > 1``)."""
        arrays: dict[str, np.ndarray] = stack_states(self.states, "rejectors")
        if self.stale is not None:
            arrays.update({f"stale/{k}": self.stale[k].numpy() for k in self.stale.keys()})
        arrays["stale_round"], arrays["known"] = self.stale_round.copy(), self.known.copy()
        for key, avg in self.averages.items():
            arrays.update({f"averages/{key}/{n}": v for n, v in avg.items()})
        return arrays, {"rejectors": sorted(self.states), "stale": self.stale is not None,
                        "averages": sorted(self.averages)}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], finished_round: int) -> None:
        """Continue after ``finished_round``: devices get their trained parts back with their next message.

        Raises:
            CheckpointMismatch: the checkpoint's device states are missing or in an older format.
        """
        self.offset = finished_round
        states = unstack_states(arrays, "rejectors")
        if sorted(states) != sorted(int(d) for d in meta["rejectors"]):
            raise CheckpointMismatch("the checkpoint's device states are missing or in an older format; "
                                     "start the run again without sim.resume")
        for d, st in states.items():
            self.states[d] = st
            self.restore_pending[d] = ArrayRecord({k: Array(np.array(v)) for k, v in st.items()})
        if meta["stale"]:
            self.stale = ArrayRecord({k: Array(np.array(v)) for k, v in sub(arrays, "stale").items()})
        if "known" in arrays:
            self.stale_round[:], self.known[:] = arrays["stale_round"], arrays["known"]
        else:  # a checkpoint made before this was tracked: every device knows the copy it holds
            heads = {broadcast_head(k) for k in (self.stale.keys() if self.stale is not None else [])}
            present = {int(h[1:]) for h in heads if h[:1] == "s" and h[1:].isdigit()}  # not "comb" (MEL)
            self.stale_round[sorted(present)] = 1
            self.known[np.ix_(sorted(int(d) for d in self.states), sorted(present))] = 1
        self.averages = {key: {n: np.array(v) for n, v in sub(arrays, f"averages/{key}").items()}
                         for key in meta.get("averages", [])}
