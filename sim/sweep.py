"""One Ray session for a whole sweep (``python -m sim.run -m ...``): a Hydra callback.

Hydra's basic launcher runs a sweep's jobs one after another in this process. Without this callback
every Flower-on-Ray job starts a private Ray instance and shuts it down again (about 8 s each on two
cores, more than a small job's work). :class:`RaySweepSession` starts Ray once, in
``on_multirun_start``, with the sweep's ``sim.ray_address`` / ``sim.num_cpus`` / ``sim.verbose``; each
job's engine then joins it and leaves it up (:func:`sim.engine.ray_session` stops only a Ray it
started), and ``on_multirun_end`` shuts it down. A job's results do not depend on it: Flower on Ray
adds no arithmetic, and a run that joins a Ray already up gives the same ``summary.json``
(``tests/test_sweep.py``; the golden tests run their Ray cases that way).

The session is not shared -- each job starts its own, as before -- when the sweep has no Ray job for
sure or could need different Ray settings per job: when ``sim.backend``, ``sim.ray_address``,
``sim.num_cpus`` or ``sim.verbose`` is swept (on the command line or in an experiment preset's
``hydra.sweeper.params``), when the sweep's ``sim.backend`` is ``inprocess``, or when
``sim.shared_ray_session=false``.

Hydra does not call ``on_multirun_end`` when a job raised (its basic sweeper re-raises without a
``finally``); :func:`sim.run.main` then ends the process with Ray still up, and stops the instance
started here (:func:`sim.engine.kill_ray`). A stop signal while Ray starts is handled as in a single
run (:func:`sim.engine.init_ray`: the start is not cut short, the stop takes effect after it).

**Jobs at once** (``sim.sweep_parallel=N`` > 1): :func:`sim.run.main` runs the sweep on Hydra's joblib
launcher (``hydra-joblib-launcher``; N worker processes, each running one job at a time). A shared
local Ray started here is handed to them by its address (:data:`sim.engine.SWEEP_RAY_ENV`), and each
job on a Ray it did not start asks for N times ``sim.client_resources`` per device worker
(:data:`sim.engine.SWEEP_JOBS_ENV`, :func:`sim.engine.worker_resources`), so the N jobs' worker pools
together fit the cluster instead of waiting on each other. A job's numbers do not depend on which
process or worker ran it: the same ``summary.json`` as the job alone (``tests/test_sweep.py``).

**Failed jobs**: a job that fails with a one-line error writes it to ``failed.txt`` in its directory
(:func:`record_failure`; a parallel job runs in another process) and the sweep goes on;
``on_multirun_end`` gathers them into :data:`FAILED` and the command exits 2 naming the first.

Reference: Hydra callbacks, https://hydra.cc/docs/experimental/callbacks/ (hydra-core 1.3); the joblib
launcher, https://hydra.cc/docs/plugins/joblib_launcher/.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

RAY_KEYS = ("sim.backend", "sim.ray_address", "sim.num_cpus", "sim.verbose")
"""Keys whose sweeping makes jobs need different Ray sessions (each job then starts its own)."""

SHARED: list[bool] = []
"""Non-empty while a sweep's shared Ray session started by :class:`RaySweepSession` is up."""
SWEEP: dict[str, Any] = {}
"""The sweep running now: ``dir`` (its directory), ``parallel`` (jobs at once)."""
FAILED: list[str] = []
"""The sweep's jobs that failed with a one-line error, in job order (gathered at the sweep's end)."""
FAILED_FILE = "failed.txt"
"""A failed job's one-line error, in its directory."""


def record_failure(job_dir: Path, message: str) -> None:
    """Keep a failed job's one-line ``message`` in ``job_dir``/:data:`FAILED_FILE` (written atomically;
    best effort: a job that failed because its disk is full cannot leave it, and is still reported by
    this process, :data:`FAILED`)."""
    from sim.core.cache import atomic_write_text

    try:
        atomic_write_text(Path(job_dir) / FAILED_FILE, message + "\n")
    except (OSError, ValueError):  # ValueError: OutOfSpace is a ConfigError
        pass


def gather_failures(sweep_dir: Path) -> list[str]:
    """The one-line errors of the failed jobs under ``sweep_dir``, ordered by job number."""
    found = []
    for path in Path(sweep_dir).rglob(FAILED_FILE):
        text = path.read_text().strip()
        num = re.match(r"job (\d+)", text)
        found.append((int(num.group(1)) if num else 1 << 30, text))
    return [text for _, text in sorted(found)]


def swept_keys(config: Any) -> set[str]:
    """The keys a sweep varies: command-line sweep overrides (``k=a,b``, ranges, ...) and the keys of
    ``hydra.sweeper.params`` (experiment presets), without ``+``/``~`` prefixes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
            if o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params is not None:
        keys |= {str(k) for k in OmegaConf.to_container(params, resolve=False)}
    return {k.lstrip("+~") for k in keys}


def should_share(config: Any) -> bool:
    """Whether a sweep with this (multirun) config gets one Ray session (see the module docstring)."""
    sim = config.sim
    if not bool(sim.get("shared_ray_session", True)) or str(sim.backend) != "ray":
        return False
    return not (swept_keys(config) & set(RAY_KEYS))


def stop_job_processes(parallel: int) -> None:
    """Shut down the joblib launcher's worker processes now. joblib keeps them for reuse (loky's
    reusable executor, 300 s idle timeout): left running, the command waited for them at exit, or,
    ending without waiting, left loky's resource tracker to warn about leaked semaphores."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(max_workers=parallel).shutdown(wait=True)


class RaySweepSession(Callback):
    """Hydra callback (``hydra.callbacks.ray_sweep`` in configs/config.yaml): one Ray session per sweep,
    the set-up of a sweep's jobs at once, and its failed jobs gathered at the end (module docstring)."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from sim import engine

        sim = config.sim
        parallel = int(sim.get("sweep_parallel", 1))
        SWEEP.update(dir=str(config.hydra.sweep.dir), parallel=parallel)
        FAILED.clear()
        if parallel > 1:  # read by the jobs' processes, which the launcher starts after this
            os.environ[engine.SWEEP_JOBS_ENV] = str(parallel)
            # The jobs' tasks run in the launcher's processes, so none ends the hold on stop signals
            # (sim.engine.hold_stops) here: this process only waits for them, and a stop interrupts that.
            engine.release_stops()
        if not should_share(config):
            return
        try:
            started = engine.start_ray(sim.ray_address or None, sim.num_cpus or None, bool(sim.verbose))
        except engine.EngineError:
            return  # each job then meets the same error and reports it in one line, as without this
        if started:
            SHARED.append(True)
            if parallel > 1 and not sim.ray_address:  # the jobs' processes join this local instance
                import ray

                os.environ[engine.SWEEP_RAY_ENV] = ray.get_runtime_context().gcs_address

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from sim import engine

        gathered = gather_failures(Path(str(config.hydra.sweep.dir)))  # this process's failures are among them
        FAILED[:] = gathered + [m for m in FAILED if m not in gathered]
        if SWEEP.get("parallel", 1) > 1:
            stop_job_processes(int(SWEEP["parallel"]))
        SWEEP.clear()
        for key in (engine.SWEEP_RAY_ENV, engine.SWEEP_JOBS_ENV):
            os.environ.pop(key, None)
        if SHARED:
            SHARED.clear()
            engine.stop_ray()
