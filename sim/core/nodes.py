"""Which Flower node simulates which devices.

A Flower message costs a fixed 6-10 ms on this kind of machine (Ray actor round trip, LinkState
book-keeping, reply polling; benchmarks/README.md), far more than one small device's round of
work. So a Flower node (a simulated site or gateway) may host several devices: node ``j`` holds
the contiguous block of devices ``[j * k, min((j + 1) * k, N))`` and one message to it carries
the round's work for every one of its devices that the round sampled. The devices stay
independent -- each has its own data, legacy model, rejector and seeds, and fails on its own
(an injected dropout skips that device only) -- so the numbers a run produces do not depend on
``k`` (tests/test_nodes.py); only the count of Flower messages does.

``sim.devices_per_node`` sets ``k``; null picks the smallest ``k`` that keeps the fleet within
``sim.max_nodes`` nodes.
"""
from __future__ import annotations

import math
from typing import Iterable


def devices_per_node(num_clients: int, setting: int | None, max_nodes: int) -> int:
    """Devices per Flower node: ``setting`` if given, else ``ceil(num_clients / max_nodes)``.

    Raises:
        ValueError: ``num_clients``, ``setting`` or ``max_nodes`` below 1.
    """
    if num_clients < 1:
        raise ValueError(f"fleet.num_clients={num_clients}: need at least 1 device")
    if setting is not None:
        if setting < 1:
            raise ValueError(f"sim.devices_per_node={setting}: must be >= 1 (or null for automatic)")
        return min(int(setting), num_clients)
    if max_nodes < 1:
        raise ValueError(f"sim.max_nodes={max_nodes}: must be >= 1")
    return math.ceil(num_clients / max_nodes)


def num_nodes(num_clients: int, per_node: int) -> int:
    """Flower nodes needed for ``num_clients`` devices at ``per_node`` devices each."""
    return math.ceil(num_clients / per_node)


def node_of(device: int, per_node: int) -> int:
    """The node (partition id) that hosts ``device``."""
    return device // per_node


def hosted(node: int, per_node: int, num_clients: int) -> range:
    """The devices node ``node`` hosts (a contiguous block)."""
    return range(node * per_node, min((node + 1) * per_node, num_clients))


def by_node(devices: Iterable[int], per_node: int) -> dict[int, list[int]]:
    """Group device ids by their node: ``{node: sorted devices}``, nodes in increasing order."""
    out: dict[int, list[int]] = {}
    for d in sorted(devices):
        out.setdefault(node_of(d, per_node), []).append(d)
    return out
