"""The ServerApp: the helper-server pool and the method's strategy, driven by Flower's round loop.

:class:`Federation` is one run's ServerApp main (:meth:`Federation.main`): inside the engine's
session it builds the pool (:class:`servers.pool.ServerPool`; its actors live on Ray), the method's
strategy (``strategy.server``), restores a resumed run, and runs Flower's rounds; at the end of every
round (:meth:`Federation.on_round`) the record is appended to ``metrics.jsonl``, the checkpoint
replaced, the progress line printed. :func:`server_app` wraps a main as Flower's ``ServerApp``;
:mod:`sim.engine` runs it against the ClientApp (:mod:`sim.client_app`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sim.core.config import Backend, Config, StrategyConfig
from sim.core.device_spec import DeviceSpec
from sim.core.errors import ConfigError
from sim.core.round_record import RoundRecord

if TYPE_CHECKING:  # Flower is imported when a run starts, not for a config check (python -m sim.run)
    from flwr.serverapp import Grid, ServerApp

    from strategies.method import DeviceMethod
    from strategies.pool_strategy import PoolStrategy


@dataclass
class Inputs:
    """Everything the federation needs, made before it starts (step 1)."""

    cfg: Config
    run_dir: Path
    console: Any
    prep: Any
    fleet: Any
    schedule: list
    server_states: list | None
    recorder: Any
    resume: tuple[dict, dict] | None
    finished: int
    t_start: float
    timing: dict[str, float] = field(default_factory=dict)
    trackers: Any = None  # TensorBoard / MLflow (sim/tracking.py), open while the run goes on


@dataclass
class Outcome:
    """What the federation left behind (step 2)."""

    strategy: Any
    table: dict | None
    dead: list[int]
    sim_seconds: float


class Federation:
    """The ServerApp's main (:meth:`main`: the pool and the method's strategy) and what it does at
    the end of every round (:meth:`on_round`: record, checkpoint, progress line).

    Args:
        inp: what the run prepared (step 1). spec: the device-runtime spec every message carries
            (serialised here, once: :meth:`DeviceSpec.to_json`).
        node_check: ``node_check(when)`` raises when the Ray node under the run has died
            (:func:`sim.engine.check_node`; None: not checked).
    """

    def __init__(self, inp: Inputs, spec: DeviceSpec, node_check: Callable[[str], None] | None = None):
        from sim.progress import RunProgress

        self.inp, self.cfg, self.spec_json = inp, inp.cfg, spec.to_json()
        self.node_check = node_check  # raises when the Ray node under the run died (sim.engine.check_node)
        self.progress = RunProgress(inp.console, self.cfg.sim.num_rounds, inp.finished, self.cfg.sim.progress)
        self.pool: Any = None
        self.strategy: Any = None
        self.table: dict | None = None
        self.dead: list[int] = []
        self.t_sim = time.perf_counter()
        if inp.trackers is None:
            inp.trackers = open_trackers(inp)

    def round_ok(self, record: dict[str, Any]) -> bool:
        """Whether a round is worth a checkpoint: some device answered its training *and* its
        evaluation, beyond the injected dropouts. A killed worker costs its replies and the round is
        kept; a round in which every device failed (e.g. after restoring a mis-shaped state) never
        replaces the last good checkpoint, so the run can still be resumed from it. The final round
        needs every device's evaluation (it has no injected dropout; :func:`sim.pipeline.final_missing_message`)."""
        answered_train = int(record.get("train_devices", 1))
        answered_eval = int(record.get("eval_devices", 1))
        if int(record["round"]) == len(self.inp.schedule) and int(record.get("eval_errors", 0)) > 0:
            return False  # the schedule has one entry per round: this is the final one
        return answered_train > 0 and answered_eval > 0

    def on_round(self, round_record: RoundRecord) -> None:
        """A finished round: its record appended, the checkpoint replaced (rounds that lost device
        replies excepted, :meth:`round_ok`), the progress line printed. The record is flattened
        here, once, into the ``metrics.jsonl`` line everything after reads (:meth:`RoundRecord.as_dict`)."""
        from sim import terminal

        self.check_node(round_record.round)
        record = round_record.as_dict()
        self.inp.recorder.round(record)
        if self.inp.trackers is not None:  # before the checkpoint, as metrics.jsonl: a stop loses no round of it
            self.inp.trackers.round(record)
        final = round_record.round == self.cfg.sim.num_rounds and self.strategy.last_x is not None
        if final:  # computed now, so the last checkpoint can hold it (a stop after it loses nothing)
            self.table = self.pool.table(self.strategy.last_x, self.strategy.last_eval["y"])
            self.dead = sorted(self.pool.dead)
        if self.cfg.sim.checkpoint and self.round_ok(record):
            self.save_checkpoint(record, final)
        self.progress.advance()
        if record.get("system_accuracy") is not None:
            self.progress.console.print(terminal.round_line(record, self.cfg.sim.num_rounds), soft_wrap=True)

    def check_node(self, round_: int) -> None:
        """On Ray: fail the run, before this round is recorded, if the Ray node under it has died (its
        servers and device workers died with it: the round's numbers would be the legacy models').

        Raises:
            sim.engine.NodeLost: one line, naming what died and where its log is (:attr:`node_check`).
        """
        if self.cfg.sim.backend == Backend.ray and self.node_check is not None:
            self.node_check(f"during round {round_}")

    def save_checkpoint(self, record: dict[str, Any], final: bool) -> None:
        """Replace the run's checkpoint with this round's state; the last round's also keeps what
        :func:`finish` needs (:func:`sim.checkpoint.final_part`)."""
        from sim import checkpoint, journal
        from sim.core.arrays import prefixed

        pool_arrays, pool_meta = self.pool.checkpoint()
        strat_arrays, strat_meta = self.strategy.checkpoint()
        arrays = {**prefixed("pool", pool_arrays), **prefixed("strategy", strat_arrays),
                  **journal.part(self.inp.recorder.text)}  # metrics.jsonl up to this round: sim/journal.py
        meta = {"round": record["round"], "config": checkpoint.comparable(self.cfg), "pool": pool_meta,
                "strategy": strat_meta}
        if final:
            last = self.strategy
            final_arrays, meta[checkpoint.FINAL] = checkpoint.final_part(last.last_eval, last.last_metrics,
                                                                         self.table, self.dead)
            arrays.update(final_arrays)
        checkpoint.save(self.inp.run_dir, arrays, meta)

    def main(self, grid: Any) -> None:
        """The ServerApp: build the pool inside the engine's session (its actors live on Ray), the
        strategy, restore a resumed run, then Flower's round loop; the pool is shut down whatever happens."""
        from flwr.app import ArrayRecord

        from servers.pool import ServerPool
        from strategies.labels import fold_copies

        cfg, inp, timing = self.cfg, self.inp, self.inp.timing
        device_cls, server_cls = method_classes(cfg.strategy)
        timing["engine_start_s"] = time.perf_counter() - self.t_sim
        self.progress.phase("servers", f"starting {cfg.servers.count} helper server(s)")
        if cfg.sim.backend == Backend.ray:  # which Ray instance ran it (a sweep's jobs share one: sim/sweep.py)
            import ray

            timing["ray_node_id"] = ray.get_runtime_context().get_node_id()
        self.pool = ServerPool(cfg.servers, inp.prep.in_shape, inp.prep.num_classes, cfg.seed,
                               cfg.failures.query_timeout_s, "ray" if cfg.sim.backend == Backend.ray else "local",
                               cfg.sim.torch_threads, cfg.servers.prices(cfg.strategy.c_e),
                               fold_copies(cfg.strategy, device_cls.learns_from_labels))
        try:
            timeout = cfg.sim.round_timeout
            self.pool.wait_ready(min(120.0, timeout))
            if inp.server_states is not None:
                self.pool.install(inp.server_states)
            self.strategy = server_cls(cfg, self.pool, inp.schedule, self.on_round)
            self.strategy.spec_json = self.spec_json
            if inp.resume is not None:
                self.restore()
            self.progress.phase("handshake", "every Flower node builds its devices")
            self.strategy.handshake(grid, timeout)
            self.strategy.t0 = time.perf_counter()
            timing["handshake_s"] = self.strategy.t0 - self.t_sim - timing["engine_start_s"]
            self.progress.rounds_start()
            self.strategy.start(grid, initial_arrays=ArrayRecord(), num_rounds=cfg.sim.num_rounds - inp.finished,
                                timeout=timeout)
            timing["rounds_s"] = time.perf_counter() - self.strategy.t0
            last = self.strategy
            if self.table is None and last.last_x is not None:
                self.table = self.pool.table(last.last_x, last.last_eval["y"])
            self.dead = sorted(self.pool.dead)
        finally:
            self.pool.shutdown()

    def restore(self) -> None:
        """Load the resumed run's checkpoint into the pool and the strategy."""
        from sim import checkpoint
        from sim.core.arrays import sub
        from strategies.pool_strategy import CheckpointMismatch

        arrays, meta = self.inp.resume
        self.pool.restore(sub(arrays, "pool"), meta["pool"])
        try:
            self.strategy.restore(sub(arrays, "strategy"), meta["strategy"], self.inp.finished)
        except CheckpointMismatch as exc:
            raise checkpoint.CheckpointError(str(exc)) from None



