"""``python -m sim.run``: simulate a fleet of legacy devices and helper servers (Hydra entry point).

Examples:
    python -m sim.run                                   # digits, default fleet, L2H, 1 server
    python -m sim.run fleet.num_clients=20 sim.num_rounds=15 strategy.c_e=0.2
    python -m sim.run -m strategy.c_e=0,0.1,0.3          # Hydra multirun (sweep)
    python -m sim.run -m seed=0,1,2,3 sim.sweep_parallel=2   # two jobs at a time (sim/sweep.py)

The run itself is :func:`sim.pipeline.simulate`. Outputs go to the Hydra run directory (``outputs/DATE/TIME`` or ``multirun/DATE/TIME/N_...``):
metrics.jsonl, summary.json, clients.csv, rounds.png, accuracy_vs_defer_rate.png, devices.png.

Stopping: SIGINT and SIGTERM are handled from the moment this module runs (before any import of
Ray): the run stops, says what is saved and the (shell-quoted) command that resumes it, and exits
130 / 143. A stop that cannot finish in :data:`EXIT_TIMEOUT_S` seconds (a thread stuck in Ray, ...)
ends the process anyway, with the same message and code, after killing the Ray instance it started.
"""
from __future__ import annotations

import signal as _signal
import threading as _threading

from sim.core.stop import SIGNAL as _SIGNAL
from sim.core.stop import STOP as _STOP


def _early_signal(signum: int, frame: object) -> None:
    """A stop signal while the program is still importing: remembered, acted on in :func:`main`."""
    _STOP.set()
    _SIGNAL.append(signum)


if __name__ == "__main__" and _threading.current_thread() is _threading.main_thread():
    _signal.signal(_signal.SIGINT, _early_signal)
    _signal.signal(_signal.SIGTERM, _early_signal)

import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from rich.console import Console  # noqa: E402

from sim.cli import precheck  # noqa: E402
from sim.core.config import register, to_config  # noqa: E402
from sim.core.errors import ConfigError  # noqa: E402
from sim.core.stop import exit_code, signal_name  # noqa: E402
from sim.pipeline import simulate  # noqa: E402
from sim.runlog import mirrored  # noqa: E402
from sim.results import claim, path_override, resume_override  # noqa: E402
from sim.sweep import FAILED, SWEEP, record_failure  # noqa: E402

register()

__all__ = ["main", "simulate"]

EXIT_TIMEOUT_S = float(os.environ.get("L2H_SIM_EXIT_TIMEOUT_S", "20"))
"""After a stop signal the process ends within this many seconds, whatever is still running."""

_CURRENT: dict[str, Any] = {}
"""The job running now: ``run_dir``, ``overrides`` (its own), ``multirun``, ``config_name``, ``checkpoint`` (sim.checkpoint)."""
_EXITING = _threading.Lock()


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def _hydra_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sim import engine

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    _CURRENT.clear()
    _CURRENT.update(overrides=list(hc.overrides.task), multirun=multirun, config_name=hc.job.config_name)
    try:
        return _run_job(cfg, hc, multirun)
    finally:
        if multirun:
            engine.hold_stops()  # Hydra composes the next job's config: a stop waits for its task (main)


