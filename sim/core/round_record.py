"""One round's record: :class:`RoundRecord`, built once per round by the strategy
(:meth:`strategies.base.FleetStrategy.aggregate_evaluate`) and flattened once by the runner
(:meth:`sim.server_app.Federation.on_round`) into the line of ``metrics.jsonl`` that the run's
records, the terminal, the trackers, the resilience analysis and the report read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """What one round did.

    Attributes:
        round: the round (1-based; a resumed run's true round).
        train: the round's training record: ``train_devices`` and ``train_errors`` (devices that
            answered / did not) and the method's own keys (:meth:`PoolStrategy.train_round`: at least
            ``samples_sent``); empty before any training round.
        servers: the pool's outcome on the test samples (:meth:`PoolStrategy.answer`: ``degraded``,
            ``availability``, ``load``, ``failovers``, ``servers_dead``, the all-up counterfactual,
            ...); empty when no device answered the evaluation.
        metrics: the pooled evaluation metrics (:func:`sim.core.metrics.pooled_metrics` without its
            ``curves``: ``system_accuracy``, ``defer_rate``, ... as fractions in [0, 1]); empty when
            no device answered.
        eval_devices: devices that answered the evaluation. eval_errors: devices asked that did not.
        elapsed_s: wall-clock seconds since the rounds began.
    """

    round: int
    train: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    eval_devices: int = 0
    eval_errors: int = 0
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The record as one flat ``metrics.jsonl`` line (the one place it is flattened)."""
        return {"round": self.round, **self.train, **self.servers, **self.metrics,
                "eval_devices": self.eval_devices, "eval_errors": self.eval_errors, "elapsed_s": self.elapsed_s}
