"""Real Flower-on-Ray simulations (each costs seconds): result files, determinism, c_e behaviour."""
import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import small_cfg

pytestmark = pytest.mark.slow  # real runs: the full suite only (README)

SUMMARY_KEYS = ["system_accuracy", "legacy_accuracy", "server_accuracy", "oracle_accuracy", "defer_rate",
                "l01_cost", "num_clients", "num_rounds", "seed"]


def test_cli_run_writes_results(tmp_path, shared_cache):
    """One run through the real command line, as a user runs it, in-process: the files it writes and
    what the terminal shows do not depend on the backend (the same numbers on both: tests/test_golden.py).
    The command line on Flower + Ray is the sweep's, the stop signals' and the killed worker's tests."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache)}
    r = subprocess.run([sys.executable, "-m", "sim.run", "fleet.num_clients=4", "sim.num_rounds=2", "seed=3",
                        "sim.backend=inprocess", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("metrics.jsonl", "summary.json", "clients.csv", "rounds.png", "accuracy_vs_defer_rate.png",
                 "devices.png", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    rounds = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in rounds] == [1, 2]
    assert all(x["train_errors"] == 0 and x["eval_errors"] == 0 and x["train_devices"] == 4 for x in rounds)
    s = json.loads((run_dir / "summary.json").read_text())
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert s["num_clients"] == 4 and s["num_rounds"] == 2 and s["seed"] == 3
    for b in ("confidence", "random"):
        assert s["baselines"][b]["defer_rate"] == s["defer_rate"]
        assert 0 <= s["baselines"][b]["system_accuracy"] <= 1
    assert s["oracle_accuracy"] >= max(s["system_accuracy"], s["legacy_accuracy"], s["server_accuracy"])
    with open(run_dir / "clients.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["device"]) for row in rows] == [0, 1, 2, 3]
    assert sum(int(row["num_test"]) for row in rows) == s["num_test_samples"]
    # the terminal shows the fleet spread, per-round progress and the summary table
    assert "legacy accuracy min" in r.stdout and "round   2/2" in r.stdout and "system_accuracy" in r.stdout
    assert "Traceback" not in r.stderr


def test_deferral_price_controls_defer_rate(tmp_path, shared_cache):
    """c_e = 0 defers; c_e >= 1 costs at least as much as any legacy error, so nothing is deferred.
    Per-device legacy models (weak: tens of samples each), so that deferring is worth something at
    c_e = 0.3 too; the product lines' legacy models (~0.87 on digits) leave nothing to defer there."""
    from rich.console import Console

    from sim.run import simulate
    from tests.conftest import PER_DEVICE

    rates = {}
    for c_e in (0.0, 0.3, 1.0):
        cfg = small_cfg(**{"strategy.c_e": c_e, "sim.num_rounds": 4, "sim.backend": "inprocess",
                           "sim.cache_dir": str(shared_cache), **PER_DEVICE})
        rates[c_e] = simulate(cfg, tmp_path / str(c_e), console=Console(quiet=True))["defer_rate"]
    assert rates[0.0] > rates[0.3] > rates[1.0] == 0.0


def test_binary_task_partial_participation_and_staleness_run(tmp_path):
    """A 2-class task uses the binary surrogate; sampled devices only; a stale server copy."""
    from rich.console import Console

    from sim.run import simulate

    cfg = small_cfg(**{"data.classes": "[3,8]", "sim.fraction_train": 0.5, "strategy.staleness": 2,
                       "sim.num_rounds": 3, "sim.backend": "inprocess", "sim.cache_dir": str(tmp_path / "cache")})
    s = simulate(cfg, tmp_path / "run", console=Console(quiet=True))
    assert s["num_classes"] == 2 and 0.0 <= s["defer_rate"] <= 1.0
    rounds = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_devices"] for r in rounds] == [2, 2, 2] and all(r["eval_devices"] == 4 for r in rounds)


