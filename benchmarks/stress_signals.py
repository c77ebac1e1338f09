"""Stop signals at random moments: does ``python -m sim.run`` always end promptly and resume exactly?

Every try picks a setting in turn -- backend (Flower on Ray | in-process) x helper servers (1 | 3,
MEL-trained) x a single run or a two-job multirun (``-m seed=0,1``) -- starts it in its own process
group, and sends SIGINT or SIGTERM (alternating; every other pair to the whole process group, as
Ctrl-C in a terminal does) at a moment drawn uniformly between the start and the end of the same
setting's uninterrupted run, measured first. So the signal lands anywhere: imports, dataset and
fleet build, Ray's start, mid-round, a checkpoint, the summary, between two jobs of a sweep.

A try is *clean* when:

- the process exits within ``--exit-timeout`` seconds with 130 (SIGINT) / 143 (SIGTERM) -- or, when
  the signal came after the run had written its results, 0 or death by that signal (a shell shows
  130 / 143 for both) -- with no traceback and no process of its group left behind (Ray's included);
- it prints the command that resumes it (or, with nothing to resume, the command that starts it again
  in its directory), and that command (or, stopped before it started, the original one) finishes
  the interrupted run with a ``summary.json``
  equal, to the last digit, to the uninterrupted run's; jobs of a sweep that finished before the
  signal are equal too (later jobs are not run: the message says so).

Whatever a try leaves running is killed (SIGKILL to its group) before the next one.

Usage:
    python benchmarks/stress_signals.py --runs 30      # ~1 minute a try on a busy 2-core machine
    python benchmarks/stress_signals.py --runs 8 --settings ray-1-single inprocess-3-multirun
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXPECTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class Setting:
    """One kind of run to interrupt: ``backend`` (ray | inprocess), ``servers`` (1 | 3), ``multirun``."""

    backend: str
    servers: int
    multirun: bool

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.servers}-{'multirun' if self.multirun else 'single'}"

    def args(self, clients: int, rounds: int) -> list[str]:
        a = [f"fleet.num_clients={clients}", f"sim.num_rounds={rounds}", f"sim.backend={self.backend}",
             "sim.plots=false", "sim.progress=false"]
        if self.servers > 1:
            a += [f"servers.count={self.servers}", "servers.training=mel"]
        return (["-m", "seed=0,1"] if self.multirun else []) + a

    def dir_arg(self, where: Path) -> str:
        return f"hydra.sweep.dir={where}" if self.multirun else f"hydra.run.dir={where}"


SETTINGS = [Setting(b, s, m) for b, s, m in itertools.product(("ray", "inprocess"), (1, 3), (False, True))]


def group_alive(pgid: int) -> list[int]:
    """The live processes (zombies excepted: nothing may reap them here) of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            alive.append(int(stat.parent.name))
    return alive


def summaries(where: Path, multirun: bool) -> dict[str, dict]:
    """``{job: summary}`` of the finished jobs under ``where`` (a run dir, or a sweep dir's job dirs)."""
    dirs = sorted(p.parent for p in where.glob("*/summary.json")) if multirun else [where]
    return {d.name.split("_", 1)[0] if multirun else "run": json.loads((d / "summary.json").read_text())
            for d in dirs if (d / "summary.json").is_file()}


def run_to_end(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def reference(setting: Setting, work: Path, env: dict, args: argparse.Namespace) -> tuple[dict, float]:
    """The uninterrupted run of ``setting``: its summaries and its wall time (s)."""
    where = work / f"ref-{setting.name}"
    t = time.monotonic()
    r = run_to_end([sys.executable, "-m", "sim.run", *setting.args(args.clients, args.rounds), setting.dir_arg(where)],
                   work, env, args.start_timeout)
    took = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"the uninterrupted {setting.name} run failed (exit {r.returncode}): {r.stderr[-500:]}")
    return summaries(where, setting.multirun), took


