"""The Ray node under a run: whether it is still alive, and Ray's error channel off the console.

**A node that dies is a failed run, not a failure scenario.** When the raylet of the node a run uses
dies (killed from outside, the OOM killer), Ray's actors on it are lost: the helper servers look
crashed to the pool's health check and every deferral falls back to the legacy model, so the run
used to go on and end with exit 0 and legacy-only numbers that no injected failure explains.
:func:`node_lost` tells; the runner checks it at the end of every round, before the round is
recorded (``sim.pipeline.Federation.on_round``), and fails with one line (:class:`sim.engine.NodeLost`),
the last good checkpoint kept.

**A dead node ends the process at once.** Ray's core worker (the driver's too) ends its process
with status 1 and no word on the console -- ``_Exit(1)``, its only trace a line in the driver's Ray log
(``python-core-driver-*.log``: "The connection to the plasma store is failed. Terminate the process")
-- the first time it touches its dead raylet: reading or writing an object in the object store (any
object over Ray's 100 KiB inline limit: a device's reply, a server's state), or disconnecting
(``ray.shutdown``). The end-of-round check above rarely got its turn. So a local instance this
process started is watched (:func:`watch`): a daemon thread the kernel wakes the moment its raylet or
GCS server exits (a pidfd; polled every 50 ms where there is none) hands the one-line failure to
the runner, which prints it and exits 2 before the driver next touches the store. What stays open:
a driver thread *inside* an object-store call when the raylet dies, or starting one in the instant
before the watcher runs, still ends the process with status 1 and no line (measured: the driver
touches the store a few milliseconds per round). A node this process did not start (a cluster, a
parallel sweep's shared Ray) is not watched: only the end-of-round check covers it. And once a node
is lost, Ray is never disconnected from (:func:`abandon`): its remaining processes are killed
instead, and the process must end with ``os._exit``.

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

import os
import select
import threading
from typing import Any, Callable

WATCHED_KINDS = ("raylet", "gcs_server")
"""The processes of a local Ray instance whose exit is the node's death (Ray's process types)."""

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


def node_lost(started_here: bool, ask_gcs: bool = True) -> str | None:
    """What of this process's Ray node has died (None: nothing, or Ray is not up).

    ``started_here``: the local instance was started by this process -- its raylet and GCS server are
    this process's children, so their exit is seen at once (``Node.dead_processes``). Otherwise (a
    cluster, a sweep's shared Ray), and when ``ask_gcs``, the GCS is asked whether the driver's node
    is alive (``ray.nodes``; it notices a lost node after its health checks, seconds later; a GCS
    that is itself exiting can keep that call waiting for up to a minute).
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
            return exited(*dead[0])
    if not ask_gcs:
        return None
    try:
        me = ray.get_runtime_context().get_node_id()
        alive = {n.get("NodeID"): n.get("Alive") for n in ray.nodes()}
    except Exception as exc:  # noqa: BLE001 -- the GCS itself is gone
        return f"its GCS does not answer ({type(exc).__name__})"
    if alive.get(me) is False:
        return f"the cluster reports node {me[:12]} dead"
    return None


def exited(kind: str, proc: Any) -> str:
    """What :func:`node_lost` says of a local instance's process ``proc`` (a ``subprocess.Popen``) that exited."""
    return f"its {kind} (pid {proc.pid}) exited with status {proc.poll()}"


def lost_message(started_here: bool, when: str) -> str | None:
    """The one-line failure for a dead node (:func:`node_lost`; None: the node is alive), ``when``
    it was found (``during round 3``)."""
    lost = node_lost(started_here)
    if lost is None:
        return None
    return lost_line(lost, when)


def lost_line(lost: str, when: str) -> str:
    """The one-line failure for a node that died (``lost``: what of it, :func:`node_lost`), ``when``
    it was found."""
    return (f"the Ray node this run uses died {when} ({lost}): its helper servers and device workers died with "
            f"it, so no round after the last checkpoint is kept; its log is in {logs_dir()} (raylet.out; killed "
            "from outside, or out of memory?)")


_PIDFD_OPEN = getattr(os, "pidfd_open", None)
"""``os.pidfd_open`` where the platform has it (Linux 5.3+, Python 3.9+); None: :func:`watch` polls."""
_WATCH: dict[str, Any] = {}
"""The watcher running now (:func:`watch`): ``stop``, the Event that :func:`disarm` sets."""
LOST: list[str] = []
"""What of the node died, once :func:`watch` or :func:`abandon` found it (then Ray must not be disconnected)."""


