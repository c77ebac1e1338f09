"""The one adapter around Flower's simulation engine on Ray.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.4x but is the only in-process
entry; everything that touches it, Ray's start-up and the Flower/Ray log noise is here.
Flower starts Ray only if it is not already running, so this module starts (or joins) Ray
itself: ``sim.ray_address=null`` starts a local instance, ``auto`` or ``host:port`` joins an
existing cluster (``ray start --head``).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A Ray call after shutdown must fail, not silently start a new cluster (and hang at exit).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


from sim.core.config import Backend, ResourcesConfig, SimConfig  # noqa: E402
from sim.core.errors import ConfigError  # noqa: E402
from sim.core.stop import SIGNAL, STOP, Interrupted  # noqa: E402


class EngineError(RuntimeError):
    """The simulation engine could not start or run (one line: what and how to fix)."""


class NodeLost(EngineError):
    """The Ray node a run uses died mid-run (:func:`sim.raynode.node_lost`; one line). The round it
    happened in is not kept, so the run resumes from its last checkpoint."""


def check_node(when: str) -> None:
    """Fail when the Ray node this process uses has died (:func:`sim.raynode.lost_message`; ``when``:
    ``during round 3``).

    Raises:
        NodeLost: one line, naming what died and where its log is.
    """
    from sim import raynode

    message = raynode.lost_message(started_here(), when)
    if message:
        raise NodeLost(message)


def started_here() -> bool:
    """Whether the Ray this process is connected to is a local instance it started (its processes are
    this process's children)."""
    return bool(_STARTED and _STARTED[0])


SWEEP_RAY_ENV = "L2H_SWEEP_RAY_ADDRESS"
"""Set by a sweep running several jobs at once (:mod:`sim.sweep`) to the address of the local Ray it
started: a job with ``sim.ray_address=null`` joins that Ray instead of starting its own."""
SWEEP_JOBS_ENV = "L2H_SWEEP_JOBS_AT_ONCE"
"""Set by a sweep running N > 1 jobs at once (:mod:`sim.sweep`): a job on a Ray it did not start takes
1/N of the device-worker pool (:func:`worker_resources`), so the jobs' pools together fit the cluster."""


DISPATCH = threading.Event()
"""Set when the ServerApp has pushed messages: the simulation engine's dispatcher looks for them
at once instead of at its next 0.1 s poll (:func:`dispatch_on_push`)."""
STOP_GRACE_S = 10.0
"""After a stop, how long the engine waits for every thread that may still call Ray (the ServerApp
thread, Flower's device-worker threads) before it gives up on them (:func:`settle_threads`)."""

_SHIELD: list[int] = []
"""Non-empty while the main thread is in a section a KeyboardInterrupt must not cut short
(``ray.init``, ``ray.shutdown``): a stop signal then only sets :data:`STOP`, and the section's end
raises (:func:`shielded`)."""
_RAISED: list[bool] = []
"""Whether the stop has been raised in the main thread (once: later signals do not interrupt the cleanup)."""
ON_FIRST_SIGNAL: list[Any] = []
"""Callables run (in the main thread, from the handler) when the first stop signal arrives: the runner
starts its exit watchdog here (``sim.run``)."""
ON_REPEATED_SIGNAL: list[Any] = []
"""Callables run when a second stop signal arrives (the user insists: the runner exits at once)."""
_STARTED: list[bool] = []
"""Whether this process started the local Ray instance it is connected to (so it must stop it)."""
ON_NODE_LOST: list[Any] = []
"""Callables run, in a watcher thread, with the one-line failure (:func:`sim.raynode.lost_line`) the
moment the local Ray instance this process started loses its raylet or GCS server
(:func:`sim.raynode.watch`): the runner prints its one line and ends the process there (``sim.run``),
before Ray's core worker ends it with status 1 and no word. With none registered (the simulator used
as a library) the end-of-round check (``sim.pipeline.Federation.check_node``) is all there is."""


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM: set :data:`STOP` and raise KeyboardInterrupt in the main thread -- once, and
    not inside a :func:`shielded` section (its end raises instead)."""
    first = not SIGNAL
    STOP.set()
    SIGNAL.append(signum)
    for hook in (ON_FIRST_SIGNAL if first else ON_REPEATED_SIGNAL):
        hook()
    if not _SHIELD and not _RAISED:
        _RAISED.append(True)
        raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM both stop the run the same way: :data:`STOP` is set and the main thread
    gets KeyboardInterrupt (:func:`_on_signal`). Installed once, before Ray starts, and kept: Ray's
    own SIGTERM handler (``sys.exit`` from ``ray.init``) is never installed (:func:`_keep_handlers`).
    A no-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


@contextmanager
def shielded() -> Iterator[None]:
    """A section a stop signal must not interrupt (starting or stopping Ray): the signal is recorded,
    and KeyboardInterrupt is raised when the section ends (unless it ends with an exception)."""
    _SHIELD.append(1)
    try:
        yield
    finally:
        _SHIELD.pop()
    if STOP.is_set() and not _SHIELD and not _RAISED and SIGNAL:
        _RAISED.append(True)
        raise KeyboardInterrupt


_HELD: list[int] = []
"""Entries :func:`hold_stops` added to :data:`_SHIELD` (removed by :func:`release_stops`)."""


def hold_stops() -> None:
    """Until :func:`release_stops`, a stop signal only sets :data:`STOP` (a second one still exits at
    once, and the runner's watchdog still runs). For the runner's own start-up -- the command line's
    checks and Hydra composing each job's config: a KeyboardInterrupt raised inside Hydra or OmegaConf
    can leave them half-way through a change, and the exception that then surfaces is a config error
    Hydra prints (``'NoneType' object has no attribute '_invalidate_flags_cache'``) instead of the stop."""
    _SHIELD.append(1)
    _HELD.append(1)


def release_stops() -> None:
    """End :func:`hold_stops`; a stop that came meanwhile is raised now (KeyboardInterrupt)."""
    while _HELD:
        _HELD.pop()
        _SHIELD.pop()
    if STOP.is_set() and not _SHIELD and not _RAISED and SIGNAL:
        _RAISED.append(True)
        raise KeyboardInterrupt


@contextmanager
def _keep_handlers() -> Iterator[None]:
    """Within the block (``ray.init``) this process's SIGINT / SIGTERM handling stays as it is:
    ``signal.signal`` leaves both alone (``ray.init`` installs a SIGTERM handler that calls
    ``sys.exit``, which would abort a half-started Ray and bypass the stop), and Ray's core worker does
    not install its C++ failure-signal handler (it catches SIGTERM below Python, prints a stack dump
    and aborts the process). The handlers are installed again afterwards (:func:`install_signal_handlers`)."""
    from ray._private import ray_constants

    original, no_dump = signal.signal, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER

    def keep(signum: int, handler: Any) -> Any:
        if signum in (signal.SIGINT, signal.SIGTERM):
            return signal.getsignal(signum)
        return original(signum, handler)

    signal.signal = keep  # type: ignore[assignment]
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver's core worker starts
    try:
        yield
    finally:
        signal.signal = original  # type: ignore[assignment]
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = no_dump
        if signal.getsignal(signal.SIGTERM) is _on_signal:
            install_signal_handlers()  # the C-level handler too, whatever a library did below Python


class StoppableGrid:
    """The ServerApp's Grid, with ``send_and_receive`` that gives up when :data:`STOP` is set.

    Flower runs the ServerApp in a non-daemon thread that waits for device replies for up to
    ``sim.round_timeout``; after Ctrl-C the simulation engine is gone and no reply will come, so
    without this the process would hang at exit. Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Any, poll_s: float = 0.01):
        self._grid, self._poll = grid, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Any:
        """The grid's node ids (the start-up handshake polls them).

        Raises:
            Interrupted: the run is stopping.
        """
        if STOP.is_set():
            raise Interrupted("stopped while waiting for the simulation's nodes")
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        """Push ``messages``, then pull replies until all arrived, ``timeout`` passed, or STOP.

        Raises:
            Interrupted: the run is stopping.
        """
        pending = set(self._grid.push_messages(messages))
        DISPATCH.set()
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        while pending and (end is None or time.monotonic() < end):
            if STOP.is_set():
                raise Interrupted("stopped while waiting for device replies")
            got = list(self._grid.pull_messages(pending))
            out.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return out


def quiet_logs(verbose: bool) -> None:
    """Keep Flower's, Ray's and the data libraries' INFO chatter out of the user's way unless verbose.

    Only log levels change here; Python warnings are left to Python's default filters (so a
    deprecation in a library we call still shows where Python shows it, and pytest turns it into an
    error). Flower's ``run_simulation`` deprecation notice is a log record on the ``flwr`` logger,
    so it is hidden with the rest of Flower's log unless verbose.
    """
    level = logging.DEBUG if verbose else logging.ERROR
    for name in ("flwr", "ray", "filelock", "datasets", "urllib3", "alembic", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(level)
    # matplotlib's PDF backend logs every font subset it embeds at INFO (hundreds of lines per run)
    for name in ("fontTools", "matplotlib"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Flower logs every failed device reply (an injected dropout too) with its traceback at ERROR;
    # the run counts them in metrics.jsonl and says so at the end, so they stay hidden unless verbose.
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # A helper-server method that raised (servers.handles.ServerMethodError) logs its traceback here;
    # the run then fails with one line, and with the traceback above it when verbose.
    logging.getLogger("servers.handles").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if not verbose:
        # Read by huggingface_hub / datasets when they are imported (later, on the hub data path).
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")


def start_ray(address: str | None, num_cpus: int | None, verbose: bool) -> bool:
    """Start a local Ray or join ``address``; False if Ray was already initialised in this process.

    Raises:
        EngineError: one-line reason (e.g. no Ray cluster answers at ``address``).
    """
    import ray

    from sim.raynode import quiet_error_channel

    quiet_error_channel(verbose)  # Ray's error channel off the console unless verbose (sim/raynode.py)
    if ray.is_initialized():
        return False
    shared = os.environ.get(SWEEP_RAY_ENV) if not address else None
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "configure_logging": True,
    }
    if address:
        check_reachable(address)
        kwargs["address"] = address
    else:
        # "local": always a fresh private instance. Without it Ray joins whatever cluster
        # /tmp/ray/ray_current_cluster names, and hangs for minutes if that head has died.
        kwargs["address"] = "local"
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    if shared:
        # The sweep's local instance, started by the sweep's process with this project's environment
        # (its workers already import this code): joined as it is, nothing shipped.
        kwargs["address"] = shared
        init_ray(kwargs, shared)
        return True
    env = runtime_env(address)
    if address:
        kwargs["runtime_env"] = env
        init_ray(kwargs, address)
    else:
        # A local instance's processes are this process's children: they inherit its environment,
        # so the variables are set for ray.init only. Passed as a runtime_env instead, they would
        # keep every actor off the workers Ray prestarts (their environment differs): measured on
        # 2 cores, the default run's handshake went from a median 11.4 s to 9.5 s without it.
        with _environ(env["env_vars"]):
            init_ray(kwargs, address)
    return True


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def init_ray(kwargs: dict[str, Any], address: str | None) -> None:
    """``ray.init(**kwargs)``, which a stop signal cannot cut short and which keeps this process's
    signal handlers (:func:`shielded`, :func:`_keep_handlers`). A Ray that started while the run was
    being stopped, or that failed half-way, is shut down again before this returns.

    Raises:
        KeyboardInterrupt: a stop signal arrived meanwhile (Ray is down again).
        EngineError: Ray could not start or join ``address`` (one line).
    """
    import ray

    failure: BaseException | None = None
    with shielded():
        try:
            with _keep_handlers():
                ray.init(**kwargs)
            _STARTED[:] = [not address]
            if not address:
                from sim import raynode

                raynode.LOST.clear()
                raynode.watch(ray._private.worker._global_node, _node_lost)
        except Exception as exc:  # noqa: BLE001 -- any failure of ray.init is one line, after cleaning up
            failure = exc
        if failure is not None or STOP.is_set():
            stop_ray()
    if failure is not None:
        if STOP.is_set():
            raise KeyboardInterrupt
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        msg = " ".join(str(failure).split())[:200] or type(failure).__name__
        raise EngineError(f"could not start or join {where} ({type(failure).__name__}: {msg}); check "
                          "sim.ray_address (null for a local run, or the address `ray start --head` printed) "
                          "and that Ray's temporary directory (RAY_TMPDIR, /tmp/ray) is writable")


def _node_lost(lost: str) -> None:
    """The watcher's report (:func:`sim.raynode.watch`): the one line to every :data:`ON_NODE_LOST` hook."""
    from sim import raynode

    line = raynode.lost_line(lost, "during the run")
    for hook in list(ON_NODE_LOST):
        hook(line)


PROJECT_PACKAGES = ("sim", "strategies", "servers", "clients", "configs")
"""The project's top-level packages: what Ray ships to the workers of a cluster (``py_modules``)."""


def runtime_env(address: str | None) -> dict[str, Any]:
    """Ray's runtime environment for this run's workers (device actors, server actors).

    A local instance (``address`` None) runs on this machine: workers import the project from the
    driver's ``sys.path`` (given to them as ``PYTHONPATH``), nothing is packed or uploaded. Joining a
    cluster (``auto`` or ``host:port``), the project's packages (:data:`PROJECT_PACKAGES`) are shipped
    to every node by Ray (``py_modules``: zipped once, uploaded to the cluster's GCS, unpacked on each
    node and put first on its workers' ``sys.path``), so a node needs only the dependencies installed,
    and runs the driver's code, not whatever version it has; ``sim.cache_dir`` must still be a path
    every node can read.
    """
    env_vars = {"FLWR_TELEMETRY_ENABLED": "0"}
    if not address:
        return {"env_vars": {**env_vars, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    return {"py_modules": project_packages(), "excludes": ["__pycache__", "*.pyc"], "env_vars": env_vars}


def project_packages() -> list[str]:
    """The directories of :data:`PROJECT_PACKAGES`, as this process imports them (not imported here).

    Raises:
        EngineError: a package cannot be found (the project is neither installed nor on sys.path).
    """
    import importlib.util

    dirs = []
    for name in PROJECT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise EngineError(f"cannot find the package {name!r} to ship to the Ray cluster: "
                              "run from the project root or `pip install -e .`")
        dirs.append(str(list(spec.submodule_search_locations)[0]))
    return dirs


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (seconds, not Ray's minutes of retries) if nothing listens at ``host:port``.

    ``auto`` and ``local`` are left to Ray, which answers at once when no cluster runs.

    Raises:
        EngineError: the address is malformed or no server accepts a TCP connection there.
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise EngineError(f"sim.ray_address={address!r} is not host:port (or auto): "
                          "use the address `ray start --head` printed, e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EngineError(f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}); "
                          "start one with `ray start --head` or set sim.ray_address=null for a local run") from None


def stop_ray() -> None:
    """Shut Ray down in this process (a local instance started here: its processes too), without a
    stop signal cutting the shutdown short. Also after a failed ``ray.init`` (what it started). On a
    node that died, Ray is left without disconnecting (:func:`abandon_ray`)."""
    import ray

    from sim import raynode

    raynode.disarm()
    if node_gone():
        abandon_ray()
        return
    with shielded():
        ray.shutdown()
    _STARTED.clear()


def node_gone() -> bool:
    """Whether the Ray node this process uses has died, as far as this process can see without asking
    the GCS (:func:`sim.raynode.node_lost` with ``ask_gcs=False``; once found, for good). Called while
    shutting down: a GCS that is exiting too (a stop signal sent to the whole process group) can keep a
    ``ray.nodes()`` call waiting for its reconnect timeout, 60 s (measured: a stress try still running
    30 s after SIGTERM to its group)."""
    from sim import raynode

    if not raynode.LOST:
        lost = raynode.node_lost(started_here(), ask_gcs=False)
        if lost is not None:
            raynode.LOST.append(lost)
    return bool(raynode.LOST)


def abandon_ray() -> None:
    """Leave a Ray whose node died without disconnecting from it: Ray's core worker, finding its raylet
    gone while it disconnects (``ray.shutdown``), ends the process with status 1 and no word. What is
    left of a local instance started here is killed instead (:func:`sim.raynode.abandon`); the process
    must then end with ``os._exit`` (the runner's :func:`sim.run._leave` does, Ray being still
    initialised), Ray's own exit hook would disconnect."""
    import ray

    from sim import raynode

    raynode.abandon(getattr(ray._private.worker, "_global_node", None), started_here())


def kill_ray(timeout: float = 10.0) -> None:
    """The last resort of a stop that could not wait for every thread: ``ray.shutdown`` in a helper
    thread, at most ``timeout`` seconds; then, if a local instance started here is still there, its
    processes are killed directly, and whatever of its process tree is still running a second later
    (:func:`sim.raynode.end_processes`). Call only right before the process exits (a thread may still hang on Ray
    afterwards)."""
    import ray

    from sim import raynode

    if not ray.is_initialized() and not _STARTED:
        return
    raynode.disarm()
    if node_gone():
        abandon_ray()
        return
    node = getattr(ray._private.worker, "_global_node", None)
    tree = raynode.processes(node) if _STARTED else []  # before they are re-parented
    t = threading.Thread(target=ray.shutdown, name="l2h-ray-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive() and node is not None and _STARTED:
        try:
            node.kill_all_processes(check_alive=False, allow_graceful=False)
        except Exception:  # noqa: BLE001 -- best effort while exiting
            pass
    raynode.end_processes(tree)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, verbose: bool) -> Iterator[None]:
    """Ray up for the duration of the block; shut down afterwards (also on errors and stops) if
    started here -- but only once no thread can call Ray any more: the block's threads are waited for
    (:func:`settle_threads`); if one is still running, Ray stays up and :data:`STUCK` names it (the
    runner then ends the process, :func:`kill_ray`)."""
    started = start_ray(address, num_cpus, verbose)
    before = set(threading.enumerate())
    try:
        yield
    finally:
        with shielded():
            stuck = settle_threads(before)
            if started and not stuck:
                stop_ray()


STUCK: list[str] = []
"""Threads that were still running (and may still call Ray) when the engine stopped waiting for them."""


def settle_threads(before: set[threading.Thread], grace_s: float | None = None) -> list[str]:
    """Wait (at most ``grace_s``, default :data:`STOP_GRACE_S`) for the non-daemon threads started
    since ``before`` -- the ServerApp's, Flower's device workers -- to end; returns the names of those
    still running (also kept in :data:`STUCK`)."""
    deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
    for th in [t for t in threading.enumerate() if t not in before and not t.daemon]:
        th.join(max(0.0, deadline - time.monotonic()))
    STUCK[:] = [t.name for t in threading.enumerate() if t not in before and not t.daemon and t.is_alive()]
    return list(STUCK)


def release_device_workers() -> None:
    """Make Flower's simulation engine leave Ray up when it stops, for :func:`ray_session` to shut
    down once every thread is done with it.

    Flower's ``RayBackend.terminate`` (run when its engine stops, also on Ctrl-C) calls
    ``ray.shutdown()`` while its device-worker threads and the ServerApp thread may still be inside
    ``ray.get``/``ray.wait``: those calls then never return and the process hangs at exit. Here
    ``terminate`` only terminates the device actors; on a stop it also kills the actors that are busy
    with a message, so the threads waiting on them are released at once. Applied once per process.

    What Flower lacks (upstream-style): a backend option to leave an externally managed Ray
    instance running on ``terminate``. Version-guarded like :func:`dispatch_on_push`.

    Raises:
        FlowerChanged: Flower is outside :data:`FLOWER_TESTED`, or ``RayBackend`` no longer has the
            ``terminate`` method and the ``pool.terminate_all_actors`` the replacement relies on.
    """
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(RayBackend, "_leaves_ray_up", False):
        return
    low, high = FLOWER_TESTED
    found = flower_version()
    if not low <= found < high or not callable(getattr(RayBackend, "terminate", None)) or \
            not callable(getattr(BasicActorPool, "terminate_all_actors", None)):
        raise FlowerChanged(f"flwr {found[0]}.{found[1]}: sim/engine.py release_device_workers replaces "
                            f"RayBackend.terminate, tested with flwr {low[0]}.{low[1]}-{high[0]}.{high[1] - 1}; "
                            f"install flwr[simulation]>={low[0]}.{low[1]},<{high[0]}.{high[1]}")

    def terminate(self: Any) -> None:
        import ray

        pool = getattr(self, "pool", None)
        if pool is None:
            return
        pool.terminate_all_actors()
        if STOP.is_set():
            for actor in list(getattr(pool, "_future_to_actor", {}).values()):
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 -- already gone
                    pass

    RayBackend.terminate = terminate
    RayBackend._leaves_ray_up = True


FLOWER_TESTED = ((1, 41), (1, 43))
"""Flower releases this module is tested with, ``[low, high)`` (pyproject.toml pins the same range)."""

RESTART_DEAD_WORKERS = {"max_restarts": -1, "max_task_retries": 0}
"""Ray actor options for Flower's device workers, passed through ``client_resources`` (Flower's
RayBackend hands every key of it to ``ClientAppActor.options()``). A worker process that dies is
restarted by Ray, as often as it dies; the message it was running is not retried
(``max_task_retries=0``): it becomes an error reply, counted in the round's ``train_errors`` /
``eval_errors``, and the device's state is untouched (Flower keeps it in the driver). Without a
restart, Flower's ``BasicActorPool`` puts the dead actor back into its pool and every later
message it gets fails too (``ActorDiedError``)."""


def worker_resources(client_resources: ResourcesConfig, jobs_at_once: int = 1) -> dict[str, float | int]:
    """Flower's ``backend_config["client_resources"]`` for a device worker: ``sim.client_resources``
    (CPUs, GPUs per worker actor) plus :data:`RESTART_DEAD_WORKERS`.

    ``jobs_at_once`` = N > 1 (jobs of a parallel sweep on one Ray): each worker asks for N times the
    resources. Flower sizes its worker pool from the cluster's whole resources, node by node
    (``int(node CPUs / worker CPUs)``), so N jobs asking for the plain amount would make N full pools:
    the workers that do not fit wait for resources that the other jobs' workers hold until those jobs
    end -- and those jobs wait on their own waiting workers. With N times the amount the N pools fit."""
    n = max(1, int(jobs_at_once))
    return {"num_cpus": float(client_resources.num_cpus) * n, "num_gpus": float(client_resources.num_gpus) * n,
            **RESTART_DEAD_WORKERS}


def check_worker_pool(resources: dict[str, float | int], jobs_at_once: int) -> None:
    """Refuse a run whose device-worker pool would be empty on the Ray it is connected to (counted as
    Flower counts it, node by node): Flower would only log a warning and wait.

    Raises:
        EngineError: one line with the nodes' CPUs and the fix.
    """
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]  # one GCS call
    cpus = [float(r.get("CPU", 0)) for r in alive]
    gpus = [float(r.get("GPU", 0)) for r in alive]
    need_cpu, need_gpu = float(resources["num_cpus"]), float(resources["num_gpus"])

    def fit(c: float, g: float) -> int:
        n = int(c / need_cpu)
        return min(n, int(g / need_gpu)) if need_gpu > 0 else n

    if sum(fit(c, g) for c, g in zip(cpus, gpus)) >= 1:
        return
    what = (f"a sweep running {jobs_at_once} jobs at once gives each device worker {need_cpu:g} CPUs "
            f"(sim.client_resources x sim.sweep_parallel)" if jobs_at_once > 1 else
            f"each device worker asks for {need_cpu:g} CPUs and {need_gpu:g} GPUs (sim.client_resources)")
    fix = "lower sim.sweep_parallel or sim.client_resources" if jobs_at_once > 1 else "lower sim.client_resources"
    raise EngineError(f"no device worker fits on this Ray (nodes' CPUs: {[round(c, 2) for c in cpus]}, GPUs: "
                      f"{[round(g, 2) for g in gpus]}): {what}; {fix}, or give Ray more CPUs (sim.num_cpus, a cluster)")


def flower_version() -> tuple[int, int]:
    """The installed Flower's ``(major, minor)``."""
    from importlib.metadata import version

    major, minor = version("flwr").split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class FlowerChanged(EngineError):
    """The installed Flower is not one this project's Flower patch was tested with (one line)."""


DISPATCH_SIGNATURE = ("state", "queue", "nodes_mapping", "f_stop")
"""The parameters of Flower's ``vce_api.add_messages_to_queue`` that :func:`dispatch_on_push` replaces."""


def check_dispatch_patch() -> Any:
    """The module :func:`dispatch_on_push` patches, after checking it is the one the patch was written for.

    Raises:
        FlowerChanged: Flower is outside :data:`FLOWER_TESTED`, or its dispatcher is not the function
            (name, parameters, caller) the patch replaces.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    low, high = FLOWER_TESTED
    found = flower_version()
    fix = ("sim/engine.py patches Flower's simulation dispatcher (dispatch_on_push), tested with flwr "
           f"{low[0]}.{low[1]}-{high[0]}.{high[1] - 1}; install flwr[simulation]>={low[0]}.{low[1]},<{high[0]}.{high[1]}")
    if not low <= found < high:
        raise FlowerChanged(f"flwr {found[0]}.{found[1]} is installed: {fix}")
    fn, caller = getattr(vce_api, "add_messages_to_queue", None), getattr(vce_api, "run_api", None)
    import inspect

    if fn is None or caller is None or "add_messages_to_queue" not in caller.__code__.co_names or \
            tuple(inspect.signature(fn).parameters) != DISPATCH_SIGNATURE:
        raise FlowerChanged(f"flwr {found[0]}.{found[1]} changed vce_api.add_messages_to_queue or its caller run_api: {fix}")
    return vce_api


def dispatch_on_push() -> None:
    """Make Flower's simulation engine hand pushed messages to the device actors at once.

    What Flower lacks (upstream-style): the simulation engine's dispatcher thread
    (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) polls the LinkState for every
    node, then sleeps 0.1 s (``f_stop.wait(0.1)``), so every message a ServerApp pushes waits up to
    0.1 s before a device actor sees it: a synchronous round (train + evaluate) pays up to 0.2 s of
    idle waiting. The Grid has no way to wake the dispatcher when it pushes. The replacement is the
    same loop, waking also when :class:`StoppableGrid` pushes (:data:`DISPATCH`); the scan is Flower's.

    Applied once per process. Version-guarded (:func:`check_dispatch_patch`): on a Flower whose
    dispatcher differs it raises instead of silently doing nothing or hanging the run.

    Raises:
        FlowerChanged: see :func:`check_dispatch_patch`.
    """
    vce_api = check_dispatch_patch()
    if getattr(vce_api, "_dispatch_on_push", False):
        return

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            DISPATCH.clear()  # a push during the scan below sets it again: no wake-up is lost
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            DISPATCH.wait(0.1)

    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api._dispatch_on_push = True


def run_fleet(server_app: Any, client_app: Any, num_clients: int, client_resources: ResourcesConfig,
              verbose: bool, jobs_at_once: int = 1) -> None:
    """Run ``server_app`` against ``num_clients`` virtual nodes of ``client_app`` on Ray
    (:func:`flwr.simulation.run_simulation`; device workers restart when they die,
    :data:`RESTART_DEAD_WORKERS`).

    Raises:
        FlowerChanged: the installed Flower is not one the dispatch patch was tested with.
        EngineError: the simulation engine failed (the ServerApp's own exception is chained).
    """
    from flwr.simulation import run_simulation

    quiet_logs(verbose)
    dispatch_on_push()
    backend_config = {"client_resources": worker_resources(client_resources, jobs_at_once)}
    check_worker_pool(backend_config["client_resources"], jobs_at_once)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_name="ray", backend_config=backend_config, verbose_logging=verbose)


def run(sim_cfg: SimConfig, server_main: Any, client_app: Any, num_clients: int) -> None:
    """Run a fleet: ``server_main(grid)`` (the ServerApp's main, :meth:`sim.server_app.Federation.main`)
    drives ``num_clients`` nodes of ``client_app`` (:data:`sim.client_app.app`).

    ``sim.backend=ray``: Flower's simulation engine on Ray (started or joined here, shut down
    after if started here). ``sim.backend=inprocess``: the same apps called in this process.

    Raises:
        EngineError: Ray could not start, or the simulation failed (the ServerApp's own error in
            the message).
    """
    if sim_cfg.backend == Backend.inprocess:
        from sim.inprocess import InProcessGrid

        server_main(InProcessGrid(client_app, num_clients))
        return
    from sim import raynode
    from sim.server_app import server_app

    def main(grid: Any) -> None:
        server_main(StoppableGrid(grid))

    with ray_session(sim_cfg.ray_address, sim_cfg.num_cpus, sim_cfg.verbose):
        release_device_workers()
        # One of several jobs running at once on a Ray this process did not start (a parallel sweep's
        # shared Ray, or a cluster): a 1/N share of the device workers (:func:`worker_resources`).
        private = bool(_STARTED and _STARTED[0])
        jobs_at_once = 1 if private else int(os.environ.get(SWEEP_JOBS_ENV, "1"))
        try:
            run_fleet(server_app(main), client_app, num_clients, sim_cfg.client_resources, sim_cfg.verbose,
                      jobs_at_once)
        except KeyboardInterrupt:
            STOP.set()  # the ServerApp thread stops at its next check (ray_session waits for it)
            raise
        except Exception as exc:  # the ServerApp's own error is the useful one
            cause = exc.__cause__ or exc
            if STOP.is_set() or isinstance(cause, Interrupted):
                raise KeyboardInterrupt from exc
            if isinstance(cause, (ConfigError, NodeLost)):  # already one line (a full disk, a dead node)
                raise cause from None
            lost = raynode.lost_message(started_here(), "during the run")
            if lost:  # what failed first (a reset connection, a lost actor) was the node dying
                raise NodeLost(lost) from exc
            raise EngineError(f"the simulation failed: {type(cause).__name__}: {cause}") from exc
        lost = raynode.lost_message(started_here(), "during the run")
        if lost:
            raise NodeLost(lost)
    if STOP.is_set():
        raise KeyboardInterrupt  # a stop that came while the engine was shutting down
