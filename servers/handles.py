"""Handles on helper servers: one in its own Ray actor, or the same object called in this process.

Both kinds answer ``submit(method, *args)`` with something :func:`gather` waits for, so the pool
never needs to know where a server runs. Only a *lost* server is a failure the run survives:
a Ray actor that is gone (``ray.exceptions.RayActorError``, which covers ``ActorDiedError`` and
``ActorUnavailableError``) or an in-process server the failure injector killed
(:class:`ServerUnavailable`) -- :func:`gather` reports it as ``dead``, a call slower than the
timeout as ``timeout``. Any other exception a server method raises is a bug in the server code:
:func:`gather` raises :class:`ServerMethodError`, which fails the run.

Ray usage (each by the book): the actor class is made remote once per process
(:func:`remote_server_class`); server actors are placed with ``scheduling_strategy="SPREAD"``
(on a cluster, actors that request resources -- ``servers.resources`` > 0 -- go round-robin to
different nodes; Ray places an actor requesting nothing, the default, on a node of its choosing,
measured: both servers of a 2-node test cluster on one node); a large argument shared by
several servers in one round of calls is put in the object store once (:data:`PUT_MIN_BYTES`)
instead of being copied into every actor call; results come back as arrays the pool owns, as
in-process (:func:`_owned`).

:class:`ServerHandles` holds a pool's handles and the bookkeeping of its calls: which servers are
dead, and which are *busy* -- a Ray actor answers its calls one at a time, so a server whose call
timed out is busy until that call returns: a timed call does not queue behind it (a busy server
counts as not answering, at once), and an untimed call waits for it, at most :data:`BUSY_GRACE_S`
past its delay. A server slowed past the timeout is snapshotted first (``full_state``, kept in
:attr:`ServerHandles.resting`), so a checkpoint taken while it sleeps needs no call to it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from servers.helper import HelperServer
from sim.core.config import ResourcesConfig, ServersConfig
from sim.core.stop import check_stop

log = logging.getLogger(__name__)

PUT_MIN_BYTES = 100 * 1024
"""Arguments at least this large (numpy arrays, or dicts / tuples / lists of them) are put in Ray's
object store once per :func:`gather` round and passed by reference to every server that gets them.
Smaller ones are passed by value: Ray inlines an argument under 100 KiB
(``max_direct_call_object_size``) in the task itself, which is cheaper than an object-store
round trip; above that it would store one copy per call."""

_PUT: dict[int, tuple[Any, Any]] = {}
"""``id(arg) -> (arg, ObjectRef)`` for the calls submitted since the last :func:`gather` (the
argument is kept alive, so its id cannot be reused while it is cached)."""


READ_ONLY = frozenset({"ping", "set_delay", "where", "predict", "weights", "broadcast_weights", "state", "full_state",
                       "predict_labels"})
"""Server methods that leave a server's state (weights, optimizer, buffer) as it is."""

BUSY_GRACE_S = 60.0
"""How long past its injected delay an untimed call waits for a busy server (:meth:`ServerHandles.settle`)."""


class ServerUnavailable(RuntimeError):
    """A server did not answer: dead (actor gone), unreachable, or slower than the timeout."""


class ServerMethodError(RuntimeError):
    """A helper-server method raised: a bug in the server code, not a server failure.

    The message is one line (server, method, exception type and first line of its message); the
    exception itself is chained as ``__cause__`` (on Ray, a ``RayTaskError`` whose text is the
    remote traceback) and its full traceback is in :attr:`details` and logged at ERROR on this
    module's logger (shown with ``sim.verbose=true``).

    Attributes:
        server: the server index. method: the method name. details: the formatted traceback.
    """

    def __init__(self, server: int, method: str, exc: BaseException, details: str):
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the original exception
        first = (str(cause).strip().splitlines() or [""])[0][:200]
        super().__init__(f"helper server {server}'s {method}() raised {type(cause).__name__}: {first} "
                         "(a bug in the server code, not a server failure; sim.verbose=true shows the traceback)")
        self.server, self.method, self.details = server, method, details


class _Done:
    """The result of an in-process call (an exception is kept and raised on :func:`gather`)."""

    def __init__(self, method: str, value: Any = None, error: BaseException | None = None, delay: float = 0.0):
        self.method, self.value, self.error, self.delay = method, value, error, delay


class _Pending:
    """An actor call in flight: Ray's ObjectRef and the method's name (for error messages)."""

    def __init__(self, method: str, ref: Any):
        self.method, self.ref = method, ref


