"""Hostile inputs and failing infrastructure: every numeric config value out of range, two jobs
building one cache entry at once, and a device worker killed from outside mid-run."""
import copy
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from sim.core.config import Config, from_plain, plain
from sim.core.errors import ConfigError
from tests.conftest import fleet_for, prepare_for, small_cfg


def numeric_leaves(node, path=""):
    """Dotted keys of every int/float value in a plain config (bools, None and lists left out)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from numeric_leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict):
                yield from numeric_leaves(v, f"{path}.{i}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path


def set_key(cfg, dotted, value):
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[parts[-1]] = value


# Every method's config: the L2H defaults, a baseline's and L2D's (each has keys of its own).
BASES = {name: plain(small_cfg(**{"failures": "random", "servers.count": 2, "strategy": name}))
         for name in ("l2h", "confidence", "l2d")}
_SHARED = set(numeric_leaves(BASES["l2h"]))
NUMERIC = sorted({("l2h", k) for k in _SHARED if k != "seed"}
                 | {(name, k) for name in ("confidence", "l2d") for k in numeric_leaves(BASES[name]) if k not in _SHARED})
"""Every numeric key of L2H's config, and the keys only a baseline's or L2D's config has."""


def test_the_config_has_many_numeric_keys():
    assert len({k for _, k in NUMERIC}) > 40  # the enumeration below really covers the schema


SIGNED = {"drift.offset": 1e6, "drift.shift": 10**9}
"""Keys whose valid range includes -1 (a sensor offset, a shift either way): out of range beyond their bound."""


@pytest.mark.parametrize("name,key", NUMERIC)
def test_every_numeric_value_out_of_range_is_a_one_line_error_naming_it(name, key):
    cfg = copy.deepcopy(BASES[name])
    from_plain(Config, cfg)  # the base config is valid
    set_key(cfg, key, next((v for k, v in SIGNED.items() if key.endswith(k)), -1))
    with pytest.raises(ConfigError) as exc:
        from_plain(Config, cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    # the message names the key (data.split.* errors name the split fractions as a group)
    assert key in msg or (key.startswith("data.split.") and "data.split" in msg), msg


def _build(cache_dir, q):
    import torch

    torch.set_num_threads(1)  # as a run does (sim.torch_threads): two jobs on two cores
    try:
        cfg = small_cfg(**{"fleet": "uniform", "fleet.num_clients": 2})
        prep = prepare_for(cfg, cache_dir)
        fleet = fleet_for(cfg, prep, cache_dir)
        q.put(("ok", str(fleet.path), fleet.legacy_accuracy.tolist()))
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        q.put(("error", repr(exc), None))


@pytest.mark.slow
def test_two_jobs_building_the_same_cache_entry_at_once_do_not_corrupt_it(tmp_path):
    from sim.core.cache import read_verified

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(tmp_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1] and results[0][2] == results[1][2]
    from pathlib import Path

    assert read_verified(Path(results[0][1])) is not None  # the entry passes its full hash check
    assert not [p for p in Path(results[0][1]).parent.iterdir() if p.name.startswith(".tmp")]


def _client_workers(root: int) -> list[int]:
    """PIDs of Flower's device-worker actors (Ray titles their processes ray::ClientAppActor) that
    descend from process ``root`` -- never another test's, which may be running beside this one."""
    return _descendants_running(root, "ClientAppActor")


def _descendants_running(root: int, needle: str) -> list[int]:
    """PIDs of the processes descending from ``root`` whose command line holds ``needle``."""
    parent, cmdline = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    parent[int(d)] = int(f.read().rsplit(b")", 1)[1].split()[1])  # field 4: ppid
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmdline[int(d)] = f.read().decode(errors="ignore")
            except (OSError, IndexError, ValueError):
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid, cmd in cmdline.items() if needle in cmd and descends(pid)]


