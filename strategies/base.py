"""What every fleet strategy shares on the ServerApp side (a Flower Message-API Strategy).

- A handshake (one ``query`` message per node) maps Flower's random node ids to device
  (partition) ids, so device sampling is seeded and reproducible.
- Seeded device sampling per round; replies sorted by device id before they are used, so the
  result never depends on the order replies arrive in.
- Error replies (a device that failed a round) are counted, never fatal.
- Evaluation replies carry per-sample records and the test samples; the strategy's
  :meth:`FleetStrategy.answer` (the server pool) answers them, :mod:`sim.metrics` computes every
  metric from the pooled records, and each round ends with one record passed to ``on_round``.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sim.metrics import pooled_metrics
from sim.training import derive_seed


DEVICE_FIELDS = ("device", "y", "m_pred", "score", "m_conf", "defer", "route")
"""Per-sample fields a device returns from evaluation (plus the samples ``x``); the strategy adds
``e_pred`` and ``served`` (:meth:`FleetStrategy.answer`)."""


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
        cfg: the run config (plain dict).
        on_round: called with each finished round's record (a JSON-able dict).
    """

    def __init__(self, cfg: dict[str, Any], on_round: Callable[[dict[str, Any]], None]):
        self.cfg = cfg
        self.num_clients = int(cfg["fleet"]["num_clients"])
        self.num_rounds = int(cfg["sim"]["num_rounds"])
        self.seed = int(cfg["seed"])
        self.on_round = on_round
        self.node_of: dict[int, int] = {}
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

    def config(self, server_round: int) -> ConfigRecord:
        """The config every message carries: the round and the device-runtime spec."""
        return ConfigRecord({"round": server_round, "spec": self.spec_json})

    # ---- Flower plumbing -------------------------------------------------------------------
    def handshake(self, grid: Grid, timeout: float) -> None:
        """Ask every node for its partition id. Raises RuntimeError if devices are missing."""
        deadline = time.monotonic() + timeout
        # The simulation registers its nodes concurrently with the ServerApp's start: wait for all.
        while len(nodes := sorted(grid.get_node_ids())) < self.num_clients and time.monotonic() < deadline:
            time.sleep(0.05)
        msgs = [grid.create_message(RecordDict(), MessageType.QUERY, nid, "handshake") for nid in nodes]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if not reply.has_error():
                self.node_of[int(reply.content["info"]["partition_id"])] = reply.metadata.src_node_id
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"{len(missing)} device(s) did not answer the start-up handshake (first: {missing[0]})")

    def sample(self, server_round: int, fraction: float, tag: str) -> list[int]:
        """Seeded sample of ``ceil(fraction * N)`` device ids, sorted."""
        k = max(1, math.ceil(fraction * self.num_clients))
        if k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng(derive_seed(self.seed, tag, server_round))
        return sorted(rng.choice(self.num_clients, size=k, replace=False).tolist())

    def messages(self, grid: Grid, devices: Iterable[int], msg_type: str, content: RecordDict, round_: int
                 ) -> list[Message]:
        out = []
        for d in devices:
            c = content
            state = self.restore_pending[d] if d in self.restore_pending else self.personal(d)
            if state is not None:
                c = RecordDict({**dict(content.items()), "rejector": state})
            out.append(grid.create_message(c, msg_type, self.node_of[d], str(round_)))
        return out

    def personal(self, device: int) -> ArrayRecord | None:
        """A state to hand ``device`` with its next message (e.g. a FedAvg average); None: none."""
        return None

    def acknowledge(self, ok: list[tuple[int, Message]]) -> None:
        """Devices that answered have their restored state: stop resending it."""
        for d, _ in ok:
            self.restore_pending.pop(d, None)

    @staticmethod
    def ok_replies(replies: Iterable[Message]) -> tuple[list[tuple[int, Message]], int]:
        """Successful replies as ``(device, message)`` sorted by device, and the number of error replies."""
        ok, errors = [], 0
        for r in replies:
            if r.has_error():
                errors += 1
            else:
                ok.append((int(r.content["info"]["device"]), r))
        ok.sort(key=lambda t: t[0])
        return ok, errors

    def summary(self) -> None:  # Strategy API; the run prints its own summary
        return None

    # ---- evaluation (shared by every strategy) ---------------------------------------------
    def is_eval_round(self, server_round: int) -> bool:
        return server_round == self.num_rounds or server_round % int(self.cfg["sim"]["eval_every"]) == 0

    def eval_content(self, server_round: int, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({"server": arrays, "config": self.config(server_round)})

    @resumable
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        last = server_round == self.num_rounds
        devices = self.sample(server_round, 1.0 if last else float(self.cfg["sim"]["fraction_evaluate"]), "eval")
        return self.messages(grid, devices, MessageType.EVALUATE, self.eval_content(server_round, arrays),
                             server_round)

    def answer(self, server_round: int, pooled: dict[str, np.ndarray], x: np.ndarray) -> dict[str, Any]:
        """Fill ``pooled["e_pred"]`` (and ``served``) for the test samples ``x``; return round metrics."""
        raise NotImplementedError

    @resumable
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record = {"round": server_round, **self.train_record}
        ok, errors = self.ok_replies(replies)
        self.acknowledge(ok)
        metrics = None
        if ok:
            pooled = {f: np.concatenate([r.content["samples"][f].numpy() for _, r in ok]) for f in DEVICE_FIELDS}
            x = np.concatenate([r.content["samples"]["x"].numpy() for _, r in ok])
            record.update(self.answer(server_round, pooled, x))
            self.last_x = x
            s = self.cfg["strategy"]
            metrics = pooled_metrics(pooled, float(s["c_e"]), float(s["c_1"]))
            self.last_eval, self.last_metrics = pooled, metrics
            record.update({k: v for k, v in metrics.items() if k != "curves"})
        record["eval_devices"] = len(ok)
        record["eval_errors"] = errors
        record["elapsed_s"] = time.perf_counter() - self.t0
        self.on_round(record)
        if metrics is None:
            return None
        return MetricRecord({k: float(metrics[k]) for k in ("system_accuracy", "defer_rate", "legacy_accuracy")})
