"""Experiment tracking beside the run directory: TensorBoard (``sim.tensorboard``) and MLflow (``sim.mlflow``).

**TensorBoard** (``<run dir>/tensorboard``; ``tensorboard --logdir outputs``): every round's scalars
at step = round, grouped by tag prefix -- ``system/`` (system, legacy, oracle accuracy, defer rates,
L01 cost, rejector loss), ``servers/`` (server accuracy and loss, samples sent, per-server load,
training load and availability) and ``resilience/`` (failovers by kind, device errors, servers down,
the all-up accuracies of a run with failures) -- and, when the run finishes, its hyperparameters:
the composed config, flattened (``strategy.c_e``, ``fleet.num_clients``, ...), with the final
metrics (``hparams/system_accuracy``, ...) for TensorBoard's HParams tab.

**MLflow** (local, no server): one MLflow run per simulation in the store under ``sim.mlflow_dir``
(default ``mlruns/`` in the working directory, shared by every run and sweep started there), in the
experiment ``l2h-fleet-sim``: the flattened config as params, the same per-round metrics at step =
round, the final metrics, and the run's figures, ``summary.json`` and ``clients.csv`` as artifacts;
tags ``run_dir`` and the code's ``git_commit``. The run is named after its directory; a sweep's job after its
``N_<overrides>`` directory, with ``/`` and other characters a path rejects made ``_`` (:func:`run_name`).
A stopped run's MLflow run ends ``KILLED`` (a failed one ``FAILED``), and its resume continues that MLflow
run (found by its ``run_dir`` tag). The all-up reference of a run with failures gets no MLflow run of
its own (its TensorBoard files are in ``reference/tensorboard``). Browse with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Why SQLite and not MLflow's plain file store: MLflow deprecated the file store (``./mlruns`` as a
tracking URI) and the 3.18 tested here refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; the
SQLite store (``mlruns/mlflow.db``) is what MLflow now uses by default, and artifacts stay plain
files (``mlruns/artifacts/``). MLflow is an optional extra (``pip install -e ".[mlflow]"``:
``mlflow-skinny``, MLflow's client without its server; part of ``.[dev]``, so the tests use it);
``sim.mlflow=true`` or ``sim.tensorboard=true`` without its package is a one-line error before
anything runs (:func:`check_trackers`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from sim.core.errors import ConfigError

GROUPS: dict[str, tuple[str, ...]] = {
    "system": ("system_accuracy", "legacy_accuracy", "oracle_accuracy", "defer_rate", "served_defer_rate",
               "l01_cost", "rejector_loss"),
    "servers": ("server_accuracy", "server_loss", "samples_sent", "servers_dead"),
    "resilience": ("train_errors", "eval_errors", "server_accuracy_all_up", "system_accuracy_all_up"),
}
"""Per-round scalar fields of ``metrics.jsonl`` by tag group."""
PER_SERVER = {"load": "servers", "train_load": "servers", "availability": "servers"}
"""Per-server list fields: one scalar per server (``servers/load/0``, ...)."""
EXPERIMENT = "l2h-fleet-sim"
"""The MLflow experiment every run is logged in."""
FINAL = ("system_accuracy", "legacy_accuracy", "server_accuracy", "oracle_accuracy", "defer_rate", "coverage",
         "l01_cost", "aurc", "e_aurc")
"""Final metrics (summary.json) logged with the hyperparameters."""


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """One round's scalars under their group tags (module docstring); non-numbers and NaN left out."""
    out: dict[str, float] = {}
    for group, keys in GROUPS.items():
        for key in keys:
            v = _number(record.get(key))
            if v is not None:
                out[f"{group}/{key}"] = v
    for key, group in PER_SERVER.items():
        for i, v in enumerate(record.get(key) or []):
            if _number(v) is not None:
                out[f"{group}/{key}/{i}"] = float(v)
    for kind, n in (record.get("failovers") or {}).items():
        if _number(n) is not None:
            out[f"resilience/failovers/{kind}"] = float(n)
    avail = record.get("availability")
    if avail:
        out["resilience/servers_down"] = float(len(avail) - sum(int(a) for a in avail))
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str | float | int | bool]:
    """The config flattened to ``dotted.key: value``; values other than numbers, text and booleans
    (None, lists) as text, so TensorBoard's and MLflow's parameter tables can hold them."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)) and not (isinstance(v, float) and not math.isfinite(v)):
            out[key] = v
        else:
            out[key] = json.dumps(v) if v is not None else "none"
    return out


class Trackers:
    """The run's open trackers: :meth:`round` after every round, :meth:`finish` with the summary,
    :meth:`close` always (with the status of a run that did not finish)."""

    def __init__(self, cfg: Any, run_dir: Path, finished: int):
        from sim.core.config import plain

        self.run_dir, self.params = Path(run_dir), flat_params(plain(cfg))
        self.board = open_board(self.run_dir, finished) if cfg.sim.tensorboard else None
        try:
            self.mlflow = MlflowRun(cfg, self.run_dir, self.params) if cfg.sim.mlflow else None
        except BaseException:
            if self.board is not None:
                self.board.close()
            raise
        self.closed = False

    def round(self, record: dict[str, Any]) -> None:
        """Log one round's scalars (step = its round)."""
        scalars = round_scalars(record)
        t = int(record["round"])
        if self.board is not None:
            for tag, v in scalars.items():
                self.board.add_scalar(tag, v, t)
            self.board.flush()
        if self.mlflow is not None:
            self.mlflow.metrics(scalars, t)

    def finish(self, summary: dict[str, Any], files: list[Path]) -> None:
        """The finished run: hyperparameters with the final metrics (TensorBoard), final metrics and
        the run's ``files`` as artifacts (MLflow)."""
        final = {k: float(summary[k]) for k in FINAL if _number(summary.get(k)) is not None}
        if self.board is not None:
            self.board.add_hparams(self.params, {f"hparams/{k}": v for k, v in final.items()}, run_name=".")
            self.board.flush()
        if self.mlflow is not None:
            self.mlflow.metrics({f"final/{k}": v for k, v in final.items()}, int(summary.get("num_rounds", 0)))
            self.mlflow.artifacts([f for f in files if Path(f).is_file()])

    def close(self, status: str = "FINISHED") -> None:
        """Close the TensorBoard writer and end the MLflow run with ``status``: ``FINISHED``, ``KILLED``
        (stopped: a resume continues it) or ``FAILED``. Only the first call counts."""
        if self.closed:
            return
        self.closed = True
        if self.board is not None:
            self.board.close()
        if self.mlflow is not None:
            self.mlflow.end(status)


