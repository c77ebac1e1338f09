"""What every fleet strategy shares on the ServerApp side (a Flower Message-API Strategy).

- A handshake (one ``query`` message per node) maps Flower's random node ids to node
  (partition) ids; each node hosts a block of devices (:mod:`sim.core.nodes`), and a round sends one
  message per node that hosts a sampled device. Device sampling is seeded and reproducible.
- Seeded device sampling per round; replies sorted by device id before they are used, so the
  result never depends on the order replies arrive in.
- Failed devices (an error reply fails every device of its node; a dropped-out device is left
  out of its node's reply) are counted, never fatal.
- Evaluation replies carry per-sample records and the test samples; the strategy's
  :meth:`FleetStrategy.answer` (the server pool) answers them, :mod:`sim.core.metrics` computes every
  metric from the pooled records, and each round ends with one record passed to ``on_round``.
"""
from __future__ import annotations

import functools
import re
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sim.core.config import Config
from sim.core.metrics import pooled_metrics
from sim.core.nodes import by_node, devices_per_node, node_of as node_hosting, num_nodes
from sim.core.round_record import RoundRecord
from sim.core.seeding import derive_seed


DEVICE_FIELDS = ("device", "y", "m_pred", "score", "m_conf", "m_conf_cal", "defer", "route")
"""Per-sample fields a device returns from evaluation (plus the samples ``x``); the strategy adds
``e_pred`` and ``served`` (:meth:`FleetStrategy.answer`)."""


@dataclass
class DeviceReplies:
    """The devices that answered a round, unpacked from their nodes' replies.

    Attributes:
        samples: per-sample arrays of all answering devices concatenated, rows sorted by device
            (stable: each device's rows in the order it sent them); ``samples["device"]`` names
            each row's device. Empty when no device sent a row.
        info: per device, its info metrics (``num_examples`` and the method's metrics).
        learners: per device that sent one, its trained part (rejector / L2D model state).
        errors: sampled devices that did not answer (error replies and dropouts).
        node_errors: Flower node id -> the reason of its error reply (one line, :func:`error_line`).
    """

    samples: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[int, MetricRecord] = field(default_factory=dict)
    learners: dict[int, ArrayRecord] = field(default_factory=dict)
    errors: int = 0
    node_errors: dict[int, str] = field(default_factory=dict)

    @property
    def devices(self) -> list[int]:
        """The answering device ids, sorted."""
        return sorted(self.info)

    def rows(self, device: int) -> dict[str, np.ndarray]:
        """The sample arrays of one device (views into :attr:`samples`: empty arrays if it sent
        none while others did, an empty dict if no device sent a row)."""
        if not self.samples:
            return {}
        col = self.samples["device"]
        lo, hi = np.searchsorted(col, device, "left"), np.searchsorted(col, device, "right")
        return {k: v[lo:hi] for k, v in self.samples.items()}


ERROR_LINE_CHARS = 300
"""Longest device error cause quoted in a one-line message."""


