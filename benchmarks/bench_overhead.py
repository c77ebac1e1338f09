"""Flower-on-Ray simulation vs the same work as a plain in-process loop: wall time, ratio, peak memory.

Both runs execute the same L2H rounds (same devices, rounds, epochs, seed) through the same
ServerApp strategy and ClientApp code; ``sim.backend=inprocess`` calls the ClientApp handlers
directly in one process (no Ray, no Flower engine), ``sim.backend=ray`` runs the Flower
simulation engine on a local Ray. Their results are identical (tests/test_e2e.py), so the
difference in time and memory is the federation machinery alone.

Each run is a fresh ``python -m sim.run`` process (imports, Ray start-up and shutdown included,
as a user experiences it); the legacy fleet is built once beforehand so both read it from the
cache. Peak memory is the largest sum of proportional set sizes (PSS, shared pages split
between the processes sharing them) over the run's whole process tree -- the driver and every
Ray process -- sampled every 0.1 s.

Usage:
    python benchmarks/bench_overhead.py                  # 20 and 100 devices, 3 repeats
    python benchmarks/bench_overhead.py --devices 20 --repeats 1 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


PHASES = ("prepare_data_s", "legacy_fleet_s", "engine_start_s", "handshake_s", "rounds_s", "engine_stop_s",
          "total_s")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mib(root: int) -> float:
    """PSS of ``root`` and all its descendants, MiB."""
    seen, stack, total = set(), [root], 0
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss_kib(pid)
        stack += _children(pid)
    return total / 1024


def run_once(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, dict, dict]:
    """Run ``python -m sim.run args``; returns wall seconds, peak tree PSS (MiB), summary.json, timing.json."""
    run_dir = Path(tempfile.mkdtemp(dir=cwd))
    cmd = [sys.executable, "-m", "sim.run", *args, f"hydra.run.dir={run_dir}", "sim.progress=false",
           "sim.plots=false"]
    peak = [0.0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mib(proc.pid))
            time.sleep(0.1)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(args)}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    return (wall, peak[0], json.loads((run_dir / "summary.json").read_text()),
            json.loads((run_dir / "timing.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="l2h-bench-"))
    env = {**os.environ, "L2H_SIM_CACHE": str(work / "cache"), "FLWR_TELEMETRY_ENABLED": "0"}
    rows = []
    for n in ns.devices:
        common = [f"fleet.num_clients={n}", f"sim.num_rounds={ns.rounds}"]
        run_once(common + ["sim.backend=inprocess", "sim.num_rounds=1"], env, work)  # build + cache the fleet
        res: dict[str, list] = {"inprocess": [], "ray": []}
        for _ in range(ns.repeats):
            for backend in ("inprocess", "ray"):
                res[backend].append(run_once(common + [f"sim.backend={backend}"], env, work))
        same = res["ray"][0][2]["system_accuracy"] == res["inprocess"][0][2]["system_accuracy"]
        med = {b: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for b, v in res.items()}
        phases = {b: {k: statistics.median(r[3][k] for r in v) for k in PHASES} for b, v in res.items()}
        rows.append((n, med["inprocess"], med["ray"], same, phases))
        print(f"devices={n}: in-process {[round(r[0], 1) for r in res['inprocess']]} s, "
              f"ray {[round(r[0], 1) for r in res['ray']]} s", flush=True)
    print()
    print(f"L2H, digits, default fleet, {ns.rounds} rounds, medians of {ns.repeats} runs "
          f"(each a fresh `python -m sim.run` process; {os.cpu_count()} CPUs)")
    print("| devices | in-process wall s | Flower+Ray wall s | ratio | in-process peak MiB | Flower+Ray peak MiB "
          "| same result |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for n, (ti, mi), (tr, mr), same, _ in rows:
        print(f"| {n} | {ti:.1f} | {tr:.1f} | {tr / ti:.2f} | {mi:.0f} | {mr:.0f} | {'yes' if same else 'NO'} |")
    print()
    print("Where the time goes (medians, seconds; from each run's timing.json; the rest of the wall time is "
          "Python start-up and imports)")
    print("| devices | backend | " + " | ".join(PHASES) + " |")
    print("|---:|---|" + "---:|" * len(PHASES))
    for n, *_, phases in rows:
        for b in ("inprocess", "ray"):
            print(f"| {n} | {b} | " + " | ".join(f"{phases[b][k]:.1f}" for k in PHASES) + " |")


if __name__ == "__main__":
    main()
