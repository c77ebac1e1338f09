"""Thousand-device scale: the issue's targets measured in one command, printed as markdown tables.

What it runs (every run a fresh ``python -m sim.run`` process, as a user runs it; peak memory is
the largest PSS sum over the whole process tree -- driver and every Ray process -- sampled every
0.1 s, see bench_overhead.py):

1. Legacy fleet build for ``--target`` devices: cold (empty cache) and warm (the same command
   again); ``legacy_fleet_s`` from each run's timing.json.
2. For each fleet size in ``--devices``: the workload of the issue's target command
   (``sim.num_rounds=20 sim.fraction_train=0.1``, every device evaluated every round and in the
   last, digits, the default fleet mix, ``data.partition.name=sampled`` because 1797 images cannot
   be split disjointly over a thousand devices) with ``sim.backend=ray`` (Flower's simulation
   engine on Ray, the default) and ``sim.backend=inprocess`` (the same strategy and ClientApp
   handlers called in one process: the plain loop, no federation). Wall time, peak memory, the
   ratio, the phases, and whether both gave the same summary.json.
3. The floor: Flower on Ray with a no-op ClientApp (bench_flower_floor.py) for the same number of
   Flower nodes and rounds, so the report can say what is Flower's and Ray's and what is ours.

With ``--data mnist1d`` the workload is real, disjoint data instead (MNIST-1D generated offline,
``data.num_samples`` = 50 per device, so every device has its own ~40 training and ~10 test
samples): ``data=mnist1d sim.num_rounds=20 sim.fraction_train=0.1 sim.eval_every=K`` (every device
evaluated every K rounds and in the last), with the targets of ten thousand devices: wall < 600 s and
peak < 8 GiB at the largest size, legacy models built in < 60 s, Ray / in-process <= 1.3.

Usage:
    python benchmarks/bench_scale.py                      # 100 300 1000 3000 devices, 1 repeat
    python benchmarks/bench_scale.py --devices 100 1000 --repeats 3
    python benchmarks/bench_scale.py --data mnist1d --devices 1000 10000 --target 10000 \
        --out benchmarks/results/scale_mnist1d.json
    python benchmarks/bench_scale.py --data mnist1d --memory-curve --devices 100 1000 3000 \
        --out benchmarks/results/memory_mnist1d.json
    python benchmarks/bench_scale.py --data mnist1d --cold-run ray --devices 10000 \
        --out benchmarks/results/cold10k_mnist1d.json
    python benchmarks/bench_scale.py --data mnist1d --build-only --devices 10000 --build-threads 1 2 \
        --repeats 3 --cache /tmp/c10k --out benchmarks/results/build10k_mnist1d.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_overhead import run_once

from sim.cli import compose_checked
from sim.core.nodes import devices_per_node, num_nodes

WORKLOAD = ["sim.num_rounds=20", "sim.fraction_train=0.1", "data.partition.name=sampled"]
"""digits: 1797 images cannot be split disjointly over thousands of devices, so each samples from shared pools."""
EVAL_EVERY = 5
"""mnist1d workload: evaluate every device every this many rounds (and in the last)."""
TARGETS = {"digits": {"wall_s": 300, "peak_mib": 4096, "ratio": 1.5, "build_s": 60},
           "mnist1d": {"wall_s": 600, "peak_mib": 8192, "ratio": 1.3, "build_s": 60}}
"""Per workload: the target-size run's wall and peak, Ray / in-process, legacy build (issues 5 and 19)."""


def workload(data: str, eval_every: int = EVAL_EVERY) -> list[str]:
    """The overrides of the benchmark's 20-round workload on ``data`` (digits | mnist1d)."""
    if data == "mnist1d":
        return ["data=mnist1d", "sim.num_rounds=20", "sim.fraction_train=0.1", f"sim.eval_every={eval_every}"]
    return list(WORKLOAD)
PHASES = ("engine_start_s", "handshake_s", "rounds_s", "engine_stop_s", "total_s")
MAX_NODES = int(compose_checked([]).sim.max_nodes)  # the configs' default: the runs set none