def one_try(work: Path, i: int, setting: Setting, ref: dict, delay: float, sig: int, to_group: bool,
            env: dict, args: argparse.Namespace) -> dict:
    """Start ``setting``, send ``sig`` after ``delay`` seconds, check the exit, resume, compare."""
    where = work / f"try{i:03d}-{setting.name}"
    cmd = [sys.executable, "-m", "sim.run", *setting.args(args.clients, args.rounds), setting.dir_arg(where)]
    p = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines: queue.Queue = queue.Queue()
    out: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    result = {"code": None, "seconds": None, "problem": None, "moment": "", "resumed": False}
    try:
        time.sleep(delay)
        while (line := _next(lines, time.monotonic())) is not None:
            out.append(line)
        result["moment"] = _moment(out)
        t = time.monotonic()
        try:
            os.killpg(p.pid, sig) if to_group else p.send_signal(sig)
        except ProcessLookupError:
            pass  # already gone: it finished before the signal
        try:
            p.wait(timeout=args.exit_timeout)
        except subprocess.TimeoutExpired:
            result["problem"] = f"still running {args.exit_timeout:g}s after the signal"
            return result
        result["code"], result["seconds"] = p.returncode, time.monotonic() - t
        end = time.monotonic() + 10
        while (line := _next(lines, end)) is not None:
            out.append(line)
        text = "".join(out)
        grace = time.monotonic() + 5
        while group_alive(p.pid) and time.monotonic() < grace:
            time.sleep(0.2)
        said = any(m in text for m in ("resume with:", "nothing to resume", "before the run started"))
        done = len(summaries(where, setting.multirun)) == len(ref)
        if p.returncode not in (EXPECTED[sig], -sig, 0):
            result["problem"] = f"exit code {p.returncode}, expected {EXPECTED[sig]}, or 0 if it had finished"
        elif "Traceback" in text:
            result["problem"] = "traceback in the output"
        elif left := group_alive(p.pid):
            result["problem"] = f"{len(left)} process(es) of its group left running"
        elif not said and not done:
            result["problem"] = "stopped unfinished without a resume command or 'nothing to resume'"
        else:
            result["problem"] = finish_and_compare(text, cmd, where, setting, ref, work, env, args, result)
        return result
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        p.stdout.close()
        if result["problem"] and args.verbose:
            print("".join(out[-20:]), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


def finish_and_compare(text: str, cmd: list[str], where: Path, setting: Setting, ref: dict, work: Path, env: dict,
                       args: argparse.Namespace, result: dict) -> str | None:
    """Run the printed resume command (or the original command when nothing was saved), then compare
    every job that has a summary with the uninterrupted run's. Returns the problem, or None."""
    m = re.search(r"(?:resume|start the run again there) with:\n\s+(.+)", text)
    if m:  # the printed command: a resume, or (nothing checkpointed) the job started again in its directory
        again = shlex.split(m.group(1))
        again[0:1] = [sys.executable] if again[0] == "python" else again[0:1]
    elif len(summaries(where, setting.multirun)) < len(ref):
        if where.exists():
            shutil.rmtree(where)  # stopped before the run started: nothing of it is there to keep
        again = cmd
    else:
        again = None
    if again is not None:
        r = run_to_end(again, work, env, args.start_timeout)
        if r.returncode != 0:
            return f"the resume exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}"
        result["resumed"] = True
    got = summaries(where, setting.multirun)
    if not got:
        return "no summary.json after the resume"
    bad = [job for job, s in got.items() if s != ref.get(job)]
    return f"summary.json differs from the uninterrupted run for job(s) {bad}" if bad else None


def _moment(out: list[str]) -> str:
    """Where the run was when the signal went: the last meaningful line it had printed."""
    for line in reversed(out):
        s = line.strip()
        if s and not s.startswith(("│", "┃", "┏", "┗", "┡", "└", "━")):
            return re.sub(r"\s+", " ", s)[:60]
    return "(nothing printed yet)"


def _next(lines: queue.Queue, deadline: float) -> str | None:
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None


def stress(runs: int, settings: list[Setting], args: argparse.Namespace, work: Path, seed: int = 0) -> list[dict]:
    """``runs`` tries over ``settings`` in turn (random moments from ``seed``); one dict per try."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(seed)
    refs = {s: reference(s, work, env, args) for s in settings}
    for s, (_, took) in refs.items():
        print(f"uninterrupted {s.name}: {took:.1f}s", flush=True)
    results = []
    for i in range(runs):
        setting = settings[i % len(settings)]
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        to_group = (i // 2) % 2 == 1
        ref, took = refs[setting]
        delay = rng.uniform(0.0, took)
        r = one_try(work, i, setting, ref, delay, sig, to_group, env, args)
        r.update(setting=setting.name, signal=signal.Signals(sig).name, to_group=to_group, delay=delay)
        results.append(r)
        took_s = f"{r['seconds']:5.1f}s" if r["seconds"] is not None else "    -"
        print(f"try {i + 1:>3}/{runs}  {setting.name:<22} {r['signal']:<7} to {'group  ' if to_group else 'process'} "
              f"at {delay:5.1f}s ({r['moment'][:40]:<40})  exit {r['code'] if r['code'] is not None else '-':>4} "
              f"after {took_s}  {'clean' if r['problem'] is None else 'NOT CLEAN: ' + r['problem']}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="tries (default 30)")
    ap.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS], choices=[s.name for s in SETTINGS])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    ap.add_argument("--exit-timeout", type=float, default=30.0, help="seconds a stopped run may take to exit")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds a whole run may take")
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' directories")
    ap.add_argument("--verbose", action="store_true", help="print the output of a try that was not clean")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stress-signals-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = [s for s in SETTINGS if s.name in args.settings]
    results = stress(args.runs, settings, args, work, args.seed)
    clean = sum(r["problem"] is None for r in results)
    seconds = [r["seconds"] for r in results if r["seconds"] is not None and r["code"] != 0]
    median = f"{statistics.median(seconds):.1f}" if seconds else "-"
    print(f"clean: {clean}/{len(results)} (resumed: {sum(r['resumed'] for r in results)}), "
          f"median exit s after the signal: {median}")
    if args.workdir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if clean == len(results) else 1)


if __name__ == "__main__":
    main()
