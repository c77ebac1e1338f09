"""``python -m tests.kernels [pytest args]``: the numeric tests again under the CPU kernels this
machine does not use by default.

torch picks its CPU kernels by the best instruction set the CPU has (``AVX512`` on a recent x86,
``AVX2`` on an older one) unless ``ATEN_CPU_CAPABILITY`` names another: ``default`` (the portable
kernels, for any x86-64 CPU) or ``avx2``. Each family rounds differently, so a float comparison that
passes with one can fail with another (issue 28: a tolerance measured on an AVX-512 machine failed
on an AVX2 one). The tests marked ``numeric`` (pyproject.toml) are those whose results depend on
that rounding; this runs them (``pytest -m numeric -n 2``) once per family in :data:`FAMILIES`
that differs from the one this process uses and that this CPU has, so the README's test command
(``python -m pytest -n 2`` then this) covers every family the CPU offers. ``.ci/run`` runs it.

Exit status: 0 when every run passed (or none was needed), else the first failing run's.
Only torch's own kernels follow ``ATEN_CPU_CAPABILITY``; the BLAS (MKL) and oneDNN choose their
paths by the CPU themselves (``MKL_CBWR``, ``ONEDNN_MAX_CPU_ISA``), not varied here.
"""
from __future__ import annotations

import os
import subprocess
import sys

FAMILIES = ("default", "avx2")
"""``ATEN_CPU_CAPABILITY`` values the numeric tests are run again with (``avx512`` is the native
family of the machines that have it, so the plain test run covers it there)."""


def capability(env: dict[str, str]) -> str:
    """The kernel family torch uses under ``env`` (lower case: ``default``, ``avx2``, ``avx512``)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().lower()


def main(argv: list[str]) -> int:
    base = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    native = capability(base)
    status = 0
    for family in FAMILIES:
        env = {**base, "ATEN_CPU_CAPABILITY": family}
        got = capability(env)
        if got == native:
            print(f"tests.kernels: {family}: this machine's own kernels, covered by the plain test run", flush=True)
            continue
        if got != family:
            print(f"tests.kernels: {family}: this CPU lacks it (torch uses {got}); skipped", flush=True)
            continue
        print(f"tests.kernels: the numeric tests with ATEN_CPU_CAPABILITY={family} (native: {native})", flush=True)
        rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "numeric", "-n", "2", *argv], env=env)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