def _run_job(cfg: DictConfig, hc: Any, multirun: bool) -> float | None:
    """One job of :func:`_hydra_task`: its config checked, its directory claimed, the simulation run;
    a one-line error reported (and, in a sweep, kept in the job's directory)."""
    from sim import engine
    from sim.engine import EngineError

    engine.release_stops()  # Hydra is done composing: a stop that came meanwhile is raised here
    try:
        config = to_config(cfg)
        resume = bool(config.sim.resume)
        run_dir = Path(os.path.expanduser(str(config.sim.resume))) if resume else Path(hc.runtime.output_dir)
        _CURRENT["run_dir"] = run_dir
        _CURRENT["checkpoint"] = bool(config.sim.checkpoint)
        with claim(run_dir, new=not resume, key="sim.resume" if resume else "hydra.run.dir"):
            if not resume:
                save_hydra_record(run_dir, cfg)
            with mirrored(Console(), run_dir) as console:  # run.log: what the console got (sim/runlog.py)
                if multirun and config.sim.progress:
                    say_job(console, hc)
                summary = simulate(config, run_dir, console)
    except (ConfigError, EngineError) as exc:
        text = failure_text(exc, _CURRENT.get("run_dir"))
        if _CURRENT.get("run_dir") is not None and Path(_CURRENT["run_dir"]).is_dir():
            from sim.runlog import append_line

            append_line(_CURRENT["run_dir"], f"error: {text}")  # run.log has what the console got (sim/runlog.py)
        if not multirun:
            print(f"error: {text}", file=sys.stderr)
            sys.exit(2)
        # The sweep goes on. The failure is kept in the job's directory too: a parallel sweep's jobs run
        # in other processes, and :class:`sim.sweep.RaySweepSession` gathers them all at the sweep's end.
        message = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {text}"
        FAILED.append(message)
        record_failure(Path(hc.runtime.output_dir), message)
        return None
    return float(summary["system_accuracy"])


def say_job(console: Any, hc: Any) -> None:
    """A sweep's job as it starts: ``job k/N: <overrides> (d done in MM:SS, eta MM:SS)`` (:mod:`sim.progress`)."""
    from sim.progress import job_line, sweep_context

    total, t0 = sweep_context()
    console.print(job_line(int(hc.job.num), total or int(hc.job.num) + 1, list(hc.overrides.task),
                           Path(str(hc.sweep.dir)), t0), soft_wrap=True, highlight=False)


def failure_text(exc: BaseException, run_dir: Path | None) -> str:
    """The one line for a job that failed with ``exc``; a full disk (:class:`sim.core.storage.OutOfSpace`)
    or a dead Ray node (:class:`sim.engine.NodeLost`) also says what of the run is saved and the command
    that goes on from there (:func:`saved_and_next`)."""
    from sim.core.storage import OutOfSpace
    from sim.engine import NodeLost

    if not isinstance(exc, (OutOfSpace, NodeLost)) or run_dir is None:
        return str(exc)
    try:
        what, then = saved_and_next(Path(run_dir))
    except Exception:  # noqa: BLE001 -- the failure itself is the message
        return str(exc)
    return f"{exc}; the run stopped {what}; then {then.replace(chr(10) + '  ', ' ')}"


