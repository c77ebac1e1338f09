"""Federated averaging of the devices' trained parts (FedAvg, McMahan et al. 2017, arXiv 1602.05629).

:func:`weighted_mean` is the sample-weighted mean of same-named arrays, computed exactly as
Flower's FedAvg aggregation (``flwr.serverapp.strategy`` aggregates ArrayRecords the same way:
weights normalised by their sum, then ``sum_i w_i * a_i`` accumulated in order), kept here
because Flower does not export that helper.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_mean(states: Sequence[dict[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i (w_i / sum_j w_j) * states[i][name]`` for every array name.

    Args:
        states: one dict of arrays per device (same names and shapes). weights: one weight per
            device (its number of training samples), not all zero.

    Raises:
        ValueError: no states, a different number of weights, or weights summing to zero.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"weighted_mean: {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_mean: the weights sum to zero")
    out: dict[str, np.ndarray] = {}
    for state, w in zip(states, weights):
        factor = w / total
        for name, value in state.items():
            if name not in out:
                out[name] = np.asarray(value) * factor
            else:
                out[name] += np.asarray(value) * factor
    return out
