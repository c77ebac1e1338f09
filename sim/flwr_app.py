"""``flwr run .``: the fleet simulation as a Flower App, run by Flower's own runtime.

pyproject.toml's ``[tool.flwr.app.components]`` names this module's :data:`app` (the ServerApp of
``flwr run``: it composes the config, then runs :class:`sim.server_app.Federation` as ``python -m
sim.run`` does) and :data:`sim.client_app.app` (the ClientApp, the same one ``python -m sim.run`` runs). Its run config
(``[tool.flwr.app.config]``) has two keys:

- ``overrides``: a Hydra override string, exactly the arguments ``python -m sim.run`` takes
  (``"fleet.num_clients=4 sim.num_rounds=2"``); the ServerApp composes the same typed config
  (:func:`sim.cli.compose_checked`) and runs the same steps (:mod:`sim.pipeline`: prepare, the
  method's strategy driving the server pool, finish) into
- ``run-dir``: the results directory (``summary.json``, ``metrics.jsonl``, ...); empty:
  ``outputs/flwr/DATE/TIME`` under the directory the SuperLink was started from. Give an
  absolute path.

For example::

    flwr run . --stream -c 'overrides="fleet.num_clients=4 sim.num_rounds=2" run-dir="/tmp/run"' \\
        --federation-config "num-supernodes=4 client-resources-num-cpus=1"

What differs from ``python -m sim.run``: Flower's runtime, not this project, starts Ray and the
device workers, so ``sim.ray_address``, ``sim.num_cpus`` and ``sim.client_resources`` do not
apply (the federation config sets the SuperNodes and their resources), and device workers that
die are not restarted (Flower passes no actor options on this path). The number of SuperNodes is
the federation's: the fleet is spread over them (``sim.devices_per_node`` = ceil(devices / nodes);
the numbers a run produces do not depend on it). Flower's Ray backend calls ``ray.init()``
without an address, so Ray joins the cluster ``/tmp/ray/ray_current_cluster`` names, if any (a
``ray start`` head; for minutes, if it has died): set ``RAY_ADDRESS=local`` in the environment of
``flwr run`` for a private instance (``python -m sim.run`` does that itself). Not supported here
(one line, before anything runs): ``sim.resume``, and failures with an all-up reference run
(``failures.reference=true`` needs a second federation; set it false or use ``python -m sim.run``).

A refused config (or any failure) ends the run with Flower's status ``finished:failed``, but
``flwr run`` itself exits 0: Flower 1.42's CLI returns once the run has *started* (``--stream``
only follows its logs) and never reads its final status, and nothing in an App can set the CLI's
exit code. Check it with ``flwr ls --run-id <id> --format json`` (docs/reliability.md).
"""
from __future__ import annotations

import math
import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim.client_app import app as client_app
from sim.core.config import Backend, Config, FailureKind, replace
from sim.core.errors import ConfigError

__all__ = ["app", "client_app", "config_from", "run_app"]

app = ServerApp()
"""The ServerApp component of ``flwr run .``."""

NODES_TIMEOUT_S = 120.0
"""How long the ServerApp waits for the federation's SuperNodes (and Flower's Ray) to come up."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry: compose the config from the run config and run the fleet on ``grid``."""
    run_config = dict(context.run_config)
    run_app(grid, config_from(run_config), run_dir_from(run_config))


def config_from(run_config: dict[str, Any]) -> Config:
    """The typed config for the run config's ``overrides`` (a Hydra override string, shell-quoted).

    Raises:
        ConfigError: one line -- a bad override, or an option ``flwr run`` cannot host.
    """
    from sim.cli import compose_checked

    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
    except ValueError as exc:
        raise ConfigError(f"run config overrides={run_config.get('overrides')!r}: {exc}") from None
    cfg = compose_checked(overrides)
    if cfg.sim.resume:
        raise ConfigError("sim.resume is not supported by `flwr run`: resume with python -m sim.run")
    if cfg.failures.name != FailureKind.none and cfg.failures.reference:
        raise ConfigError("failures with failures.reference=true need a second (all-up) run, which `flwr run` "
                          "cannot host: add failures.reference=false, or use python -m sim.run")
    return cfg


def run_dir_from(run_config: dict[str, Any]) -> Path:
    """The run config's ``run-dir``, or ``outputs/flwr/DATE/TIME`` (relative to the working directory)."""
    given = str(run_config.get("run-dir", "") or "")
    return Path(given).expanduser() if given else Path("outputs/flwr") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def wait_for_nodes(grid: Grid, timeout: float, settle: float = 1.0) -> int:
    """The number of SuperNodes, once it has stayed the same for ``settle`` seconds.

    Flower registers the simulation's nodes while the ServerApp starts, so the first answer may be
    short (or empty).

    Raises:
        RuntimeError: no node registered within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            return count
        time.sleep(0.05)
    if count > 0:
        return count
    raise RuntimeError(f"no SuperNode registered within {timeout:g}s")


def wait_for_ray(timeout: float) -> None:
    """Wait until Flower's simulation runtime has started Ray in this process (the server pool's
    actors live in it). Raises RuntimeError after ``timeout`` seconds."""
    import ray

    deadline = time.monotonic() + timeout
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Flower's Ray runtime did not start within {timeout:g}s")
        time.sleep(0.05)


def run_app(grid: Grid, cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Run the fleet of ``cfg`` on Flower's ``grid`` and write its results into ``run_dir``: the same
    steps as :func:`sim.pipeline.simulate` (prepare, federate, finish) with Flower's runtime as the engine.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        ConfigError / DataError: bad configuration or data (one line).
        RuntimeError: the federation did not come up, or no evaluation round succeeded.
    """
    from rich.console import Console

    from sim import engine
    from sim.pipeline import device_spec, finish, prepare_inputs
    from sim.runlog import mirrored
    from sim.server_app import Federation, Outcome

    nodes = wait_for_nodes(grid, NODES_TIMEOUT_S)
    per_node = math.ceil(cfg.fleet.num_clients / nodes)
    cfg = replace(cfg, sim=replace(cfg.sim, devices_per_node=per_node))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with mirrored(Console(), Path(run_dir)) as console:  # run.log: what the console got (sim/runlog.py)
        inp = prepare_inputs(cfg, Path(run_dir), console, None, 0)
        if cfg.sim.backend == Backend.ray:
            wait_for_ray(NODES_TIMEOUT_S)
        fed = Federation(inp, device_spec(inp, per_node), engine.check_node)
        with fed.progress:
            fed.main(grid)
        seconds = time.perf_counter() - fed.t_sim
        if fed.strategy is None or fed.strategy.last_metrics is None:
            raise RuntimeError("the simulation finished without a successful evaluation round; "
                               "rerun with overrides sim.verbose=true to see the devices' errors")
        return finish(inp, Outcome(fed.strategy, fed.table, fed.dead, seconds), None)