def test_binary_surrogate_on_multiclass_data_is_a_config_error(tmp_path):
    from rich.console import Console

    from sim.run import simulate
    from sim.core.errors import ConfigError

    cfg = small_cfg(**{"strategy.surrogate": "binary", "sim.backend": "inprocess",
                       "sim.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match="needs 2-class data"):
        simulate(cfg, tmp_path / "run", console=Console(quiet=True))


def test_a_two_node_ray_cluster_runs_devices_and_servers_on_both_nodes(tmp_path, shared_cache):
    """A real multi-node cluster on this machine: `ray start --head --num-cpus=1` and a second node
    joined to it (`ray start --address=...`, its own raylet and object store), both in their own temp
    dir (so nothing else on the machine joins them). A run with sim.ray_address and 2 helper servers
    places device actors (Flower's ClientAppActor) on both nodes and its server actors on the
    cluster -- shown by Ray's GCS actor table -- and gives the same summary.json as the run in one
    process. (Server actors request no resources by default, and Ray places such actors where it
    likes, SPREAD or not: both were measured on one node.) Both nodes are stopped whatever happens."""
    import shutil
    import signal
    import socket
    import tempfile
    import time

    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate

    if shutil.which("ray") is None:
        pytest.skip("the ray command-line tool is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths have a length limit
    common = ["--block", "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp}",
              "--disable-usage-stats"]
    nodes = [subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                               "--include-dashboard=false", *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    address = f"127.0.0.1:{port}"
    probe = ("import json, sys, time, ray\n"
             "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
             "from ray._private import state\n"  # the GCS tables (no dashboard in core Ray)
             "deadline = time.monotonic() + 90\n"  # one process waits for the nodes: each probe is a Ray driver
             "while len([n for n in ray.nodes() if n['Alive']]) < int(sys.argv[2]) and time.monotonic() < deadline:\n"
             "    time.sleep(0.5)\n"
             "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
             "actors = [(a['ActorClassName'], a['Address']['NodeID']) for a in state.actors().values()]\n"
             "print(json.dumps({'nodes': nodes, 'actors': actors}))\n")

    def cluster(min_nodes: int = 1) -> dict:
        """Ray's node and actor tables, once at least ``min_nodes`` nodes are alive (or 90 s passed)."""
        r = subprocess.run([sys.executable, "-c", probe, address, str(min_nodes)], capture_output=True, text=True,
                           timeout=150)
        assert r.returncode == 0, f"Ray's GCS tables could not be read (did Ray's state API change?): {r.stderr[-1500:]}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until the head's GCS accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        nodes.append(subprocess.Popen(["ray", "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                       *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        assert len(cluster(min_nodes=2)["nodes"]) == 2, "the second node never joined the head"
        cache = shared_cache
        env = {**os.environ, "L2H_SIM_CACHE": str(cache)}
        args = ["fleet.num_clients=4", "sim.num_rounds=2", "seed=3", "servers.count=2"]
        simulate(compose_checked([*args, "sim.backend=inprocess", f"sim.cache_dir={cache}"]),
                 tmp_path / "alone", console=Console(quiet=True))  # in this process: what `python -m sim.run` calls
        r = subprocess.run([sys.executable, "-m", "sim.run", *args, f"sim.ray_address={address}",
                            f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((tmp_path / "run" / "summary.json").read_text()) == \
            json.loads((tmp_path / "alone" / "summary.json").read_text())
        seen = cluster()
        where = {cls: {node for c, node in seen["actors"] if c == cls} for cls in ("ClientAppActor", "HelperServer")}
        counts = {cls: [c for c, _ in seen["actors"]].count(cls) for cls in where}
        assert counts == {"ClientAppActor": 2, "HelperServer": 2}, counts  # one device worker per CPU, 2 servers
        assert where["ClientAppActor"] == set(seen["nodes"]), (where, seen["nodes"])  # devices: on both nodes
        assert where["HelperServer"] <= set(seen["nodes"]), (where, seen["nodes"])  # servers: on the cluster
    finally:
        for n in reversed(nodes):  # the joined node first; `ray start --block` tears its node down on SIGTERM
            try:
                os.killpg(n.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for n in nodes:
            try:
                n.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(n.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
