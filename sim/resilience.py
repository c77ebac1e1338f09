"""The ``servers`` and ``resilience`` parts of summary.json (MEL's resilience metric and ours).

- ``resilience.fraction_kept`` (and ``_min``, ``_run``, ``_final``, ``_by_round``): per round, the
  run's system accuracy / the system accuracy of the same seed with every server up, averaged
  over the rounds where something failed; ``resilience.inference_kept`` (and ``_system``): per
  round, the same trained pool's accuracy under the failure state / with every server up. See
  :func:`kept` (Gudipaty et al. 2025, MEL; docs/methods.md §7). End to end: rejectors, routing
  and the legacy fallback included; ``test_set_digest`` checks the final test samples match.
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
from sim.core.metrics import ratio_over_reference


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
    load = np.zeros(s.count, dtype=np.int64)
    for r in rounds:
        load += np.asarray(r.get("train_load", [0] * len(load)), dtype=np.int64)
    ev = _evaluated(rounds)
    return {
        "count": s.count, "routing": str(s.resolved_routing), "training": str(s.training),
        "dead_at_end": dead, "available_at_end": ev[-1]["availability"] if ev else None,
        "train_load": load.tolist(),
        "table": table,
    }


def _ratios(num: dict[int, float], den: dict[int, float], degraded: set[int], num_classes: int,
            n: dict[int, int]) -> dict[str, Any]:
    """Per-round ratios ``num / den`` of accuracies on ``n[t]`` test samples and their summaries:
    ``mean`` over the degraded rounds (over every round when none is degraded), ``min`` over the
    degraded rounds, ``run`` mean over every round, ``final``, ``by_round``. A round whose reference
    ``den`` is no better than guessing has no ratio (:func:`sim.core.metrics.ratio_over_reference`):
    ``by_round`` gives it as None and the summaries leave it out (``mean`` is None when every
    degraded round is undefined)."""
    defined = {t: ratio_over_reference(num[t], den[t], num_classes, n.get(t, 0)) for t in sorted(num) if t in den}
    by_round_all = {str(t): v for t, v in defined.items()}
    by_round = {t: v for t, v in defined.items() if v is not None}
    if not by_round:
        if by_round_all:
            return {"mean": None, "min": None, "run": None, "final": None, "by_round": by_round_all}
        return {"mean": None, "min": None, "run": None, "final": None, "by_round": {}}
    hit = [v for t, v in by_round.items() if t in degraded]
    # every degraded round undefined: no mean of them (not the all-up rounds' mean in their place)
    mean = float(np.mean(hit)) if hit else None if degraded & set(defined) else float(np.mean(list(by_round.values())))
    last = max(defined)
    return {"mean": mean, "min": float(min(hit)) if hit else None,
            "run": float(np.mean(list(by_round.values()))), "final": defined[last], "by_round": by_round_all}


def kept(rounds: list[dict[str, Any]], reference_rounds: list[dict[str, Any]] | None, num_classes: int
         ) -> dict[str, Any]:
    """MEL's resilience measures per round (Gudipaty et al. 2025; docs/methods.md §7).

    - ``fraction_kept``: system accuracy in round t / the all-up reference run's in round t (same
      seed, every server up); trained models may differ (servers down do not learn).
    - ``inference_kept``: server accuracy in round t (every test sample as if deferred, failovers
      included) / the same trained pool's with every server up and reachable (a down server
      answers with its last checkpoint): the models are the same, only availability differs -- the
      number comparable to MEL's 95.6%. ``inference_kept_system``: the same with the devices' own
      deferral decisions.

    Each is summarised over the rounds where a server was down, a partition cut devices off or
    queries were dropped (``mean``, ``min``) and over the run (``run``); a run where nothing fails
    gives exactly 1. A round whose reference accuracy is no better than guessing among
    ``num_classes`` classes has no ratio (None; :func:`sim.core.metrics.chance_floor`).
    """
    ev = _evaluated(rounds)
    n = {r["round"]: int(r.get("num_samples", 0)) for r in ev}
    degraded = {r["round"] for r in ev if r.get("degraded", state_label(r["availability"]) != "all up")}
    acc = {r["round"]: r["system_accuracy"] for r in ev}
    out = {"rounds_degraded": sorted(degraded)}
    ref = {r["round"]: r["system_accuracy"] for r in _evaluated(reference_rounds)} if reference_rounds else None
    out["fraction_kept"] = _ratios(acc, ref if ref is not None else acc, degraded, num_classes, n)
    # a round whose all-up stand-in holds a server that never learnt anything has no inference ratio
    up = {r["round"]: (None if r.get("all_up_untrained") else r.get("server_accuracy_all_up"))
          for r in ev if r.get("server_accuracy_all_up") is not None}
    out["inference_kept"] = _ratios({t: r["server_accuracy"] for r in ev if (t := r["round"]) in up}, up, degraded,
                                    num_classes, n)
    sys_up = {r["round"]: (None if r.get("all_up_untrained") else r["system_accuracy_all_up"])
              for r in ev if r.get("system_accuracy_all_up") is not None}
    out["inference_kept_system"] = _ratios({t: acc[t] for t in sys_up}, sys_up, degraded, num_classes, n)
    return out


def resilience_summary(cfg: Config, rounds: list[dict[str, Any]], summary: dict[str, Any],
                       reference: dict[str, Any] | None, reference_rounds: list[dict[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """``summary.resilience`` (see the module docstring and :func:`kept`)."""
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
    num_classes, num_test = int(summary["num_classes"]), int(summary["num_test_samples"])
    k = kept(rounds, reference_rounds if reference is not None else None, num_classes)
    if reference is None and cfg.failures.name != FailureKind.none:
        k["fraction_kept"] = _ratios({}, {}, set(), num_classes, {})  # no all-up reference run (failures.reference=false)
    return {
        "system_accuracy": acc,
        "all_up_accuracy": all_up,
        "fraction_kept": k["fraction_kept"]["mean"] if same is not False else None,
        "fraction_kept_min": k["fraction_kept"]["min"],
        "fraction_kept_run": k["fraction_kept"]["run"],
        "fraction_kept_final": ratio_over_reference(acc, all_up, num_classes, num_test) if same else None,
        "fraction_kept_by_round": k["fraction_kept"]["by_round"],
        "inference_kept": k["inference_kept"]["mean"],
        "inference_kept_min": k["inference_kept"]["min"],
        "inference_kept_run": k["inference_kept"]["run"],
        "inference_kept_system": k["inference_kept_system"]["mean"],
        "inference_kept_by_round": k["inference_kept"]["by_round"],
        "same_test_samples": same,
        "served_defer_rate": summary.get("served_defer_rate"),
        "final_state": state_label(ev[-1]["availability"]) if ev else None,
        "rounds_degraded": len(k["rounds_degraded"]),
        "accuracy_by_state": {
            k: {"system_accuracy": float(np.mean([r["system_accuracy"] for r in v])), "rounds": len(v),
                "served_defer_rate": float(np.mean([r["served_defer_rate"] for r in v]))}
            for k, v in sorted(by_state.items())
        },
        "failovers": {k: int(failovers.get(k, 0)) for k in ("subset", "standalone", "legacy")},
        "train_rerouted": int(sum(int(r.get("train_rerouted", 0)) for r in rounds)),
        "device_errors": int(sum(int(r.get("train_errors", 0)) + int(r.get("eval_errors", 0)) for r in rounds)),
    }
