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
kernel family (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` changes),
the CPU model and any setting that changes the BLAS's or oneDNN's kernels (:data:`KERNEL_ENV`) they
were made with. With all of them the same the comparison is exact, text to text; otherwise, float
rounding differs, and keys, counts and strings must still be equal and floats equal to :data:`RTOL`
(see there for what that can and cannot promise).
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
    # every strategy (the failure, routing and pool cases below price deferrals at c_e = 0, so that the
    # 3-round runs defer enough, against product-line legacy models near 0.87, to exercise what they pin)
    "l2h": [],
    "l2d": ["strategy=l2d"],
    "legacy_only": ["strategy=legacy_only"],
    "server_only": ["strategy=server_only"],
    "random": ["strategy=random"],
    "confidence": ["strategy=confidence"],
    "compare_confidence": ["strategy=compare_confidence"],
    "dml": ["strategy.c_e=0", "strategy=dml"],
    "mel_crash_stop": ["strategy.c_e=0", "strategy=mel", "failures=crash_stop", "failures.servers=[1]", "failures.round=2"],
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
    "round_robin_crash_recover": ["strategy.c_e=0", "sim.num_rounds=5", "servers.count=2", "servers.routing=round_robin",
                                  "failures=crash_recover", "failures.round=1", "failures.recover_after=1"],
    "learned_partition": ["strategy.c_e=0", "servers.count=2", "servers.routing=learned", "failures=partition",
                          "failures.partition.devices=[0,1]", "failures.partition.start=1"],
    "least_loaded_transient": ["strategy.c_e=0", "sim.num_rounds=5", "servers.count=2", "servers.routing=least_loaded",
                               "failures=transient", "failures.outage_p=0.5", "failures.query_drop_q=0.2"],
    "ensemble_slow": ["strategy.c_e=0", "servers.count=2", "servers.routing=all", "failures=slow", "failures.slow.start=1",
                      "failures.slow.delay_s=5"],
    "dropout_per_server_prices": ["strategy.c_e=0", "servers.count=2", "servers.c_e=[0.0,0.1]", "failures=device_dropout",
                                  "failures.dropout.fraction=0.5"],
    "random_failures_sampled": ["fleet.num_clients=12", "data.partition.name=sampled", "failures=random",
                                "servers.count=2", "sim.devices_per_node=3"],
    # fleets and uneven help (issues 29, 30)
    "l2h_per_device": ["fleet.legacy=per_device", "data.split.legacy=0.4", "data.split.rejector=0.4",
                       "data.split.test=0.2"],
    "specialists_drift": ["strategy.c_e=0", "servers.count=2", "servers.known_classes=[[0,1,2,3,4],[5,6,7,8,9]]",
                          "fleet.drift.fraction=0.5", "fleet.drift.offset=0.5"],
    "tiered_versions": ["+tier=both", "servers.c_e=[0.0,0.1]", "fleet.groups.0.versions=2", "fleet.num_clients=8"],
    "crossfit_labels": ["strategy.c_e=0", "strategy.server_labels=crossfit", "strategy.crossfit_folds=2",
                        "sim.num_rounds=5"],
}
"""Every strategy; every ``servers.training`` (independent, mel, dml, coop); four routings;
seven failure kinds; both surrogates; both bounds; staleness, partial participation, three
partitions, per-server prices, several devices per node; product lines (the default) with model
versions and per-device legacy models; specialist servers, drifting devices, a tiered pool;
cross-fitted labels."""

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


KERNEL_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
"""Environment variables that make MKL or oneDNN use other kernels than the CPU's best (they pick by
the CPU themselves, whatever ``ATEN_CPU_CAPABILITY`` says): measured here, ``MKL_CBWR=COMPATIBLE``
and ``ONEDNN_MAX_CPU_ISA=SSE41`` each change the rounding of a training run."""


def machine() -> dict[str, Any]:
    """What exact float equality depends on (the kernel settings of :data:`KERNEL_ENV` only when set,
    so files recorded without them keep matching)."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "cpu": cpu_model()}
    env = {k: os.environ[k] for k in KERNEL_ENV if os.environ.get(k)}
    if env:
        out["kernel_env"] = env
    return out


RTOL = 1e-3
"""Relative tolerance for floats when the golden files come from other arithmetic (:func:`differences`):
another CPU, another kernel family (``ATEN_CPU_CAPABILITY``), other BLAS kernels (:data:`KERNEL_ENV`).

What it promises. Behaviour is compared exactly: every key, string, boolean and integer -- sample
counts, deferrals sent, servers down. A decision changed on one test sample changes such a count
and moves an accuracy or rate of a golden run (at most 360 test samples) by at least 1/360 of it,
2.8e-3 relative; RTOL stays below that, so no accuracy hides a changed sample.

What it cannot promise. Floats that are not counts (losses, AURC, ratios) differ by rounding, and
for trained quantities no a-priori bound exists: float32 rounding of a gradient with cancelling
terms is as large as Adam's eps, so Adam can turn it into a step of up to lr
(tests/test_fleet.py, ``test_batched_pretraining_is_the_one_by_one_training``), and a moved weight
can flip a prediction. That the golden runs agree across arithmetics is therefore measured, not
guaranteed. Measured against the AVX-512 recording (AMD EPYC, torch 2.13.0), on an AMD EPYC without
AVX-512 with the AVX2 and the portable kernels (``ATEN_CPU_CAPABILITY=avx2`` / ``default``): every
count and accuracy equal; largest relative float difference 7.7e-5 (``mel_crash_stop``'s E-AURC, a
ranking of scores), 2.7e-5 for a loss (``coop``'s summed server loss), at most 1.8e-6 in the other
20 cases; earlier, between an Intel and an AMD AVX-512 machine, 1.3e-4 (``coop``). RTOL is 13 times
the largest. ``python -m tests.kernels`` (the README's test command) reruns the golden cases with
both kernel families on every CI machine. Since the product-line legacy models (recording: AMD EPYC,
AVX2), the legacy models are trained in float64 (``clients.legacy.PRODUCT_LINE_DTYPE``: in float32
they came out different under the portable kernels and flipped 2 of 540 decisions in every case);
under the portable kernels every case then agrees to RTOL except ``coop``, whose rounds after the
first amplify the rounding of its float32 server training into changed decisions
(``tests/test_golden.py``, ``AMPLIFIED``).

Where it is known not to hold: with MKL's and oneDNN's portable paths too (``MKL_CBWR=COMPATIBLE``,
``ONEDNN_MAX_CPU_ISA=SSE41``), ``coop``'s server loss moves 2e-3 and two ensemble accuracies by one
and two test samples: training amplified the rounding into changed decisions. A failure like that on
a new machine, with the simulator's code unchanged, is that machine's arithmetic, not a regression:
record the files there (``python -m tests.golden``) before comparing a change, rather than widen
RTOL, which would then hide a changed test sample. Infinities and NaNs must match exactly."""


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
