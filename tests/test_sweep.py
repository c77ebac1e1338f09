"""Sweeps (sim/sweep.py): one Ray session per sweep, jobs at once (``sim.sweep_parallel``), failed jobs
-- and that none of it changes a job's results."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.sweep import should_share, swept_keys


def multirun_config(task: list[str], params: dict | None = None, **sim) -> object:
    """The shape of the config Hydra gives ``on_multirun_start``: ``sim`` and ``hydra.overrides.task``."""
    return OmegaConf.create({"sim": {"backend": "ray", "ray_address": None, "num_cpus": None, "verbose": False,
                                     "shared_ray_session": True, **sim},
                             "hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}})


@pytest.mark.parametrize("task, params, sim, shared", [
    (["seed=0,1"], None, {}, True),
    (["seed=range(3)", "fleet.num_clients=4"], None, {}, True),
    (["seed=0,1", "sim.num_cpus=2"], None, {"num_cpus": 2}, True),  # fixed for the whole sweep: fine
    (["seed=0,1"], None, {"backend": "inprocess"}, False),  # nothing to share
    (["seed=0,1"], None, {"shared_ray_session": False}, False),  # switched off
    (["sim.num_cpus=1,2"], None, {}, False),  # jobs need different Ray settings
    (["sim.backend=ray,inprocess"], None, {}, False),
    (["+sim.verbose=true,false"], None, {}, False),
    (["experiment=x"], {"sim.ray_address": "auto,null"}, {}, False),  # swept by a preset
    (["experiment=x"], {"strategy.c_e": "0.1,0.2"}, {}, True),
])
def test_a_sweep_shares_ray_unless_its_jobs_need_different_ray_settings(task, params, sim, shared):
    assert should_share(multirun_config(task, params, **sim)) is shared


def test_swept_keys_reads_the_command_line_and_the_preset():
    cfg = multirun_config(["seed=0,1", "fleet.num_clients=4", "~sim.num_cpus", "+a.b=glob(*)"], {"strategy.c_e": "0,1"})
    assert swept_keys(cfg) == {"seed", "a.b", "strategy.c_e"}


ARGS = ["fleet.num_clients=4", "sim.num_rounds=2", "sim.plots=false", "sim.progress=false"]


def _run(args: list[str], cwd: Path, cache: Path, code: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "L2H_SIM_CACHE": str(cache)})
    assert r.returncode == code, r.stderr[-3000:]
    # Flower's simulation entry point is deprecated (sim/engine.py keeps it behind one adapter): the
    # user never sees its notice, nor a traceback, nor joblib's warnings about leaked worker resources
    assert "DEPRECATED" not in r.stdout + r.stderr and "Traceback" not in r.stderr, (r.stdout + r.stderr)[-3000:]
    assert "leaked" not in r.stderr and "UserWarning" not in r.stderr, r.stderr[-3000:]
    return r


SWEEPS = "sweeps-compared-with-jobs-alone"
"""The pytest-xdist group of the sweep tests that compare their jobs with :func:`_alone` (``--dist
loadgroup``): on one worker, each job alone is run once for all of them."""

_ALONE: dict[tuple[int, str], dict] = {}
"""summary.json of each job of :data:`ARGS` run alone, by (seed, cache): three tests compared their sweep's
jobs 0 and 1 with the same two runs, each running them again (the same config, the same numbers)."""


def _alone(seed: int, out: Path, cache: Path) -> dict:
    """summary.json of job ``seed`` of :data:`ARGS` run alone, in this process (in-process: the same
    numbers as on Ray, golden tests); run once per seed and cache, in ``out`` (a fresh copy of the dict
    each time)."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate

    key = (seed, str(cache))
    if key not in _ALONE:
        simulate(compose_checked([f"seed={seed}", *ARGS, "sim.backend=inprocess", f"sim.cache_dir={cache}"]), out,
                 console=Console(quiet=True))
        _ALONE[key] = json.loads((out / "summary.json").read_text())
    return json.loads(json.dumps(_ALONE[key]))


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0]))


