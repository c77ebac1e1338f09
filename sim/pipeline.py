"""One fleet simulation in three steps: prepare the inputs, run the federation, finish the results.

:func:`simulate` is what ``python -m sim.run`` calls for each job:

1. :func:`prepare_inputs` -- the prepared dataset, the legacy fleet, the failure schedule, the
   method's server start states (L2D's fixed experts), the result recorder;
2. :func:`run_federation` -- the ServerApp (:mod:`sim.server_app`: the method's strategy driving
   the server pool) and the ClientApp (:mod:`sim.client_app`) on Flower's simulation engine (or
   in-process), one checkpoint per round;
3. :func:`finish` -- ``summary.json``, ``clients.csv``, plots, ``timing.json``, the summary table.

With failures injected (``failures.name != none`` and ``failures.reference=true``) the same seed
is first run with every server up into ``run_dir/reference`` (:func:`run_reference`): the
all-up side of the resilience metrics, on the same test samples.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sim.core.config import Backend, Config, FailureKind, LegacySource, plain, replace
from sim.core.device_spec import DeviceSpec
from sim.core.errors import ConfigError
from sim.server_app import Federation, Inputs, Outcome, method_classes, open_trackers


def simulate(cfg: Config, run_dir: Path, console: Any | None = None, fresh: bool = False) -> dict[str, Any]:
    """Run one fleet simulation and write its results into ``run_dir``.

    The directory is claimed while the run writes (:func:`sim.results.claim`): a second run or
    resume of it is refused, and so is a new run where a run already left results (``fresh``: this
    run's own all-up reference, started again, may replace what an interrupted one left), unless
    nothing can resume those (:func:`sim.results.dead_end`): a new run then replaces them, saying so.

    Args:
        cfg: the run config. run_dir: output directory (created; with ``sim.resume`` the resumed
            run's own directory is used). console: a rich Console (None: a default one); what it
            prints is also appended to ``run_dir/run.log`` (:mod:`sim.runlog`).

    Returns:
        The summary dict written to ``summary.json``.

    Raises:
        ConfigError / DataError: bad configuration or data (one-line message).
        EngineError: Ray/Flower could not start or the simulation failed.
    """
    from rich.console import Console

    from sim.core.sources import check_hub
    from sim.results import claim, restart_in_place
    from sim.runlog import mirrored
    from sim.tracking import check_trackers

    check_hub(cfg.data)
    check_trackers(cfg.sim)
    console = console or Console()
    run_dir = Path(os.path.expanduser(cfg.sim.resume)) if cfg.sim.resume else Path(run_dir)
    if cfg.sim.resume and not run_dir.is_dir():
        raise ConfigError(f"sim.resume={run_dir} is not a directory: give the run directory to continue")
    key = "sim.resume" if cfg.sim.resume else "hydra.run.dir"
    with claim(run_dir, new=not cfg.sim.resume and not fresh, key=key), mirrored(console, run_dir) as console:
        if not cfg.sim.resume:
            gone = restart_in_place(run_dir)
            if gone:
                console.print(f"[bold]note[/bold]: {run_dir} held a stopped run that nothing can resume (no "
                              f"checkpoint); this run replaces its {', '.join(gone)}", soft_wrap=True)
        run_dir, resume, finished, done = open_run(cfg, run_dir, console)
        if done is not None:
            return done
        reference = run_reference(cfg, run_dir, console)
        inputs = prepare_inputs(cfg, run_dir, console, resume, finished)
        try:
            if resume is not None and finished >= cfg.sim.num_rounds:
                return finish(inputs, outcome_from_checkpoint(inputs), reference)
            return finish(inputs, run_federation(inputs), reference)
        except BaseException as exc:  # the MLflow run ends KILLED (a stop) or FAILED, not RUNNING
            if inputs.trackers is not None:
                inputs.trackers.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise


def open_run(cfg: Config, run_dir: Path, console: Any) -> tuple[Path, tuple | None, int, dict | None]:
    """The run directory and, with ``sim.resume``, its checkpoint and finished rounds.

    Returns:
        ``(run_dir, checkpoint or None, rounds finished, summary if the run had already finished)``.

    Raises:
        ConfigError: the resumed directory does not fit this config, or cannot be finished.
    """
    from sim import checkpoint, journal

    if not cfg.sim.resume:
        return run_dir, None, 0, None
    run_dir = Path(os.path.expanduser(cfg.sim.resume))
    ckpt, finished = checkpoint.open_for_resume(cfg, run_dir)
    if ckpt is not None and finished >= cfg.sim.num_rounds:
        if (run_dir / "summary.json").is_file():
            console.print(f"{run_dir} already finished all {cfg.sim.num_rounds} rounds; its summary.json stands",
                          soft_wrap=True)
            from sim.results import upgrade_summary

            return run_dir, ckpt, finished, upgrade_summary(json.loads((run_dir / "summary.json").read_text()))
        if checkpoint.final_state(*ckpt) is None:
            raise ConfigError(f"{run_dir} finished all {cfg.sim.num_rounds} rounds, but its checkpoint predates "
                              "the results a resume needs to write summary.json: run it again without sim.resume")
        console.print(f"[bold]resuming[/bold] {run_dir}: all {finished} rounds are saved; writing its results",
                      soft_wrap=True)
    else:
        console.print(f"[bold]resuming[/bold] {run_dir} after round {finished} of {cfg.sim.num_rounds}"
                      if ckpt is not None else f"[bold]resuming[/bold] {run_dir}: its all-up reference run first",
                      soft_wrap=True)
    say_repair(console, run_dir, journal.proven(run_dir, ckpt[0] if ckpt else None, finished), finished)
    return run_dir, ckpt, finished, None


def say_repair(console: Any, run_dir: Path, proven: Any, finished: int) -> None:
    """One line when ``run_dir``'s metrics.jsonl is rewritten from its checkpoint (:class:`sim.journal.Proven`)."""
    if proven.problem:
        console.print(f"[bold]note[/bold]: {run_dir / 'metrics.jsonl'} did not match the checkpoint "
                      f"({proven.problem}); rewritten with rounds 1-{finished} as the checkpoint keeps them",
                      soft_wrap=True)


def outcome_from_checkpoint(inp: Inputs) -> Outcome:
    """A resumed run whose every round is checkpointed (stopped after its last round, before its
    summary): the last round's results, as the checkpoint keeps them (:func:`sim.checkpoint.final_part`)."""
    from types import SimpleNamespace

    from sim.checkpoint import final_state

    final = final_state(*inp.resume)
    strategy = SimpleNamespace(last_metrics=final["metrics"], last_eval=final["last_eval"])
    return Outcome(strategy, final["table"], final["dead"], 0.0)


def run_reference(cfg: Config, run_dir: Path, console: Any) -> dict[str, Any] | None:
    """With failures injected: the same seed with every server up (run, resumed, or read from
    ``run_dir/reference``): its summary, with its per-round records under ``rounds``; None when
    no reference is wanted."""
    from sim import journal
    from sim.checkpoint import CHECKPOINT
    from sim.core.cache import atomic_write_text

    if cfg.failures.name == FailureKind.none or not cfg.failures.reference:
        return None
    ref_dir = run_dir / "reference"
    if (ref_dir / "summary.json").is_file() and cfg.sim.resume:
        reference = json.loads((ref_dir / "summary.json").read_text())
    else:
        console.print("[bold]reference[/bold]: the same seed with every server up (for resilience.fraction_kept)")
        resume = str(ref_dir) if cfg.sim.resume and (ref_dir / CHECKPOINT).is_file() else None
        # its own TensorBoard (reference/tensorboard), no MLflow run of its own: the experiment lists the runs asked for
        ref_cfg = replace(cfg, failures=cfg.failures.none(), sim=replace(cfg.sim, resume=resume, mlflow=False))
        reference = simulate(ref_cfg, ref_dir, console, fresh=bool(cfg.sim.resume))
    console.print("[bold]run with failures[/bold]")
    proven = journal.of_finished_run(ref_dir, cfg.sim.num_rounds)
    if proven.problem:
        say_repair(console, ref_dir, proven, cfg.sim.num_rounds)
        atomic_write_text(ref_dir / "metrics.jsonl", proven.text, fsync=True)
    return {**reference, "rounds": journal.records(proven.text)}


def prepare_inputs(cfg: Config, run_dir: Path, console: Any, resume: tuple | None, finished: int) -> Inputs:
    """Step 1: data, fleet, the method's server start states, the failure schedule, the recorder."""
    import torch

    from clients.legacy import build_fleet
    from sim import engine, terminal
    from sim.core.data import prepare
    from sim.progress import phase
    from sim.core.faults import build_schedule, schedule_json
    from sim.provenance import record as record_provenance
    from sim.results import Recorder

    _, server_cls = method_classes(cfg.strategy)  # a wrong strategy.device / .server: refused before any work
    t_start = time.perf_counter()
    timing: dict[str, Any] = {"started_at": time.time()}  # Unix seconds (when, beside how long)
    engine.quiet_logs(cfg.sim.verbose)
    torch.set_num_threads(cfg.sim.torch_threads)
    torch.manual_seed(cfg.seed)
    cache_dir = check_cache_dir(cfg.sim.cache_dir)
    show = cfg.sim.progress  # a status line per phase (sim/progress.py)
    with phase(console, "data", f"preparing {cfg.data.name} for {cfg.fleet.num_clients} devices", show):
        prep = prepare(cfg.data, cfg.fleet.num_clients, cfg.seed, cache_dir,
                       vendor=cfg.fleet.legacy == LegacySource.product_line)
    check_archs(cfg, prep.in_shape)
    cfg.strategy.check_data(prep.num_classes)
    cfg.servers.check_data(prep.num_classes)
    timing["prepare_data_s"] = time.perf_counter() - t_start
    with phase(console, "legacy models", fleet_phase_text(cfg), show) as status:
        fleet = build_fleet(cfg.fleet, cfg.data, prep, cfg.seed, cache_dir, progress=status.update)
    timing["legacy_fleet_s"] = time.perf_counter() - t_start - timing["prepare_data_s"]
    for note in cfg.strategy.notes():
        console.print(f"[bold]warning[/bold]: {note}", soft_wrap=True)
    terminal.print_fleet(console, cfg, prep, fleet)
    states = server_cls.prepare_servers(cfg, prep, fleet, cache_dir, console)
    if states is not None:
        timing["experts_s"] = time.perf_counter() - t_start - timing["prepare_data_s"] - timing["legacy_fleet_s"]
    recorder = Recorder(run_dir, keep_rounds=finished if cfg.sim.resume else None)
    record_provenance(run_dir, resumed=bool(cfg.sim.resume))
    schedule = build_schedule(cfg.failures, cfg.servers.count, cfg.fleet.num_clients, cfg.sim.num_rounds,
                              cfg.seed)
    terminal.print_servers(console, cfg, schedule)
    recorder.write_json("failure_schedule.json", {"failures": plain(cfg.failures), "rounds": schedule_json(schedule)})
    return Inputs(cfg, run_dir, console, prep, fleet, schedule, states, recorder, resume, finished, t_start, timing)


def fleet_phase_text(cfg: Config) -> str:
    """What the fleet build makes: product lines build few models, per-device fleets one per device."""
    from clients.legacy import product_line_models

    n = cfg.fleet.num_clients
    if cfg.fleet.legacy == LegacySource.product_line:
        models = len(product_line_models(list(cfg.fleet.groups)))
        return f"{models} product-line model(s) for {n} devices (built or from the cache)"
    return f"{n} per-device models (built or from the cache)"


def check_cache_dir(cache_dir: str) -> Path:
    """``sim.cache_dir`` as a path, refused at once when it names an existing file (an unwritable
    directory is refused when an entry must be written there: :func:`sim.core.cache.build_entry`).

    Raises:
        ConfigError: one line naming the key.
    """
    path = Path(os.path.expanduser(str(cache_dir)))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"sim.cache_dir={path} is an existing file, not a directory: give a directory "
                          "(or set L2H_SIM_CACHE)")
    return path


def check_archs(cfg: Config, in_shape: tuple[int, ...]) -> None:
    """The fleet's and the servers' architectures and sensors against the data's ``(C, H, W)``, before
    anything is built (a 2-D ``cnn`` on 1-D signals, a sensor block larger than the inputs, ...).

    Raises:
        ConfigError: one line naming the key (``fleet.groups.<i>.arch`` / ``.downsample`` or
            ``servers.arch``) and the fix.
    """
    from sim.core.zoo import check_input

    _, h, w = (int(v) for v in in_shape)
    for i, g in enumerate(cfg.fleet.groups):
        check_input(str(g.arch), in_shape, f"fleet.groups.{i}.arch")
        side = w if h == 1 else max(h, w)
        if g.downsample > side:
            raise ConfigError(f"fleet.groups.{i}.downsample={g.downsample} is invalid: the inputs are {h}x{w}, so a "
                              f"sensor block can be at most {side} samples wide")
    check_input(str(cfg.servers.arch), in_shape, "servers.arch")


def device_spec(inp: Inputs, per_node: int) -> DeviceSpec:
    """What every message carries: what a worker needs to build the run's devices and method."""
    cfg = inp.cfg
    return DeviceSpec(
        key=f"{inp.run_dir}:{time.time_ns()}", data_path=Path(inp.prep.path), fleet_path=Path(inp.fleet.path),
        legacy_models=tuple(Path(p) for p in inp.fleet.models) if inp.fleet.legacy == "product_line" else (),
        groups=tuple(inp.fleet.groups), group_cfgs=tuple(inp.fleet.group_cfgs),
        temperatures=tuple(float(t) for t in inp.fleet.temperature), in_shape=tuple(inp.prep.in_shape),
        num_classes=inp.prep.num_classes, seed=cfg.seed, strategy=cfg.strategy, servers=cfg.servers,
        torch_threads=cfg.sim.torch_threads, devices_per_node=per_node)


def run_federation(inp: Inputs) -> Outcome:
    """Step 2: the ServerApp and the ClientApp on the simulation engine; a checkpoint every round.

    Raises:
        EngineError: the engine failed, no evaluation round succeeded, or a device did not answer
            the final evaluation (:func:`final_missing_message`).
    """
    from sim import engine
    from sim.client_app import app as client_app
    from sim.core.nodes import devices_per_node, num_nodes

    cfg = inp.cfg
    per_node = devices_per_node(cfg.fleet.num_clients, cfg.sim.devices_per_node, cfg.sim.max_nodes)
    fed = Federation(inp, device_spec(inp, per_node), engine.check_node)
    nodes = num_nodes(cfg.fleet.num_clients, per_node)
    with fed.progress:
        fed.progress.phase("engine", f"starting Flower on Ray ({nodes} nodes)" if cfg.sim.backend == Backend.ray
                           else "starting the in-process engine")
        engine.run(cfg.sim, fed.main, client_app, nodes)
    sim_seconds = time.perf_counter() - fed.t_sim
    inp.timing["engine_stop_s"] = sim_seconds - sum(inp.timing.get(p, 0.0) for p in (
        "engine_start_s", "handshake_s", "rounds_s"))
    if fed.strategy is not None and fed.strategy.final_missing:
        from sim.checkpoint import CHECKPOINT

        resumable = (inp.run_dir / CHECKPOINT).is_file()
        raise engine.EngineError(final_missing_message(fed.strategy.final_missing, cfg.fleet.num_clients,
                                                       inp.run_dir if resumable else None))
    if fed.strategy is None or fed.strategy.last_metrics is None:
        raise engine.EngineError("the simulation finished without a successful evaluation round; "
                                 "rerun with sim.verbose=true to see the devices' errors")
    return Outcome(fed.strategy, fed.table, fed.dead, sim_seconds)


def final_missing_message(missing: dict[int, str], num_clients: int, run_dir: Path | None) -> str:
    """The one line of a run whose final evaluation missed devices (``device -> cause``, not empty);
    ``run_dir``: the run to continue with ``sim.resume`` (None: it has no checkpoint, start again).

    The final evaluation is exempt from injected dropout (:func:`strategies.pool_strategy.faults_config`),
    so a device missing from it failed: its summary would cover only some devices' test samples and
    silently differ from the run asked for. The final round is not checkpointed
    (:meth:`Federation.round_ok`), so a resume repeats it."""
    first = min(missing)
    others = f" (and {len(missing) - 1} more device(s))" if len(missing) > 1 else ""
    return (f"device {first} failed in the final evaluation{others}: {missing[first]}; the results would cover "
            f"{num_clients - len(missing)} of {num_clients} devices, so none were written. Fix the cause "
            f"(sim.verbose=true shows the device's traceback), then "
            + (f"continue with sim.resume={run_dir}" if run_dir is not None else "run again"))


def finish(inp: Inputs, out: Outcome, reference: dict[str, Any] | None) -> dict[str, Any]:
    """Step 3: per-device rows, ``summary.json`` (with the servers' and resilience parts), plots,
    ``timing.json`` and the summary on the terminal. Returns the summary."""
    from sim import plots, terminal
    from sim.core.metrics import per_device
    from sim.resilience import resilience_summary, servers_summary, test_set_digest
    from sim.results import build_summary

    cfg, fleet, rec, strategy = inp.cfg, inp.fleet, inp.recorder, out.strategy
    metrics = strategy.last_metrics
    meta = {d: {"group": fleet.group_cfgs[g].name, "arch": str(fleet.group_cfgs[g].arch),
                "pretrain_size": int(fleet.pretrain_size[d])} for d, g in enumerate(fleet.groups)}
    rows = per_device(strategy.last_eval, meta)
    rec.clients(rows)
    summary = build_summary(cfg, metrics, rows, fleet.legacy_accuracy, inp.prep.num_classes)
    summary["test_set_digest"] = test_set_digest(strategy.last_eval)
    summary["servers"] = servers_summary(cfg, rec.rounds, out.table, out.dead)
    summary["resilience"] = resilience_summary(cfg, rec.rounds, summary, reference,
                                               reference.get("rounds") if reference else None)
    rec.summary(summary)
    made = []
    if cfg.sim.plots:
        d = inp.run_dir
        made += [plots.plot_rounds(rec.rounds, d / "rounds.png"),
                 plots.plot_defer_curve(metrics, d / "accuracy_vs_defer_rate.png"),
                 plots.plot_devices(rows, d / "devices.png")]
        if cfg.failures.name != FailureKind.none:  # the resilience figures: only a run with failures has them
            made += [plots.plot_timeline(rec.rounds, inp.schedule, summary["resilience"], d / "resilience_timeline.png",
                                         reference.get("rounds") if reference else None),
                     plots.plot_states(summary, d / "resilience_states.png", rec.rounds,
                                       reference.get("rounds") if reference else None)]
        made.append(plots.plot_partition(inp.prep.y, inp.prep.owner, inp.prep.split, inp.prep.num_classes,
                                         d / "partition.png"))
    errors = sum(int(r.get("train_errors", 0)) + int(r.get("eval_errors", 0)) for r in rec.rounds)
    if errors and not cfg.sim.verbose:
        inp.console.print(f"note: {errors} device replies were errors (injected dropouts count here); "
                          "sim.verbose=true shows each one")
    inp.timing["total_s"] = time.perf_counter() - inp.t_start
    inp.timing["finished_at"] = time.time()
    # Wall-clock phases go to their own file: summary.json holds only seed-determined numbers.
    rec.write_json("timing.json", {"backend": str(cfg.sim.backend), **inp.timing})
    if inp.trackers is None:  # a resume of a run whose rounds were all done opens them here
        inp.trackers = open_trackers(inp)  # None: neither is on
    if inp.trackers is not None:  # (on an error, simulate ends the MLflow run FAILED)
        from sim.style import outputs

        inp.trackers.finish(summary, [f for png in made for f in outputs(png)]
                            + [inp.run_dir / "summary.json", inp.run_dir / "clients.csv"])
        inp.trackers.close()
    terminal.print_summary(inp.console, summary, inp.run_dir, out.sim_seconds, inp.timing["total_s"])
    return summary
