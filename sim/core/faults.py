"""Fault injection: the failure schedule of a run (``failures=<preset>`` plus overrides).

A schedule is computed once, before the run, from the ``failures`` config and the run's seed:
one :class:`RoundFaults` per round saying what happens at the start of that round. It is printed
at start and saved as ``failure_schedule.json``, so a run's failures are known, repeatable and
can be compared across training modes. The server pool (:mod:`servers.pool`) carries the
schedule out -- a crash really kills the server's Ray actor -- and detects the result by health
checks; devices learn which servers they can reach through each round's message config.

Failure kinds (docs/architecture.md, "Failure model"):

- crash-stop: ``failures.servers`` die at ``failures.round``; their state is lost.
- crash-recover: as crash-stop, then each comes back ``failures.recover_after`` rounds later,
  from its last checkpoint or from scratch (``failures.recover_from``).
- transient outage: each server is unreachable for a whole round with probability
  ``failures.outage_p`` (state kept).
- per-query drop: each (query, server) pair is lost with probability ``failures.query_drop_q``.
- network partition: ``failures.partition.devices`` cannot reach ``failures.partition.servers``
  from round ``start`` to ``end``.
- slow server: ``failures.slow.servers`` answer after ``delay_s`` seconds; past
  ``failures.query_timeout_s`` they count as down.
- device dropout: a device fails its round (a Flower error reply; the worker keeps running).
- random: ``failures=random`` draws all of the above per round from ``failures.random.*``,
  seeded from ``seed``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sim.core.config import FailureKind, FailuresConfig, RandomFaultConfig
from sim.core.seeding import derive_seed


@dataclass
class RoundFaults:
    """What the failure schedule does at the start of one round.

    Attributes:
        round: 1-based round. kill: servers crashed now (state lost). restart: servers brought
        back now, from ``recover_from`` (``checkpoint`` | ``scratch``). outage: servers
        unreachable for this round. slow: server -> answer delay in seconds. partition: list of
        ``[devices, servers]`` pairs that cannot reach each other. query_drop: probability that
        one query to one server is lost. dropout: devices that fail this round.
    """

    round: int
    kill: list[int] = field(default_factory=list)
    restart: list[int] = field(default_factory=list)
    recover_from: str = "checkpoint"
    outage: list[int] = field(default_factory=list)
    slow: dict[int, float] = field(default_factory=dict)
    partition: list[list[list[int]]] = field(default_factory=list)
    query_drop: float = 0.0
    dropout: list[int] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.kill or self.restart or self.outage or self.slow or self.partition or self.query_drop
                    or self.dropout)

    def cut_servers(self, device: int) -> set[int]:
        """Servers ``device`` cannot reach this round (network partition)."""
        return cut_off(self.partition, device)


def cut_off(partition: list, device: int) -> set[int]:
    """Servers that ``device`` cannot reach under ``partition`` (a list of ``[devices, servers]``)."""
    return {s for devs, srvs in partition if device in devs for s in srvs}


@dataclass(frozen=True)
class NodeFaults:
    """What a Flower node learns of a round's faults: ``config.faults`` in each message, JSON text
    written by :meth:`to_json` (:func:`strategies.pool_strategy.faults_config`) and read by
    :meth:`from_json` (the ClientApp, once per message).

    Attributes:
        up: the helper servers up this round.
        partition: ``(devices, servers)`` cuts: those devices cannot reach those servers (the
            schedule's network partition; in evaluation also the servers reset since a device last
            trained against them).
        dropout: the devices that drop out this round (none in the final evaluation).
    """

    up: tuple[int, ...] = ()
    partition: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    dropout: tuple[int, ...] = ()

    def reachable(self, device: int) -> list[int]:
        """The up servers ``device`` is not cut off from, in ``up``'s order."""
        cut = cut_off(list(self.partition), device)
        return [s for s in self.up if s not in cut]

    def to_json(self) -> str:
        """The faults as the JSON text a message carries."""
        return json.dumps({"up": list(self.up), "partition": [[list(d), list(s)] for d, s in self.partition],
                           "dropout": list(self.dropout)})

    @classmethod
    def from_json(cls, text: str) -> NodeFaults:
        """The faults :meth:`to_json` wrote.

        Raises:
            ValueError: one line naming the first missing or unknown key.
        """
        data = json.loads(text)
        names = ("up", "partition", "dropout")
        for k in names:
            if k not in data:
                raise ValueError(f"node faults: missing key {k!r}")
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ValueError(f"node faults: unknown key {unknown[0]!r}")
        cuts = tuple((tuple(int(d) for d in devs), tuple(int(s) for s in srvs)) for devs, srvs in data["partition"])
        return cls(tuple(int(s) for s in data["up"]), cuts, tuple(int(d) for d in data["dropout"]))


def _in(t: int, start: int, end: int | None) -> bool:
    return start <= t and (end is None or t <= end)