def _at_once(dirs: list[Path]) -> bool:
    """Whether the jobs' runs overlapped in time (each started before any other had finished)."""
    t = [json.loads((d / "timing.json").read_text()) for d in dirs]
    return max(x["started_at"] for x in t) < min(x["finished_at"] for x in t)


@pytest.mark.slow
@pytest.mark.xdist_group(SWEEPS)
def test_a_ray_sweep_runs_every_job_on_one_ray_with_the_results_of_each_job_alone(tmp_path, shared_cache):
    """``-m seed=0,1`` on Flower + Ray: both jobs ran on the same Ray node (started once) and each
    job's summary.json equals that job run alone. (One CPU for Ray: one device worker to start, not two.)"""
    _run(["-m", "seed=0,1", *ARGS, "sim.num_cpus=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, shared_cache)
    jobs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(jobs) == 2
    nodes = {json.loads((j.parent / "timing.json").read_text())["ray_node_id"] for j in jobs}
    assert len(nodes) == 1, nodes
    for seed, job in enumerate(jobs):
        assert json.loads(job.read_text()) == _alone(seed, tmp_path / f"alone{seed}", shared_cache), job


@pytest.mark.slow
@pytest.mark.xdist_group(SWEEPS)
def test_a_parallel_ray_sweep_runs_its_jobs_at_once_on_one_ray_with_the_results_of_each_alone(tmp_path,
                                                                                              shared_cache):
    """``-m seed=0,1 sim.sweep_parallel=2`` on Flower + Ray: the two jobs ran at the same time (two
    processes of Hydra's joblib launcher), both on the Ray the sweep started (one node id), each with
    half the device workers -- and each job's summary.json equals that job run alone."""
    sweep = tmp_path / "sweep"
    _run(["-m", "seed=0,1", "sim.sweep_parallel=2", *ARGS, f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache)
    dirs = _jobs(sweep)
    assert len(dirs) == 2 and _at_once(dirs)
    assert len({json.loads((d / "timing.json").read_text())["ray_node_id"] for d in dirs}) == 1
    for seed, d in enumerate(dirs):
        assert json.loads((d / "summary.json").read_text()) == _alone(seed, tmp_path / f"alone{seed}", shared_cache)


@pytest.mark.slow
@pytest.mark.xdist_group(SWEEPS)
def test_a_parallel_sweep_runs_jobs_at_once_and_finishes_the_others_when_some_fail(tmp_path, shared_cache):
    """``sim.sweep_parallel=2``: jobs 0 and 1 (in-process) ran at the same time in two processes, each
    with the summary.json of the job alone; jobs 2 and 3 (Ray, at an address where no cluster answers)
    each failed with one line, kept in their directories (failed.txt); the command exits 2 naming the
    first failed job, with no traceback."""
    sweep = tmp_path / "sweep"
    r = _run(["-m", "sim.backend=inprocess,ray", "seed=0,1", "sim.ray_address=127.0.0.1:9", "sim.sweep_parallel=2",
              *ARGS, f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache, code=2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 job(s) of the sweep failed, the others finished; first: job 2 ("), last
    assert "no Ray cluster answers at 127.0.0.1:9" in last
    dirs = _jobs(sweep)
    assert [(d / "summary.json").exists() for d in dirs] == [True, True, False, False]
    assert [(d / "failed.txt").exists() for d in dirs] == [False, False, True, True]
    assert _at_once(dirs[:2])
    for seed, d in enumerate(dirs[:2]):
        assert json.loads((d / "summary.json").read_text()) == _alone(seed, tmp_path / f"alone{seed}", shared_cache)


@pytest.mark.slow
def test_a_sweep_one_job_at_a_time_reports_its_failed_jobs_the_same_way(tmp_path, shared_cache):
    r = _run(["-m", "sim.ray_address=127.0.0.1:9,127.0.0.1:8", *ARGS, f"hydra.sweep.dir={tmp_path / 's'}"],
             tmp_path, shared_cache, code=2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 job(s) of the sweep failed, the others finished; first: job 0 ("), last
    assert "127.0.0.1:9" in last and all((d / "failed.txt").exists() for d in _jobs(tmp_path / "s"))


@pytest.mark.slow
def test_a_stopped_parallel_sweep_says_what_is_saved_and_leaves_no_job_process(tmp_path, shared_cache):
    """SIGTERM to the command while two jobs run at once: exit 143 with the one message (no traceback),
    each job's finished rounds are in its checkpoint, and no process the sweep started is left."""
    from tests.test_flwr_app import MARKER, _marked

    token = uuid.uuid4().hex
    sweep = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-m", "sim.run", "-m", "seed=0,1", "sim.sweep_parallel=2",
                          "sim.backend=inprocess", *ARGS, "sim.num_rounds=200", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "L2H_SIM_CACHE": str(shared_cache), MARKER: token})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(sweep.glob("*/checkpoint.npz"))) < 2 and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()[-3000:]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "interrupted (SIGTERM) during a sweep running 2 jobs at once" in err, err
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _marked(token):
        time.sleep(0.2)
    assert not _marked(token)
    assert len(list(sweep.glob("*/checkpoint.npz"))) == 2


def test_a_parallel_sweep_is_one_setting_for_the_whole_sweep_and_chooses_the_launcher():
    from sim.cli import precheck
    from sim.core.errors import ConfigError
    from sim.run import _hydra_argv

    assert precheck(["-m", "seed=0,1", "sim.sweep_parallel=3"]) == 3
    assert precheck(["seed=0", "sim.sweep_parallel=3"]) == 1  # one run: nothing runs at once
    with pytest.raises(ConfigError, match="sim.sweep_parallel is one setting for the whole sweep"):
        precheck(["-m", "sim.sweep_parallel=1,2"])
    with pytest.raises(ConfigError, match="leave out hydra/launcher"):
        precheck(["-m", "seed=0,1", "sim.sweep_parallel=2", "hydra/launcher=basic"])
    with pytest.raises(ConfigError, match="sim.sweep_parallel"):
        precheck(["-m", "seed=0,1", "sim.sweep_parallel=0"])
    argv = _hydra_argv(["p", "-m", "seed=0,1"], 2)
    assert "hydra/launcher=joblib" in argv and "hydra.launcher.n_jobs=2" in argv
    assert not any("launcher" in a for a in _hydra_argv(["p", "-m", "seed=0,1"], 1))


def test_jobs_at_once_on_one_ray_share_its_device_workers_and_an_empty_pool_is_one_line(monkeypatch):
    """N jobs at once each ask N times the CPUs per device worker, so Flower's per-node pool sizes
    (int(node CPUs / worker CPUs)) add up to what the cluster holds; a pool that would be empty is
    refused in one line instead of Flower waiting with a warning."""
    import ray

    from sim.core.config import ResourcesConfig
    from sim.engine import EngineError, check_worker_pool, worker_resources

    one = ResourcesConfig(num_cpus=1, num_gpus=0)
    assert worker_resources(one)["num_cpus"] == 1.0 and worker_resources(one, 2)["num_cpus"] == 2.0
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_worker_pool(worker_resources(one, 2), 2)  # one worker per job fits
    with pytest.raises(EngineError, match=r"no device worker fits .*sim.sweep_parallel") as exc:
        check_worker_pool(worker_resources(one, 3), 3)
    assert "\n" not in str(exc.value)
    with pytest.raises(EngineError, match="lower sim.client_resources"):
        check_worker_pool(worker_resources(ResourcesConfig(num_cpus=1, num_gpus=1)), 1)  # no GPU on the node


def test_failed_jobs_are_gathered_in_job_order(tmp_path):
    from sim.sweep import gather_failures, record_failure

    for num in (10, 2):
        record_failure(tmp_path / f"{num}_x", f"job {num} (seed={num}): bad")
    (tmp_path / "3_ok").mkdir()
    assert gather_failures(tmp_path) == ["job 2 (seed=2): bad", "job 10 (seed=10): bad"]
