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
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# A Ray call after shutdown must fail, not silently start a new cluster (and hang at exit).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


from sim.core.config import Backend, ResourcesConfig, SimConfig  # noqa: E402
from sim.core.stop import SIGNAL, STOP, Interrupted  # noqa: E402


class EngineError(RuntimeError):
    """The simulation engine could not start or run (one line: what and how to fix)."""


DISPATCH = threading.Event()
"""Set when the ServerApp has pushed messages: the simulation engine's dispatcher looks for them
at once instead of at its next 0.1 s poll (:func:`dispatch_on_push`)."""
_SERVER_THREADS: list[threading.Thread] = []


def _on_signal(signum: int, frame: Any) -> None:
    STOP.set()
    SIGNAL.append(signum)
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM both stop the run the same way: :data:`STOP` is set and the main thread
    gets KeyboardInterrupt. Ray installs its own SIGTERM handler when it starts, so this is called
    again after ``ray.init``. A no-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


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
    """Keep Flower's INFO chatter and its deprecation warning out of the user's way unless verbose."""
    level = logging.DEBUG if verbose else logging.ERROR
    for name in ("flwr", "ray", "filelock", "datasets", "urllib3", "alembic", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(level)
    # matplotlib's PDF backend logs every font subset it embeds at INFO (hundreds of lines per run)
    for name in ("fontTools", "matplotlib"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Flower logs every failed device reply (an injected dropout too) with its traceback at ERROR;
    # the run counts them in metrics.jsonl and says so at the end, so they stay hidden unless verbose.
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    if not verbose:
        # Read by huggingface_hub / datasets when they are imported (later, on the hub data path).
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*run_simulation.*")


def start_ray(address: str | None, num_cpus: int | None, verbose: bool) -> bool:
    """Start a local Ray or join ``address``; False if Ray was already initialised in this process.

    Raises:
        EngineError: one-line reason (e.g. no Ray cluster answers at ``address``).
    """
    import ray

    if ray.is_initialized():
        return False
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
    # Workers must import the project's packages from wherever the driver does.
    kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                                          "FLWR_TELEMETRY_ENABLED": "0"}}
    try:
        ray.init(**kwargs)
        install_signal_handlers()
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        msg = " ".join(str(exc).split())[:200]
        raise EngineError(f"could not start or join {where} ({msg}); check sim.ray_address "
                          "(null for a local run, or the address `ray start --head` printed)") from None
    return True


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
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def ray_session(address: str | None, num_cpus: int | None, verbose: bool) -> Iterator[None]:
    """Ray up for the duration of the block; shut down afterwards (also on errors) if started here."""
    started = start_ray(address, num_cpus, verbose)
    try:
        yield
    finally:
        if started:
            stop_ray()


def replace_dead_workers() -> None:
    """Make Flower's Ray actor pool replace a device-worker actor whose process died.

    Flower 1.41's ``BasicActorPool`` puts the actor that ran a failed message back into its pool
    even when the failure was the actor's death (``RayActorError``), so every later message it
    gets fails too. Here the dead actor's slot gets a freshly created actor instead; the message
    that was running still becomes an error reply (counted in the round's metrics), and the
    device's state is untouched (Flower keeps it in the driver). Applied once per process.
    """
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(BasicActorPool, "_replaces_dead_actors", False) or not hasattr(
            BasicActorPool, "fetch_result_and_return_actor_to_pool"):
        return  # already applied, or a Flower whose pool works differently
    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool

    def fetch_or_replace(self: Any, future: Any) -> Any:
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            self._future_to_actor[future] = self.create_actor_fn()
            raise

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace
    BasicActorPool._replaces_dead_actors = True


def dispatch_on_push() -> None:
    """Make Flower's simulation engine hand pushed messages to the device actors at once.

    Flower 1.41's dispatcher (``vce_api.add_messages_to_queue``) scans the message store for
    every node, then sleeps 0.1 s, so every round trip waits up to 0.1 s before a device actor
    sees it: about 0.2-0.3 s per round, 5 s of a 20-round run (benchmarks/README.md). The same
    loop here also wakes when :class:`StoppableGrid` pushes (:data:`DISPATCH`); the scan is
    Flower's own. Applied once per process; a Flower without that function is left alone.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    if getattr(vce_api, "_dispatch_on_push", False) or not hasattr(vce_api, "add_messages_to_queue"):
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
              verbose: bool) -> None:
    """Run ``server_app`` against ``num_clients`` virtual nodes of ``client_app`` on Ray.

    Raises:
        EngineError: the simulation engine failed (the ServerApp's own exception is chained).
    """
    from flwr.simulation import run_simulation

    quiet_logs(verbose)
    replace_dead_workers()
    dispatch_on_push()
    backend_config = {"client_resources": {"num_cpus": float(client_resources.num_cpus),
                                           "num_gpus": float(client_resources.num_gpus)}}
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_name="ray", backend_config=backend_config, verbose_logging=verbose)


def run(sim_cfg: SimConfig, server_main: Any, client_app: Any, num_clients: int) -> None:
    """Run a fleet: ``server_main(grid)`` drives ``num_clients`` nodes of ``client_app``.

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
    from sim.apps import make_server_app

    def main(grid: Any) -> None:
        _SERVER_THREADS.append(threading.current_thread())
        server_main(StoppableGrid(grid))

    with ray_session(sim_cfg.ray_address, sim_cfg.num_cpus, sim_cfg.verbose):
        try:
            run_fleet(make_server_app(main), client_app, num_clients, sim_cfg.client_resources, sim_cfg.verbose)
        except KeyboardInterrupt:
            # The ServerApp thread stops at its next check and shuts the server pool down; wait for
            # it while Ray is still up, so nothing it does in between can hang on a dead cluster.
            STOP.set()
            for th in _SERVER_THREADS:
                th.join(timeout=60)
            raise
        except Exception as exc:  # the ServerApp's own error is the useful one
            cause = exc.__cause__ or exc
            if STOP.is_set() or isinstance(cause, Interrupted):
                raise KeyboardInterrupt from exc
            raise EngineError(f"the simulation failed: {type(cause).__name__}: {cause}") from exc
