"""One Ray session per sweep (sim/sweep.py): when it is shared, and that sharing changes no result."""
import json
import os
import subprocess
import sys
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


def _run(args: list[str], cwd: Path, cache: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "L2H_SIM_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    # Flower's simulation entry point is deprecated (sim/engine.py keeps it behind one adapter): the
    # user never sees its notice, nor a traceback
    assert "DEPRECATED" not in r.stdout + r.stderr and "Traceback" not in r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.slow
def test_a_ray_sweep_runs_every_job_on_one_ray_with_the_results_of_each_job_alone(tmp_path, shared_cache):
    """``-m seed=0,1`` on Flower + Ray: both jobs ran on the same Ray node (started once) and each
    job's summary.json equals that job run alone (in-process: the same numbers as Ray, golden tests)."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate

    _run(["-m", "seed=0,1", *ARGS, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, shared_cache)
    jobs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(jobs) == 2
    nodes = {json.loads((j.parent / "timing.json").read_text())["ray_node_id"] for j in jobs}
    assert len(nodes) == 1, nodes
    for seed, job in enumerate(jobs):  # alone: in this process (what `python -m sim.run` calls)
        alone = tmp_path / f"alone{seed}"
        simulate(compose_checked([f"seed={seed}", *ARGS, "sim.backend=inprocess", f"sim.cache_dir={shared_cache}"]),
                 alone, console=Console(quiet=True))
        assert json.loads(job.read_text()) == json.loads((alone / "summary.json").read_text()), job
