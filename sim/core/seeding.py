"""Seeds derived from what a random draw is for, never from the order work ran in."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (seed, device id, round, tag, ...).

    Used so that every random choice depends only on what it is for, never on which worker or
    in what order the work ran.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from the CPU generator seeded with ``seed`` inside the block, global RNG state restored after.

    The same numbers as ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``, without
    what ``torch.manual_seed`` also does: queue a CUDA re-seed, which records a Python stack
    trace on every call (a third of the cost of building a small model; py-spy). torch is imported
    here, not with the module: the command line's path to its first error or ``--help`` (which
    reaches this module through :mod:`sim.results`) then never pays torch's ~2.7 s import.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser of ``z`` (uint64, any shape), elementwise: a fast integer hash whose
    outputs look uniform (Steele, Lea, Flood 2014, "Fast splittable pseudorandom number
    generators", OOPSLA; constants of Vigna's ``splitmix64.c``). Wraps modulo 2^64."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
