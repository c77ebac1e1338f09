"""Which helper server(s) a deferred sample goes to (``servers.routing``), for training and answers.

- ``learned``: the server the device's rejector chose, if the device can reach it;
- ``round_robin``: the device's reachable servers in turn;
- ``least_loaded``: the reachable server with the fewest samples routed to it this round;
- ``all``: every reachable server (the answer is their ensemble).

A sample whose chosen server is unreachable, and an exploration sample (a kept sample sent so the
servers are not cold), is assigned by the round-robin / least-loaded rule instead.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sim.core.config import Routing


class Router:
    """Routes samples among reachable servers; one instance per call of the pool (``reset``).

    Args:
        routing: the resolved ``servers.routing`` (not ``auto``). load: ``(S,)`` samples routed to
            each server this round, read by ``least_loaded`` (the pool updates it).
    """

    def __init__(self, routing: Routing, load: np.ndarray):
        self.routing, self.load = routing, load
        self.turn = 0

    def reset(self) -> None:
        """Start a new sequence of round-robin turns."""
        self.turn = 0

    def assign(self, candidates: Sequence[int]) -> int:
        """One server among ``candidates`` for the pool-chosen routings."""
        if self.routing == Routing.least_loaded:
            return min(candidates, key=lambda s: (self.load[s], s))
        s = candidates[self.turn % len(candidates)]
        self.turn += 1
        return s

    def pick(self, reach: Sequence[int], want: int, explore: bool = False) -> tuple[list[int], bool]:
        """The servers a sample goes to, and whether its chosen server was skipped (rerouted).

        Args:
            reach: the servers the sample's device can reach (non-empty). want: the server the
                device's rejector chose (-1: none). explore: an exploration sample.
        """
        if explore:
            return [self.assign(reach)], False
        if self.routing == Routing.all:
            return list(reach), False
        if self.routing == Routing.learned and want in reach:
            return [want], False
        return [self.assign(reach)], want >= 0

    def route(self, batches: list[dict[str, Any]], reachable: Callable[[int], list[int]], up: Sequence[int]
              ) -> tuple[dict[int, list[int]], int]:
        """Route the training samples the devices sent (one batch per device, in device order:
        ``device``, ``route (M,)``, ``explore (M,)``), counting each in :attr:`load`.

        Args:
            reachable: ``reachable(device)``, the servers the device can use (non-empty for every
                batch). up: the servers up this round.

        Returns:
            ``(rows, rerouted)``: server -> the rows (indices into the batches concatenated) it
            gets; how many samples' chosen server was down and went to another.
        """
        rows: dict[int, list[int]] = {s: [] for s in up}
        self.reset()
        row = rerouted = 0
        for b in batches:
            reach = reachable(int(b["device"]))
            for want, explore in zip(b["route"].tolist(), b["explore"].tolist()):
                targets, skipped = self.pick(reach, want, explore)
                rerouted += skipped  # the chosen server went down since the device chose
                for s in targets:
                    self.load[s] += 1
                    rows[s].append(row)
                row += 1
        return rows, rerouted