MISSING = {
    "tensorboard": ("tensorboard", "sim.tensorboard=true needs the tensorboard package: pip install tensorboard"),
    "mlflow": ("mlflow", 'sim.mlflow=true needs MLflow: pip install -e ".[mlflow]" (or pip install mlflow-skinny)'),
}
"""Per ``sim`` switch: the package it needs and the one-line error without it."""


def check_trackers(sim: Any) -> None:
    """Before anything runs (the command line's check of every job, and :func:`sim.pipeline.simulate`):
    the packages that ``sim.tensorboard`` / ``sim.mlflow`` need are installed.

    Raises:
        ConfigError: one line naming what to install.
    """
    import importlib.util

    for switch, (package, message) in MISSING.items():
        if getattr(sim, switch) and importlib.util.find_spec(package) is None:
            raise ConfigError(message)


def open_board(run_dir: Path, finished: int) -> Any:
    """A TensorBoard writer in ``<run dir>/tensorboard`` (a resumed run drops what came after its
    checkpoint).

    Raises:
        ConfigError: the ``tensorboard`` package is missing (one line).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(MISSING["tensorboard"][1]) from None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=finished + 1 if finished else None)


def store_uri(store: Path) -> str:
    """The SQLite tracking URI of a store directory (module docstring: why not MLflow's file store)."""
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def open_store(mlflow_dir: str, verbose: bool = False) -> tuple[Any, str]:
    """The MLflow store ``mlflow_dir`` (created, with its database and the experiment, on first use).

    A sweep whose jobs run at once (``sim.sweep_parallel`` > 1) has it opened once before the first
    job (:func:`sim.cli.precheck`), so the jobs never create the database together.

    Returns:
        ``(MlflowClient, experiment id)``.

    Raises:
        ConfigError: MLflow is missing, or the directory cannot be created (one line).
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(MISSING["mlflow"][1]) from None
    if not verbose:  # its database set-up logs at INFO
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    store = Path(os.path.expanduser(str(mlflow_dir)))
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"sim.mlflow_dir={store} cannot be created ({exc.strerror}): give a directory "
                          "you can write") from None
    client = MlflowClient(tracking_uri=store_uri(store))
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        EXPERIMENT, artifact_location=(store.resolve() / "artifacts").as_uri())
    return client, exp_id


RUN_NAME_MAX = 250
"""Longest MLflow run name: the ``runs.name`` column of MLflow's SQL schema is ``String(250)`` (SQLite does not
enforce it, the other databases MLflow runs on do)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%\[\]-]+")
"""What a run name keeps: letters, digits and the punctuation of Hydra's ``key=value,key=value`` override
names; anything else (``/``, ``\\``, ``:``, spaces, quotes, control characters) is what a path or another
store's name rejects or splits on."""


