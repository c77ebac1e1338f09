"""Stop signals under repetition: does ``python -m sim.run`` (Flower on Ray) always end promptly?

Each try starts ``python -m sim.run fleet.num_clients=4 sim.num_rounds=3`` (Ray backend) in its own
process group, waits for the line of round 1, sends a stop signal and measures how long the
process takes to exit. Tries alternate SIGINT / SIGTERM; every other pair sends the signal to the
whole process group (as Ctrl-C in a terminal does, Ray's own processes included) instead of the
main process alone. A try is *clean* when the process exits within ``--exit-timeout`` seconds with
130 (SIGINT) / 143 (SIGTERM), prints the command that resumes it, shows no traceback, and leaves no
process of its group behind; whatever is left is killed (SIGKILL to the group) before the next try.

Usage:
    python benchmarks/stress_signals.py --runs 30      # ~1 minute a try on a busy 2-core machine
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXPECTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


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


def one_try(work: Path, i: int, sig: int, to_group: bool, args: argparse.Namespace) -> dict:
    run_dir = work / f"try{i:03d}"
    cmd = [sys.executable, "-m", "sim.run", f"fleet.num_clients={args.clients}", f"sim.num_rounds={args.rounds}",
           f"hydra.run.dir={run_dir}"]
    p = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines: queue.Queue = queue.Queue()
    out: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    result = {"code": None, "seconds": None, "problem": None}
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:  # until round 1's line
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                result["problem"] = f"no round 1 within {args.start_timeout:g}s"
                return result
            if line is None:
                result["problem"] = f"exited ({p.wait()}) before round 1"
                return result
            out.append(line)
            if re.search(rf"round\s+1/{args.rounds}\b", line):
                break
        t = time.monotonic()
        if to_group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
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
        if p.returncode != EXPECTED[sig]:
            result["problem"] = f"exit code {p.returncode}, expected {EXPECTED[sig]}"
        elif "resume with:" not in text and "nothing to resume" not in text:
            result["problem"] = "no resume command printed"
        elif "Traceback" in text:
            result["problem"] = "traceback in the output"
        elif left := group_alive(p.pid):
            result["problem"] = f"{len(left)} process(es) of its group left running"
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
            shutil.rmtree(run_dir, ignore_errors=True)


def _next(lines: queue.Queue, deadline: float) -> str | None:
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="tries (default 30)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exit-timeout", type=float, default=30.0, help="seconds a stopped run may take to exit")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for round 1")
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' directories")
    ap.add_argument("--verbose", action="store_true", help="print the output of a try that was not clean")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stress-signals-"))
    work.mkdir(parents=True, exist_ok=True)
    clean, seconds = 0, []
    for i in range(args.runs):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        to_group = (i // 2) % 2 == 1
        r = one_try(work, i, sig, to_group, args)
        ok = r["problem"] is None
        clean += ok
        if r["seconds"] is not None:
            seconds.append(r["seconds"])
        took = f"{r['seconds']:5.1f}s" if r["seconds"] is not None else "    -"
        print(f"try {i + 1:>3}/{args.runs}  {signal.Signals(sig).name:<7} to {'group  ' if to_group else 'process'}  "
              f"exit {r['code'] if r['code'] is not None else '-':>4}  after {took}  "
              f"{'clean' if ok else 'NOT CLEAN: ' + r['problem']}", flush=True)
    median = f"{statistics.median(seconds):.1f}" if seconds else "-"
    print(f"exited cleanly: {clean}/{args.runs}, median exit s: {median}")
    if args.workdir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
