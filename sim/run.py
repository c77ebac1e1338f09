"""``python -m sim.run``: simulate a fleet of legacy devices and helper servers (Hydra entry point).

Examples:
    python -m sim.run                                   # digits, default fleet, L2H, 1 server
    python -m sim.run fleet.num_clients=20 sim.num_rounds=15 strategy.c_e=0.2
    python -m sim.run -m strategy.c_e=0,0.1,0.3          # Hydra multirun (sweep)

Outputs go to the Hydra run directory (``outputs/DATE/TIME`` or ``multirun/DATE/TIME/N_...``):
metrics.jsonl, summary.json, clients.csv, rounds.png, accuracy_vs_defer_rate.png, devices.png.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sim.cli import precheck
from sim.schema import ConfigError, register, routing_of, validate

register()


def simulate(cfg: dict[str, Any], run_dir: Path, console: Any | None = None) -> dict[str, Any]:
    """Run one fleet simulation and write its results into ``run_dir``.

    With failures injected (``failures.name != none`` and ``failures.reference=true``), the same
    seed is first run with no failures into ``run_dir/reference``: its final system accuracy, on
    the same test samples, is the all-servers-up accuracy of ``resilience.fraction_kept``.

    Args:
        cfg: the composed config as a plain dict (see configs/ and sim/schema.py).
        run_dir: output directory (created).
        console: a rich Console for progress and the summary table (None: a default one).

    Returns:
        The summary dict written to ``summary.json``.

    Raises:
        ConfigError / DataError: bad configuration or data (one-line message).
        EngineError: Ray/Flower could not start or the simulation failed.
    """
    import torch
    from rich.console import Console

    from clients.legacy import build_fleet
    from servers.pool import ServerPool
    from sim import checkpoint, engine, plots, terminal
    from sim.checkpoint import CHECKPOINT
    from sim.apps import app as client_app
    from sim.data import prepare
    from sim.metrics import per_device
    from sim.nodes import devices_per_node, num_nodes
    from flwr.app import ArrayRecord

    from sim.resilience import resilience_summary, servers_summary, test_set_digest
    from sim.results import Recorder, build_summary
    from sim.failures import build_schedule, schedule_json
    from strategies.l2h import resolve_surrogate
    from strategies.registry import server_side
    from strategies.l2h_losses import binary_alpha

    validate(cfg)
    cfg = copy.deepcopy(cfg)
    cfg["servers"]["routing"] = routing_of(cfg["servers"])
    console = console or Console()
    num_rounds = int(cfg["sim"]["num_rounds"])
    resume = cfg["sim"]["resume"]
    finished, ckpt = 0, None
    if resume:
        run_dir = Path(os.path.expanduser(str(resume)))
        ckpt, finished = checkpoint.open_for_resume(cfg, run_dir)
        if ckpt is not None and finished >= num_rounds:
            if (run_dir / "summary.json").is_file():
                console.print(f"{run_dir} already finished all {num_rounds} rounds; its summary.json stands",
                              soft_wrap=True)
                return json.loads((run_dir / "summary.json").read_text())
            raise ConfigError(f"{run_dir} finished all {num_rounds} rounds but has no summary.json: "
                              "run it again without sim.resume")
        console.print(f"[bold]resuming[/bold] {run_dir} after round {finished} of {num_rounds}" if ckpt is not None
                      else f"[bold]resuming[/bold] {run_dir}: its all-up reference run first", soft_wrap=True)
    reference = None
    if cfg["failures"]["name"] != "none" and cfg["failures"]["reference"]:
        ref_dir = Path(run_dir) / "reference"
        if (ref_dir / "summary.json").is_file() and resume:
            reference = json.loads((ref_dir / "summary.json").read_text())
        else:
            console.print("[bold]reference[/bold]: the same seed with every server up (for resilience.fraction_kept)")
            ref_cfg = {**copy.deepcopy(cfg), "failures": none_failures(cfg["failures"])}
            ref_cfg["sim"]["resume"] = str(ref_dir) if resume and (ref_dir / CHECKPOINT).is_file() else None
            reference = simulate(ref_cfg, ref_dir, console)
        console.print("[bold]run with failures[/bold]")
    t_start = time.perf_counter()
    engine.quiet_logs(cfg["sim"]["verbose"])
    torch.set_num_threads(int(cfg["sim"]["torch_threads"]))
    torch.manual_seed(int(cfg["seed"]))
    cache_dir = Path(os.path.expanduser(str(cfg["sim"]["cache_dir"])))
    run_dir = Path(run_dir)

    timing: dict[str, float] = {}
    prep = prepare(cfg, cache_dir)
    timing["prepare_data_s"] = time.perf_counter() - t_start
    fleet = build_fleet(cfg, prep, cache_dir)
    timing["legacy_fleet_s"] = time.perf_counter() - t_start - timing["prepare_data_s"]
    num_classes = prep.num_classes
    s = cfg["strategy"]
    try:
        if resolve_surrogate(s["surrogate"], num_classes) == "binary":
            binary_alpha(float(s["c_e"]), float(s["c_1"]), float(s["binary_beta"]), float(s["binary_p"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    acc = fleet.legacy_accuracy
    terminal.print_fleet(console, cfg, prep, fleet)
    experts = None
    if s["name"] == "l2d":
        from servers.experts import pretrain_experts

        experts, experts_meta = pretrain_experts(cfg, prep, fleet, cache_dir)
        timing["experts_s"] = time.perf_counter() - t_start - timing["prepare_data_s"] - timing["legacy_fleet_s"]
        console.print(f"L2D experts (fixed): pretrained on the held-out pool of {experts_meta['pool_size']} samples, "
                      f"train accuracy {', '.join(f'{a:.3f}' for a in experts_meta['train_accuracy'])}",
                      soft_wrap=True)

    recorder = Recorder(run_dir, keep_rounds=finished if resume else None)
    schedule = build_schedule(cfg["failures"], int(cfg["servers"]["count"]), len(acc), num_rounds, int(cfg["seed"]))
    terminal.print_servers(console, cfg, schedule)
    recorder.write_json("failure_schedule.json", {"failures": cfg["failures"], "rounds": schedule_json(schedule)})

    progress, task = terminal.round_progress(console, num_rounds, cfg["sim"]["progress"])
    progress.advance(task, finished)

    def on_round(record: dict[str, Any]) -> None:
        recorder.round(record)
        if cfg["sim"]["checkpoint"]:
            pool_arrays, pool_meta = state["pool"].checkpoint()
            strat_arrays, strat_meta = state["strategy"].checkpoint()
            checkpoint.save(run_dir, {**checkpoint.prefixed("pool", pool_arrays),
                                      **checkpoint.prefixed("strategy", strat_arrays)},
                            {"round": record["round"], "config": checkpoint.comparable(cfg), "pool": pool_meta,
                             "strategy": strat_meta})
        progress.advance(task)
        if record.get("system_accuracy") is not None:
            progress.console.print(terminal.round_line(record, num_rounds), soft_wrap=True)

    timeout = float(cfg["sim"]["round_timeout"])
    placement = "ray" if cfg["sim"]["backend"] == "ray" else "local"
    state: dict[str, Any] = {}

    def server_main(grid: Any) -> None:
        timing["engine_start_s"] = time.perf_counter() - t_sim
        # The server pool is made here, inside the engine's Ray session: its actors live on Ray.
        pool = state["pool"] = ServerPool(cfg, prep.in_shape, num_classes, placement)
        try:
            pool.wait_ready(min(120.0, float(cfg["sim"]["round_timeout"])))
            if experts is not None:
                pool.install(experts)
            strategy = state["strategy"] = server_side(s["name"])(cfg, pool, schedule, on_round)
            strategy.spec_json = spec_json
            if ckpt is not None:
                arrays, meta = ckpt
                pool.restore(checkpoint.sub(arrays, "pool"), meta["pool"])
                strategy.restore(checkpoint.sub(arrays, "strategy"), meta["strategy"], finished)
            strategy.handshake(grid, timeout)
            strategy.t0 = time.perf_counter()
            timing["handshake_s"] = strategy.t0 - t_sim - timing["engine_start_s"]
            strategy.start(grid, initial_arrays=ArrayRecord(), num_rounds=num_rounds - finished, timeout=timeout)
            timing["rounds_s"] = time.perf_counter() - strategy.t0
            state["table"] = pool.table(strategy.last_x, strategy.last_eval["y"]) if strategy.last_x is not None \
                else None
            state["where"] = pool.where()
            state["dead"] = sorted(pool.dead)
        finally:
            pool.shutdown()

    per_node = devices_per_node(len(acc), cfg["sim"]["devices_per_node"], int(cfg["sim"]["max_nodes"]))
    spec = {
        "key": f"{run_dir}:{time.time_ns()}",
        "data_path": str(prep.path), "fleet_path": str(fleet.path),
        "groups": fleet.groups, "group_cfgs": fleet.group_cfgs,
        "in_shape": list(prep.in_shape), "num_classes": num_classes, "seed": int(cfg["seed"]),
        "strategy": cfg["strategy"], "servers": cfg["servers"], "torch_threads": int(cfg["sim"]["torch_threads"]),
        "devices_per_node": per_node,
    }
    spec_json = json.dumps(spec, sort_keys=True)
    t_sim = time.perf_counter()
    with progress:
        engine.run(cfg["sim"], server_main, client_app, num_nodes(len(acc), per_node))
    strategy = state["strategy"]
    sim_seconds = time.perf_counter() - t_sim
    timing["engine_stop_s"] = sim_seconds - sum(timing.get(p, 0.0) for p in ("engine_start_s", "handshake_s",
                                                                             "rounds_s"))
    if strategy.last_metrics is None:
        raise engine.EngineError("the simulation finished without a successful evaluation round; "
                                 "rerun with sim.verbose=true to see the devices' errors")

    metrics = strategy.last_metrics
    meta = {d: {"group": fleet.group_cfgs[g]["name"], "arch": fleet.group_cfgs[g]["arch"],
                "pretrain_size": int(fleet.pretrain_size[d])} for d, g in enumerate(fleet.groups)}
    rows = per_device(strategy.last_eval, meta)
    recorder.clients(rows)
    summary = build_summary(cfg, metrics, rows, acc, num_classes)
    summary["test_set_digest"] = test_set_digest(strategy.last_eval)
    summary["servers"] = servers_summary(cfg, recorder.rounds, state["table"], state["dead"])
    summary["resilience"] = resilience_summary(cfg, recorder.rounds, summary, reference)
    recorder.summary(summary)
    if cfg["sim"]["plots"]:
        plots.plot_rounds(recorder.rounds, run_dir / "rounds.png")
        plots.plot_defer_curve(metrics, run_dir / "accuracy_vs_defer_rate.png")
        plots.plot_devices(rows, run_dir / "devices.png")
        plots.plot_timeline(recorder.rounds, schedule, summary["resilience"], run_dir / "resilience_timeline.png")
        plots.plot_states(summary, run_dir / "resilience_states.png")
    errors = sum(int(r.get("train_errors", 0)) + int(r.get("eval_errors", 0)) for r in recorder.rounds)
    if errors and not cfg["sim"]["verbose"]:
        console.print(f"note: {errors} device replies were errors (injected dropouts count here); "
                      "sim.verbose=true shows each one")
    timing["total_s"] = time.perf_counter() - t_start
    # Wall-clock phases go to their own file: summary.json holds only seed-determined numbers.
    recorder.write_json("timing.json", {"backend": cfg["sim"]["backend"], **timing})
    terminal.print_summary(console, summary, run_dir, sim_seconds, timing["total_s"])
    return summary


def none_failures(f: dict[str, Any]) -> dict[str, Any]:
    """The ``failures`` config with every fault switched off (the all-servers-up reference)."""
    from sim.schema import FailuresConfig

    plain = OmegaConf.to_container(OmegaConf.structured(FailuresConfig(name="none")))
    plain["reference"] = False
    plain["query_timeout_s"] = f["query_timeout_s"]
    return plain


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def _hydra_task(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from sim.engine import EngineError

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        run_dir = Path(os.path.expanduser(plain["sim"]["resume"])) if plain["sim"]["resume"] \
            else Path(HydraConfig.get().runtime.output_dir)
        _CURRENT["run_dir"] = run_dir
        summary = simulate(plain, run_dir)
    except (ConfigError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(summary["system_accuracy"])


_CURRENT: dict[str, Path] = {}


def _interrupted_message() -> str:
    """What to tell the user after Ctrl-C / SIGTERM: what is saved and the command that resumes."""
    from sim.checkpoint import finished_round
    from sim.engine import SIGNAL

    name = "SIGTERM" if SIGNAL and SIGNAL[-1] == signal.SIGTERM else "SIGINT"
    run_dir = _CURRENT.get("run_dir")
    if run_dir is None:
        return f"interrupted ({name}) before the run started"
    args = [a for a in sys.argv[1:] if not a.startswith(("sim.resume=", "hydra.run.dir=", "-m", "--multirun"))]
    command = f"python -m sim.run {' '.join(args + [f'sim.resume={run_dir}'])}"
    done = finished_round(run_dir)
    if done is None:
        ref = finished_round(run_dir / "reference")
        if ref is not None:
            return (f"interrupted ({name}) during the all-up reference run, after its round {ref} (saved in "
                    f"{run_dir / 'reference'}); resume with:\n  {command}")
        return f"interrupted ({name}) before the first round was checkpointed; nothing to resume in {run_dir}"
    return (f"interrupted ({name}) after round {done}: rounds 1-{done} are saved in {run_dir} (metrics.jsonl, "
            f"checkpoint.npz); resume with:\n  {command}")


def main() -> None:
    """Console entry: check the whole command line's configs first, then hand over to Hydra."""
    try:
        precheck(sys.argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    from sim.engine import SIGNAL, install_signal_handlers

    install_signal_handlers()
    argv = sys.argv
    resume = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("sim.resume=")]
    if resume and not any(a.startswith("hydra.run.dir=") for a in argv[1:]):
        sys.argv = argv + [f"hydra.run.dir={resume[-1]}"]  # the resumed run writes into its own directory
    try:
        _hydra_task()
    except KeyboardInterrupt:
        sys.argv = argv
        print(_interrupted_message(), file=sys.stderr)
        sys.exit(143 if SIGNAL and SIGNAL[-1] == signal.SIGTERM else 130)


if __name__ == "__main__":
    main()