class LocalHandle:
    """A helper server called in this process (``sim.backend=inprocess``; tests).

    An injected delay is not slept: a call slower than the timeout fails at once, so in-process
    runs stay fast and give the same results as Ray runs (where the delay is real). A killed
    server answers every call with :class:`ServerUnavailable` (the in-process equivalent of
    Ray's ``RayActorError``).
    """

    TIMED = ("ping", "predict")

    def __init__(self, make: Callable[[], HelperServer]):
        self.obj: HelperServer | None = make()

    def submit(self, method: str, *args: Any) -> _Done:
        """Call ``method(*args)`` now; its value or exception is kept for :func:`gather`."""
        if self.obj is None:
            return _Done(method, error=ServerUnavailable("server is dead"))
        obj = self.obj
        delay = obj.delay_s if method in self.TIMED else 0.0
        saved, obj.delay_s = obj.delay_s, 0.0  # the delay is judged against the timeout, not slept
        try:
            return _Done(method, getattr(obj, method)(*args), delay=delay)
        except Exception as exc:  # noqa: BLE001 -- kept, and raised as ServerMethodError by gather()
            return _Done(method, error=exc)
        finally:
            if method != "set_delay":
                obj.delay_s = saved

    def kill(self) -> None:
        self.obj = None


class RayHandle:
    """A helper server in its own Ray actor."""

    def __init__(self, actor: Any):
        self.actor = actor

    def submit(self, method: str, *args: Any) -> _Pending:
        """Start ``method(*args)`` on the actor; large arguments go by object-store reference."""
        return _Pending(method, getattr(self.actor, method).remote(*(_shared(a) for a in args)))

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def _nbytes(arg: Any) -> int:
    """Bytes of the arrays in ``arg`` (an array, or a dict / tuple / list of them); 0 for anything else."""
    if isinstance(arg, np.ndarray):
        return int(arg.nbytes)
    if isinstance(arg, dict):
        return sum(_nbytes(v) for v in arg.values())
    if isinstance(arg, (tuple, list)):
        return sum(_nbytes(v) for v in arg)
    return 0


def _shared(arg: Any) -> Any:
    """``arg`` itself, or -- if it is at least :data:`PUT_MIN_BYTES` -- its object-store reference,
    put once for every call submitted until the next :func:`gather`."""
    if _nbytes(arg) < PUT_MIN_BYTES:
        return arg
    hit = _PUT.get(id(arg))
    if hit is None or hit[0] is not arg:
        import ray

        hit = _PUT[id(arg)] = (arg, ray.put(arg))
    return hit[1]


_REMOTE: dict[str, Any] = {}
"""The Ray actor class of :class:`HelperServer`, per Ray job (driver session)."""


