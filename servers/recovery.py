"""What each helper server comes back with after a crash, and how far each has been trained.

The pool keeps, per server, its crash-recover checkpoint (its state at the end of the last round it
was up: what ``failures.recover_from=checkpoint`` restores) and any installed start state (L2D's fixed
experts: what ``scratch`` restores), and three rounds (0: none): the last round its weights were
trained, the round its checkpoint was taken at (0: its start state), and the last round it came back
with less training than it went down with -- a *reset*: what devices learnt about it before no longer
describes it (docs/methods.md §1, "Synchronous and asynchronous").
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sim.core.arrays import prefixed, sub


class Recovery:
    """The recovery states and training rounds of S servers.

    Args:
        count: S.

    Attributes:
        checkpoints: server -> its crash-recover checkpoint (``state()`` arrays).
        initial: server -> its installed start state (none: it starts from its seeded init).
        trained_round, checkpoint_round, reset_round: ``(S,)`` int64 rounds (see the module docstring).
    """

    def __init__(self, count: int):
        self.count = count
        self.checkpoints: dict[int, dict[str, np.ndarray]] = {}
        self.initial: dict[int, dict[str, np.ndarray]] = {}
        self.trained_round = np.zeros(count, dtype=np.int64)
        self.checkpoint_round = np.zeros(count, dtype=np.int64)
        self.reset_round = np.zeros(count, dtype=np.int64)

    def install(self, states: list[dict[str, np.ndarray]]) -> None:
        """Start states for every server (``states[s]``), also its first checkpoint."""
        self.initial = dict(enumerate(states))
        self.checkpoints.update(self.initial)

    def state(self, s: int) -> dict[str, np.ndarray] | None:
        """What server ``s`` answers with when it is down: its checkpoint, else its start state (None:
        its seeded init)."""
        return self.checkpoints.get(s, self.initial.get(s))

    def restart(self, s: int, recover_from: str, round_: int, load: Callable[[dict[str, np.ndarray]], Any]) -> None:
        """Server ``s`` has just been started again in round ``round_``: ``load`` it with its
        checkpoint (``recover_from="checkpoint"``, when it has one) or its start state (``scratch``,
        when it has one), and record a reset if it comes back less trained than it went down."""
        restored = 0  # the round whose end state the server comes back with (0: its start state)
        if recover_from == "checkpoint" and s in self.checkpoints:
            load(self.checkpoints[s])
            restored = int(self.checkpoint_round[s])
        elif s in self.initial:
            load(self.initial[s])
        if restored < self.trained_round[s]:
            self.reset_round[s] = round_
            self.trained_round[s] = restored

    def saved(self, states: dict[int, dict[str, np.ndarray]], round_: int) -> None:
        """The servers' checkpoints at the end of round ``round_`` (server -> ``state()``)."""
        self.checkpoints.update(states)
        self.checkpoint_round[list(states)] = round_

    def untrained(self, up: list[int]) -> list[int]:
        """The servers whose all-up stand-in has never learnt anything: an up server not trained yet,
        a down one with no checkpoint from training, neither with a start state."""
        return [s for s in range(self.count) if s not in self.initial
                and (self.trained_round[s] if s in up else self.checkpoint_round[s]) == 0]

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)`` for the run's checkpoint: the recovery checkpoints and the rounds."""
        arrays: dict[str, np.ndarray] = {}
        for s, st in self.checkpoints.items():
            arrays.update(prefixed(f"recovery{s}", st))
        rounds = {"trained": self.trained_round.tolist(), "checkpoint": self.checkpoint_round.tolist(),
                  "reset": self.reset_round.tolist()}
        return arrays, {"recovery": sorted(self.checkpoints), "rounds": rounds}

    def restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Load :meth:`checkpoint`'s output back."""
        self.checkpoints = {int(s): sub(arrays, f"recovery{s}") for s in meta["recovery"]}
        rounds = meta.get("rounds", {})  # absent from checkpoints made before resets were tracked: none known
        for name, target in (("trained", self.trained_round), ("checkpoint", self.checkpoint_round),
                             ("reset", self.reset_round)):
            target[:] = rounds.get(name, [0] * self.count)
