"""Bad configs exit non-zero with one clear line and no traceback, before anything runs."""
import os
import subprocess
import sys

import pytest

from sim.cli import _expand, user_overrides


def run_cli(*args, cwd):
    env = {**os.environ, "L2H_SIM_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["data=foo"], "available options for data: cifar10, digits"),
    (["strategy=nope"], "available options for strategy"),
    (["fleet.num_clients=abc"], "could not be converted to Integer"),
    (["strategy.c_e=-1"], "strategy.c_e=-1.0 is invalid"),
    (["strategy.c_1=-0.1"], "strategy.c_1=-0.1 is invalid"),
    (["fleet.num_clients=0"], "fleet.num_clients=0 is invalid"),
    (["sim.num_rounds=0"], "sim.num_rounds=0 is invalid"),
    (["fleet.unknown_key=3"], "Key 'unknown_key' not in 'FleetConfig'"),
    (["data=local"], "data.path is not set"),
    (["data=local", "data.path=/nonexistent/file.npz"], "does not exist"),
    (["-m", "strategy.c_e=0,0.1,-0.5"], "strategy.c_e=-0.5 is invalid"),
    (["data.split.legacy=0.9"], "sum to"),
    (["failures=crash_stop", "failures.servers=[3]"], "names server 3, but servers.count=1"),
    (["failures=partition", "fleet.num_clients=3"], "names device 3, but fleet.num_clients=3"),
    (["servers.count=2", "servers.c_e=[0.1]"], "servers.c_e has 1 prices for 2 servers"),
    (["failures=query_drop", "failures.query_drop_q=1.5"], "failures.query_drop_q=1.5 is invalid"),
    (["servers.routing=nearest"], "servers.routing='nearest' is invalid"),
    # a preset's key that the chosen strategy lacks: Hydra says why on the line after the first
    (["experiment=fleet_size", "strategy=confidence"],
     "Key 'max_defer_rate' not in 'BaselineConfig' (strategy.max_defer_rate)"),
])
def test_bad_config_one_line_nonzero_exit(tmp_path, args, expect):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expect in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    # nothing ran: no run directory was created
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_override_expansion_checks_every_swept_value():
    assert user_overrides(["-m", "--cfg", "job", "a=1", "hydra.job.chdir=true", "+b=2"]) == ["a=1", "+b=2"]
    combos = _expand(["strategy.c_e=0,0.1", "seed=1", "sim.num_rounds=2,3"])
    flat = {c for combo in combos for c in combo}
    assert {"strategy.c_e=0", "strategy.c_e=0.1", "sim.num_rounds=2", "sim.num_rounds=3", "seed=1"} <= flat


def test_injected_hydra_overrides_go_before_the_users_so_trailing_flags_still_parse():
    """`-m ... --cfg job` and plain multiruns: Hydra's argparse reads the overrides as one run of
    positionals, so what sim.run adds must join that run, not follow a trailing flag."""
    from sim.run import _hydra_argv

    assert _hydra_argv(["p", "-m", "seed=0,1", "--cfg", "job"]) == [
        "p", "-m", "hydra.output_subdir=null", "seed=0,1", "--cfg", "job"]
    assert _hydra_argv(["p", "-m", "experiment=compare"]) == ["p", "-m", "hydra.output_subdir=null",
                                                               "experiment=compare"]
    assert _hydra_argv(["p"]) == ["p", "hydra.output_subdir=null"]