def build_schedule(f: FailuresConfig, num_servers: int, num_clients: int, num_rounds: int, seed: int
                   ) -> list[RoundFaults]:
    """The run's failure schedule, one :class:`RoundFaults` per round ``1..num_rounds``.

    Args:
        f: the ``failures`` config. num_servers: S. num_clients: devices. num_rounds: rounds.
        seed: the run seed (random draws use :func:`sim.core.seeding.derive_seed`, so the schedule
            depends only on the config and the seed).

    Explicit faults (the preset's fields) and, with ``failures.name=random``, the random draws
    are combined. Random crashes only hit servers the schedule has up at that round.
    """
    sched = [RoundFaults(round=t, recover_from=str(f.recover_from), query_drop=float(f.query_drop_q))
             for t in range(1, num_rounds + 1)]

    def at(t: int) -> RoundFaults | None:
        return sched[t - 1] if 1 <= t <= num_rounds else None

    down_until: dict[int, float] = {}  # server -> last round it is down (inf: for good)
    if f.servers:
        t0 = int(f.round)
        for s in f.servers:
            at(t0).kill.append(int(s))
            if f.recover_after is not None:
                back = t0 + int(f.recover_after)
                if at(back):
                    at(back).restart.append(int(s))
                down_until[int(s)] = back - 1
            else:
                down_until[int(s)] = float("inf")
    rng_outage = np.random.default_rng(derive_seed(seed, "failures", "outage"))
    p, sl, dr = f.partition, f.slow, f.dropout
    rng_drop = np.random.default_rng(derive_seed(seed, "failures", "dropout"))
    for r in sched:
        t = r.round
        if float(f.outage_p) > 0:
            draws = rng_outage.random(num_servers)
            r.outage = [s for s in range(num_servers) if draws[s] < float(f.outage_p)]
        if p.servers and p.devices and _in(t, int(p.start), p.end):
            r.partition.append([sorted(int(d) for d in p.devices), sorted(int(s) for s in p.servers)])
        if sl.servers and _in(t, int(sl.start), sl.end):
            r.slow.update({int(s): float(sl.delay_s) for s in sl.servers})
        if _in(t, int(dr.start), dr.end):
            drop = set(int(d) for d in dr.devices)
            if float(dr.fraction) > 0:
                draws = rng_drop.random(num_clients)
                drop |= {d for d in range(num_clients) if draws[d] < float(dr.fraction)}
            r.dropout = sorted(drop)
    if f.name == FailureKind.random:
        _random_faults(f.random, sched, down_until, num_servers, num_clients, float(f.query_timeout_s), seed)
    for r in sched:
        r.kill, r.restart, r.outage = sorted(set(r.kill)), sorted(set(r.restart)), sorted(set(r.outage))
    return sched


def _random_faults(rp: RandomFaultConfig, sched: list[RoundFaults], down_until: dict[int, float], num_servers: int,
                   num_clients: int, timeout: float, seed: int) -> None:
    """Add seeded random crashes (with recovery), outages, slow servers, partitions, dropouts."""
    rng = np.random.default_rng(derive_seed(seed, "failures", "random"))
    num_rounds = len(sched)
    for r in sched:
        t = r.round
        for s in range(num_servers):
            if down_until.get(s, 0) >= t:
                continue
            if rng.random() < float(rp.crash_p):
                r.kill.append(s)
                if rng.random() < float(rp.recover_p):
                    back = t + int(rng.integers(1, int(rp.max_down) + 1))
                    down_until[s] = back - 1
                    if back <= num_rounds:
                        sched[back - 1].restart.append(s)
                else:
                    down_until[s] = float("inf")
            elif rng.random() < float(rp.outage_p):
                r.outage.append(s)
            elif rng.random() < float(rp.slow_p):
                r.slow[s] = 2.0 * timeout
        if rng.random() < float(rp.partition_p) and num_servers:
            devs = sorted(rng.choice(num_clients, size=max(1, num_clients // 2), replace=False).tolist())
            r.partition.append([devs, [int(rng.integers(num_servers))]])
        draws = rng.random(num_clients)
        r.dropout = sorted(set(r.dropout) | {d for d in range(num_clients) if draws[d] < float(rp.dropout_p)})
        r.query_drop = max(r.query_drop, float(rp.query_drop_q))


def schedule_json(sched: list[RoundFaults]) -> list[dict[str, Any]]:
    """The schedule as JSON-able dicts (``failure_schedule.json``)."""
    out = []
    for r in sched:
        d = asdict(r)
        d["slow"] = {str(k): v for k, v in r.slow.items()}
        out.append(d)
    return out


def describe(r: RoundFaults) -> str:
    """One short line for a round's faults (empty when none; the per-query drop rate is shown once,
    in the schedule's header)."""
    parts = []
    if r.kill:
        parts.append(f"crash {r.kill}")
    if r.restart:
        parts.append(f"recover {r.restart} from {r.recover_from}")
    if r.outage:
        parts.append(f"outage {r.outage}")
    if r.slow:
        parts.append("slow " + ", ".join(f"{s}:{d:g}s" for s, d in sorted(r.slow.items())))
    for devs, srvs in r.partition:
        parts.append(f"partition {len(devs)} devices x servers {srvs}")
    if r.dropout:
        parts.append(f"{len(r.dropout)} devices drop out")
    return "; ".join(parts)
