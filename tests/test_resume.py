"""Interrupted runs: Ctrl-C keeps every finished round, and a resumed run ends with the same
summary.json, to the last digit, as the same run uninterrupted (SIGTERM's exit status and message:
tests/test_reliability.py)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sim import checkpoint
from sim.core.errors import ConfigError
from sim.results import resume_override
from tests.conftest import small_cfg

pytestmark = pytest.mark.slow  # real runs: the full suite only (README)

# Several servers, MEL, asynchronous rejectors, a crash with recovery from checkpoint and query
# drops: everything that carries state from one round to the next.
ARGS = ["fleet.num_clients=4", "sim.num_rounds=5", "servers.count=2", "servers.training=mel", "strategy.staleness=2",
        "failures=crash_recover", "failures.round=2", "failures.recover_after=1", "failures.query_drop_q=0.1",
        "failures.reference=false"]


CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _cache(shared_cache):
    CACHE[:] = [shared_cache]


def env() -> dict:
    return {**os.environ, "L2H_SIM_CACHE": str(CACHE[0])}


def interrupt(tmp_path: Path, run_dir: Path, args: list[str], sig: int, after_lines: int,
              watch: str = "metrics.jsonl") -> subprocess.CompletedProcess:
    """Start a real run, send ``sig`` once ``run_dir/watch`` has ``after_lines`` rounds, wait for it to exit."""
    p = subprocess.Popen([sys.executable, "-m", "sim.run", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / watch
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines):
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    p.send_signal(sig)
    t = time.monotonic()
    out, err = p.communicate(timeout=120)  # it must exit on its own, promptly
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    done.seconds_to_exit = time.monotonic() - t
    return done


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.run", *args], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)


def resumed(args: list[str], run_dir: Path) -> dict:
    """``python -m sim.run *args sim.resume=run_dir`` in this process: :func:`sim.pipeline.simulate`,
    which the command line calls (its checks before, e.g. the exit status 2 of a refused resume, are
    tested through the command line: the SIGINT test above and the one-line errors below)."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate

    return simulate(compose_checked([*args, f"sim.resume={run_dir}", f"sim.cache_dir={CACHE[0]}"]),
                    run_dir, console=Console(quiet=True))


def rounds_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, _cache):
    """The run uninterrupted, in this process (``simulate`` is what ``python -m sim.run`` calls; the
    command line's own path is what the interrupted and resumed runs below go through)."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate
    from sim.server_app import Federation

    tmp = tmp_path_factory.mktemp("whole")
    save = Federation.save_checkpoint

    def save_and_keep(self, record, final):  # each round's checkpoint, as a stop after that round leaves it
        save(self, record, final)
        SNAPS[int(record["round"])] = (self.inp.run_dir / checkpoint.CHECKPOINT).read_bytes()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Federation, "save_checkpoint", save_and_keep)
        simulate(compose_checked([*ARGS, "sim.backend=inprocess", f"sim.cache_dir={CACHE[0]}"]), tmp / "run",
                 console=Console(quiet=True))
    return tmp / "run"


SNAPS: dict[int, bytes] = {}
"""The uninterrupted run's checkpoint after each round."""


def test_sigint_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    """Interrupted on Ray, resumed in-process (the backend may change on resume) with the command the
    stopped run printed, compared with the run uninterrupted: equality also shows Flower on Ray and
    the in-process backend agree with MEL servers and failures."""
    run_dir = tmp_path / "runs a b" / "run"  # a space: the printed command must be quoted
    r = interrupt(tmp_path, run_dir, ARGS, signal.SIGINT, after_lines=2)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.seconds_to_exit < 30  # no thread left hanging in a Ray call (the engine's stop, sim/engine.py)
    done = checkpoint.finished_round(run_dir)
    assert done is not None and done >= 1
    assert f"interrupted (SIGINT) after round {done}" in r.stderr, r.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    # the finished rounds are on disk as they were
    kept = rounds_without_time(run_dir / "metrics.jsonl")
    assert kept[:done] == rounds_without_time(uninterrupted / "metrics.jsonl")[:done]

    printed = re.search(r"resume with:\n(.+)", r.stderr)
    assert printed, r.stderr[-2000:]
    argv = shlex.split(printed.group(1))
    assert argv == ["python", "-m", "sim.run", *ARGS, resume_override(run_dir)]
    r = cli(tmp_path, *argv[3:], "sim.backend=inprocess")  # the printed command (python: this interpreter)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run_dir} after round {done}" in r.stdout
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())
    assert rounds_without_time(run_dir / "metrics.jsonl") == rounds_without_time(uninterrupted / "metrics.jsonl")