@pytest.mark.slow
def test_a_worker_killed_from_outside_costs_its_replies_not_the_run(tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache)}
    p = subprocess.Popen([sys.executable, "-m", "sim.run", "fleet.num_clients=4", "sim.num_rounds=3",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    workers = _client_workers(p.pid)  # the run started its own Ray: its workers are the run's descendants
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    rounds = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    per_round = [(r["train_errors"], r["eval_errors"]) for r in rounds]
    # The killed worker's replies are recorded as lost: every message queued on that actor when it
    # died (Flower pushes several per actor, so 1-3 of a round's 8 were measured, timing-dependent) ...
    assert sum(t + e for t, e in per_round) >= 1, per_round
    # ... the rest of the fleet answers every round, and the restarted worker serves the last round whole.
    assert all(r["train_devices"] >= 1 and r["eval_devices"] >= 1 for r in rounds), per_round
    assert rounds[-1]["eval_errors"] == 0 and rounds[-1]["eval_devices"] == 4, per_round
    assert json.loads((run_dir / "summary.json").read_text())["num_test_samples"] > 0
    # Ray's own "A worker died or was killed ..." stays off the console (sim.verbose=false): the run says it
    assert "(raylet)" not in out + err and "worker died" not in (out + err).lower(), err[-2000:]
    assert "device replies were errors" in out


def _sleepers(*kinds):
    """A stand-in for a local Ray node (``ray._private.node.Node``): one sleeping process per kind."""
    from types import SimpleNamespace

    procs = {k: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for k in kinds}
    return procs, SimpleNamespace(all_processes={k: [SimpleNamespace(process=p)] for k, p in procs.items()})


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
def test_the_node_watcher_reports_a_dead_raylet_at_once_and_a_disarmed_one_nothing(monkeypatch, pidfd):
    """sim/raynode.py watch: the raylet's exit is reported within a second, with its pid and status (the
    runner then prints its one line and exits 2 before Ray's core worker ends the process with status 1
    and no word); a watcher disarmed first (Ray shut down on purpose) reports nothing; abandon ends what
    is left of the node, its GCS server included."""
    import queue

    from sim import raynode

    monkeypatch.setattr(raynode, "LOST", [])
    monkeypatch.setattr(raynode, "_WATCH", {})
    if not pidfd:
        monkeypatch.setattr(raynode, "_PIDFD_OPEN", None)
    got = queue.Queue()
    procs, node = _sleepers("raylet", "gcs_server")
    try:
        raynode.watch(node, got.put)
        time.sleep(0.2)
        assert got.empty()  # alive: nothing reported
        procs["raylet"].kill()
        t0 = time.monotonic()
        what = got.get(timeout=10)
        assert time.monotonic() - t0 < 1.0
        assert what == f"its raylet (pid {procs['raylet'].pid}) exited with status -9" and raynode.LOST == [what]
        raynode.abandon(node, started_here=True)
        # killed, not left to sleep its 120 s (0: psutil reaped it before Popen could read -9)
        assert procs["gcs_server"].wait(timeout=5) in (0, -signal.SIGKILL)
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    procs, node = _sleepers("raylet")
    try:
        raynode.watch(node, got.put)
        raynode.disarm()
        procs["raylet"].kill()
        procs["raylet"].wait()
        time.sleep(0.3)
        assert got.empty()
    finally:
        procs["raylet"].kill()
        procs["raylet"].wait()


@pytest.mark.slow
def test_a_killed_raylet_fails_the_run_in_one_line_and_it_resumes_to_the_uninterrupted_summary(tmp_path,
                                                                                                shared_cache):
    """The raylet of the run's own Ray killed after round 1 (before: the servers looked crashed, every
    deferral fell back to the legacy model, exit 0 with legacy-only results, and Ray's 20-line raylet log
    on the console). Now: exit 2, one line naming the dead node, the round it died in not kept; the
    printed resume command ends with the uninterrupted run's summary.json."""
    import re
    import shlex

    from sim.pipeline import simulate

    run_dir = tmp_path / "run"
    args = ["fleet.num_clients=4", "sim.num_rounds=3", "sim.plots=false", "sim.progress=false",
            "servers.epochs=100"]
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache)}
    p = subprocess.Popen([sys.executable, "-m", "sim.run", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint.npz").is_file():  # round 1 checkpointed
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    raylets = _descendants_running(p.pid, "raylet")
    assert raylets
    os.kill(raylets[0], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, (p.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the Ray node this run uses died during "), err[-3000:]
    assert "(raylet)" not in out + err and "Traceback" not in err
    from sim.checkpoint import finished_round

    done = finished_round(run_dir)  # the round the node died in is not kept (nor, then, checkpointed)
    assert done in (1, 2) and f"after round {done}:" in lines[0], lines[0]
    assert len(metrics.read_text().splitlines()) in (done, done + 1)  # + a line whose checkpoint failed
    assert not (run_dir / "summary.json").exists()
    again = shlex.split(re.search(r"resume with: (.+)$", lines[0]).group(1))
    r = subprocess.run([sys.executable, *again[1:], "sim.backend=inprocess"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    simulate(small_cfg(**{a.split("=")[0]: a.split("=", 1)[1] for a in args},
                       **{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache)}), tmp_path / "whole")
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((tmp_path / "whole" / "summary.json").read_text())


@pytest.mark.slow
def test_a_ray_address_that_does_not_answer_fails_in_seconds_with_one_line(tmp_path, shared_cache):
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sim.run", "fleet.num_clients=2", "sim.num_rounds=1",
                        "sim.ray_address=127.0.0.1:9", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no Ray cluster answers at 127.0.0.1:9" in lines[0], r.stderr
