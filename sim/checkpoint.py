"""End-of-round checkpoints: what a run needs to continue exactly where it stopped.

One file, ``checkpoint.npz`` in the run directory, replaced atomically (written to a temporary
file in the same directory, fsynced, then renamed over the old one), so an interruption at any
moment leaves either the previous round's checkpoint or this round's, never a torn one. It holds
only arrays (loaded with ``allow_pickle=False``: nothing is unpickled) plus one JSON document
(``__meta__``): the round, the config, and each part's small metadata.

No random-number-generator state is saved because none is carried between rounds: every random
draw in the simulation is seeded from (seed, purpose, round, device) by
:func:`sim.training.derive_seed`, so round k+1 draws the same numbers whether or not the process
restarted after round k.
"""
from __future__ import annotations

import json
import os
import shlex
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.cache import file_mode
from sim.core.config import Config, FailureKind, plain
from sim.core.errors import ConfigError
from sim.core.storage import guard

CHECKPOINT = "checkpoint.npz"
META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run (one line: what and how to fix)."""


def save(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Atomically write ``run_dir/checkpoint.npz`` with ``arrays`` and the JSON ``meta`` (mode as any
    result file, :func:`sim.core.cache.file_mode`).

    Raises:
        OutOfSpace: the disk is full: the temporary file is removed, the previous checkpoint stays.
    """
    run_dir = Path(run_dir)
    payload = dict(arrays)
    payload[META] = np.frombuffer(json.dumps(meta, sort_keys=True, default=_json_default).encode(), dtype=np.uint8)
    what = f"the checkpoint of round {meta.get('round')}"
    with guard(run_dir / CHECKPOINT, what):
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".npz", dir=run_dir)
    try:
        with guard(run_dir / CHECKPOINT, what):  # judged before the partial file is removed
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **payload)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, run_dir / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return run_dir / CHECKPOINT


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays in a checkpoint's header as plain JSON values (exactly: float64 round-trips)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def header_problem(meta: Any, num_rounds: int | None = None) -> str | None:
    """What is wrong with a checkpoint's header (None: nothing): it must be a JSON object with a
    ``round`` (an integer from 1, at most ``num_rounds`` when given) and ``config``, ``pool`` and
    ``strategy`` objects."""
    if not isinstance(meta, dict):
        return f"its header is a {type(meta).__name__}, not an object"
    r = meta.get("round")
    if isinstance(r, bool) or not isinstance(r, int):
        return f"its round {r!r} is not a round number"
    if r < 1 or (num_rounds is not None and r > num_rounds):
        return f"its round {r} is outside 1..{num_rounds if num_rounds is not None else 'sim.num_rounds'}"
    for key in ("config", "pool", "strategy"):
        if not isinstance(meta.get(key), dict):
            return f"its header has no {key!r} object"
    return None


def load(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``run_dir/checkpoint.npz``: ``(arrays, meta)``.

    Raises:
        CheckpointError: no checkpoint there, or it is truncated / corrupt / not ours.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        from sim.results import RESULT_FILES, path_override, resume_override

        if any((Path(run_dir) / name).exists() for name in RESULT_FILES):  # a run stopped before it checkpointed
            raise CheckpointError(f"no checkpoint in {run_dir}: its run stopped before it checkpointed a round (or ran "
                                  "with sim.checkpoint=false), so there is nothing to resume; start it again there: "
                                  f"the same command with {shlex.quote(path_override('hydra.run.dir', run_dir))} "
                                  f"instead of {shlex.quote(resume_override(run_dir))}")
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {CHECKPOINT}): sim.resume needs the run "
                              "directory of a run that finished at least one round")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: closed on a bad file
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop(META).tobytes().decode())
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the checkpoint {path} is unreadable ({type(exc).__name__}); it cannot be resumed: "
                              "start the run again without sim.resume") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"the checkpoint {path} is not one this simulator wrote (its header is a "
                              f"{type(meta).__name__}); it cannot be resumed: start the run again without sim.resume")
    return arrays, meta


def finished_round(run_dir: Path) -> int | None:
    """The last finished round recorded in ``run_dir``'s checkpoint (None: no readable checkpoint)."""
    try:
        with open(Path(run_dir) / CHECKPOINT, "rb") as f, np.load(f, allow_pickle=False) as z:
            meta = json.loads(z[META].tobytes().decode())
    except Exception:  # noqa: BLE001 -- any unreadable file means "nothing to resume"
        return None
    return None if header_problem(meta) else int(meta["round"])