def test_stopped_during_the_reference_run_resumes_from_there(tmp_path, uninterrupted):
    """Ctrl-C while the all-up reference of a failure run is going: the reference resumes, then
    the run with failures runs; its numbers equal the same run made without the reference."""
    args = [a for a in ARGS if a != "failures.reference=false"] + ["sim.backend=inprocess"]
    run_dir = tmp_path / "run"
    r = interrupt(tmp_path, run_dir, args, signal.SIGINT, after_lines=2, watch="reference/metrics.jsonl")
    assert r.returncode == 130 and "during the all-up reference run" in r.stderr, r.stderr[-2000:]
    # the resume in this process (what `python -m sim.run ... sim.resume=DIR` calls; the command line's
    # own resume, as printed, is the SIGINT test's above): what is checked is where it resumes from
    resumed(args, run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    base = json.loads((uninterrupted / "summary.json").read_text())
    skip = ("resilience", "config")  # the config differs in failures.reference only
    assert {k: v for k, v in s.items() if k not in skip} == {k: v for k, v in base.items() if k not in skip}
    assert s["config"]["failures"]["reference"] and not base["config"]["failures"]["reference"]
    s["config"]["failures"]["reference"] = False
    assert s["config"] == base["config"]
    assert s["resilience"]["same_test_samples"] and s["resilience"]["fraction_kept"] is not None


def test_resuming_with_another_config_or_without_a_checkpoint_is_a_one_line_error(tmp_path, uninterrupted):
    before = {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file()}
    r = cli(tmp_path, *ARGS, "strategy.c_e=0.3", f"sim.resume={uninterrupted}")
    assert r.returncode == 2 and "was run with a different config: strategy.c_e" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # nothing in the run directory was touched (not even Hydra's record of its config)
    assert {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file()} == before
    r = cli(tmp_path, "-m", "seed=0,1", f"sim.resume={uninterrupted}")
    assert r.returncode == 2 and "one run" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(tmp_path, "fleet.num_clients=4", f"sim.resume={empty}")
    assert r.returncode == 2 and "no checkpoint in" in r.stderr


def test_resuming_a_finished_run_leaves_it_as_it_is(tmp_path, uninterrupted):
    before = (uninterrupted / "summary.json").read_text()
    from sim.run import simulate

    cfg = small_cfg(**{a.split("=")[0]: a.split("=", 1)[1] for a in ARGS}, **{"sim.resume": str(uninterrupted)})
    assert simulate(cfg, tmp_path / "unused") == json.loads(before)
    assert (uninterrupted / "summary.json").read_text() == before


def test_corrupt_or_truncated_checkpoint_is_refused_not_used(tmp_path):
    checkpoint.save(tmp_path, {"a/x": np.arange(100.0)}, {"round": 3, "config": {}})
    arrays, meta = checkpoint.load(tmp_path)
    assert meta["round"] == 3 and np.array_equal(arrays["a/x"], np.arange(100.0))
    path = tmp_path / checkpoint.CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path)
    assert checkpoint.finished_round(tmp_path) is None
    with pytest.raises(ConfigError, match="unreadable"):
        checkpoint.open_for_resume(small_cfg(), tmp_path)