def error_line(reason: str) -> str:
    """One line of a node's error reply: the device's exception, without the wrappers around it.

    In-process the reason is ``"Type: message"`` (:class:`sim.inprocess.InProcessGrid`); on Ray
    Flower writes ``"<class 'module.Type'>:<'message'>"``, and for the device's own exception the
    message is Ray's traceback ending in ``"... Message: <the exception's message>"``. Returns
    ``"Type: message"`` (the device's message after Flower's last ``Message: `` where there is one),
    its first non-empty line, at most :data:`ERROR_LINE_CHARS` characters.
    """
    text = str(reason)
    wrapped = re.fullmatch(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>", text.strip(), re.DOTALL)
    if wrapped:
        kind, text = wrapped.groups()
        if "Message: " in text:  # the device's exception inside ClientAppException: its message alone
            text = text.rsplit("Message: ", 1)[1]
        elif kind:
            text = f"{kind}: {text}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "no reason given")
    return line if len(line) <= ERROR_LINE_CHARS else line[:ERROR_LINE_CHARS - 3] + "..."


def unpack_replies(replies: Iterable[Message], sent: Iterable[int]) -> DeviceReplies:
    """Per-device view of node replies (the ClientApp packs them); never depends on arrival order.

    Args:
        replies: the round's node replies. sent: the devices the round's messages listed.
    """
    out = DeviceReplies()
    parts: list[dict[str, np.ndarray]] = []
    for r in replies:
        if r.has_error():
            out.node_errors[int(r.metadata.src_node_id)] = error_line(r.error.reason)
            continue
        for key in r.content.keys():
            if key.startswith("info/"):
                d = int(key[5:])
                out.info[d] = r.content[key]
                if f"rejector/{d}" in r.content:
                    out.learners[d] = r.content[f"rejector/{d}"]
        if "samples" in r.content:
            rec = r.content["samples"]
            parts.append({k: rec[k].numpy() for k in rec.keys()})
    out.errors = len(set(sent)) - len(out.info)
    if parts:
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cat["device"], kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            cat = {k: v[order] for k, v in cat.items()}
        out.samples = cat
    return out


def resumable(hook: Callable) -> Callable:
    """Decorate a Flower Strategy hook so it sees the run's true round: a resumed run restarts
    Flower's round counter at 1, and ``offset`` (the rounds already finished) is added back."""

    @functools.wraps(hook)
    def wrapper(self: "FleetStrategy", server_round: int, *args: Any, **kwargs: Any) -> Any:
        return hook(self, server_round + self.offset, *args, **kwargs)

    return wrapper


class FleetStrategy(Strategy):
    """Base class: handshake, sampling, reply handling, pooled evaluation, round records.

    Args:
        cfg: the run config (it orchestrates the run: fleet size, rounds, sampling, costs).
        on_round: called with each finished round's record (:class:`sim.core.round_record.RoundRecord`).
    """

    def __init__(self, cfg: Config, on_round: Callable[[RoundRecord], None]):
        self.cfg = cfg
        self.num_clients = cfg.fleet.num_clients
        self.num_rounds = cfg.sim.num_rounds
        self.seed = cfg.seed
        self.on_round = on_round
        self.per_node = devices_per_node(self.num_clients, cfg.sim.devices_per_node, cfg.sim.max_nodes)
        self.num_nodes = num_nodes(self.num_clients, self.per_node)
        self.node_of: dict[int, int] = {}  # node (partition id) -> Flower node id
        self.sent: list[int] = []  # devices the last configure_* call sent messages for
        self.train_record: dict[str, Any] = {}
        self.last_eval: dict[str, np.ndarray] | None = None
        self.last_x: np.ndarray | None = None
        self.last_metrics: dict[str, Any] | None = None
        self.t0 = time.perf_counter()
        self.spec_json = "{}"  # the device-runtime spec every message carries (set by the runner)
        self.offset = 0  # rounds finished before this process started (sim.resume)
        # Rejector states to hand back to devices after a resume (device -> record); each is sent
        # with every message to its device until that device answers successfully.
        self.restore_pending: dict[int, ArrayRecord] = {}
        # The final evaluation's devices that did not answer, with the cause (device -> one line):
        # the runner refuses to summarise a final evaluation that misses a device (sim/pipeline.py).
        self.final_missing: dict[int, str] = {}

    def config(self, server_round: int) -> ConfigRecord:
        """The config every message carries: the round and the device-runtime spec."""
        return ConfigRecord({"round": server_round, "spec": self.spec_json})

    # ---- Flower plumbing -------------------------------------------------------------------
    def handshake(self, grid: Grid, timeout: float) -> None:
        """Ask every node for its partition id. Raises RuntimeError if nodes are missing."""
        deadline = time.monotonic() + timeout
        # The simulation registers its nodes concurrently with the ServerApp's start: wait for all.
        while len(nodes := sorted(grid.get_node_ids())) < self.num_nodes and time.monotonic() < deadline:
            time.sleep(0.05)
        msgs = [grid.create_message(RecordDict(), MessageType.QUERY, nid, "handshake") for nid in nodes]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if not reply.has_error():
                self.node_of[int(reply.content["info"]["partition_id"])] = reply.metadata.src_node_id
        missing = sorted(set(range(self.num_nodes)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"{len(missing)} node(s) did not answer the start-up handshake (first: {missing[0]})")

    def sample(self, server_round: int, fraction: float, tag: str) -> list[int]:
        """Seeded sample of ``ceil(fraction * N)`` device ids, sorted."""
        k = max(1, math.ceil(fraction * self.num_clients))
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng(derive_seed(self.seed, tag, server_round))
        return sorted(rng.choice(self.num_clients, size=k, replace=False).tolist())

    def messages(self, grid: Grid, devices: Iterable[int], msg_type: str, content: RecordDict, round_: int
                 ) -> list[Message]:
        """One message per node hosting any of ``devices``: ``content`` plus the node's device list
        (``config.devices``, a list of ints), per device with one a state to restore (``rejector/<d>``,
        after a resume), and the federated averages its devices load (``federated/<key>``, with the
        map device -> key in the ConfigRecord ``federated``)."""
        out = []
        self.sent = sorted(devices)
        for node, devs in by_node(self.sent, self.per_node).items():
            keys, records = self.federated(devs, msg_type)
            config = {**dict(content["config"].items()), "devices": [int(d) for d in devs]}
            c = RecordDict({**dict(content.items()), "config": ConfigRecord(config)})
            if keys:
                c["federated"] = ConfigRecord({str(d): k for d, k in keys.items()})
            for d in devs:
                if d in self.restore_pending:
                    c[f"rejector/{d}"] = self.restore_pending[d]
            for k, rec in records.items():
                c[f"federated/{k}"] = rec
            out.append(grid.create_message(c, msg_type, self.node_of[node], str(round_)))
        return out

    def federated(self, devices: list[int], msg_type: str) -> tuple[dict[int, str], dict[str, ArrayRecord]]:
        """The averaged state each of ``devices`` loads before its work (``device -> key`` and
        ``key -> state``); none by default."""
        return {}, {}

    def acknowledge(self, got: DeviceReplies) -> None:
        """Devices that answered have their restored state: stop resending it."""
        for d in got.devices:
            self.restore_pending.pop(d, None)

    def collect(self, replies: Iterable[Message]) -> DeviceReplies:
        """The round's replies per device (:func:`unpack_replies`); restored states acknowledged."""
        got = unpack_replies(replies, self.sent)
        self.acknowledge(got)
        return got

    def missing(self, got: DeviceReplies) -> dict[int, str]:
        """The devices the last ``configure_*`` call sent work to that did not answer, each with its
        cause: its node's error reply (:func:`error_line`), or that it left no reply (an injected
        dropout, or a reply lost in transit)."""
        out: dict[int, str] = {}
        for d in sorted(set(self.sent) - set(got.info)):
            flower_id = self.node_of.get(node_hosting(d, self.per_node))
            out[d] = got.node_errors.get(flower_id, "its node's reply did not include it")
        return out

    def summary(self) -> None:  # Strategy API; the run prints its own summary
        return None

    # ---- evaluation (shared by every strategy) ---------------------------------------------
    def is_eval_round(self, server_round: int) -> bool:
        return server_round == self.num_rounds or server_round % self.cfg.sim.eval_every == 0

    def eval_content(self, server_round: int, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({"server": arrays, "config": self.config(server_round)})

    @resumable
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            self.sent = []  # no device was asked: aggregate_evaluate must not count the training round's as failed
            return []
        last = server_round == self.num_rounds
        devices = self.sample(server_round, 1.0 if last else self.cfg.sim.fraction_evaluate, "eval")
        return self.messages(grid, devices, MessageType.EVALUATE, self.eval_content(server_round, arrays),
                             server_round)

    def answer(self, server_round: int, pooled: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
        """Fill ``pooled["e_pred"]`` (and ``served``) for the test samples ``x``; return round metrics."""
        raise NotImplementedError

    @resumable
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        got = self.collect(replies)
        if server_round == self.num_rounds:  # the final evaluation has no injected dropout: all must answer
            self.final_missing = self.missing(got)
        metrics, servers = None, {}
        if got.devices:
            pooled = {f: got.samples[f] for f in DEVICE_FIELDS}
            x = got.samples["x"]
            servers = self.answer(server_round, pooled, x)
            self.last_x = x
            s = self.cfg.strategy
            metrics = pooled_metrics(pooled, s.c_e, s.c_1)
            self.last_eval, self.last_metrics = pooled, metrics
        self.on_round(RoundRecord(
            server_round, dict(self.train_record), servers,
            {k: v for k, v in metrics.items() if k != "curves"} if metrics is not None else {},
            len(got.devices), got.errors, time.perf_counter() - self.t0))
        if metrics is None:
            return None
        return MetricRecord({k: float(metrics[k]) for k in ("system_accuracy", "defer_rate", "legacy_accuracy")})
