"""The Ray node under a run: whether it is still alive, and Ray's error channel off the console.

**A node that dies is a failed run, not a failure scenario.** When the raylet of the node a run uses
dies (killed from outside, the OOM killer), Ray's actors on it are lost: the helper servers look
crashed to the pool's health check and every deferral falls back to the legacy model, so the run
used to go on and end with exit 0 and legacy-only numbers that no injected failure explains.
:func:`node_lost` tells; the runner checks it at the end of every round, before the round is
recorded (``sim.pipeline.Federation.on_round``), and fails with one line (:class:`sim.engine.NodeLost`),
the last good checkpoint kept.

**Ray's error channel.** Ray's driver prints every error the cluster publishes -- a worker that died,
the raylet's last 20 log lines when it terminated -- to the console from its
``listen_error_messages`` thread, whatever ``log_to_driver`` says. Unless ``sim.verbose=true`` they
are kept off it (:func:`quiet_error_channel`): the run counts the device replies a dead worker cost
(``train_errors`` / ``eval_errors``) and says so in one line, and a dead node is the one-line failure
above. This replaces ``ray._private.worker.print_to_stdstream`` (looked up by that thread at each
message); on a Ray without it nothing is replaced and the messages show, as before.

**Nothing left behind.** A stop that cannot wait for Ray's own shutdown (a second Ctrl-C) ends the
local instance's whole process tree (:func:`processes`, :func:`end_processes`): cut short, the
shutdown left workers and agents running for tens of seconds after the driver had gone.
"""
from __future__ import annotations

from typing import Any

_VERBOSE: list[bool] = [True]
"""Whether Ray's error channel reaches the console (the running job's ``sim.verbose``)."""


def quiet_error_channel(verbose: bool) -> None:
    """Keep the messages Ray's driver prints from its error channel (``pid`` ``raylet``: dead workers,
    a terminated raylet) off the console unless ``verbose``. Applied once per process; the job's
    ``verbose`` is read at each message."""
    _VERBOSE[0] = bool(verbose)
    try:
        from ray._private import worker
    except ImportError:  # pragma: no cover - Ray is a dependency
        return
    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_l2h_quiet", False):
        return

    def print_to_stdstream(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not _VERBOSE[0] and data.get("pid") == "raylet":
            return None
        return original(data, *args, **kwargs)

    print_to_stdstream._l2h_quiet = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def node_lost(started_here: bool) -> str | None:
    """What of this process's Ray node has died (None: nothing, or Ray is not up).

    ``started_here``: the local instance was started by this process -- its raylet and GCS server are
    this process's children, so their exit is seen at once (``Node.dead_processes``). Otherwise (a
    cluster, a sweep's shared Ray) the GCS is asked whether the driver's node is alive (``ray.nodes``;
    it notices a lost node after its health checks, seconds later).
    """
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    if started_here and node is not None:
        try:
            dead = [(kind, proc) for kind, proc in node.dead_processes() if kind in ("raylet", "gcs_server")]
        except Exception:  # noqa: BLE001 -- an internal Ray changed: fall back to the GCS
            dead = []
        if dead:
            kind, proc = dead[0]
            return f"its {kind} (pid {proc.pid}) exited with status {proc.poll()}"
    try:
        me = ray.get_runtime_context().get_node_id()
        alive = {n.get("NodeID"): n.get("Alive") for n in ray.nodes()}
    except Exception as exc:  # noqa: BLE001 -- the GCS itself is gone
        return f"its GCS does not answer ({type(exc).__name__})"
    if alive.get(me) is False:
        return f"the cluster reports node {me[:12]} dead"
    return None


def lost_message(started_here: bool, when: str) -> str | None:
    """The one-line failure for a dead node (:func:`node_lost`; None: the node is alive), ``when``
    it was found (``during round 3``)."""
    lost = node_lost(started_here)
    if lost is None:
        return None
    return (f"the Ray node this run uses died {when} ({lost}): its helper servers and device workers died with "
            f"it, so no round after the last checkpoint is kept; its log is in {logs_dir()} (raylet.out; killed "
            "from outside, or out of memory?)")


def processes(node: Any) -> list[Any]:
    """The processes of the local Ray instance ``node`` (its GCS server, raylet and every process they
    started: device and server workers, the dashboard and runtime-env agents), as ``psutil.Process``
    objects (Ray's own psutil); [] when they cannot be listed."""
    try:
        import psutil

        roots = [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos]
        return roots + [child for root in roots for child in root.children(recursive=True)]
    except Exception:  # noqa: BLE001 -- best effort while exiting (no psutil, a process already gone)
        return []


def end_processes(procs: list[Any], grace_s: float = 1.0) -> None:
    """SIGKILL those of ``procs`` (``psutil.Process``) still running after ``grace_s`` seconds, and
    wait for them briefly. A shutdown cut short by a second Ctrl-C used to leave Ray's workers and
    agents running for tens of seconds after the driver had gone (they notice a lost raylet late)."""
    if not procs:
        return
    try:
        import psutil

        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()  # psutil checks the process is the one listed (not a reused pid)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=2.0)
    except Exception:  # noqa: BLE001 -- best effort while exiting
        pass


def logs_dir() -> str:
    """Where this Ray session's logs are (``raylet.out``, ``gcs_server.out``), or a generic hint."""
    try:
        import ray

        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001
        return "/tmp/ray/session_latest/logs"