def test_device_states_are_stacked_per_shape_and_unstacked_exactly(tmp_path):
    """Checkpoints keep a thousand devices' rejectors as a few stacked arrays (one per shape group)."""
    from sim.core.arrays import stack_states, unstack_states

    rng = np.random.default_rng(0)
    states = {d: {"w": rng.normal(size=(3, 4 if d % 2 else 6)).astype(np.float32), "b": rng.normal(size=3)}
              for d in (0, 3, 4, 7, 9)}
    stacked = stack_states(states, "rejectors")
    assert len(stacked) == 2 * 3  # two shape groups: devices, w, b each
    checkpoint.save(tmp_path, stacked, {"round": 1})
    arrays, _ = checkpoint.load(tmp_path)
    back = unstack_states(arrays, "rejectors")
    assert sorted(back) == sorted(states)
    for d, st in states.items():
        assert back[d].keys() == st.keys()
        for k in st:
            assert back[d][k].dtype == st[k].dtype and np.array_equal(back[d][k], st[k])
    assert unstack_states({}, "rejectors") == {}


CROSSFIT_ARGS = ["fleet.num_clients=4", "sim.num_rounds=5", "servers.count=2", "strategy.server_labels=crossfit",
                 "strategy.crossfit_folds=2", "strategy.staleness=2", "failures=crash_recover", "failures.round=2",
                 "failures.recover_after=1", "failures.reference=false", "sim.backend=inprocess"]
"""Cross-fitted labels: each server's fold copies (weights, Adam states) carry over rounds, into the
stale copy devices train against and into the crash-recover checkpoint."""


def test_a_crossfit_run_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.pipeline import simulate

    whole = tmp_path / "whole"
    simulate(compose_checked([*CROSSFIT_ARGS, f"sim.cache_dir={CACHE[0]}"]), whole, console=Console(quiet=True))
    run_dir = tmp_path / "run"
    r = interrupt(tmp_path, run_dir, CROSSFIT_ARGS, signal.SIGINT, after_lines=2)
    assert r.returncode == 130, r.stderr[-2000:]
    done = checkpoint.finished_round(run_dir)
    assert done is not None and 1 <= done < 4  # a later round still refreshes the copy devices train against
    arrays, _ = checkpoint.load(run_dir)
    assert any("/fold1/opt/" in k for k in arrays) and any(k.startswith("strategy/stale/fold1:s1.") for k in arrays)
    resumed(CROSSFIT_ARGS, run_dir)  # in this process, as the test above resumes
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert rounds_without_time(run_dir / "metrics.jsonl") == rounds_without_time(whole / "metrics.jsonl")


# ---- metrics.jsonl against the checkpoint (sim/journal.py) ------------------------------------------

STOPPED_AFTER = 3
DAMAGES = {
    "as a stop leaves it": lambda lines: lines[:STOPPED_AFTER] + [lines[STOPPED_AFTER]],  # the abandoned round's
    "deleted": None,
    "empty": lambda lines: [],
    "last line cut in half": lambda lines: lines[:STOPPED_AFTER - 1] + [lines[STOPPED_AFTER - 1][:300]],
    "garbage line appended": lambda lines: lines[:STOPPED_AFTER] + ["garbage {\n"],
    "last line duplicated": lambda lines: lines[:STOPPED_AFTER] + [lines[STOPPED_AFTER - 1]],
    "a round edited": lambda lines: [lines[0].replace('"round": 1', '"round": 1, "x": 1')] + lines[1:STOPPED_AFTER],
}


