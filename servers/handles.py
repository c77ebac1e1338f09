"""Handles on helper servers: one in its own Ray actor, or the same object called in this process.

Both kinds answer ``submit(method, *args)`` with something :func:`gather` waits for, so the pool
never needs to know where a server runs. A server that is gone (killed actor, or an in-process
server marked dead) fails its calls; :func:`gather` reports it as ``dead``, a call slower than
the timeout as ``timeout``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from servers.helper import HelperServer
from sim.core.config import ServersConfig
from sim.core.stop import check_stop


class ServerUnavailable(RuntimeError):
    """A server did not answer: dead (actor gone), unreachable, or slower than the timeout."""


class _Done:
    """The result of an in-process call (an exception is kept and raised on :func:`gather`)."""

    def __init__(self, value: Any = None, error: BaseException | None = None, delay: float = 0.0):
        self.value, self.error, self.delay = value, error, delay


class LocalHandle:
    """A helper server called in this process (``sim.backend=inprocess``; tests).

    An injected delay is not slept: a call slower than the timeout fails at once, so in-process
    runs stay fast and give the same results as Ray runs (where the delay is real).
    """

    TIMED = ("ping", "predict")

    def __init__(self, make: Callable[[], HelperServer]):
        self.obj: HelperServer | None = make()

    def submit(self, method: str, *args: Any) -> _Done:
        if self.obj is None:
            return _Done(error=ServerUnavailable("server is dead"))
        obj = self.obj
        delay = obj.delay_s if method in self.TIMED else 0.0
        saved, obj.delay_s = obj.delay_s, 0.0  # the delay is judged against the timeout, not slept
        try:
            return _Done(getattr(obj, method)(*args), delay=delay)
        except Exception as exc:  # noqa: BLE001 -- a server's failure is a result, not a crash
            return _Done(error=exc)
        finally:
            if method != "set_delay":
                obj.delay_s = saved

    def kill(self) -> None:
        self.obj = None


class RayHandle:
    """A helper server in its own Ray actor."""

    def __init__(self, actor: Any):
        self.actor = actor

    def submit(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method).remote(*args)

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)


def new_handle(placement: str, cfg: ServersConfig, in_shape: tuple[int, ...], num_classes: int, seed: int,
               index: int, torch_threads: int) -> LocalHandle | RayHandle:
    """A new helper server ``index``: in this process (``placement="local"``) or in a new Ray actor
    with ``servers.resources`` (``"ray"``; Ray must be initialised)."""
    args = (cfg, list(in_shape), num_classes, seed, index, torch_threads)
    if placement == "local":
        return LocalHandle(lambda: HelperServer(*args))
    import ray

    actor_cls = ray.remote(HelperServer).options(
        num_cpus=float(cfg.resources.num_cpus), num_gpus=float(cfg.resources.num_gpus),
        max_restarts=0, max_task_retries=0)
    return RayHandle(actor_cls.remote(*args))


def gather(futures: dict[int, Any], timeout: float | None) -> tuple[dict[int, Any], dict[int, str]]:
    """Wait for ``server -> future``; returns ``(results, failures)`` with failure reasons
    ``dead`` (the actor is gone or the call raised) or ``timeout``.

    Raises:
        sim.core.stop.Interrupted: the run is stopping (Ctrl-C / SIGTERM).
    """
    check_stop()
    results: dict[int, Any] = {}
    failed: dict[int, str] = {}
    ray_refs = {s: f for s, f in futures.items() if not isinstance(f, _Done)}
    for s, f in futures.items():
        if isinstance(f, _Done):
            if f.error is not None:
                failed[s] = "dead"
            elif timeout is not None and f.delay > timeout:
                failed[s] = "timeout"
            else:
                results[s] = f.value
    if ray_refs:
        import ray

        refs = list(ray_refs.values())
        # Wait in short slices so a stop (Ctrl-C / SIGTERM) is seen even while an actor call is in
        # flight: once the main thread shuts Ray down, a single unbounded ray.wait never returns.
        deadline = None if timeout is None else time.monotonic() + timeout
        ready: list = []
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.25 if left is None else min(0.25, left))
            if len(ready) == len(refs) or (left is not None and left <= 0.25):
                break
            check_stop()
        ready_set = set(ready)
        for s, ref in ray_refs.items():
            if ref not in ready_set:
                failed[s] = "timeout"
                continue
            try:
                results[s] = ray.get(ref)
            except Exception:  # noqa: BLE001 -- RayActorError, a raised task error: the server is gone
                failed[s] = "dead"
    return results, failed