def save_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Write Hydra's record of a new run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``),
    as Hydra would, but only once the directory is known to hold no other run's results: Hydra's own
    writing is switched off (``hydra.output_subdir=null``, added by :func:`main`), so a refused run or
    a resume never rewrites another run's record.

    Call it with the directory claimed (:func:`sim.results.claim`).
    """
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    from sim.core.cache import atomic_write_text

    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    for node in (hydra_cfg, hydra_cfg.hydra, hydra_cfg.hydra.overrides):
        OmegaConf.set_readonly(node, False)
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = ".hydra"
        hydra_cfg.hydra.overrides.hydra = [o for o in hydra_cfg.hydra.overrides.hydra if o not in _INJECTED]
    record = run_dir / ".hydra"
    atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


_INJECTED = ("hydra.output_subdir=null",)
"""Overrides :func:`main` adds for Hydra (left out of the ``.hydra/hydra.yaml`` record)."""


def resume_command(run_dir: Path) -> str:
    """The command that continues the job running now, shell-quoted: its own overrides (in a
    multirun, this job's values, not the sweep), its config name if not the default, ``sim.resume``."""
    return _job_command(resume_override(run_dir))


def start_command(run_dir: Path) -> str:
    """The command that starts the job running now again in ``run_dir`` (a :func:`sim.results.dead_end`:
    nothing to resume), shell-quoted: as :func:`resume_command`, with ``hydra.run.dir`` instead of ``sim.resume``."""
    return _job_command(path_override("hydra.run.dir", run_dir))


def _job_command(where: str) -> str:
    args = [a for a in _CURRENT.get("overrides", []) if not a.lstrip("+~").startswith(("sim.resume=", "hydra."))]
    name = _CURRENT.get("config_name")
    flags = ["--config-name", name] if name and name != "config" else []
    return " ".join(shlex.quote(a) for a in ["python", "-m", "sim.run", *flags, *args, where])


def _interrupted_message() -> str:
    """What to tell the user after Ctrl-C / SIGTERM: what is saved and the command that resumes."""
    name = signal_name()
    run_dir = _CURRENT.get("run_dir")
    if SWEEP.get("parallel", 1) > 1:
        return (f"interrupted ({name}) during a sweep running {SWEEP['parallel']} jobs at once: the jobs still "
                f"running were stopped and later jobs did not run; each job's finished rounds are saved in its "
                f"directory under {SWEEP['dir']} (resume one with `python -m sim.run <its overrides> "
                "sim.resume=<its directory>`)")
    if run_dir is None:
        return f"interrupted ({name}) before the run started"
    rest = "; this sweep's later jobs did not run" if _CURRENT.get("multirun") else ""
    what, then = saved_and_next(run_dir)
    return f"interrupted ({name}) {what}{rest}; {then}"


def saved_and_next(run_dir: Path) -> tuple[str, str]:
    """What a stopped job left in ``run_dir``, and how to go on from there: the resume command, or --
    nothing to resume (:func:`sim.results.dead_end`) -- the command that starts it again there.

    Returns:
        ``(what, then)``, e.g. ``("after round 4: rounds 1-4 are saved in ...", "resume with:\\n  python -m ...")``.
    """
    from sim.checkpoint import finished_round

    done = finished_round(run_dir)
    if done is not None:
        return (f"after round {done}: rounds 1-{done} are saved in {run_dir} (metrics.jsonl, checkpoint.npz)",
                f"resume with:\n  {resume_command(run_dir)}")
    ref_dir = run_dir / "reference"
    if (ref_dir / "summary.json").is_file():
        return (f"after the all-up reference run, before the run with failures checkpointed a round (the reference "
                f"is saved in {ref_dir})", f"resume with:\n  {resume_command(run_dir)}")
    ref = finished_round(ref_dir)
    if ref is not None:
        return (f"during the all-up reference run, after its round {ref} (saved in {ref_dir})",
                f"resume with:\n  {resume_command(run_dir)}")
    off = " (sim.checkpoint=false)" if _CURRENT.get("checkpoint") is False else ""
    return (f"before any round was checkpointed{off}: nothing to resume in {run_dir}",
            f"start the run again there with:\n  {start_command(run_dir)}")


def _node_lost(line: str) -> None:
    """:data:`sim.engine.ON_NODE_LOST`: the Ray node under the run died (its raylet or GCS server
    exited, seen by a watcher thread). Print the run's one line -- what died, what is saved, the
    command that resumes (:func:`failure_text`) -- and end the process with 2 at once: Ray's core
    worker would end it with status 1 and no word the next time the driver touched the dead node's
    object store, or disconnected from it. Nothing if a stop is already ending the process (it says
    what is saved)."""
    from sim import engine
    from sim.engine import NodeLost

    if not _EXITING.acquire(blocking=False):
        return
    try:
        text = _node_lost_text(NodeLost(line))
    except Exception:  # noqa: BLE001 -- never let the message stop the exit
        text = line
    try:
        sys.stdout.flush()
        sys.stderr.write(f"error: {text}\n")  # one write: the line whole, or (Ray ending the process first) none
        sys.stderr.flush()
    finally:
        engine.abandon_ray()
        os._exit(2)


def _node_lost_text(exc: BaseException) -> str:
    """The one line of :func:`_node_lost` for the job (or the sweep) running now."""
    if SWEEP.get("parallel", 1) > 1:
        return (f"{exc}; the sweep's running jobs died with it and its later jobs did not run; each job's finished "
                f"rounds are saved in its directory under {SWEEP['dir']} (resume one with `python -m sim.run <its "
                "overrides> sim.resume=<its directory>`)")
    text = failure_text(exc, _CURRENT.get("run_dir"))
    return text + ("; this sweep's later jobs did not run" if _CURRENT.get("multirun") else "")


def _report_and_exit(note: str = "") -> None:
    """Print the interruption message (once per process) and end the process with 130 / 143."""
    if not _EXITING.acquire(blocking=False):
        while True:  # the other path (main thread or watchdog) is ending the process
            time.sleep(1.0)
    try:
        message = _interrupted_message()
    except Exception:  # noqa: BLE001 -- never let the message stop the exit
        message = f"interrupted ({signal_name()})"
    print(message + note, file=sys.stderr, flush=True)
    _leave(exit_code())


def _leave(code: int) -> None:
    """End the process with ``code``: normally (``sys.exit``) when the run was not stopped and nothing
    is left running; else at once (``os._exit``), after stopping the Ray instance this process started
    -- a thread stuck in a Ray call would otherwise keep the interpreter from exiting.

    A stopped run always ends with ``os._exit``: CPython (3.11-3.13, gh-128130) keeps a process-wide
    "unhandled KeyboardInterrupt" flag that code run through ``PyRun_String`` (C extensions do) sets
    when the stop's KeyboardInterrupt passes through it, even though this module then catches it; a
    ``python -m`` process whose flag is set kills itself with SIGINT at exit, so ``sys.exit(143)``
    would end as "killed by SIGINT" (-2) instead of 143. Every result file is already written
    atomically; only third-party exit hooks are skipped (logging is flushed first).
    """
    import logging

    from sim import engine

    sys.stdout.flush()
    sys.stderr.flush()
    main_thread = _threading.current_thread() is _threading.main_thread()
    others = [t for t in _threading.enumerate() if t is not _threading.current_thread() and not t.daemon
              and t.is_alive()]
    if main_thread and not others and not engine.STUCK and not _ray_up() and not _STOP.is_set():
        sys.exit(code)
    if "ray" in sys.modules:
        engine.kill_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _watchdog() -> None:
    """Started by the first stop signal: if the process is still here after :data:`EXIT_TIMEOUT_S`,
    end it (what is saved stays saved: every result file is written atomically)."""
    def wait_then_exit() -> None:
        time.sleep(EXIT_TIMEOUT_S)
        _report_and_exit(f"\n(the run did not stop within {EXIT_TIMEOUT_S:g}s; exiting without waiting for it)")

    _threading.Thread(target=wait_then_exit, name="l2h-exit-watchdog", daemon=True).start()


def _insist() -> None:
    """A second stop signal: exit now (in a helper thread; the handler returns at once)."""
    _threading.Thread(target=_report_and_exit, args=("\n(second signal: exiting now)",), name="l2h-exit-now",
                      daemon=True).start()


def check_command_line(argv: list[str]) -> int:
    """Refuse a bad command line before Hydra starts: every job's config (:func:`sim.cli.precheck`),
    ``--config-name``, an explicit ``hydra.run.dir`` / ``hydra.sweep.dir`` that cannot be used, and a
    ``sim.resume`` directory that cannot be written.

    Returns:
        How many jobs of the sweep run at once (``sim.sweep_parallel``; 1 without ``-m``).

    Raises:
        ConfigError: one line.
    """
    name = _flag(argv, ("--config-name", "-cn"))
    if name is not None and _flag(argv, ("--config-path", "-cp", "--config-dir", "-cd")) is None:
        from importlib.resources import files

        available = sorted(p.name[:-5] for p in files("configs").iterdir() if p.name.endswith(".yaml"))
        if name not in available and f"{name}.yaml" not in available and name.removesuffix(".yaml") not in available:
            raise ConfigError(f"--config-name {name}: no such primary config (available: {', '.join(available)}); "
                              "leave the flag out to use config")
    multirun = "-m" in argv or "--multirun" in argv
    if multirun and any(a in ("--cfg", "-c", "--info", "-i") or a.startswith(("--cfg=", "--info=")) for a in argv):
        raise ConfigError("--cfg/--info show one job's config: leave out -m (give one value per key) to see it")
    parallel = precheck(argv)
    resume = [_override_value(a) for a in argv if a.startswith("sim.resume=")]
    if resume and not multirun:  # Hydra's job log goes there first: an unwritable one is a traceback otherwise
        from sim.results import check_run_dir

        check_run_dir(Path(resume[-1]), key="sim.resume", new=False)
    for a in argv:
        key, _, value = a.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir"):
            value = _override_value(a)  # Hydra's quoting removed: 'dir,with=chars' is the path dir,with=chars
        if key == "hydra.run.dir" and not multirun and not any(b.startswith("sim.resume=") for b in argv):
            from sim.results import check_run_dir

            check_run_dir(Path(value))
        elif key == "hydra.sweep.dir" and multirun and (Path(os.path.expanduser(value)) / "multirun.yaml").exists():
            raise ConfigError(f"hydra.sweep.dir={value} already holds a sweep (multirun.yaml): give a new directory")
    return parallel


def _override_value(override: str) -> str:
    """The value of one ``key=value`` override as Hydra parses it (quotes removed); the raw text
    after ``=`` when Hydra cannot parse it (Hydra then reports the override itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return str(OverridesParser.create().parse_override(override).value())
    except HydraException:
        return override.partition("=")[2]


def _flag(argv: list[str], names: tuple[str, ...]) -> str | None:
    """The value of a command-line flag (``--flag value`` or ``--flag=value``), or None."""
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            return argv[i + 1]
        head, eq, value = a.partition("=")
        if eq and head in names:
            return value
    return None


def _hydra_argv(argv: list[str], parallel: int = 1) -> list[str]:
    """The command line Hydra gets: a resume writes into its own directory, Hydra does not write its
    ``.hydra`` record itself (:func:`save_hydra_record` does, for new runs only), and a sweep of
    ``parallel`` > 1 jobs at once runs on Hydra's joblib launcher (``hydra-joblib-launcher``: one
    process per running job, ``n_jobs=parallel``)."""
    extra = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={parallel}"] if parallel > 1 else []
    resume = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("sim.resume=")]
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv[1:]):
        extra.append(f"hydra.run.dir={resume[-1]}")
    if not any(a.startswith("hydra.output_subdir=") for a in argv[1:]):
        extra.extend(_INJECTED)
    # Hydra's argparse takes the overrides as one run of positionals: the extras go right before the
    # first override (after flags such as -m), so a flag after the overrides (`--cfg job`) still parses.
    at = next((i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")), len(argv))
    return argv[:at] + extra + argv[at:]


def main() -> None:
    """Console entry: stop handling first, then the whole command line's checks, then Hydra."""
    from sim import engine

    engine.install_signal_handlers()
    engine.ON_FIRST_SIGNAL.append(_watchdog)
    engine.ON_REPEATED_SIGNAL.append(_insist)
    engine.ON_NODE_LOST.append(_node_lost)
    engine.hold_stops()  # until a job's task starts (:func:`_run_job`): a stop then ends the run cleanly
    argv, code = sys.argv, 0
    try:
        if _STOP.is_set():  # a signal came while the program was importing
            _watchdog()
            raise KeyboardInterrupt
        parallel = check_command_line(argv[1:])
        if "-m" in argv[1:] or "--multirun" in argv[1:]:  # the sweep's "job k/N" lines (sim/progress.py)
            from sim.cli import LAST_CHECK
            from sim.progress import JOBS_ENV, T0_ENV

            os.environ[JOBS_ENV] = str(LAST_CHECK.get("jobs", 0))
            os.environ[T0_ENV] = repr(time.time())
        sys.argv = _hydra_argv(argv, parallel)
        _hydra_task()
    except KeyboardInterrupt:
        sys.argv = argv
        _report_and_exit()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except SystemExit as exc:
        if _STOP.is_set():
            sys.argv = argv
            _report_and_exit()
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.argv = argv
    if _STOP.is_set():
        _report_and_exit()
    if FAILED and code == 0:
        print(f"error: {len(FAILED)} job(s) of the sweep failed, the others finished; first: {FAILED[0]}",
              file=sys.stderr)
        code = 2
    _leave(code)


if __name__ == "__main__":
    main()