def remote_server_class() -> Any:
    """:class:`HelperServer` as a Ray actor class, made once per Ray session (``ray.remote`` pickles and
    registers the class; every server of the session uses it). Keyed by the session's job id: a class
    made in an earlier session (a test suite, a sweep restarting Ray) is not reused in a new one."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    if job not in _REMOTE:
        _REMOTE.clear()
        _REMOTE[job] = ray.remote(HelperServer)
    return _REMOTE[job]


def new_handle(placement: str, cfg: ServersConfig, in_shape: tuple[int, ...], num_classes: int, seed: int,
               index: int, torch_threads: int, folds: int = 0) -> LocalHandle | RayHandle:
    """A new helper server ``index``: in this process (``placement="local"``) or in a new Ray actor
    with ``servers.resources`` (``"ray"``; Ray must be initialised). Actors are spread over the
    cluster's nodes (``SPREAD``, for actors that request resources) and never restarted by Ray: a lost server stays lost until the
    failure schedule recovers it (a new actor). ``folds``: the server's crossfit fold copies (0: none)."""
    args = (cfg, list(in_shape), num_classes, seed, index, torch_threads, folds)
    if placement == "local":
        return LocalHandle(lambda: HelperServer(*args))
    actor_cls = remote_server_class().options(
        num_cpus=cfg.resources.num_cpus, num_gpus=cfg.resources.num_gpus,
        max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
    return RayHandle(actor_cls.remote(*args))


def gather(futures: dict[int, Any], timeout: float | None) -> tuple[dict[int, Any], dict[int, str]]:
    """Wait for ``server -> future`` (from ``submit``); returns ``(results, failures)`` with failure
    reasons ``dead`` (the actor is gone, or the in-process server was killed) or ``timeout``.

    Raises:
        ServerMethodError: a server method raised (a bug: the run must fail, not count a crash).
        sim.core.stop.Interrupted: the run is stopping (Ctrl-C / SIGTERM).
    """
    try:
        check_stop()
        results: dict[int, Any] = {}
        failed: dict[int, str] = {}
        for s, f in futures.items():
            if isinstance(f, _Done):
                _local_result(s, f, timeout, results, failed)
        pending = {s: f for s, f in futures.items() if isinstance(f, _Pending)}
        if pending:
            _ray_results(pending, timeout, results, failed)
        return results, failed
    finally:
        _PUT.clear()


def _local_result(s: int, f: _Done, timeout: float | None, results: dict[int, Any], failed: dict[int, str]) -> None:
    if isinstance(f.error, ServerUnavailable):
        failed[s] = "dead"
    elif f.error is not None:
        raise _method_error(s, f.method, f.error) from f.error
    elif timeout is not None and f.delay > timeout:
        failed[s] = "timeout"
    else:
        results[s] = f.value


def _ray_results(pending: dict[int, _Pending], timeout: float | None, results: dict[int, Any],
                 failed: dict[int, str]) -> None:
    import ray
    from ray.exceptions import RayActorError

    refs = [p.ref for p in pending.values()]
    # Wait in short slices so a stop (Ctrl-C / SIGTERM) is seen even while an actor call is in
    # flight: once the main thread shuts Ray down, a single unbounded ray.wait never returns.
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.25 if left is None else min(0.25, left))
        if len(ready) == len(refs) or (left is not None and left <= 0.25):
            break
        check_stop()
    ready_set = set(ready)
    for s, p in pending.items():
        if p.ref not in ready_set:
            failed[s] = "timeout"
            continue
        try:
            results[s] = _owned(ray.get(p.ref))
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):  # its constructor raised: a bug, not a crash
                raise _method_error(s, "__init__", exc) from exc
            failed[s] = "dead"
        except Exception as exc:  # RayTaskError(<the method's exception>) and anything else Ray raises
            raise _method_error(s, p.method, exc) from exc


def _owned(value: Any) -> Any:
    """``value`` with every read-only numpy array in it (dicts, tuples, lists) copied.

    ``ray.get`` hands back numpy arrays as read-only views of the object store; the pool owns what
    an in-process server returns and may load it into torch (``torch.from_numpy`` warns that a
    read-only array is undefined behaviour to write), so a Ray result is made the same kind of value.
    """
    if isinstance(value, np.ndarray):
        return value if value.flags.writeable else value.copy()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_owned(v) for v in value)
    return value


def _method_error(s: int, method: str, exc: BaseException) -> ServerMethodError:
    import traceback

    details = "".join(traceback.format_exception(exc))
    log.error("helper server %d's %s() raised:\n%s", s, method, details)
    return ServerMethodError(s, method, exc, details)


Handle = LocalHandle | RayHandle


