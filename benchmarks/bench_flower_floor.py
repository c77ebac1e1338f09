"""The fixed cost of Flower's simulation engine on Ray alone: a ClientApp that does no work.

Same message pattern as an L2H run (a handshake, then per round one train and one evaluate
message to every device), same Ray set-up (through sim.engine), no torch, no data. What this
costs is the floor any Flower-on-Ray simulation of that many devices pays on this machine.

Usage:
    python benchmarks/bench_flower_floor.py --devices 20 100 --rounds 10 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def one_run(n: int, rounds: int) -> dict[str, float]:
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from sim import engine

    app = ClientApp()

    def reply(msg, ctx):
        return Message(RecordDict({"info": MetricRecord({"x": 1})}), reply_to=msg)

    app.query()(reply)
    app.train()(reply)
    app.evaluate()(reply)
    server = ServerApp()
    t: dict[str, float] = {}

    @server.main()
    def main(grid, context):
        t["engine_start_s"] = time.perf_counter() - t0
        while len(nodes := sorted(grid.get_node_ids())) < n:
            time.sleep(0.05)
        t1 = time.perf_counter()
        list(grid.send_and_receive([grid.create_message(RecordDict(), MessageType.QUERY, i, "hs") for i in nodes]))
        t2 = time.perf_counter()
        t["handshake_s"] = t2 - t1
        for r in range(rounds):
            for kind in (MessageType.TRAIN, MessageType.EVALUATE):
                list(grid.send_and_receive([grid.create_message(RecordDict(), kind, i, str(r)) for i in nodes]))
        t["rounds_s"] = time.perf_counter() - t2
        t["per_message_ms"] = 1000 * t["rounds_s"] / (2 * rounds * n)

    t0 = time.perf_counter()
    with engine.ray_session(None, None, False):
        engine.run_fleet(server, app, n, {"num_cpus": 1, "num_gpus": 0}, False)
        t_end = time.perf_counter()
    t["engine_stop_s"] = t_end - t0 - t["engine_start_s"] - t["handshake_s"] - t["rounds_s"]
    t["total_s"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(one_run(ns.one, ns.rounds)))
        return
    keys = ("engine_start_s", "handshake_s", "rounds_s", "per_message_ms", "engine_stop_s", "total_s")
    print(f"Flower {__import__('flwr').__version__} + Ray, no-op ClientApp, {ns.rounds} rounds x (train + evaluate), "
          f"medians of {ns.repeats} fresh processes")
    print("| devices | wall s | " + " | ".join(keys) + " |")
    print("|---:|---:|" + "---:|" * len(keys))
    for n in ns.devices:
        runs, walls = [], []
        for _ in range(ns.repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--rounds", str(ns.rounds)],
                                 capture_output=True, text=True, check=True).stdout
            walls.append(time.perf_counter() - t0)
            runs.append(json.loads(out.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        print(f"| {n} | {statistics.median(walls):.1f} | " + " | ".join(f"{med[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
