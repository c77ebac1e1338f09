"""The all-up counterfactual: the same trained pool answering with every server up and reachable.

MEL's resilience measure (docs/methods.md §7) compares a degraded round's answers with those the same
trained servers would give if none were down, cut off or dropping queries: a server that is down
answers with its last checkpoint (its state when it was last up; the state it started with if it
never was), served by an in-process copy (:class:`Replicas`).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from servers.failover import ServerOutputs, answer
from servers.helper import HelperServer
from servers.models import Combiners
from servers.router import Router
from sim.core.config import CoopConfig, ServersConfig


class Replicas:
    """In-process copies of the servers, each with a given state, cached until that state changes.

    Args:
        cfg: the ``servers`` config. in_shape: ``(C, H, W)``. num_classes: K. seed: the run seed.
        torch_threads: intra-op threads of each copy.
    """

    def __init__(self, cfg: ServersConfig, in_shape: Sequence[int], num_classes: int, seed: int,
                 torch_threads: int):
        self.cfg, self.in_shape, self.num_classes, self.seed = cfg, tuple(in_shape), num_classes, seed
        self.torch_threads = torch_threads
        self.cache: dict[int, tuple[int, HelperServer]] = {}

    def get(self, s: int, state: dict[str, np.ndarray] | None) -> HelperServer:
        """Server ``s`` with ``state`` loaded (None: its start state)."""
        cached = self.cache.get(s)
        if cached is None or cached[0] != id(state):
            server = HelperServer(self.cfg, self.in_shape, self.num_classes, self.seed, s, self.torch_threads)
            if state is not None:
                server.load_state(state)
            self.cache[s] = cached = (id(state), server)
        return cached[1]


def all_up_answers(out: ServerOutputs, replicas: Replicas, states: dict[int, dict[str, np.ndarray] | None],
                   x: np.ndarray, device: np.ndarray, route: np.ndarray, defer: np.ndarray, m_pred: np.ndarray,
                   router: Router, combiners: Combiners | None, coop: CoopConfig | None,
                   prices: Sequence[float] | None) -> np.ndarray:
    """``e_pred (N,)`` of the samples ``x`` had every server been up and reachable: the servers that
    answered keep their outputs ``out``; every other server ``s`` answers with ``states[s]`` (added
    to ``out``); nothing is dropped or cut off.

    Args:
        device, route, defer, m_pred: ``(N,)`` per sample, as :func:`servers.failover.answer` takes them.
        router: a router over a copy of the round's load (the pool's counters stay untouched).
        combiners, coop, prices: as :func:`servers.failover.answer`.
    """
    num_servers = len(states)
    for s in range(num_servers):
        if s not in out.logits:
            r = replicas.get(s, states[s]).predict(x)
            out.feats[s], out.logits[s] = (torch.from_numpy(np.array(v)) for v in r[:2])
            if len(r) > 2:
                out.exits[s] = torch.from_numpy(np.array(r[2]))
    everyone = list(range(num_servers))
    res = answer(out, router, {int(d): everyone for d in np.unique(device)}, device, route, defer, m_pred,
                 np.zeros((len(x), num_servers), bool), num_servers, Counter(), combiners, coop, prices)
    return res.e_pred

