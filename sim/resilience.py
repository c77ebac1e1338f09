"""The ``servers`` and ``resilience`` parts of summary.json (MEL's resilience metric and ours).

- ``resilience.fraction_kept`` = the run's final system accuracy / the system accuracy of the
  same seed with every server up, on the same test samples (every device is evaluated in the
  final round, and ``test_set_digest`` checks the samples are the same). It is MEL's "accuracy
  kept under failures" (Gudipaty et al. 2025; docs/methods.md, "Resilience") measured end to end:
  rejectors, routing and the legacy fallback included.
- ``resilience.accuracy_by_state``: mean system accuracy over the evaluated rounds in each
  availability state (``all up``, ``down 0``, ``down 0,2``, ...).
- ``servers.table``: MEL's standalone-vs-ensemble table on the final test samples (server
  answers only, no rejector), with ``standalone_over_ensemble`` = mean standalone accuracy /
  accuracy of the ensemble of every live server -- the ratio MEL's paper reports (95.6%).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np

from sim.core.config import Config, FailureKind


def state_label(availability: list[int]) -> str:
    """``[1, 0, 1] -> "down 1"``; all ones -> ``"all up"``."""
    down = [str(s) for s, up in enumerate(availability) if not up]
    return "all up" if not down else "down " + ",".join(down)


def test_set_digest(rec: dict[str, np.ndarray]) -> str:
    """A short hash of the evaluated test samples (device and label of each, in order)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(rec["device"], dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(rec["y"], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _evaluated(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rounds if r.get("system_accuracy") is not None and r.get("availability") is not None]


def servers_summary(cfg: Config, rounds: list[dict[str, Any]], table: dict[str, Any] | None,
                    dead: list[int]) -> dict[str, Any]:
    """``summary.servers``: the pool's setup, who is alive at the end, total load, the MEL table."""
    s = cfg.servers
    load = np.zeros(int(s.count), dtype=np.int64)
    for r in rounds:
        load += np.asarray(r.get("train_load", [0] * len(load)), dtype=np.int64)
    ev = _evaluated(rounds)
    return {
        "count": int(s.count), "routing": str(s.resolved_routing), "training": str(s.training),
        "dead_at_end": dead, "available_at_end": ev[-1]["availability"] if ev else None,
        "train_load": load.tolist(),
        "table": table,
    }


def resilience_summary(cfg: Config, rounds: list[dict[str, Any]], summary: dict[str, Any],
                       reference: dict[str, Any] | None) -> dict[str, Any]:
    """``summary.resilience`` (see the module docstring)."""
    ev = _evaluated(rounds)
    by_state: dict[str, list[dict[str, Any]]] = {}
    failovers: Counter = Counter()
    for r in ev:
        by_state.setdefault(state_label(r["availability"]), []).append(r)
        failovers.update(r.get("failovers", {}))
    acc = summary["system_accuracy"]
    all_up = same = None
    if reference is not None:
        all_up = reference["system_accuracy"]
        same = reference.get("test_set_digest") == summary["test_set_digest"]
    elif cfg.failures.name == FailureKind.none:
        all_up, same = acc, True
    return {
        "failures": str(cfg.failures.name),
        "system_accuracy": acc,
        "all_up_accuracy": all_up,
        "fraction_kept": (acc / all_up) if all_up and same else None,
        "same_test_samples": same,
        "served_defer_rate": summary.get("served_defer_rate"),
        "final_state": state_label(ev[-1]["availability"]) if ev else None,
        "rounds_degraded": sum(state_label(r["availability"]) != "all up" for r in ev),
        "accuracy_by_state": {
            k: {"system_accuracy": float(np.mean([r["system_accuracy"] for r in v])), "rounds": len(v),
                "served_defer_rate": float(np.mean([r["served_defer_rate"] for r in v]))}
            for k, v in sorted(by_state.items())
        },
        "failovers": {k: int(failovers.get(k, 0)) for k in ("subset", "standalone", "legacy")},
        "train_rerouted": int(sum(int(r.get("train_rerouted", 0)) for r in rounds)),
        "device_errors": int(sum(int(r.get("train_errors", 0)) + int(r.get("eval_errors", 0)) for r in rounds)),
    }