def floor(nodes: int, rounds: int) -> tuple[float, dict]:
    """One no-op Flower-on-Ray run with ``nodes`` nodes (a fresh process): wall seconds and phases."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_flower_floor.py"), "--one", str(nodes),
                          "--rounds", str(rounds)], capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])


def one_round(devices: int, data: list[str]) -> list[str]:
    """Overrides of a one-round in-process run of ``devices`` devices: into an empty cache it builds
    and caches the data and the legacy fleet (its timing.json has both times)."""
    return [f"fleet.num_clients={devices}", *data, "sim.num_rounds=1", "sim.backend=inprocess"]


def save(out: Path, results: dict) -> None:
    """Write ``results`` to ``out`` as JSON (the folder made if missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True))


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 300, 1000, 3000])
    ap.add_argument("--target", type=int, default=1000, help="fleet size of the build and target rows")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data", choices=sorted(TARGETS), default="digits")
    ap.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="mnist1d workload's sim.eval_every")
    ap.add_argument("--no-floor", action="store_true", help="skip the no-op Flower floor runs")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--memory-curve", action="store_true",
                    help="instead of the above: per size in --devices, a 2-round run on each backend (round 2 "
                         "evaluates every device) -- peak memory and wall -- after a cold one-round build")
    mode.add_argument("--cold-run", choices=("ray", "inprocess"),
                    help="instead of the above: per size in --devices, one run of the workload on this backend "
                         "into an empty cache (it builds its own data and legacy fleet) -- for sizes where "
                         "both backends and separate builds do not fit in the time at hand")
    mode.add_argument("--build-only", action="store_true",
                    help="instead of the above: per size in --devices and count in --build-threads, build the "
                         "legacy fleet --repeats times in this process (data prepared once, into --cache)")
    ap.add_argument("--build-threads", type=int, nargs="+", default=[1], help="with --build-only: fleet.build_threads")
    ap.add_argument("--cache", type=Path,
                    help="with --cold-run or --build-only: use (and fill) this cache directory instead of a new empty one, so a "
                         "second --cold-run on the same directory measures a warm run (data and fleet reused; "
                         "--build-only reuses the data and rebuilds the fleets it measures)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="with --cold-run: more overrides for every run, e.g. fleet.build_threads=2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    ap.add_argument("--report", type=Path, metavar="FILE", help="print the tables of a results file (--out) and stop")
    ns = ap.parse_args()
    if ns.report is not None:
        report(json.loads(ns.report.read_text()))
        return
    if ns.set and not ns.cold_run:
        ap.error("--set goes with --cold-run")
    if any(o.split("=")[0].lstrip("+~") in ("fleet.num_clients", "sim.backend") for o in ns.set):
        ap.error("--set cannot change fleet.num_clients or sim.backend: use --devices and --cold-run")
    if (ns.cold_run or ns.memory_curve) and ns.repeats != 1:
        ap.error("--cold-run and --memory-curve make one run per size: repeat the command, each with its own --out")
    if (ns.cold_run or ns.memory_curve or ns.build_only) and ns.no_floor:
        ap.error("--no-floor goes with the default mode (the others run no floor)")
    if ns.build_threads != [1] and not ns.build_only:
        ap.error("--build-threads goes with --build-only (a run takes --set fleet.build_threads=N)")
    if ns.cache is not None and not (ns.cold_run or ns.build_only):
        ap.error("--cache goes with --cold-run or --build-only (the other modes build their own caches)")
    work = Path(tempfile.mkdtemp(prefix="l2h-scale-"))
    cache = ns.cache.expanduser().resolve() if ns.cache is not None else work / "cache"
    env = {**os.environ, "L2H_SIM_CACHE": str(cache), "FLWR_TELEMETRY_ENABLED": "0"}
    load = workload(ns.data, ns.eval_every)
    data = load[:1] if ns.data == "mnist1d" else ["data.partition.name=sampled"]
    if ns.memory_curve:
        memory_curve(ns, data, env, work)
        return
    if ns.cold_run:
        cold_run(ns, load + ns.set, env, work)
        return
    if ns.build_only:
        build_only(ns, data, cache)
        return
    results: dict = {"cpus": os.cpu_count(), "workload": load, "data": ns.data, "repeats": ns.repeats, "sizes": {}}

    # 1. fleet build, cold then warm (one-round in-process runs; legacy_fleet_s and prepare_data_s are read)
    one = one_round(ns.target, data)
    first = run_once(one, env, work)
    cold, data_s = first[3]["legacy_fleet_s"], first[3]["prepare_data_s"]
    warm = [run_once(one, env, work)[3]["legacy_fleet_s"] for _ in range(ns.repeats)]
    results["build"] = {"devices": ns.target, "cold_s": cold, "warm_s": med(warm), "data_cold_s": data_s,
                        "cold_wall_s": first[0], "cold_peak_mib": first[1]}
    print(f"fleet build, {ns.target} devices: data {data_s:.1f} s, legacy models cold {cold:.1f} s, "
          f"warm {med(warm):.2f} s", flush=True)

    # 2. the workload per fleet size, both backends; 3. the floor at the same node count
    for n in ns.devices:
        if n != ns.target:
            run_once(one_round(n, data), env, work)  # build + cache this fleet first
        runs: dict[str, list] = {"inprocess": [], "ray": []}
        for _ in range(ns.repeats):
            for backend in ("ray", "inprocess"):
                runs[backend].append(run_once([f"fleet.num_clients={n}", *load, f"sim.backend={backend}"],
                                              env, work))
        nodes = num_nodes(n, devices_per_node(n, None, MAX_NODES))
        floors = [] if ns.no_floor else [floor(nodes, 20) for _ in range(ns.repeats)]
        row = {b: {"wall_s": med([r[0] for r in v]), "peak_mib": med([r[1] for r in v]),
                   "phases": {k: med([r[3][k] for r in v]) for k in PHASES},
                   "system_accuracy": v[0][2]["system_accuracy"]} for b, v in runs.items()}
        row["same_result"] = all(r[2] == runs["inprocess"][0][2] for r in runs["ray"] + runs["inprocess"])
        row["nodes"] = nodes
        if floors:
            row["floor"] = {"wall_s": med([f[0] for f in floors]),
                            "phases": {k: med([f[1][k] for f in floors]) for k in PHASES}}
        results["sizes"][str(n)] = row
        print(f"devices={n}: ray {[round(r[0], 1) for r in runs['ray']]} s, "
              f"in-process {[round(r[0], 1) for r in runs['inprocess']]} s, peak "
              f"{row['ray']['peak_mib']:.0f} / {row['inprocess']['peak_mib']:.0f} MiB", flush=True)
        save(ns.out, results)  # what is measured so far
    save(ns.out, results)
    report(results)


CURVE_RUN = ["sim.num_rounds=2", "sim.fraction_train=0.1", "sim.eval_every=2"]
"""The memory curve's run: round 1 trains a tenth of the fleet, round 2 (the last) trains another tenth
and evaluates every device, so every device's data, legacy model and rejector has been built in the
workers by the end -- what the 20-round workload holds from its first full evaluation on."""


def memory_curve(ns: argparse.Namespace, data: list[str], env: dict[str, str], work: Path) -> None:
    """Peak memory (PSS of the process tree) and wall of :data:`CURVE_RUN` per fleet size, Ray and
    in-process, after a cold one-round in-process run that builds and caches the data and the fleet."""
    res: dict = {"cpus": os.cpu_count(), "data": ns.data, "run": [*data, *CURVE_RUN], "sizes": {}}
    print("| devices | cold data s | cold legacy s | Ray wall s | Ray peak MiB | in-process wall s "
          "| in-process peak MiB | same result |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|", flush=True)
    for n in ns.devices:
        first = run_once(one_round(n, data), env, work)
        row: dict = {"data_cold_s": first[3]["prepare_data_s"], "legacy_cold_s": first[3]["legacy_fleet_s"]}
        got = {b: run_once([f"fleet.num_clients={n}", *data, *CURVE_RUN, f"sim.backend={b}"], env, work)
               for b in ("ray", "inprocess")}
        for b, r in got.items():
            row[b] = {"wall_s": r[0], "peak_mib": r[1], "rounds_s": r[3]["rounds_s"]}
        row["same_result"] = got["ray"][2] == got["inprocess"][2]
        res["sizes"][str(n)] = row
        print(f"| {n} | {row['data_cold_s']:.1f} | {row['legacy_cold_s']:.1f} | {row['ray']['wall_s']:.1f} "
              f"| {row['ray']['peak_mib']:.0f} | {row['inprocess']['wall_s']:.1f} | {row['inprocess']['peak_mib']:.0f} "
              f"| {'yes' if row['same_result'] else 'NO'} |", flush=True)
        save(ns.out, res)  # what is measured so far


def build_only(ns: argparse.Namespace, data: list[str], cache: Path) -> None:
    """Per fleet size and build thread count, the legacy build alone, ``--repeats`` times, each into
    an empty cache entry (the data is prepared once and reused; the measured fleet's entry is deleted
    after each build, other entries are left alone): seconds of ``build_fleet``, as a run's
    ``legacy_fleet_s``, with one torch thread outside the build as in a run."""
    import shutil

    import torch

    from clients.legacy import build_fleet
    from sim.core.data import prepare

    torch.set_num_threads(1)
    res: dict = {"cpus": os.cpu_count(), "data": data, "sizes": {}}
    limit = TARGETS[ns.data]["build_s"]
    print(f"| devices | build threads | legacy build s (each run) | median s | < {limit} s | mean legacy accuracy |")
    print("|---:|---:|---|---:|:---:|---:|", flush=True)
    for n in ns.devices:
        for threads in ns.build_threads:
            cfg = compose_checked([f"fleet.num_clients={n}", f"fleet.build_threads={threads}", *data])
            prep = prepare(cfg.data, n, cfg.seed, cache)
            times: list[float] = []
            while len(times) < ns.repeats:
                t0 = time.perf_counter()
                fleet = build_fleet(cfg.fleet, cfg.data, prep, cfg.seed, cache)
                if fleet.built:  # (not when the first call found this fleet already cached)
                    times.append(time.perf_counter() - t0)
                shutil.rmtree(fleet.path)  # this fleet's entry only: the next call builds it again
                acc = float(fleet.legacy_accuracy.mean())
            res["sizes"].setdefault(str(n), {})[str(threads)] = {"build_s": times, "median_s": med(times),
                                                                 "mean_legacy_accuracy": acc}
            print(f"| {n} | {threads} | {', '.join(f'{t:.1f}' for t in times)} | {med(times):.1f} "
                  f"| {'yes' if med(times) < limit else 'no'} | {acc:.5f} |",
                  flush=True)
            save(ns.out, res)


def cold_run(ns: argparse.Namespace, load: list[str], env: dict[str, str], work: Path) -> None:
    """Per fleet size, one run of the 20-round workload on backend ``ns.cold_run`` into an empty cache
    (or into ``--cache``, warm when an earlier command filled it): wall (with the build, if any), the
    build's phases (timing.json), the rounds, peak memory (PSS of the tree), the summary."""
    res: dict = {"cpus": os.cpu_count(), "workload": load, "backend": ns.cold_run, "sizes": {}}
    target = TARGETS[ns.data]
    cache = Path(env["L2H_SIM_CACHE"])
    state = "a filled cache (warm)" if cache.is_dir() and any(cache.iterdir()) else "an empty cache (cold)"
    print(f"One run per size: `{' '.join(load)} sim.backend={ns.cold_run}` into {state} ({cache}); "
          f"{res['cpus']} CPUs.\n")
    print("| devices | wall s (with build) | data s | legacy build s | engine start + handshake s | rounds s "
          "| wall without build s | peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for n in ns.devices:
        wall, peak, summary, t = run_once([f"fleet.num_clients={n}", *load, f"sim.backend={ns.cold_run}"], env, work)
        build = t["prepare_data_s"] + t["legacy_fleet_s"]
        res["sizes"][str(n)] = {"wall_s": wall, "wall_without_build_s": wall - build, "peak_mib": peak,
                                "phases": t, "system_accuracy": summary["system_accuracy"], "summary": summary}
        start = t.get("engine_start_s", 0.0) + t.get("handshake_s", 0.0)
        print(f"| {n} | {wall:.0f} | {t['prepare_data_s']:.0f} | {t['legacy_fleet_s']:.0f} | {start:.0f} "
              f"| {t['rounds_s']:.0f} | {wall - build:.0f} | {peak:.0f} |", flush=True)
        save(ns.out, res)  # what is measured so far
    print(f"\nTargets ({ns.data}): wall < {target['wall_s']} s, peak < {target['peak_mib']} MiB, "
          f"legacy build < {target['build_s']} s.")


def report(res: dict) -> None:
    """Print the markdown tables of benchmarks/README.md from a results dict."""
    b, sizes = res["build"], res["sizes"]
    data = res.get("data", "digits")
    tg = TARGETS[data]
    rep = f"medians of {res['repeats']} runs" if res["repeats"] > 1 else "single runs"
    print(f"\nWorkload: `{' '.join(res['workload'])}`, {data}, default fleet mix; {res['cpus']} CPUs; {rep}.\n")
    print("| target | measured | met |")
    print("|---|---:|:---:|")

    def row(what: str, value: float, text: str, limit: float, below: bool = True) -> None:
        ok = value < limit if below else value <= limit
        print(f"| {what} | {text} | {'yes' if ok else 'NO'} |")

    t = sizes.get(str(b["devices"]))
    if t:
        row(f"{b['devices']} devices, 20 rounds, Flower on Ray: wall < {tg['wall_s']} s", t["ray"]["wall_s"],
            f"{t['ray']['wall_s']:.1f} s", tg["wall_s"])
        row(f"same run: peak memory, all processes < {tg['peak_mib']} MiB", t["ray"]["peak_mib"],
            f"{t['ray']['peak_mib']:.0f} MiB", tg["peak_mib"])
    for n in sorted(sizes, key=int):
        ratio = sizes[n]["ray"]["wall_s"] / sizes[n]["inprocess"]["wall_s"]
        row(f"overhead at {n} devices: Ray wall / in-process wall {'<' if data == 'digits' else '<='} {tg['ratio']}",
            ratio, f"{ratio:.2f}", tg["ratio"], below=data == "digits")
    row(f"build {b['devices']} legacy models < {tg['build_s']} s", b["cold_s"], f"{b['cold_s']:.1f} s", tg["build_s"])
    row("reuse the cache < 5 s", b["warm_s"], f"{b['warm_s']:.2f} s", 5)
    if "data_cold_s" in b:
        print(f"\nData preparation for {b['devices']} devices (cold, cached afterwards): {b['data_cold_s']:.1f} s; "
              f"the whole cold one-round run: {b['cold_wall_s']:.1f} s, peak {b['cold_peak_mib']:.0f} MiB.")
    print("\n| devices | Flower nodes | Ray wall s | in-process wall s | ratio | Ray peak MiB | in-process peak MiB "
          "| same result |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for n, r in sorted(sizes.items(), key=lambda kv: int(kv[0])):
        print(f"| {n} | {r['nodes']} | {r['ray']['wall_s']:.1f} | {r['inprocess']['wall_s']:.1f} | "
              f"{r['ray']['wall_s'] / r['inprocess']['wall_s']:.2f} | {r['ray']['peak_mib']:.0f} | "
              f"{r['inprocess']['peak_mib']:.0f} | {'yes' if r['same_result'] else 'NO'} |")
    print("\nWhere the time goes (seconds; the rest of the wall time is Python start-up and imports)\n")
    print("| devices | run | " + " | ".join(PHASES) + " |")
    print("|---:|---|" + "---:|" * len(PHASES))
    for n, r in sorted(sizes.items(), key=lambda kv: int(kv[0])):
        kinds = [("Ray", r["ray"]["phases"]), ("in-process", r["inprocess"]["phases"])]
        if "floor" in r:
            kinds.append((f"no-op floor, {r['nodes']} nodes", r["floor"]["phases"]))
        for name, ph in kinds:
            print(f"| {n} | {name} | " + " | ".join(f"{ph[k]:.1f}" for k in PHASES) + " |")


if __name__ == "__main__":
    main()
