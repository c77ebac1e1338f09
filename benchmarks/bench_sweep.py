"""A sweep's wall time by how its jobs run: one Ray per job, one Ray for the sweep, jobs at once.

Runs the same sweep (``python -m sim.run -m seed=0,...,J-1`` plus ``--args``, into an empty cache
filled by a first untimed sweep) as a user runs it, once per mode, and prints a markdown table:

- ``ray, one Ray per job``: ``sim.shared_ray_session=false`` (every job starts and stops its own Ray);
- ``ray, one Ray per sweep``: the default (sim/sweep.py starts Ray once);
- ``ray, N at once``: ``sim.sweep_parallel=N`` (Hydra's joblib launcher, the sweep's one Ray);
- ``inprocess`` one after another and ``N at once``.

Every job's summary.json is compared with the first mode's: the modes must not change a number.

Usage:
    python benchmarks/bench_sweep.py                      # 4 jobs, 2 at once, the default run
    python benchmarks/bench_sweep.py --backends inprocess --args sim.num_rounds=40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "ray, one Ray per job": ["sim.backend=ray", "sim.shared_ray_session=false"],
    "ray, one Ray per sweep": ["sim.backend=ray"],
    "ray, N at once": ["sim.backend=ray", "sim.sweep_parallel={n}"],
    "inprocess, one after another": ["sim.backend=inprocess"],
    "inprocess, N at once": ["sim.backend=inprocess", "sim.sweep_parallel={n}"],
}


def sweep(args: list[str], env: dict[str, str], work: Path) -> tuple[float, list[dict]]:
    """Run one sweep; returns its wall seconds and its jobs' summaries (in job order)."""
    out = Path(tempfile.mkdtemp(dir=work))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sim.run", "-m", *args, f"hydra.sweep.dir={out / 's'}",
                        "sim.plots=false", "sim.progress=false"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"sweep failed ({' '.join(args)}): {r.stderr.strip().splitlines()[-1:]}")
    jobs = sorted((p for p in (out / "s").iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))
    return wall, [json.loads((j / "summary.json").read_text()) for j in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4, help="the sweep is seed=0..jobs-1")
    ap.add_argument("--parallel", type=int, default=2, help="N of the 'N at once' modes")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--args", nargs="*", default=[], help="overrides for every job (e.g. fleet.num_clients=20)")
    ap.add_argument("--backends", nargs="+", choices=("ray", "inprocess"), default=["ray", "inprocess"],
                    help="the modes of these backends only")
    ns = ap.parse_args()
    if ns.jobs < 1 or ns.parallel < 1 or ns.repeats < 1:
        ap.error("--jobs, --parallel and --repeats must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="l2h-sweep-"))
    env = {**os.environ, "L2H_SIM_CACHE": str(work / "cache"), "FLWR_TELEMETRY_ENABLED": "0"}
    seeds = "seed=" + ",".join(str(s) for s in range(ns.jobs))
    base = [seeds, *ns.args]
    sweep([*base, "sim.backend=inprocess"], env, work)  # fills the cache: every mode below is warm
    print(f"Sweep `-m {' '.join(base)}`, {ns.jobs} jobs, N = {ns.parallel}, {os.cpu_count()} CPUs, "
          f"{ns.repeats} repeat(s), warm cache.\n")
    print("| mode | wall s (median) | runs | same summaries |")
    print("|---|---:|---|:---:|", flush=True)
    reference = None
    for mode, extra in MODES.items():
        if mode.split(",")[0] not in ns.backends:
            continue
        walls, same = [], True
        for _ in range(ns.repeats):
            wall, summaries = sweep([*base, *(e.format(n=ns.parallel) for e in extra)], env, work)
            walls.append(wall)
            reference = summaries if reference is None else reference
            same = same and summaries == reference
        name = mode.replace("N at once", f"{ns.parallel} at once")
        print(f"| {name} | {statistics.median(walls):.1f} | {', '.join(f'{w:.1f}' for w in walls)} "
              f"| {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
