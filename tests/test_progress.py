"""Progress on the long phases (sim/progress.py) in both modes -- a terminal gets transient status lines
and the rounds' bar, anything else exactly one line per phase and no control codes -- the sweep's
``job k/N`` line with its estimate, and run.log holding what the console got (sim/runlog.py)."""
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from sim import progress as P
from sim.runlog import FILE, mirrored

ROOT = Path(__file__).parents[1]
ESC = "\x1b["


def consoles():
    """A non-terminal console (a file, a pipe) and a terminal one, each on its own buffer."""
    plain, tty = io.StringIO(), io.StringIO()
    return (Console(file=plain, force_terminal=False, width=100), plain,
            Console(file=tty, force_terminal=True, width=100, color_system="standard"), tty)


def test_off_a_terminal_each_phase_is_one_line_and_nothing_else():
    console, out, _, _ = consoles()
    with P.phase(console, "data", "preparing digits for 10 devices") as status:
        status.update(1, 4)
        status.update(4, 4)
    run = P.RunProgress(console, num_rounds=3, finished=0, enabled=True)
    with run:
        run.phase("engine", "starting Flower on Ray (10 nodes)")
        run.phase("handshake", "every Flower node builds its devices")
        run.rounds_start()
        for _ in range(3):
            run.advance()
    assert out.getvalue().splitlines() == ["data: preparing digits for 10 devices",
                                           "engine: starting Flower on Ray (10 nodes)",
                                           "handshake: every Flower node builds its devices"]
    assert ESC not in out.getvalue()


def test_progress_false_prints_nothing_in_either_mode():
    for console, out in consoles()[:2], consoles()[2:]:
        with P.phase(console, "data", "x", enabled=False) as status:
            status.update(1, 2)
        with P.RunProgress(console, 2, 0, enabled=False) as run:
            run.phase("engine", "y")
            run.rounds_start()
            run.advance()
        assert out.getvalue() == ""


def test_on_a_terminal_phases_are_transient_status_lines_with_their_count():
    _, _, console, out = consoles()
    with P.phase(console, "legacy models", "10 per-device models") as status:
        status.update(3, 10)
        time.sleep(0.3)  # one refresh (8 per second) shows the count
    text = out.getvalue()
    assert "legacy models" in text and "3/10" in text and ESC in text
    assert "\x1b[2K" in text.rsplit("3/10", 1)[1]  # the line is erased when the phase ends (transient)


def test_on_a_terminal_the_rounds_bar_starts_its_clock_with_the_first_round():
    _, _, console, out = consoles()
    run = P.RunProgress(console, num_rounds=4, finished=1, enabled=True)
    with run:
        run.phase("handshake", "every Flower node builds its devices")
        time.sleep(0.3)
        assert not run.rounds.tasks[0].started  # no ETA from Ray's start-up time
        run.rounds_start()
        run.advance()
        time.sleep(0.3)
    text = out.getvalue()
    assert "handshake" in text and "rounds" in text and "2/4" in text
    assert run.rounds.tasks[0].started and run.phases.tasks == []


def test_the_job_line_counts_finished_jobs_on_disk_and_estimates_the_rest(tmp_path):
    for i, name in enumerate(("summary.json", "failed.txt")):
        (tmp_path / f"{i}_seed={i}").mkdir()
        (tmp_path / f"{i}_seed={i}" / name).write_text("{}")
    (tmp_path / "2_seed=2").mkdir()  # running: not counted
    line = P.job_line(2, 6, ["seed=2", "strategy.c_e=0.1"], tmp_path, t0=1000.0, now=1120.0)
    assert line == "job 3/6: seed=2 strategy.c_e=0.1 (2 done in 2:00, eta 4:00)"
    assert P.job_line(0, 6, ["seed=0"], tmp_path / "new", t0=1000.0, now=1005.0) == "job 1/6: seed=0 (started 0:05 ago)"


def test_run_log_gets_what_the_console_printed_without_live_display_codes(tmp_path):
    _, _, console, out = consoles()
    with mirrored(console, tmp_path) as mirror:
        mirror.print("[bold]fleet[/bold]: 4 devices")
        with P.phase(mirror, "data", "preparing digits") as status:
            status.update(1, 2)
            time.sleep(0.2)
        with P.RunProgress(mirror, 2, 0, True) as run:
            run.rounds_start()
            mirror.print("round   1/2  system 0.870")
            run.advance()
        with mirrored(mirror, tmp_path) as same:  # the reference run's own console nests; same file, once
            assert same is mirror
    log = (tmp_path / FILE).read_text().splitlines()
    assert log[0].startswith("--- ") and log[1:] == ["fleet: 4 devices", "round   1/2  system 0.870"]
    assert "fleet" in out.getvalue() and ESC in out.getvalue()


@pytest.mark.slow
def test_a_sweep_off_a_terminal_prints_job_lines_and_one_line_per_phase_and_keeps_each_jobs_output(
        tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "sim.run", "-m", "seed=0,1", "fleet.num_clients=4", "sim.num_rounds=2",
                        "sim.backend=inprocess", "sim.plots=false", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ESC not in r.stdout and "\r" not in r.stdout
    lines = r.stdout.splitlines()
    jobs = [ln for ln in lines if ln.startswith("job ")]
    assert len(jobs) == 2 and jobs[0].startswith("job 1/2: ") and re.match(
        r"job 2/2: .*seed=1.* \(1 done in \d+:\d\d, eta \d+:\d\d\)$", jobs[1]), jobs
    for name in ("data", "legacy models", "engine", "servers", "handshake"):
        assert sum(ln.startswith(f"{name}: ") for ln in lines) == 2, name  # one line per phase per job
    for d in sorted(p for p in sweep.iterdir() if p.is_dir()):
        log = (d / FILE).read_text()
        seed = d.name.split("_")[0]
        assert f"job {int(seed) + 1}/2" in log and "round   2/2" in log and f"results in {d}" in log
        assert "l2h fleet summary" in log and ESC not in log
