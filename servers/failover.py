"""Answering deferred test samples with failover, and cooperative learning's serving depth.

The failover chain (MEL, Gudipaty et al. 2025, arXiv 2506.20094; docs/methods.md): the ensemble
of every server the sample was routed to -> the ensemble of those that answered (``subset``) ->
a surviving standalone server (``standalone``) -> the device's own legacy model (``legacy``).
Every failover of a deferred sample is counted by kind.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from servers.models import COOP_LEADER, Combiners, depth_fractions, ensemble_probs
from servers.router import Router
from sim.core.config import CoopConfig, Routing
from sim.core.metrics import ratio_over_reference

FAILOVER_KINDS = ("subset", "standalone", "legacy")
KINDS = ("none",) + FAILOVER_KINDS


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


@dataclass
class ServerOutputs:
    """What the servers that answered returned for a batch of samples ``x (N, ...)``.

    Attributes:
        feats: server -> trunk features ``(N, F)``. logits: server -> logits ``(N, K)``.
        exits: server -> every exit's logits ``(D, N, K)`` (multi-exit servers only).
    """

    feats: dict[int, torch.Tensor]
    logits: dict[int, torch.Tensor]
    exits: dict[int, torch.Tensor]


@dataclass
class Answers:
    """``e_pred (N,)``: the prediction each sample gets when deferred; ``served (N,)``: a server
    answered it; ``failover (N,)``: index into :data:`KINDS`; ``price (N,)``: what the answer costs
    (the mean price of the servers that answered; 0 when none did); ``depth``: coop Teammates'
    serving depth fraction this round."""

    e_pred: np.ndarray
    served: np.ndarray
    failover: np.ndarray
    price: np.ndarray
    depth: dict[int, float]


@dataclass
class PoolAnswer:
    """What the pool did in one evaluation round (:meth:`servers.pool.ServerPool.answer`).

    Attributes:
        answers: per test sample, the answer it gets when deferred (:class:`Answers`).
        options: ``(N, S)`` int64, each answering server's prediction for the samples whose device
            can reach it (-1 elsewhere): what perfect routing could pick from (the oracle reference).
        all_up: ``(N,)`` int64, the answers had every server been up and reachable
            (:func:`servers.allup.all_up_answers`); None when the round is not degraded (then
            :attr:`answers` are all-up's).
        all_up_untrained: servers whose all-up stand-in has never learnt anything.
        degraded: a server was down, a partition cut devices off, or queries were dropped.
        availability: per server, 1 if up this round, else 0.
        load: per server, the deferred samples it answered. failovers: kind -> deferred samples that
            failed over so (only kinds that occurred, sorted). depth: coop Teammate -> the depth
            fraction it served at. dead: the servers whose actor is gone, sorted.
    """

    answers: Answers
    options: np.ndarray
    all_up: np.ndarray | None
    all_up_untrained: list[int]
    degraded: bool
    availability: list[int]
    load: list[int]
    failovers: dict[str, int]
    depth: dict[int, float]
    dead: list[int]


def options(out: ServerOutputs, reach_of: dict[int, list[int]], device: np.ndarray, num_servers: int) -> np.ndarray:
    """``(N, S)`` int64: server s's prediction (full depth) for each sample whose device can reach
    it (``reach_of``: device -> servers) and that s answered; -1 elsewhere."""
    out_pred = np.full((len(device), num_servers), -1, dtype=np.int64)
    for s, logits in sorted(out.logits.items()):
        reach = np.isin(device, [d for d, servers in reach_of.items() if s in servers])
        out_pred[:, s] = np.where(reach, logits.argmax(1).numpy(), -1)
    return out_pred


def answer(out: ServerOutputs, router: Router, reach_of: dict[int, list[int]], device: np.ndarray,
           route: np.ndarray, defer: np.ndarray, m_pred: np.ndarray, dropped: np.ndarray, num_servers: int,
           failovers: Counter, combiners: Combiners | None, coop: CoopConfig | None,
           prices: Sequence[float] | None = None) -> Answers:
    """Answer test samples with failover.

    Every sample is answered as if deferred (the curves and baselines need the answer a deferred
    sample would get); only deferred ones add to ``router.load`` and ``failovers``.

    Args:
        out: the servers' outputs on the samples. router: routes each sample (reset here).
        reach_of: device -> the servers it can reach. device, route, defer, m_pred: ``(N,)`` per
        sample: its device, the server a learned rejector chose (-1: none), whether it is
        deferred, and the legacy prediction (the last fallback). dropped: ``(N, S)`` bool, the
        query to server s lost. failovers: counts by kind (updated). combiners: MEL's combiner
        heads (None: ensembles average softmax outputs). coop: cooperative learning's serving
        limits (None: not a coop pool). prices: per-server price of one answer (None: all 0).
    """
    n = len(device)
    e_pred = m_pred.astype(np.int64).copy()
    served = np.zeros(n, dtype=bool)
    price = np.zeros(n, dtype=np.float64)
    kind = np.zeros(n, dtype=np.int64)
    groups: dict[tuple[int, ...], list[int]] = {}
    router.reset()
    for i in np.concatenate([np.flatnonzero(defer), np.flatnonzero(~defer)]):  # deferred first: they load
        k, got = _serve_one(out, router, reach_of[int(device[i])], int(route[i]), dropped[i], num_servers)
        if defer[i]:
            for s in got:
                router.load[s] += 1
            if k != "none":
                failovers[k] += 1
        kind[i] = KINDS.index(k)
        if got:
            served[i] = True
            groups.setdefault(tuple(got), []).append(int(i))
    logits = dict(out.logits)
    depth = serving_depths(out.exits, router.load, coop, logits) if coop is not None else {}
    for subset, rows in groups.items():
        idx = torch.tensor(rows)
        probs = ensemble_probs(subset, {s: out.feats[s][idx] for s in subset}, {s: logits[s][idx] for s in subset},
                               combiners)
        e_pred[rows] = probs.argmax(1).numpy()
        if prices is not None:
            price[rows] = float(np.mean([prices[s] for s in subset]))
    return Answers(e_pred, served, kind, price, depth)


def _serve_one(out: ServerOutputs, router: Router, reach: list[int], route: int, dropped: np.ndarray,
               num_servers: int) -> tuple[str, list[int]]:
    """One sample: its failover kind and the servers whose answers it gets."""
    if not reach:  # nothing reachable: the legacy model answers
        return "legacy", []
    want, _ = router.pick(reach, route)
    got = [s for s in want if s in out.logits and not dropped[s]]
    # MEL's chain is judged against the whole pool: an ensemble of fewer than all S servers is a
    # failover; a single-server request fails over only if that server did not answer.
    full = num_servers if router.routing == Routing.all else len(want)
    if got:
        return ("none" if len(got) == full else "subset" if len(got) >= 2 else "standalone"), got
    others = [s for s in reach if s in out.logits and not dropped[s]]
    if not others:
        return "legacy", []
    return "standalone", [min(others, key=lambda s: (router.load[s], s))]


def serving_depths(exits: dict[int, torch.Tensor], load: np.ndarray, coop: CoopConfig,
                   logits: dict[int, torch.Tensor]) -> dict[int, float]:
    """Cooperative learning: each Teammate answers at the depth its load allows (the Leader at full
    depth); replaces its entry of ``logits`` by that exit's. Returns Teammate -> depth fraction."""
    depth = {}
    for s, ex in exits.items():
        if s == COOP_LEADER:
            continue
        fracs = depth_fractions(len(ex))
        f = serving_fraction(int(load[s]), fracs, coop.serve_depth, coop.capacity)
        depth[s] = f
        logits[s] = ex[fracs.index(f)]
    return depth


def ensemble_table(out: ServerOutputs, y: np.ndarray, combiners: Combiners | None) -> dict:
    """MEL's standalone-vs-ensemble table on ``y (N,)``: server-only accuracy of each standalone
    server and each ensemble of >= 2 of them, cooperative Teammates' accuracy per exit, and
    ``standalone_over_ensemble`` = mean standalone accuracy / accuracy of the ensemble of all
    (the resilience ratio MEL's paper reports; None when that ensemble is no better than guessing,
    :func:`sim.core.metrics.ratio_over_reference`)."""
    from servers.models import all_subsets, subset_key

    table: dict = {"standalone": {}, "ensemble": {}}
    for s in sorted(out.logits):
        table["standalone"][str(s)] = float((out.logits[s].argmax(1).numpy() == y).mean())
    for a in all_subsets(sorted(out.logits)):
        table["ensemble"][subset_key(a)] = float(
            (ensemble_probs(a, out.feats, out.logits, combiners).argmax(1).numpy() == y).mean())
    if out.exits:  # coop: accuracy of every Teammate exit (the accuracy-vs-depth curve)
        table["exits"] = {str(s): {f"{f:g}": float((ex[d].argmax(1).numpy() == y).mean())
                                   for d, f in enumerate(depth_fractions(len(ex)))}
                          for s, ex in out.exits.items() if s != COOP_LEADER}
    full_members = sorted(out.logits)
    full = subset_key(full_members)
    if len(out.logits) >= 2:
        mean_alone = float(np.mean(list(table["standalone"].values())))
        table["standalone_over_ensemble"] = ratio_over_reference(mean_alone, table["ensemble"][full],
                                                                 int(out.logits[full_members[0]].shape[1]), len(y))
    return table
