"""Where a run came from: the code's commit, the package versions, the machine and its float kernels.

Written once per run as ``provenance.json`` beside ``summary.json`` (:func:`sim.pipeline.prepare_inputs`).
It is kept out of ``summary.json`` on purpose: a summary holds only numbers the seed determines, and
is compared to the last digit across resumes, backends and golden files, while a commit, a CPU or a
version differs from machine to machine. ``python -m sim.report`` copies the CPU and the torch CPU
capability into ``report.csv`` so per-seed values can be compared with a re-run elsewhere (float
rounding differs between CPU kernel families).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "flwr", "ray", "hydra-core", "omegaconf", "numpy", "mnist1d", "flwr-datasets")
"""Distributions whose versions are recorded."""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(path: Path) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``path`` (None
    outside one, or without git). Dirty: tracked files differ from the commit."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance() -> dict[str, Any]:
    """The run's provenance: git commit and dirty flag of this code, Python, package versions, torch's
    CPU capability (the kernel family that decides float rounding; ``ATEN_CPU_CAPABILITY`` overrides
    it), the CPU model, the number of cores, the platform and the command line."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        **git_state(Path(__file__).resolve().parent),
        "python": platform.python_version(),
        "versions": versions,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }


FILE = "provenance.json"


def record(run_dir: Path, resumed: bool) -> Path:
    """Write ``run_dir/provenance.json``: ``{"started": provenance(), "resumed": [...]}``; a resume
    keeps what the run started with and appends its own entry (a run resumed on another machine
    says so). An unreadable earlier file is replaced."""
    import json

    from sim.core.cache import atomic_write_text

    path = Path(run_dir) / FILE
    now = provenance()
    doc: dict[str, Any] = {"started": now, "resumed": []}
    if resumed and path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and isinstance(old.get("started"), dict):
                doc = {"started": old["started"], "resumed": [*list(old.get("resumed") or []), now]}
        except (OSError, ValueError):
            pass
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    return path
