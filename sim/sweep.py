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

Reference: Hydra callbacks, https://hydra.cc/docs/experimental/callbacks/ (hydra-core 1.3).
"""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback

RAY_KEYS = ("sim.backend", "sim.ray_address", "sim.num_cpus", "sim.verbose")
"""Keys whose sweeping makes jobs need different Ray sessions (each job then starts its own)."""

SHARED: list[bool] = []
"""Non-empty while a sweep's shared Ray session started by :class:`RaySweepSession` is up."""


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


class RaySweepSession(Callback):
    """Hydra callback (``hydra.callbacks.ray_sweep`` in configs/config.yaml): one Ray session per sweep."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from sim import engine

        if not should_share(config):
            return
        sim = config.sim
        try:
            started = engine.start_ray(sim.ray_address or None, sim.num_cpus or None, bool(sim.verbose))
        except engine.EngineError:
            return  # each job then meets the same error and reports it in one line, as without this
        if started:
            SHARED.append(True)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from sim import engine

        if SHARED:
            SHARED.clear()
            engine.stop_ray()
