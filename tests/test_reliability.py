"""Reliability of a run's directory and of stopping: results are never overwritten or shared by two
runs, a stopped run can always be resumed (also after its last round), a bad round never replaces a
good checkpoint, files get the usual modes, a slow server costs its timeout (not its delay), and a
stop signal ends the process promptly with a resume command that works as printed.

The in-process tests share one finished 2-round run (:func:`finished`, never modified: each test
works on a copy); the subprocess and Ray tests are marked slow."""
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sim import checkpoint
from sim.checkpoint import CHECKPOINT
from sim.core.errors import ConfigError
from sim.results import claim, resume_override
from tests.conftest import small_cfg

RESULTS = ("summary.json", "metrics.jsonl", "clients.csv", CHECKPOINT)
ROOT = Path(__file__).resolve().parent.parent


def cfg(cache: Path, **over):
    """A tiny in-process run (4 devices, 2 rounds) using the shared dataset/fleet cache."""
    return small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(cache), **over})


def snapshot(d: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``d``: its bytes, mtime (ns) and mode; ``run.log`` (the console's mirror,
    sim/runlog.py, which every command on the directory appends to) as the bytes it held, checked
    by :func:`same_run` to have only grown."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(d))] = (p.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def same_run(before: dict, d: Path) -> bool:
    """Whether ``d`` is as :func:`snapshot` found it, except that each ``run.log`` may have grown
    (what a later command printed appended, nothing of the earlier text lost)."""
    after = snapshot(d)
    logs = [k for k in before if Path(k).name == "run.log"]
    for k in logs:
        if k not in after or not after[k][0].startswith(before[k][0]):
            return False
    strip = lambda snap: {k: v for k, v in snap.items() if Path(k).name != "run.log"}  # noqa: E731
    return strip(after) == strip(before) and set(after) == set(before)


def rounds(d: Path) -> list[int]:
    return [json.loads(ln)["round"] for ln in (Path(d) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # copy2: bytes and mtimes as they were
    return dst


def stopped_after_round_1(finished, dst: Path) -> Path:
    """A copy of the finished run as a stop right after round 1 leaves it: round 1's checkpoint and
    metrics line, no summary."""
    d = copy_run(finished.dir, dst)
    (d / CHECKPOINT).write_bytes(finished.snaps[1])
    (d / "metrics.jsonl").write_text((finished.dir / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    for name in ("summary.json", "clients.csv"):
        (d / name).unlink()
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_cache):
    """One finished in-process run, with each round's checkpoint kept aside (``snaps[round]``)."""
    from sim.pipeline import simulate
    from sim.server_app import Federation

    base = tmp_path_factory.mktemp("finished")
    snaps: dict[int, bytes] = {}
    save = Federation.save_checkpoint

    def save_and_keep(self, record, final):
        save(self, record, final)
        snaps[int(record["round"])] = (self.inp.run_dir / CHECKPOINT).read_bytes()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Federation, "save_checkpoint", save_and_keep)
        summary = simulate(cfg(shared_cache), base / "run")
    assert sorted(snaps) == [1, 2] and rounds(base / "run") == [1, 2]
    return SimpleNamespace(dir=base / "run", summary=summary, snaps=snaps, cache=shared_cache)


# ---- 1. a new run never starts where a run left results ------------------------------------------

@pytest.mark.parametrize("keep", [None, "summary.json", CHECKPOINT, f"reference/{CHECKPOINT}"])
def test_new_run_where_results_are_is_refused_and_nothing_is_touched(tmp_path, finished, keep):
    """A run that can be resumed (a checkpoint, here or in its reference/) or has finished (a summary)
    is never replaced; one that can be neither is a dead end, replaced by a new run (tests below)."""
    from sim.pipeline import simulate
    from sim.run import check_command_line

    if keep is None:  # everything a finished run left
        d = copy_run(finished.dir, tmp_path / "run")
    else:  # one file that makes it worth keeping (e.g. a run stopped before its summary), with a partial metrics.jsonl
        d = tmp_path / "run"
        (d / keep).parent.mkdir(parents=True)
        shutil.copy2(finished.dir / Path(keep).name, d / keep)
        shutil.copy2(finished.dir / "metrics.jsonl", d / "metrics.jsonl")
    before = snapshot(d)
    with pytest.raises(ConfigError) as exc:
        simulate(cfg(finished.cache), d)
    msg = str(exc.value)
    assert "\n" not in msg and "already holds a run's results" in msg and "sim.resume" in msg
    assert shlex.quote(resume_override(d)) in msg  # the override to continue it, ready to paste
    assert snapshot(d) == before  # nothing deleted, rewritten or added
    # the command line is refused before Hydra starts, with the same line
    with pytest.raises(ConfigError, match="already holds a run's results.*sim.resume"):
        check_command_line(["fleet.num_clients=4", f"hydra.run.dir={d}"])
    assert snapshot(d) == before


def dead_end_copy(finished, dst: Path) -> Path:
    """The finished run as a stop after round 1 leaves it with sim.checkpoint=false: round 1's line, no
    checkpoint, no summary (also what a full disk before the first checkpoint leaves)."""
    d = stopped_after_round_1(finished, dst)
    (d / CHECKPOINT).unlink()
    return d


def test_a_dead_end_run_dir_is_started_again_in_place_and_sim_resume_says_how(tmp_path, finished):
    """No checkpoint and no summary: nothing can resume it, so a new run starts there again (before:
    refused as "already holds a run's results", while the stop had said "start the run again" and
    sim.resume said "no checkpoint"), replacing the partial results and saying so."""
    import io

    from rich.console import Console

    from sim.pipeline import simulate
    from sim.results import dead_end
    from sim.run import check_command_line

    d = dead_end_copy(finished, tmp_path / "run")
    assert dead_end(d) and not dead_end(finished.dir)
    with pytest.raises(ConfigError, match="nothing to resume") as exc:
        checkpoint.open_for_resume(cfg(finished.cache), d)
    msg = str(exc.value)
    assert "\n" not in msg and shlex.quote(f"hydra.run.dir={d}") in msg and "sim.checkpoint=false" in msg
    check_command_line(["fleet.num_clients=4", f"hydra.run.dir={d}"])  # not refused
    out = io.StringIO()
    simulate(cfg(finished.cache), d, console=Console(file=out, width=400))
    assert "held a stopped run that nothing can resume" in out.getvalue() and "metrics.jsonl" in out.getvalue()
    assert rounds(d) == [1, 2]
    assert json.loads((d / "summary.json").read_text()) == json.loads((finished.dir / "summary.json").read_text())


def test_a_finished_reference_run_is_read_as_its_last_checkpoint_proves_it(tmp_path, finished):
    """A resumed run with failures reads its finished all-up reference/ back (resilience.* come from its
    per-round records): damaged records are taken from the reference's last checkpoint (before: a garbage
    line was a JSONDecodeError traceback, a missing line a silently different resilience section);
    without that checkpoint they must be whole, or the resume is refused in one line."""
    from sim import journal

    d = copy_run(finished.dir, tmp_path / "reference")
    good = (d / "metrics.jsonl").read_text()
    (d / "metrics.jsonl").write_text(good.splitlines(keepends=True)[1] + "garbage\n")
    proven = journal.of_finished_run(d, 2)
    assert proven.text == good and proven.problem
    (d / CHECKPOINT).unlink()
    with pytest.raises(ConfigError, match="does not hold rounds 1-2") as exc:
        journal.of_finished_run(d, 2)
    assert "\n" not in str(exc.value)
    (d / "metrics.jsonl").write_text(good)
    assert journal.of_finished_run(d, 2).text == good


def test_the_stop_message_of_a_dead_end_gives_the_command_that_starts_it_again(tmp_path, finished, monkeypatch):
    from sim import run

    d = dead_end_copy(finished, tmp_path / "runs; a b" / "run")
    monkeypatch.setattr(run, "_CURRENT", {"overrides": ["fleet.num_clients=4", "sim.checkpoint=false",
                                                        f"hydra.run.dir={d}"],
                                          "multirun": False, "config_name": "config", "run_dir": d})
    msg = run._interrupted_message()
    assert msg.startswith("interrupted (SIGINT) before any round was checkpointed") and "nothing to resume" in msg
    argv = shlex.split(msg.splitlines()[-1])
    assert argv[:5] == ["python", "-m", "sim.run", "fleet.num_clients=4", "sim.checkpoint=false"]
    assert hydra_values(argv[3:])["hydra.run.dir"] == str(d)


def test_a_stop_after_the_reference_run_is_not_called_during_it(tmp_path, finished, monkeypatch):
    """The all-up reference finished, the run with failures had not checkpointed a round (before: "during
    the all-up reference run, after its round 2")."""
    from sim import run

    d = tmp_path / "run"
    copy_run(finished.dir, d / "reference")
    monkeypatch.setattr(run, "_CURRENT", {"overrides": ["failures=crash_stop"], "multirun": False,
                                          "config_name": "config", "run_dir": d})
    msg = run._interrupted_message()
    assert msg.startswith("interrupted (SIGINT) after the all-up reference run, before the run with failures "
                          "checkpointed a round"), msg
    assert "during" not in msg and shlex.split(msg.splitlines()[-1])[-1] == resume_override(d)


@pytest.mark.slow
def test_ctrl_c_without_checkpoints_then_the_printed_command_finishes_the_run(tmp_path, shared_cache):
    """sim.checkpoint=false, SIGINT after round 1: the printed command starts the run again in its own
    directory and ends with the summary of the run uninterrupted."""
    from sim.pipeline import simulate

    run_dir = tmp_path / "run"
    args = [*SIGNAL_ARGS, "sim.checkpoint=false"]
    job = Running(tmp_path, shared_cache, [*args, f"hydra.run.dir={run_dir}"])
    try:
        job.wait_for(r"round\s+1/3\b", timeout=400)
        job.p.send_signal(signal.SIGINT)
        out = job.finish(timeout=30)
    finally:
        job.kill_group()
    assert job.p.returncode == 130, out[-3000:]
    assert "nothing to resume" in out and "Traceback" not in out
    m = re.search(r"start the run again there with:\n(.+)", out)
    assert m, out[-3000:]
    argv = shlex.split(m.group(1))
    r = cli(tmp_path, shared_cache, *argv[3:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held a stopped run that nothing can resume" in r.stdout
    simulate(cfg(shared_cache, **{"sim.num_rounds": 3}), tmp_path / "whole")
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert rounds(run_dir) == [1, 2, 3]


# ---- 2. one run or resume per directory at a time ------------------------------------------------

HOLD = """import sys
from pathlib import Path
from sim.results import claim
with claim(Path(sys.argv[1]), new=False):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold_elsewhere(run_dir: Path) -> subprocess.Popen:
    """Another process that has claimed ``run_dir`` (until its stdin closes or it is killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", p.stderr.read()
    return p


def test_a_claimed_directory_is_refused_to_another_run_or_resume(tmp_path, finished):
    from sim.pipeline import simulate

    d = copy_run(finished.dir, tmp_path / "run")
    before = snapshot(d)
    holder = hold_elsewhere(d)
    try:
        for new in (False, True):  # a resume, and a new run
            with pytest.raises(ConfigError, match="in use by another run or resume") as exc, claim(d, new=new):
                pytest.fail("claimed a directory another process holds")
            assert "\n" not in str(exc.value)
        with pytest.raises(ConfigError, match="in use by another run or resume"):
            simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
        assert snapshot(d) == before
        assert rounds(d) == [1, 2]  # no round written twice
    finally:
        holder.kill()  # dies holding the lock: the kernel releases it
        holder.wait(timeout=30)
        for f in (holder.stdin, holder.stdout, holder.stderr):
            f.close()
    with claim(d, new=False) as got:  # free again
        assert got == d
        with claim(d, new=False):  # re-entrant in this process (a run's own reference/ run)
            pass
    # once released, a resume of the finished run leaves it as it is
    simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    assert same_run(before, d) and rounds(d) == [1, 2]


# ---- 3. a run stopped after its last round is finished by a resume -------------------------------

def test_resume_after_the_last_round_writes_the_summary_without_running_a_round(tmp_path, finished,
                                                                                 monkeypatch):
    from sim import pipeline

    d = copy_run(finished.dir, tmp_path / "run")
    for name in ("summary.json", "clients.csv"):  # stopped right after the last round's line
        (d / name).unlink()
    metrics, ckpt = (d / "metrics.jsonl").read_bytes(), (d / CHECKPOINT).read_bytes()

    def no_rounds(inp):
        raise AssertionError("a round was run again")

    monkeypatch.setattr(pipeline, "run_federation", no_rounds)
    s = pipeline.simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    want = json.loads((finished.dir / "summary.json").read_text())
    assert json.loads((d / "summary.json").read_text()) == want
    for key in ("system_accuracy", "legacy_accuracy", "server_accuracy", "defer_rate", "l01_cost"):
        assert s[key] == want[key] == finished.summary[key]
    assert (d / "clients.csv").read_bytes() == (finished.dir / "clients.csv").read_bytes()
    assert (d / "metrics.jsonl").read_bytes() == metrics and rounds(d) == [1, 2]
    assert (d / CHECKPOINT).read_bytes() == ckpt
    assert not (tmp_path / "unused").exists()


def test_resume_after_the_last_round_without_the_final_part_is_a_one_line_error(tmp_path, finished):
    """A last-round checkpoint from before it kept the final results: refused, nothing written."""
    from sim.pipeline import simulate

    d = copy_run(finished.dir, tmp_path / "run")
    (d / "summary.json").unlink()
    arrays, meta = checkpoint.load(d)
    assert checkpoint.final_state(arrays, meta) is not None
    meta.pop(checkpoint.FINAL)
    checkpoint.save(d, {k: v for k, v in arrays.items() if not k.startswith(f"{checkpoint.FINAL}/")}, meta)
    before = snapshot(d)
    with pytest.raises(ConfigError, match="predates") as exc:
        simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    assert "\n" not in str(exc.value)
    assert same_run(before, d)


# ---- 5. file modes -------------------------------------------------------------------------------

def test_result_files_get_the_mode_of_any_new_file(tmp_path, finished):
    """0666 less the umask (0644 under 022), not mkstemp's 0600 -- under another umask too."""
    from sim.core.cache import umask
    from sim.pipeline import simulate

    mask = umask()
    assert mask == os.umask(mask)
    for name in RESULTS:
        assert stat.S_IMODE((finished.dir / name).stat().st_mode) == 0o666 & ~mask, name
    old = os.umask(0o027)
    try:
        simulate(cfg(finished.cache, **{"sim.num_rounds": 1}), tmp_path / "run")
    finally:
        os.umask(old)
    for name in (*RESULTS, "timing.json", "failure_schedule.json"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o640, name


# ---- 6. the resume hint ----------------------------------------------------------------------------

def sweep_jobs(*overrides: str) -> list[list[str]]:
    """Each job's own overrides, as Hydra's basic sweeper makes them from a sweep."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(list(overrides)), None)
    return [job for batch in batches for job in batch]


def hydra_values(argv: list[str]) -> dict[str, object]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(argv)
    assert not any(o.is_sweep_override() for o in parsed), argv
    return {o.key_or_group: o.value() for o in parsed}


@pytest.mark.parametrize("name", ["plain", "my runs; rm -rf x", "it's $HOME `x`", "1_seed=3,strategy.c_e=0.1"])
def test_resume_command_is_shell_quoted_and_keeps_the_jobs_own_values(tmp_path, monkeypatch, name):
    from sim import run

    jobs = sweep_jobs("strategy.c_e=0,0.1", "seed=3", "fleet.num_clients=range(4,6)",
                      "sim.cache_dir='/tmp/my cache;1'")
    job = jobs[3]
    assert job == ["strategy.c_e=0.1", "seed=3", "fleet.num_clients=5", "sim.cache_dir='/tmp/my cache;1'"]
    run_dir = tmp_path / "multirun; x" / name
    monkeypatch.setattr(run, "_CURRENT", {"overrides": [*job, "hydra.job.chdir=false", "+hydra.foo=1",
                                                        "sim.resume=/old"],
                                          "multirun": True, "config_name": "config", "run_dir": run_dir})
    argv = shlex.split(run.resume_command(run_dir))
    assert argv == ["python", "-m", "sim.run", *job, resume_override(run_dir)]
    values = hydra_values(argv[3:])  # Hydra reads back the job's values and exactly this directory
    assert values["sim.resume"] == str(run_dir)
    assert values["strategy.c_e"] == 0.1 and values["fleet.num_clients"] == 5
    assert values["sim.cache_dir"] == "/tmp/my cache;1"
    # a config other than the default is named
    monkeypatch.setitem(run._CURRENT, "config_name", "other")
    assert shlex.split(run.resume_command(run_dir))[3:5] == ["--config-name", "other"]


def test_resume_override_reads_back_as_the_directory_in_a_real_config(tmp_path):
    """Through Hydra's composition (the command line's own checks), not only its parser."""
    from sim.cli import compose_checked

    d = tmp_path / "0_seed=3,strategy.c_e=0.1; it's"
    assert compose_checked(["fleet.num_clients=4", resume_override(d)]).sim.resume == str(d)
    assert resume_override(tmp_path / "run") == f"sim.resume={tmp_path / 'run'}"  # quoted only when needed


def test_interrupted_message_names_the_saved_round_and_a_working_command(tmp_path, finished, monkeypatch):
    from sim import run

    d = copy_run(finished.dir, tmp_path / "runs; a b" / "1_seed=0,x")
    monkeypatch.setattr(run, "_CURRENT", {"overrides": ["fleet.num_clients=4", "sim.num_rounds=2"],
                                          "multirun": False, "config_name": "config", "run_dir": d})
    msg = run._interrupted_message()
    assert msg.startswith("interrupted (SIGINT) after round 2") and str(d) in msg
    argv = shlex.split(msg.splitlines()[-1])
    assert argv[:3] == ["python", "-m", "sim.run"] and hydra_values(argv[3:])["sim.resume"] == str(d)


# ---- 7. a round that lost device replies never replaces the checkpoint ---------------------------

def test_round_ok_keeps_a_round_only_if_some_device_answered_both_phases():
    """A checkpoint keeps a round some device trained *and* evaluated in (a lost reply or an injected
    dropout does not discard the round); one in which every device failed a phase is not kept."""
    from sim.core.faults import RoundFaults
    from sim.server_app import Federation

    fed = Federation.__new__(Federation)
    fed.inp = SimpleNamespace(schedule=[RoundFaults(round=1, dropout=[0, 3]), RoundFaults(round=2)])
    assert fed.round_ok({"round": 1, "train_devices": 2, "train_errors": 2, "eval_devices": 2, "eval_errors": 2})
    assert fed.round_ok({"round": 2, "train_devices": 3, "train_errors": 1, "eval_devices": 4, "eval_errors": 0})
    assert not fed.round_ok({"round": 2, "train_devices": 0, "train_errors": 4, "eval_devices": 4, "eval_errors": 0})
    assert not fed.round_ok({"round": 2, "train_devices": 4, "train_errors": 0, "eval_devices": 0, "eval_errors": 4})
    assert not fed.round_ok({"round": 1, "train_devices": 0, "train_errors": 2, "eval_devices": 0, "eval_errors": 2})
    # the final round (2 of 2) has no injected dropout: a device missing from it fails the run, and
    # the round is not kept, so a resume repeats it (sim/pipeline.py final_missing_message)
    assert not fed.round_ok({"round": 2, "train_devices": 4, "train_errors": 0, "eval_devices": 3, "eval_errors": 1})


def test_a_checkpoint_whose_state_fails_every_device_is_kept_as_it_was(tmp_path, finished):
    from sim.engine import EngineError
    from sim.pipeline import simulate

    d = stopped_after_round_1(finished, tmp_path / "run")
    arrays, meta = checkpoint.load(d)
    # wrong shape, so no device can load its rejector: the devices' own states and (rejector.federation
    # =fedavg) their groups' averages
    bad = [k for k in arrays if k.startswith("strategy/") and k.endswith("net.0.weight")]
    assert bad
    for key in bad:
        arrays[key] = np.ascontiguousarray(arrays[key][..., :-1])
    checkpoint.save(d, arrays, meta)
    before = (d / CHECKPOINT).read_bytes()
    with pytest.raises(EngineError):
        simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    assert (d / CHECKPOINT).read_bytes() == before  # not replaced by the failed round's state
    assert checkpoint.finished_round(d) == 1 and not (d / "summary.json").exists()
    assert checkpoint.open_for_resume(cfg(finished.cache), d)[1] == 1  # still resumable


def test_a_round_every_device_failed_is_not_checkpointed_and_a_later_resume_finishes(
        tmp_path, finished, monkeypatch):
    """Devices that cannot be built during a resume (not injected dropouts): the run fails, the good
    checkpoint stays; resumed again once the devices are fine, it ends as the run that never stopped."""
    from sim import client_app
    from sim.engine import EngineError
    from sim.pipeline import simulate

    d = stopped_after_round_1(finished, tmp_path / "run")
    good = (d / CHECKPOINT).read_bytes()

    def unreadable(spec, device_id):
        raise OSError(f"device {device_id} cannot read its legacy model (test)")

    monkeypatch.setattr(client_app, "get_device", unreadable)
    with pytest.raises(EngineError):
        simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    assert (d / CHECKPOINT).read_bytes() == good and not (d / "summary.json").exists()
    monkeypatch.undo()
    simulate(cfg(finished.cache, **{"sim.resume": str(d)}), tmp_path / "unused")
    assert rounds(d) == [1, 2]
    assert json.loads((d / "summary.json").read_text()) == json.loads((finished.dir / "summary.json").read_text())


# ---- 4. a resume never rewrites the run's .hydra record (CLI) -------------------------------------

def cli(cwd: Path, cache: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "L2H_SIM_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_resuming_or_refusing_leaves_the_hydra_record_unchanged(tmp_path, shared_cache):
    args = ["fleet.num_clients=4", "sim.num_rounds=2", "sim.backend=inprocess", "sim.plots=false",
            "sim.progress=false"]
    d = tmp_path / "run"
    r = cli(tmp_path, shared_cache, *args, f"hydra.run.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    record = {p.name for p in (d / ".hydra").iterdir()}
    assert record == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "sim.num_rounds=2" in (d / ".hydra" / "overrides.yaml").read_text()
    hydra_before, all_before = snapshot(d / ".hydra"), snapshot(d)

    r = cli(tmp_path, shared_cache, *args, f"hydra.run.dir={d}")  # a new run there: refused
    assert r.returncode == 2 and "already holds a run's results" in r.stderr and "sim.resume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert same_run(all_before, d)

    r = cli(tmp_path, shared_cache, *args, f"sim.resume={d}")  # the finished run resumed: nothing to do
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr[-2000:]
    assert same_run(all_before, d)

    (d / "summary.json").unlink()  # stopped after its last round: the resume writes the summary
    r = cli(tmp_path, shared_cache, *args, f"sim.resume={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((d / "summary.json").read_bytes()) == json.loads(all_before["summary.json"][0])
    assert snapshot(d / ".hydra") == hydra_before
    assert not (tmp_path / "outputs").exists()


# ---- 9. stop signals (Flower on Ray, real processes) ----------------------------------------------

SIGNAL_ARGS = ["fleet.num_clients=4", "sim.num_rounds=3", "sim.backend=inprocess"]
"""In-process: what these tests check (exit status, the printed command) does not depend on the
backend; Ctrl-C on Flower + Ray (threads inside Ray calls), then resuming with the printed command,
is tests/test_resume.py's SIGINT test, which also checks the exit is prompt."""


class Running:
    """``python -m sim.run`` in its own process group, its output (stdout + stderr) read line by line."""

    def __init__(self, cwd: Path, cache: Path, args: list[str]):
        env = {**os.environ, "L2H_SIM_CACHE": str(cache)}
        self.p = subprocess.Popen([sys.executable, "-m", "sim.run", *args], cwd=cwd, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout}s:\n" + "".join(self.lines[-30:]))
            if line is None:
                raise AssertionError(f"exited ({self.p.wait()}) before {pattern!r}:\n" + "".join(self.lines[-30:]))
            self.lines.append(line)
            if re.search(pattern, line):
                return

    def finish(self, timeout: float) -> str:
        """Wait for the process to end (TimeoutExpired past ``timeout``); all its output."""
        self.p.wait(timeout=timeout)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines)

    def kill_group(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.p.stdout.close()


def stop_after_round_1(tmp_path: Path, cache: Path, run_dir: Path, sig: int) -> tuple[int, float, str]:
    """Start a run, send ``sig`` when round 1's line appears: (exit code, seconds to exit, output)."""
    run = Running(tmp_path, cache, [*SIGNAL_ARGS, f"hydra.run.dir={run_dir}"])
    try:
        run.wait_for(r"round\s+1/3\b", timeout=400)
        run.p.send_signal(sig)
        t = time.monotonic()
        try:
            out = run.finish(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30s after {signal.Signals(sig).name}:\n" + "".join(run.lines[-30:]))
        return run.p.returncode, time.monotonic() - t, out
    finally:
        run.kill_group()


def printed_resume(out: str, run_dir: Path) -> list[str]:
    m = re.search(r"resume with:\n(.+)", out)
    assert m, out[-3000:]
    argv = shlex.split(m.group(1))
    assert argv == ["python", "-m", "sim.run", *SIGNAL_ARGS, resume_override(run_dir)]
    return argv


@pytest.mark.slow
def test_sigterm_exits_143_promptly_with_the_resume_command(tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    code, seconds, out = stop_after_round_1(tmp_path, shared_cache, run_dir, signal.SIGTERM)
    assert code == 143, out[-3000:]
    assert seconds < 30 and "Traceback" not in out
    assert re.search(r"interrupted \(SIGTERM\) after round [12]\b", out), out[-3000:]
    printed_resume(out, run_dir)
    assert checkpoint.finished_round(run_dir) in (1, 2)


def _descendants(root: int) -> dict[int, str]:
    """The live processes descending from ``root``: pid -> command line."""
    parent, cmd = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parent[int(entry)], cmd[int(entry)] = int(fields[1]), Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {q for q, pp in parent.items() if pp in frontier} - found
    return {q: cmd[q].split(b"\0")[0].decode(errors="replace") for q in found - {root} if q in cmd}


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_double_ctrl_c_on_ray_leaves_no_ray_process_behind(tmp_path, shared_cache):
    """Ctrl-C twice on Flower + Ray: the second exits at once, and every process of the Ray instance the
    run started (workers, agents, raylet, GCS) is gone within 1 s of the exit (before: device workers
    outlived the driver by 5-10 s on this machine, by over 30 s in the issue's measurement)."""
    run_dir = tmp_path / "run"
    job = Running(tmp_path, shared_cache, ["fleet.num_clients=4", "sim.num_rounds=4", "servers.epochs=150",
                                           "sim.plots=false", "sim.progress=false", f"hydra.run.dir={run_dir}"])
    try:
        job.wait_for(r"round\s+1/4\b", timeout=400)
        ray_tree = _descendants(job.p.pid)
        assert any("raylet" in c for c in ray_tree.values()), ray_tree
        job.p.send_signal(signal.SIGINT)
        time.sleep(0.2)
        job.p.send_signal(signal.SIGINT)
        job.p.wait(timeout=30)
        exited = time.monotonic()
        left = dict(ray_tree)
        while left and time.monotonic() < exited + 1:
            time.sleep(0.1)
            left = {q: c for q, c in left.items() if _running(q)}
        out = job.finish(timeout=30)  # (its output pipe stays open while a Ray process holds it)
        assert not left, f"still running 1 s after the driver exited: {left}"
        assert job.p.returncode == 130, out[-3000:]
        assert "second signal: exiting now" in out and "Traceback" not in out
    finally:
        job.kill_group()
        for q in ray_tree if "ray_tree" in locals() else {}:
            try:
                os.kill(q, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---- 8. a slow server does not stall every round (Ray: the delay is real) ------------------------


@pytest.mark.slow
def test_a_slow_server_costs_its_timeout_not_its_delay(tmp_path, shared_cache, ray_local):
    """Server 0 answers after 8 s in every round, the query timeout is 1 s: it counts as down at once
    in every round; the three rounds together take less than one delay (waiting for it: >= 3 x 8 s)."""
    from sim.pipeline import simulate

    delay = 8.0
    c = small_cfg(**{"sim.backend": "ray", "sim.cache_dir": str(shared_cache), "sim.num_rounds": 3,
                     "failures": "slow", "failures.slow.servers": "[0]", "failures.slow.delay_s": delay,
                     "failures.slow.start": 1, "failures.slow.end": 3, "failures.query_timeout_s": 1,
                     "failures.reference": "false"})
    t = time.perf_counter()
    simulate(c, tmp_path / "run")
    wall = time.perf_counter() - t
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["availability"] == [0] for r in records)  # slower than the timeout: down
    assert timing["rounds_s"] < delay, timing
    elapsed = [0.0] + [r["elapsed_s"] for r in records]
    assert max(b - a for a, b in itertools.pairwise(elapsed)) < delay, elapsed
    print(f"slow server: whole run {wall:.1f}s, rounds {timing['rounds_s']:.1f}s, per round {elapsed}")



# ---- 9. the exit status of a stopped run does not depend on where the stop landed ----------------

_STOPPED_INSIDE_PYRUN = '''
import ctypes, signal
from sim import run
from sim.core.stop import SIGNAL, STOP

run_string = ctypes.pythonapi.PyRun_String
run_string.restype = ctypes.py_object
run_string.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
STOP.set()
SIGNAL.append(signal.SIGTERM)
try:  # the stop's KeyboardInterrupt passes through code a C extension runs with PyRun_String
    run_string(b"raise KeyboardInterrupt", 257, {}, {})
except KeyboardInterrupt:
    run._report_and_exit()
'''


def test_a_stop_that_passed_through_c_extension_code_still_exits_143(tmp_path):
    """CPython (gh-128130) remembers a KeyboardInterrupt that passed through ``PyRun_String`` even when
    it was caught, and a ``python -m`` process then kills itself with SIGINT at exit (-2): the stress
    run saw it once (SIGTERM while job #0 of a sweep was starting). The stopped run's exit is 143."""
    (tmp_path / "stopped_inside_pyrun.py").write_text(_STOPPED_INSIDE_PYRUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    r = subprocess.run([sys.executable, "-m", "stopped_inside_pyrun"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])
    assert "interrupted (SIGTERM) before the run started" in r.stderr and "Traceback" not in r.stderr


_STOPPED_WHILE_HYDRA_COMPOSES = '''
import os, signal, sys, time
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from sim import run

compose = ConfigLoaderImpl.load_sweep_config
SENT = []


def stopped_inside(self, *args, **kwargs):
    try:  # SIGTERM to the process group just as job 0 is being composed (once: Hydra composes each job twice)
        if not SENT:
            SENT.append(os.kill(os.getpid(), signal.SIGTERM))
            time.sleep(0.2)
    except KeyboardInterrupt:  # what OmegaConf did with it: a half-made change surfaced as another error
        raise ValueError("'NoneType' object has no attribute '_invalidate_flags_cache'")
    return compose(self, *args, **kwargs)


ConfigLoaderImpl.load_sweep_config = stopped_inside
sys.argv[0] = "sim.run"
run.main()
'''


def test_a_stop_while_hydra_composes_a_job_is_a_clean_143(tmp_path, shared_cache):
    """The stress run's in-process 3-server sweep, SIGTERM just after job 0 launched: the interrupt landed
    inside OmegaConf, which turned it into a config error Hydra printed ("HYDRA_FULL_ERROR") before the
    stop's message. The runner now holds a stop until the job's task starts (sim.engine.hold_stops)."""
    (tmp_path / "stopped_while_composing.py").write_text(_STOPPED_WHILE_HYDRA_COMPOSES)
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "stopped_while_composing", "-m", "seed=0,1", "fleet.num_clients=4",
                        "sim.backend=inprocess", "servers.count=3", "servers.training=mel",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 143, (r.returncode, r.stderr[-2000:])
    assert "_invalidate_flags_cache" not in r.stderr + r.stdout and "HYDRA_FULL_ERROR" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("interrupted (SIGTERM)"), r.stderr[-2000:]
    assert not list((tmp_path / "sweep").glob("*/summary.json"))


# ---- 10. stop signals at random moments, then resume (benchmarks/stress_signals.py, fewer tries) ----


@pytest.mark.slow
def test_signals_at_random_moments_exit_promptly_and_resume_to_the_uninterrupted_summary(tmp_path, shared_cache,
                                                                                           monkeypatch):
    """One try of the stress script (30 tries over every setting in benchmarks/README.md): a
    1-server two-job multirun in-process (where the stress run once found a wrong exit status; the
    Flower+Ray stop is tests/test_resume.py's SIGINT test), stopped at a moment drawn between its start
    and its end: it exits within 30 s with 130/143 (or had finished), leaves no process behind, and its
    printed resume command (or, when nothing was saved, the command again) ends with the
    uninterrupted run's summary.json."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("stress_signals", ROOT / "benchmarks" / "stress_signals.py")
    stress = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "stress_signals", stress)  # its dataclasses look their module up
    spec.loader.exec_module(stress)
    monkeypatch.setenv("L2H_SIM_CACHE", str(shared_cache))
    args = argparse.Namespace(clients=4, rounds=3, exit_timeout=30.0, start_timeout=600.0, keep=False, verbose=True)
    results = stress.stress(1, [stress.Setting("inprocess", 1, True)], args, tmp_path, seed=3)
    assert [r["problem"] for r in results] == [None], results
