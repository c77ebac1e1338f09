"""Golden outputs: the exact results of a fixed set of small runs, recorded to pin behaviour.

Each case is a list of Hydra overrides on a 4-device fleet (12 for the sampled-partition case),
3 rounds, run in-process; a few cases also run on Flower + Ray and must give the same files.
For each case, ``tests/golden/<name>.json`` holds the run's ``summary.json`` and its per-round
records (``metrics.jsonl`` without wall-clock times). ``tests/test_golden.py`` reruns every case
and compares to the last digit.

A change that is *meant* to move results regenerates every file with one command, in the same
commit, and says in its message which numbers moved and why::

    python -m tests.golden            # all cases
    python -m tests.golden l2h mel    # some cases

Exact float equality needs the same arithmetic: the files record the torch version, the CPU
kernel family (``torch.backends.cpu.get_cpu_capability()``) and the CPU model they were made with.
On that machine the comparison is exact, text to text; on another one, whose float rounding
differs, keys, counts and strings must still be equal and floats equal to :data:`RTOL`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

BASE = ["fleet.num_clients=4", "sim.num_rounds=3", "sim.backend=inprocess", "sim.progress=false", "sim.plots=false",
        "seed=1"]

CASES: dict[str, list[str]] = {
    # every strategy
    "l2h": [],
    "l2d": ["strategy=l2d"],
    "legacy_only": ["strategy=legacy_only"],
    "server_only": ["strategy=server_only"],
    "random": ["strategy=random"],
    "confidence": ["strategy=confidence"],
    "compare_confidence": ["strategy=compare_confidence"],
    "dml": ["strategy=dml"],
    "mel_crash_stop": ["strategy=mel", "failures=crash_stop", "failures.servers=[1]", "failures.round=2"],
    "coop": ["strategy=coop"],
    # L2H variants
    "l2h_binary": ["data.classes=[3,8]"],
    "l2h_bounded_quantile": ["strategy.max_defer_rate=0.2"],
    "l2h_bounded_stochastic": ["strategy.max_defer_rate=0.2", "strategy.bound=stochastic"],
    "l2h_stale_dirichlet": ["sim.num_rounds=5", "strategy.staleness=2", "sim.fraction_train=0.5",
                            "data.partition.name=dirichlet"],
    "l2h_repo_weights_sample_inputs": ["strategy.weights=repo", "strategy.rejector.inputs=sample"],
    "l2d_ova_fedavg_2experts": ["strategy=l2d", "strategy.l2d.loss=ova", "strategy.rejector.federation=fedavg", "strategy.rejector.federate_by=fleet",
                                "servers.count=2"],
    # routings x failures
    "round_robin_crash_recover": ["sim.num_rounds=5", "servers.count=2", "servers.routing=round_robin",
                                  "failures=crash_recover", "failures.round=1", "failures.recover_after=1"],
    "learned_partition": ["servers.count=2", "servers.routing=learned", "failures=partition",
                          "failures.partition.devices=[0,1]", "failures.partition.start=1"],
    "least_loaded_transient": ["sim.num_rounds=5", "servers.count=2", "servers.routing=least_loaded",
                               "failures=transient", "failures.outage_p=0.5", "failures.query_drop_q=0.2"],
    "ensemble_slow": ["servers.count=2", "servers.routing=all", "failures=slow", "failures.slow.start=1",
                      "failures.slow.delay_s=5"],
    "dropout_per_server_prices": ["servers.count=2", "servers.c_e=[0.05,0.2]", "failures=device_dropout",
                                  "failures.dropout.fraction=0.5"],
    "random_failures_sampled": ["fleet.num_clients=12", "data.partition.name=sampled", "failures=random",
                                "servers.count=2", "sim.devices_per_node=3"],
}
"""Every strategy; every ``servers.training`` (independent, mel, dml, coop); four routings;
seven failure kinds; both surrogates; both bounds; staleness, partial participation, three
partitions, per-server prices, several devices per node."""

RAY_CASES = ("l2h",)
"""Cases also run on Flower + Ray: they must give the in-process golden file exactly. MEL servers with
failures on Ray are pinned to the in-process numbers by tests/test_resume.py (interrupted on Ray,
resumed in-process, equal to the uninterrupted in-process run to the last digit)."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): two CPUs of one
    instruction-set family (both ``AVX512``) can still round differently (measured: an Intel and an
    AMD EPYC machine differ from the 8th significant digit of the losses on)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What exact float equality depends on."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": cpu_model()}


RTOL = 1e-3
"""Relative tolerance for floats when the golden files come from another machine (:func:`differences`).
Measured between an Intel and an AMD EPYC machine (both ``AVX512``, torch 2.13.0): every accuracy,
count and defer rate equal, losses within 1.7e-6 relative in 21 of the 22 cases and 1.3e-4 in
``coop`` (its summed server loss, round 3). One test sample of a golden run (360 test samples)
moves an accuracy by at least 2.8e-3 relative (1/360 of an accuracy of at most 1), so 1e-3 still
catches it. Infinities and NaNs must match exactly."""


def differences(want: Any, got: Any, path: str = "", rtol: float = RTOL) -> list[str]:
    """Where ``got`` differs from ``want`` beyond float rounding: every key, list length, string,
    integer and boolean exactly; floats to ``rtol`` relative (absolute near zero).

    For golden files recorded on a different machine, whose float rounding differs; returns one
    line per difference, e.g. ``"summary.system_accuracy: 0.83 != 0.84"`` (empty: the same run).
    """
    if isinstance(want, dict) and isinstance(got, dict):
        def at(k: str) -> str:
            return f"{path}.{k}" if path else str(k)

        out = [f"{at(k)}: missing" if k not in got else f"{at(k)}: unexpected" for k in sorted(set(want) ^ set(got))]
        for k in sorted(set(want) & set(got)):
            out += differences(want[k], got[k], at(k), rtol)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(got)} items != {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{path}[{i}]", rtol)]
    if isinstance(want, float) and isinstance(got, float):
        if want == got or (math.isnan(want) and math.isnan(got)):
            return []
        if math.isfinite(want) and math.isfinite(got) and abs(want - got) <= rtol * max(abs(want), abs(got), 1e-3):
            return []
    elif type(want) is type(got) and want == got:
        return []
    return [f"{path}: {got!r} != {want!r}"]


def run_case(name: str, run_dir: Path, cache_dir: Path, backend: str = "inprocess") -> dict[str, Any]:
    """Run case ``name`` into ``run_dir``; returns ``{"summary": ..., "rounds": [...]}``."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.run import simulate

    overrides = BASE + CASES[name] + [f"sim.cache_dir={cache_dir}", f"sim.backend={backend}"]
    with open(os.devnull, "w") as sink:
        simulate(compose_checked(overrides), run_dir, console=Console(file=sink))
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict[str, Any]:
    """A run directory's summary and per-round records, wall-clock times left out."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rounds:
        r.pop("elapsed_s", None)
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "rounds": rounds}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    return json.loads(golden_path(name).read_text())


def dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"
