"""sim.cli.precheck: every job of a command line (multirun sweeps and experiment presets) is
composed and checked before the first runs; a bad one is one line (sim/cli.py module docstring)."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sim.cli
from sim.cli import CommandLine, parse_command_line, precheck, sample_jobs, sweep_jobs
from sim.core.errors import ConfigError
from sim.run import check_command_line

ROOT = Path(__file__).resolve().parents[1]


def one_line(exc: ConfigError) -> str:
    text = str(exc)
    assert text.strip() and "\n" not in text.strip(), text
    return text


def preset_params(name: str) -> dict[str, list[str]]:
    """The hydra.sweeper.params of configs/experiment/<name>.yaml, each value list split on commas."""
    params = yaml.safe_load((ROOT / "configs" / "experiment" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


# --------------------------------------------------------------------------- parse_command_line

def test_parse_command_line_splits_flags_and_overrides():
    line = parse_command_line(["-m", "--config-name", "mine", "-cd", "/some/dir", "--cfg", "job",
                               "a=1", "+b=2", "~c", "hydra.job.chdir=true", "hydra/launcher=basic",
                               "--config-path=rel", "x=1,2"])
    assert line.multirun
    assert line.config_name == "mine" and line.config_dir == "/some/dir" and line.config_path == "rel"
    assert line.overrides == ["a=1", "+b=2", "~c", "x=1,2"]  # --cfg's value "job" is not an override
    assert line.hydra_overrides == ["hydra.job.chdir=true", "hydra/launcher=basic"]


def test_parse_command_line_defaults_and_equals_forms():
    assert parse_command_line([]) == CommandLine()
    line = parse_command_line(["--multirun", "--config-name=other", "--config-dir=d", "-cn", "last"])
    assert line.multirun and line.config_name == "last" and line.config_dir == "d"


# --------------------------------------------------------------------------- (i) experiment presets

def test_experiment_compare_expands_to_every_job_of_its_sweeper_params():
    params = preset_params("compare")
    assert set(params) == {"strategy", "seed"}
    jobs = sweep_jobs(parse_command_line(["-m", "experiment=compare"]))
    expected = {tuple(sorted(zip(params, combo))) for combo in itertools.product(*params.values())}
    got = [as_dict(job) for job in jobs]
    assert len(jobs) == len(expected) == 7 * 5
    assert all(d["experiment"] == "compare" for d in got)
    assert {tuple(sorted((k, d[k]) for k in params)) for d in got} == expected  # each combination once


def test_command_line_wins_over_the_preset_for_a_key_both_set():
    jobs = sweep_jobs(parse_command_line(["-m", "experiment=compare", "seed=7"]))
    assert len(jobs) == 7 and {as_dict(j)["seed"] for j in jobs} == {"7"}
    jobs = sweep_jobs(parse_command_line(["-m", "experiment=compare", "seed=0,1", "sim.num_rounds=2,3"]))
    assert len(jobs) == 7 * 2 * 2


def test_without_multirun_the_preset_sweep_is_not_expanded():
    assert sweep_jobs(parse_command_line(["experiment=compare", "seed=3"])) == [["experiment=compare", "seed=3"]]


def test_precheck_checks_a_preset_on_a_sample_that_covers_every_value(monkeypatch, capsys):
    monkeypatch.setattr(sim.cli, "MAX_CHECKED", 12)
    precheck(["-m", "experiment=compare"])  # every strategy and seed of the preset composes and checks
    err = capsys.readouterr().err
    assert "the sweep has 35 jobs; checking" in err and "every swept value" in err


def test_a_bad_job_of_a_preset_is_caught(tmp_path):
    """A preset (found through --config-dir) whose sweep holds a bad combination: caught by precheck."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "bad_pool.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      servers.count: 1,3\n      strategy.weights: shifted,paper\n")
    line = ["-m", "--config-dir", str(tmp_path), "experiment=bad_pool"]
    assert len(sweep_jobs(parse_command_line(line))) == 4
    with pytest.raises(ConfigError) as info:
        precheck(line)
    assert "strategy.weights=paper is defined for one defer output only" in one_line(info.value)


# --------------------------------------------------------------------------- (ii) invalid only jointly

JOINT = ["-m", "servers.count=1,3", "strategy.weights=shifted,paper"]


def test_each_half_of_the_joint_sweep_is_valid_alone():
    precheck(["-m", "servers.count=1,3"])  # strategy.weights=shifted (the default) on 1 or 3 servers
    precheck(["-m", "strategy.weights=shifted,paper"])  # any weights on 1 server


def test_a_combination_invalid_only_jointly_is_caught_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = sweep_jobs(parse_command_line(JOINT))
    assert jobs[-1] == ["servers.count=3", "strategy.weights=paper"]  # the bad job is the sweep's last
    with pytest.raises(ConfigError) as info:
        precheck(JOINT)
    line = one_line(info.value)
    assert "strategy.weights=paper is defined for one defer output only" in line
    assert "servers.routing=learned and several servers" in line
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written