def run_name(run_dir: Path) -> str:
    """The MLflow run name of the run in ``run_dir``: the directory's name, or, for a job of a sweep, its
    path under the sweep directory (the nearest one above holding Hydra's ``multirun.yaml``), which is the
    job's ``N_<overrides>`` directory (configs/config.yaml, ``hydra.sweep.subdir``). An override value holding
    ``/`` (``sim.mlflow_dir=runs/mlruns``, ``data.path=/data/x.npz``) makes that more than one directory, and
    the last one alone named every job of the sweep alike (``mlruns``).

    Each run of characters outside letters, digits and ``._=,+@%[]-`` becomes one ``_``, so the name holds no
    ``/`` and stays readable: ``3_data.path=_data_x.npz,seed=1``. It starts with the job number, so the jobs of
    one sweep never share a name; a name over :data:`RUN_NAME_MAX` characters is cut, keeping that start, and
    ends with a hash of the whole path (two long names that differ only at their ends stay apart).
    """
    run_dir = Path(os.path.abspath(os.path.expanduser(str(run_dir))))
    sweep = next((d for d in run_dir.parents if (d / "multirun.yaml").is_file()), None)
    raw = run_dir.relative_to(sweep).as_posix() if sweep is not None else run_dir.name
    name = _UNSAFE.sub("_", raw).strip("_") or "run"
    if len(name) > RUN_NAME_MAX:
        tail = "~" + hashlib.sha1(raw.encode()).hexdigest()[:10]
        name = name[:RUN_NAME_MAX - len(tail)] + tail
    return name


class MlflowRun:
    """One simulation as one MLflow run in the local store ``sim.mlflow_dir`` (module docstring)."""

    def __init__(self, cfg: Any, run_dir: Path, params: dict[str, Any]):
        self.client, exp_id = open_store(cfg.sim.mlflow_dir, cfg.sim.verbose)
        from mlflow.entities import Param

        key = str(Path(run_dir).resolve())
        old = self.client.search_runs([exp_id], filter_string=f"tags.run_dir = '{key}'", max_results=1) \
            if cfg.sim.resume else []
        if old:  # a resume continues its run
            self.run_id = old[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        from sim.provenance import git_state

        commit = git_state(Path(__file__).resolve().parent).get("commit") or "unknown"
        self.run_id = self.client.create_run(exp_id, run_name=run_name(run_dir),
                                             tags={"run_dir": key, "git_commit": commit}).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Log ``values`` at ``step`` (MLflow metric names allow ``/``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def artifacts(self, files: list[Path]) -> None:
        """Copy ``files`` into the run's artifacts (figures under ``figures/``)."""
        for f in files:
            self.client.log_artifact(self.run_id, str(f), "figures" if Path(f).suffix in (".png", ".pdf") else None)

    def end(self, status: str) -> None:
        """Mark the run ``FINISHED``, ``KILLED`` or ``FAILED``."""
        self.client.set_terminated(self.run_id, status)