def watch(node: Any, on_lost: Callable[[str], None], poll_s: float = 0.05) -> None:
    """Watch the local Ray instance ``node`` (a ``ray._private.node.Node`` this process started): the
    moment its raylet or GCS server exits, unless :func:`disarm` came first, ``on_lost(what)`` is
    called in a daemon thread (``what``: as :func:`node_lost` says it). One watcher at a time: a new
    one disarms the last.

    The thread sleeps in ``poll`` on a pidfd of each process (Linux 5.3+): the kernel wakes it when the
    process exits, however busy the driver is; without pidfds it polls every ``poll_s`` seconds."""
    disarm()
    procs = [(kind, info.process) for kind in WATCHED_KINDS
             for info in (getattr(node, "all_processes", None) or {}).get(kind, [])]
    if not procs:
        return
    stop = threading.Event()
    _WATCH.update(stop=stop, tree=processes(node))  # its agents now: a dead raylet's children are orphaned
    threading.Thread(target=_watch, args=(procs, on_lost, stop, poll_s), name="l2h-ray-node-watch",
                     daemon=True).start()


def _watch(procs: list[tuple[str, Any]], on_lost: Callable[[str], None], stop: threading.Event,
           poll_s: float) -> None:
    fds: list[int] = []
    try:
        for _, proc in procs:
            fds.append(_PIDFD_OPEN(proc.pid))
    except (TypeError, OSError):  # no pidfd here: poll the processes instead
        for fd in fds:
            os.close(fd)
        fds = []
    poller = select.poll() if fds else None
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        while not stop.is_set():
            dead = [(kind, proc) for kind, proc in procs if proc.poll() is not None]
            if dead:
                if not stop.is_set():
                    LOST[:] = [exited(*dead[0])]
                    on_lost(LOST[0])
                return
            if poller is not None:
                poller.poll(1000)  # a process exited, or a second passed (to notice a disarm)
            else:
                stop.wait(poll_s)
    finally:
        for fd in fds:
            os.close(fd)


def disarm() -> None:
    """Stop watching (:func:`watch`): Ray is being shut down on purpose, its processes' exits are no death."""
    _WATCH.pop("tree", None)
    stop = _WATCH.pop("stop", None)
    if stop is not None:
        stop.set()


def abandon(node: Any, started_here: bool) -> None:
    """Leave Ray on a lost node without disconnecting from it (Ray's core worker would end the process
    with status 1 and no word, finding its raylet gone): stop watching, and kill what is left of the
    local instance ``node`` if this process started it (its GCS server, agents, workers). Ray stays
    initialised in this process, which must then end with ``os._exit``: Ray's exit hook disconnects."""
    started_with = _WATCH.get("tree", [])
    disarm()
    if not LOST:
        LOST.append("abandoned")
    if started_here and node is not None:
        end_processes(started_with + processes(node), grace_s=0.0)  # psutil kills only the very processes listed


def processes(node: Any) -> list[Any]:
    """The processes of the local Ray instance ``node`` (its GCS server, raylet and every process they
    started: device and server workers, the dashboard and runtime-env agents), as ``psutil.Process``
    objects (Ray's own psutil); [] when they cannot be listed."""
    psutil = _psutil()
    if psutil is None:
        return []
    found = []
    for infos in getattr(node, "all_processes", {}).values():
        for info in infos:
            try:  # one at a time: a process already gone (a killed raylet) hides none of the others
                root = psutil.Process(info.process.pid)
                found += [root, *root.children(recursive=True)]
            except Exception:  # noqa: BLE001 -- best effort while exiting
                continue
    return found


def end_processes(procs: list[Any], grace_s: float = 1.0) -> None:
    """SIGKILL those of ``procs`` (``psutil.Process``) still running after ``grace_s`` seconds, and
    wait for them briefly. A shutdown cut short by a second Ctrl-C used to leave Ray's workers and
    agents running for tens of seconds after the driver had gone (they notice a lost raylet late)."""
    psutil = _psutil()
    if not procs or psutil is None:
        return
    try:
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()  # psutil checks the process is the one listed (not a reused pid)
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=2.0)
    except Exception:  # noqa: BLE001 -- best effort while exiting
        pass


def _psutil() -> Any:
    """Ray's own copy of psutil (importing ray puts its ``thirdparty_files`` on ``sys.path``), or None."""
    try:
        import ray  # noqa: F401

        import psutil
    except ImportError:  # pragma: no cover - Ray ships psutil
        return None
    return psutil


def logs_dir() -> str:
    """Where this Ray session's logs are (``raylet.out``, ``gcs_server.out``), or a generic hint."""
    try:
        import ray

        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001
        return "/tmp/ray/session_latest/logs"
