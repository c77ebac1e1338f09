"""``python -m sim.run``: simulate a fleet of legacy devices and helper servers (Hydra entry point).

Examples:
    python -m sim.run                                   # digits, default fleet, L2H, 1 server
    python -m sim.run fleet.num_clients=20 sim.num_rounds=15 strategy.c_e=0.2
    python -m sim.run -m strategy.c_e=0,0.1,0.3          # Hydra multirun (sweep)

The run itself is :func:`sim.pipeline.simulate`. Outputs go to the Hydra run directory (``outputs/DATE/TIME`` or ``multirun/DATE/TIME/N_...``):
metrics.jsonl, summary.json, clients.csv, rounds.png, accuracy_vs_defer_rate.png, devices.png.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sim.cli import precheck
from sim.core.config import register, to_config
from sim.core.errors import ConfigError
from sim.pipeline import simulate
from strategies.config import register_all

register()
register_all()

__all__ = ["main", "simulate"]


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def _hydra_task(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from sim.engine import EngineError

    try:
        config = to_config(cfg)
        run_dir = Path(os.path.expanduser(config.sim.resume)) if config.sim.resume \
            else Path(HydraConfig.get().runtime.output_dir)
        _CURRENT["run_dir"] = run_dir
        summary = simulate(config, run_dir)
    except (ConfigError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return float(summary["system_accuracy"])


_CURRENT: dict[str, Path] = {}


def _interrupted_message() -> str:
    """What to tell the user after Ctrl-C / SIGTERM: what is saved and the command that resumes."""
    from sim.checkpoint import finished_round
    from sim.core.stop import SIGNAL

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
    from sim.core.stop import SIGNAL
    from sim.engine import install_signal_handlers

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