class ServerHandles:
    """A pool's S servers as handles, with the bookkeeping of their calls (see the module docstring).

    Args:
        make: ``make(i)`` a new handle on server ``i`` (:func:`new_handle`). count: S. remote: the
            handles are Ray actors (a delay is really slept, so a slowed server is snapshotted first).

    Attributes:
        handles: server -> its handle. dead: servers whose actor is gone (killed, or lost).
        busy: server -> (its call that timed out, its injected delay then). resting: server -> its
            ``full_state`` taken before it was slowed past the timeout. slow: server -> this round's
            injected delay in seconds (:meth:`slow_down`).
    """

    def __init__(self, make: Callable[[int], Handle], count: int, remote: bool):
        self.make, self.remote = make, remote
        self.handles: dict[int, Handle] = {i: make(i) for i in range(count)}
        self.dead: set[int] = set()
        self.busy: dict[int, tuple[Any, float]] = {}
        self.resting: dict[int, dict[str, np.ndarray]] = {}
        self.slow: dict[int, float] = {}

    def call(self, method: str, servers: Sequence[int], *args: Any, timeout: float | None = None,
             each: Callable[[int], tuple] | None = None) -> dict[int, Any]:
        """Call ``method`` on each of ``servers`` in parallel and wait (up to ``timeout`` seconds).

        A busy server is not called by a timed call: it counts as slower than ``timeout`` at once.
        Before an untimed call its busy servers are waited for (:meth:`settle`).

        Args:
            args: the same arguments for every server, or ``each(s)``: server s's arguments.

        Returns:
            ``server -> result`` for the servers that answered; those whose actor is gone are
            marked dead, those slower than ``timeout`` are left out (and busy until they answer).

        Raises:
            ServerMethodError: a server method raised (:func:`gather`).
        """
        servers = list(servers)
        if timeout is None:
            self.settle([s for s in servers if s in self.busy])
        ask = [s for s in servers if not self.still_busy(s)]
        futures = {s: self.handles[s].submit(method, *(each(s) if each else args)) for s in ask}
        res, failed = gather(futures, timeout)
        self.dead |= {s for s, why in failed.items() if why == "dead"}
        for s, why in failed.items():
            if why == "timeout" and hasattr(futures[s], "ref"):  # a Ray call still running on the actor
                self.busy[s] = (futures[s], float(self.slow.get(s, 0.0)))
        if method not in READ_ONLY:
            for s in ask:
                self.resting.pop(s, None)
        return res

    def still_busy(self, s: int) -> bool:
        """Whether server ``s``'s call that timed out is still running (checked without waiting)."""
        if s not in self.busy:
            return False
        _, failed = gather({s: self.busy[s][0]}, 0.0)
        if failed.get(s) == "timeout":
            return True
        del self.busy[s]
        if failed.get(s) == "dead":
            self.dead.add(s)
        return False

    def settle(self, servers: Sequence[int]) -> None:
        """Wait until the busy ``servers`` have answered their call that timed out, each at most its
        delay plus :data:`BUSY_GRACE_S` (one that has not by then stays busy)."""
        for s in servers:
            if self.still_busy(s):
                future, delay = self.busy[s]
                _, failed = gather({s: future}, delay + BUSY_GRACE_S)
                if failed.get(s) != "timeout":
                    del self.busy[s]
                    if failed.get(s) == "dead":
                        self.dead.add(s)

    def alive(self) -> list[int]:
        """The servers whose actor is not dead, ascending."""
        return [s for s in sorted(self.handles) if s not in self.dead]

    def kill(self, s: int) -> None:
        """Crash server ``s`` (its actor is killed; its state is lost)."""
        if s not in self.dead:
            self.handles[s].kill()
            self.dead.add(s)
        self.busy.pop(s, None)

    def revive(self, s: int) -> None:
        """Start a new server ``s`` in place of a dead one (a fresh state)."""
        self.handles[s] = self.make(s)
        self.dead.discard(s)
        self.busy.pop(s, None)
        self.resting.pop(s, None)

    def slow_down(self, delays: dict[int, float], timeout: float) -> None:
        """Give every live server this round's injected delay (``delays``: server -> seconds; 0 for
        the others). One still busy and slower than ``timeout`` again is not called (it counts as
        down); on Ray, one about to sleep past ``timeout`` is snapshotted first (:attr:`resting`), so a
        checkpoint need not wait for it."""
        self.slow = delays
        live = self.alive()
        delay = {s: float(delays.get(s, 0.0)) for s in live}
        asleep = {s for s in live if delay[s] > timeout and self.still_busy(s)}
        if self.remote:
            slowing = [s for s in live if delay[s] > timeout and s not in asleep and s not in self.resting]
            self.resting.update(self.call("full_state", slowing))
        self.call("set_delay", [s for s in live if s not in asleep], each=lambda s: (delay[s],))

    def full_states(self) -> dict[int, dict[str, np.ndarray]]:
        """Every live server's ``full_state`` (a sleeping one's from before it slept)."""
        live = self.alive()
        states = {s: self.resting[s] for s in live if s in self.resting and self.still_busy(s)}
        states.update(self.call("full_state", [s for s in live if s not in states]))
        return states

    def wait_ready(self, timeout: float, resources: ResourcesConfig) -> None:
        """Wait until every server answers a ping (Ray schedules actors only where their
        ``resources``, ``servers.resources``, fit).

        Raises:
            ServerUnavailable: some server did not start within ``timeout`` seconds.
        """
        _, failed = gather({s: h.submit("ping") for s, h in self.handles.items()}, timeout)
        if failed:
            raise ServerUnavailable(
                f"{len(failed)} of {len(self.handles)} helper server actors did not start within {timeout:g}s: "
                f"the Ray cluster may not have servers.resources (num_cpus={resources.num_cpus}, "
                f"num_gpus={resources.num_gpus}) free for each server")

    def shutdown(self) -> None:
        """Kill every server (end of run, or an interrupted one)."""
        for i, h in self.handles.items():
            if i not in self.dead:
                try:
                    h.kill()
                except Exception:  # noqa: BLE001 -- already gone
                    pass
        self.dead = set(self.handles)
        self.busy.clear()