# Keys that may differ between a run and its resumption (they do not change the numbers).
RESUME_FREE = ("resume", "progress", "verbose", "plots", "tensorboard", "mlflow", "mlflow_dir", "backend", "ray_address", "num_cpus", "round_timeout",
               "checkpoint", "client_resources", "cache_dir", "devices_per_node", "max_nodes", "shared_ray_session",
               "sweep_parallel")
"""``sim`` keys that change how a run is executed, never its numbers: a resume may differ in them (and a
checkpoint written before one of them existed still resumes)."""


def comparable(cfg: Config) -> dict[str, Any]:
    """The config as plain values without the keys a resumed run may change (:data:`RESUME_FREE`),
    without the strategy keys that have no effect in this run
    (:meth:`~sim.core.config.StrategyConfig.inert_keys`) and without the method's wiring (its classes,
    :data:`~sim.core.config.StrategyConfig.WIRING`: ``strategy.name`` identifies the method), with
    ``servers.routing=auto`` resolved as the run resolves it."""
    out = plain(cfg)
    out["servers"]["routing"] = str(cfg.servers.resolved_routing)
    for k in RESUME_FREE:
        out["sim"].pop(k, None)
    for k in (*cfg.strategy.inert_keys(), *cfg.strategy.WIRING):
        out["strategy"].pop(k, None)
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} in the run, {b!r} now)"


def reference_started(cfg: Config, run_dir: Path) -> bool:
    """True when a run with failures was stopped during its all-up reference run: the main
    directory has no checkpoint yet, ``reference/`` has one (or has finished)."""
    ref = Path(run_dir) / "reference"
    return (cfg.failures.name != FailureKind.none and cfg.failures.reference
            and not (Path(run_dir) / CHECKPOINT).is_file()
            and ((ref / CHECKPOINT).is_file() or (ref / "summary.json").is_file()))


def open_for_resume(cfg: Config, run_dir: Path) -> tuple[tuple[dict, dict] | None, int]:
    """Load ``run_dir``'s checkpoint and check it belongs to this config.

    Returns:
        ``((arrays, meta), finished_round)``; ``(None, 0)`` when the run was stopped during its
        all-up reference run (:func:`reference_started`): the reference is resumed (its own
        checkpoint is checked then), and the run with failures starts from round 1.

    Raises:
        ConfigError: no run or checkpoint there, an unreadable checkpoint, a different config, or a
            metrics.jsonl the checkpoint cannot restore (:func:`sim.journal.proven`).
    """
    from sim import journal

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"sim.resume={run_dir} is not a directory: give the run directory to continue")
    if reference_started(cfg, run_dir):
        return None, 0
    try:
        arrays, meta = load(run_dir)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    problem = header_problem(meta)
    diff = None if problem else _first_difference(meta["config"], comparable(cfg))
    if diff:
        raise ConfigError(f"{run_dir} was run with a different config: {diff}; resume with the run's own "
                          "overrides (see its .hydra/overrides.yaml)")
    problem = problem or header_problem(meta, cfg.sim.num_rounds)
    if problem:
        raise ConfigError(f"the checkpoint in {run_dir} cannot be resumed ({problem}): start the run again "
                          "without sim.resume")
    journal.proven(run_dir, arrays, int(meta["round"]))  # metrics.jsonl can be made what the checkpoint proves
    return (arrays, meta), int(meta["round"])


FINAL = "final"
"""The part of the last round's checkpoint that lets a resume write the summary without running a
round again (:func:`final_part`, :func:`final_state`)."""


def final_part(last_eval: dict[str, np.ndarray], metrics: dict[str, Any], table: dict | None,
               dead: list[int]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`sim.pipeline.finish` needs from the last round, as ``(arrays, meta)`` for the last
    round's checkpoint: the pooled evaluation records, their metrics, the servers' table, the dead servers."""
    arrays = {f"{FINAL}/eval/{k}": np.asarray(v) for k, v in last_eval.items()}
    return arrays, {"metrics": metrics, "table": table, "dead": [int(s) for s in dead], "eval": sorted(last_eval)}


def final_state(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any] | None:
    """:func:`final_part` read back from a checkpoint (None: the checkpoint has none)."""
    part = meta.get(FINAL)
    if not isinstance(part, dict) or not isinstance(part.get("metrics"), dict):
        return None
    try:
        last_eval = {k: arrays[f"{FINAL}/eval/{k}"] for k in part["eval"]}
    except (KeyError, TypeError):
        return None
    return {"last_eval": last_eval, "metrics": part["metrics"], "table": part.get("table"),
            "dead": [int(s) for s in part.get("dead", [])]}