def run_cli(*args, cwd):
    env = {**os.environ, "L2H_SIM_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,expect", [
    (JOINT, "strategy.weights=paper is defined for one defer output only"),
    (["--config-name", "nope"], "--config-name nope: no such primary config (available: config)"),
])
def test_command_line_one_line_error_and_nothing_runs(tmp_path, args, expect):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {lines[0][len('error: '):]}"] and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


# --------------------------------------------------------------------------- (iii) --config-name / --config-dir

@pytest.mark.parametrize("argv", [["--config-name", "nope"], ["-cn", "nope"], ["--config-name=nope"],
                                  ["-m", "--config-name", "nope", "seed=1,2"]])
def test_unknown_config_name_is_one_line(argv):
    with pytest.raises(ConfigError) as info:
        check_command_line(argv)
    line = one_line(info.value)
    assert line.startswith("--config-name nope: no such primary config") and "available: config" in line


def test_known_config_name_is_accepted():
    check_command_line(["--config-name", "config", "fleet.num_clients=4"])
    check_command_line(["--config-name", "config.yaml", "fleet.num_clients=4"])


def test_primary_config_in_config_dir_is_honoured(tmp_path):
    """A primary config of one's own (--config-dir, --config-name) is what precheck composes."""
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nfleet:\n  num_clients: 0\n")
    with pytest.raises(ConfigError) as info:
        precheck(["--config-dir", str(tmp_path), "--config-name", "mine"])
    assert "fleet.num_clients=0 is invalid" in one_line(info.value)
    precheck(["--config-dir", str(tmp_path), "--config-name", "mine", "fleet.num_clients=4"])
    # the primary config's own sweep is expanded too
    (tmp_path / "swept.yaml").write_text("defaults:\n  - config\n  - _self_\n"
                                         "hydra:\n  sweeper:\n    params:\n      strategy.c_e: 0.1,-1\n")
    with pytest.raises(ConfigError) as info:
        precheck(["-m", "--config-dir", str(tmp_path), "--config-name", "swept"])
    assert "strategy.c_e=-1.0 is invalid" in one_line(info.value)


def test_missing_config_dir_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        precheck(["--config-dir", str(tmp_path / "absent"), "fleet.num_clients=4"])
    assert "no such directory" in one_line(info.value)


# --------------------------------------------------------------------------- (iv) sampling large sweeps

def synthetic(sizes: dict[str, int]) -> list[list[str]]:
    return [list(job) for job in itertools.product(*[[f"{k}={i}" for i in range(n)] for k, n in sizes.items()])]


@pytest.mark.parametrize("cap", [40, 100, 500])
def test_sample_is_at_most_the_cap_and_has_every_value(cap):
    sizes = {"a": 20, "b": 10, "c": 3}
    jobs = synthetic(sizes)  # 600 jobs
    picked = sample_jobs(jobs, cap)
    values = {o for job in jobs for o in job}
    assert values == {o for job in picked for o in job}  # every value of every key at least once
    covering = sum(sizes.values()) - len(sizes) + 1  # the first job, then one per new value
    assert covering <= len(picked) <= cap  # filled towards the cap (evenly spaced fill can repeat a pick)
    assert len({tuple(j) for j in picked}) == len(picked)  # no job twice
    index = {tuple(j): i for i, j in enumerate(jobs)}
    assert [index[tuple(j)] for j in picked] == sorted(index[tuple(j)] for j in picked)  # sweep order


def test_small_sweep_is_not_sampled():
    jobs = synthetic({"a": 5, "b": 4})
    assert sample_jobs(jobs, 20) == jobs and sample_jobs(jobs, 100) == jobs


def test_coverage_wins_over_the_cap():
    """More distinct values than the cap: every value is still checked (the cap is a target)."""
    jobs = synthetic({"a": 30, "b": 2})
    picked = sample_jobs(jobs, 10)
    assert {o for j in picked for o in j} == {o for j in jobs for o in j}


def test_large_real_sweep_is_sampled_and_a_bad_value_is_never_skipped(monkeypatch, capsys):
    monkeypatch.setattr(sim.cli, "MAX_CHECKED", 10)
    argv = ["-m", "seed=range(0,30)", "strategy.c_e=0,0.1,-1"]  # 90 jobs, the bad value in 30 of them
    jobs = sweep_jobs(parse_command_line(argv))
    assert len(jobs) == 90
    assert len(sample_jobs(jobs, 10)) < 90
    with pytest.raises(ConfigError) as info:
        precheck(argv)
    assert "strategy.c_e=-1.0 is invalid" in one_line(info.value)
    assert "the sweep has 90 jobs; checking" in capsys.readouterr().err