def stopped_copy(uninterrupted: Path, dst: Path, damage) -> Path:
    """The uninterrupted run as a stop after round STOPPED_AFTER leaves it, its metrics.jsonl then damaged."""
    import shutil

    shutil.copytree(uninterrupted, dst)
    (dst / checkpoint.CHECKPOINT).write_bytes(SNAPS[STOPPED_AFTER])
    for name in ("summary.json", "clients.csv", "timing.json"):
        (dst / name).unlink()
    lines = (uninterrupted / "metrics.jsonl").read_text().splitlines(keepends=True)
    if damage is None:
        (dst / "metrics.jsonl").unlink()
    else:
        (dst / "metrics.jsonl").write_text("".join(damage(lines)))
    return dst


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_resume_repairs_metrics_jsonl_from_the_checkpoint_and_ends_as_the_uninterrupted_run(
        tmp_path, uninterrupted, damage):
    """metrics.jsonl deleted, emptied, cut, with garbage or a duplicate: the resume says it rewrites
    the file from the checkpoint's copy of rounds 1-3 and ends with the uninterrupted run's summary.json
    and per-round records (before: 2, 3 or 5 lines, a different summary, exit 0)."""
    import io

    from rich.console import Console

    from sim.pipeline import simulate

    d = stopped_copy(uninterrupted, tmp_path / "run", DAMAGES[damage])
    out = io.StringIO()
    cfg = small_cfg(**{a.split("=")[0]: a.split("=", 1)[1] for a in ARGS}, **{
        "sim.resume": str(d), "sim.backend": "inprocess", "sim.cache_dir": str(CACHE[0])})
    simulate(cfg, tmp_path / "unused", console=Console(file=out, width=400))
    printed = out.getvalue()
    assert f"resuming {d} after round {STOPPED_AFTER} of 5" in printed
    assert json.loads((d / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())
    assert rounds_without_time(d / "metrics.jsonl") == rounds_without_time(uninterrupted / "metrics.jsonl")
    note = [ln for ln in printed.splitlines() if "did not match the checkpoint" in ln]
    assert len(note) == (0 if damage == "as a stop leaves it" else 1), printed
    head = (uninterrupted / "metrics.jsonl").read_text().splitlines(keepends=True)[:STOPPED_AFTER]
    assert (d / "metrics.jsonl").read_text().startswith("".join(head))  # rounds 1-3 byte for byte


def without_journal(d: Path) -> None:
    """Make ``d``'s checkpoint one written before checkpoints kept metrics.jsonl."""
    from sim.journal import JOURNAL

    arrays, meta = checkpoint.load(d)
    assert JOURNAL in arrays
    checkpoint.save(d, {k: v for k, v in arrays.items() if k != JOURNAL}, meta)


@pytest.mark.parametrize("damage,refused", [("deleted", "lacks the record of round 1"),
                                            ("last line cut in half", "lacks the record of round 3"),
                                            ("last line duplicated", None), ("garbage line appended", None),
                                            ("as a stop leaves it", None)])
def test_an_older_checkpoint_resumes_what_the_file_proves_and_refuses_what_it_lacks(
        tmp_path, uninterrupted, damage, refused):
    """A checkpoint from before the journal: rounds 1-3 must be in the file once each (duplicates and
    garbage dropped, with the note); a missing one is refused in one line, before anything is written."""
    from sim import journal

    d = stopped_copy(uninterrupted, tmp_path / "run", DAMAGES[damage])
    without_journal(d)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    cfg = small_cfg(**{a.split("=")[0]: a.split("=", 1)[1] for a in ARGS}, **{"sim.resume": str(d)})
    if refused:
        with pytest.raises(ConfigError, match=refused) as err:
            checkpoint.open_for_resume(cfg, d)
        assert "\n" not in str(err.value) and "start the run again" in str(err.value)
        r = cli(tmp_path, *ARGS, "sim.backend=inprocess", f"sim.resume={d}")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and refused in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1
        assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
        return
    proven = journal.proven(d, None, STOPPED_AFTER)
    head = (uninterrupted / "metrics.jsonl").read_text().splitlines(keepends=True)[:STOPPED_AFTER]
    assert proven.text == "".join(head)
    assert (proven.problem is None) == (damage == "as a stop leaves it")


def test_a_damaged_journal_in_the_checkpoint_is_refused(tmp_path, uninterrupted):
    from sim.journal import JOURNAL

    d = stopped_copy(uninterrupted, tmp_path / "run", DAMAGES["as a stop leaves it"])
    arrays, meta = checkpoint.load(d)
    arrays[JOURNAL] = arrays[JOURNAL][:-100]
    checkpoint.save(d, arrays, meta)
    cfg = small_cfg(**{a.split("=")[0]: a.split("=", 1)[1] for a in ARGS}, **{"sim.resume": str(d)})
    with pytest.raises(ConfigError, match="checkpoint in .* is damaged") as err:
        checkpoint.open_for_resume(cfg, d)
    assert "\n" not in str(err.value)