def method_classes(strategy: StrategyConfig) -> tuple[type[DeviceMethod], type[PoolStrategy]]:
    """The method's device and ServerApp classes, named by ``strategy.device`` / ``strategy.server``
    (dotted paths, :func:`sim.core.schemas.resolve`); importing them imports torch and Flower.

    Raises:
        ConfigError: one line naming the key: a path that does not import, or a class of the wrong
            kind (``strategy.device`` must be a :class:`~strategies.method.DeviceMethod`,
            ``strategy.server`` a :class:`~strategies.pool_strategy.PoolStrategy`).
    """
    from sim.core.schemas import resolve
    from strategies.method import DeviceMethod
    from strategies.pool_strategy import PoolStrategy

    return (resolve(strategy.device, "strategy.device", DeviceMethod),
            resolve(strategy.server, "strategy.server", PoolStrategy))


def open_trackers(inp: Inputs) -> Any:
    """TensorBoard and MLflow for this run when ``sim.tensorboard`` / ``sim.mlflow`` ask for them
    (:class:`sim.tracking.Trackers`), else None. Raises ConfigError (one line) when a package is missing."""
    if not (inp.cfg.sim.tensorboard or inp.cfg.sim.mlflow):
        return None
    from sim.tracking import Trackers

    return Trackers(inp.cfg, inp.run_dir, inp.finished)


def server_app(main: Callable[[Grid], None]) -> ServerApp:
    """A ServerApp whose main calls ``main(grid)`` (the runner holds the strategy and results)."""
    from flwr.app import Context
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid)

    return app
