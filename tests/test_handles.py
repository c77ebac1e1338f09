"""Server handles: only a lost server is a failure the run survives; a server method that raises is a
bug that fails the run (one line, with the traceback for sim.verbose). In-process and on Ray, plus
Ray done by the book: one remote class, a shared large argument put once (SPREAD over a cluster's
nodes: tests/test_cluster.py)."""
import logging
import time

import numpy as np
import pytest

from servers import handles
from servers.handles import LocalHandle, ServerMethodError, gather, new_handle
from servers.helper import HelperServer
from servers.pool import ServerPool
from sim.core.faults import RoundFaults
from tests.conftest import small_cfg

IN_SHAPE, K = (1, 4, 4), 3


def servers_cfg(**over):
    return small_cfg(**{"servers.hidden": 8, "servers.epochs": 1, "servers.batch_size": 8, **over}).servers


def local(index=0):
    cfg = servers_cfg()
    return new_handle("local", cfg, IN_SHAPE, K, 0, index, 1)


def x_batch(n=5):
    return np.random.default_rng(0).random((n, *IN_SHAPE)).astype(np.float32)


def test_a_killed_in_process_server_is_dead_and_the_others_answer():
    a, b = local(0), local(1)
    a.kill()
    res, failed = gather({0: a.submit("ping"), 1: b.submit("ping")}, timeout=5.0)
    assert failed == {0: "dead"} and res == {1: 1}


def test_a_server_method_that_raises_is_a_bug_not_a_crash(caplog):
    h = local(0)
    with caplog.at_level(logging.ERROR, logger="servers.handles"):
        with pytest.raises(ServerMethodError) as exc:
            gather({0: h.submit("load_state", {"net.nope": np.zeros(3, np.float32)})}, timeout=None)
    err = exc.value
    assert "\n" not in str(err) and str(err).startswith("helper server 0's load_state() raised RuntimeError")
    assert isinstance(err.__cause__, RuntimeError) and "load_state" in err.details  # the traceback, kept
    assert "Traceback" in caplog.text and "load_state_dict" in caplog.text  # logged (shown when verbose)
    res, failed = gather({0: h.submit("ping")}, timeout=5.0)  # the server itself is fine
    assert res == {0: 0} and not failed


def test_the_pool_fails_on_a_bug_and_does_not_count_it_as_a_server_down(monkeypatch):
    pool = ServerPool(servers_cfg(**{"servers.count": 2}), IN_SHAPE, K, 0, 5.0, "local")
    pool.begin_round(RoundFaults(round=1))

    def broken(self, x):
        raise ValueError("shape mismatch in predict")

    monkeypatch.setattr(HelperServer, "predict", broken)
    with pytest.raises(ServerMethodError, match=r"predict\(\) raised ValueError: shape mismatch in predict"):
        pool.outputs(x_batch(), timeout=5.0)
    assert pool.dead == set()


def test_verbose_logs_show_the_traceback_and_quiet_ones_do_not():
    from sim.engine import quiet_logs

    logger = logging.getLogger("servers.handles")
    try:
        quiet_logs(False)
        assert not logger.isEnabledFor(logging.ERROR)
        quiet_logs(True)
        assert logger.isEnabledFor(logging.ERROR)
    finally:
        quiet_logs(False)



@pytest.mark.slow
def test_on_ray_a_killed_actor_is_dead_a_raising_method_is_a_bug(ray_local):
    cfg = servers_cfg()
    a, b = (new_handle("ray", cfg, IN_SHAPE, K, 0, i, 1) for i in (0, 1))
    res, failed = gather({0: a.submit("ping"), 1: b.submit("ping")}, timeout=120.0)
    assert res == {0: 0, 1: 1} and not failed
    with pytest.raises(ServerMethodError) as exc:
        gather({1: b.submit("load_state", {"net.nope": np.zeros(3, np.float32)})}, timeout=60.0)
    assert "\n" not in str(exc.value) and "helper server 1's load_state() raised RuntimeError" in str(exc.value)
    assert "load_state_dict" in exc.value.details  # the remote traceback
    a.kill()  # asynchronous: a call may still reach the actor before the kill does
    deadline = time.monotonic() + 60
    while not (failed := gather({0: a.submit("ping")}, timeout=30.0)[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert failed == {0: "dead"}
    res, failed = gather({1: b.submit("ping")}, timeout=60.0)
    assert res == {1: 1} and not failed  # b survived its own bug: only a lost actor is a crash
    b.kill()


@pytest.mark.slow
def test_on_ray_one_remote_class_and_a_shared_argument_is_put_once(ray_local, monkeypatch):
    import ray

    cfg = servers_cfg()
    hs = [new_handle("ray", cfg, IN_SHAPE, K, 0, i, 1) for i in range(3)]
    assert handles.remote_server_class() is handles.remote_server_class()
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda v: puts.append(v) or real_put(v))
    big = x_batch(2000)  # 125 KiB: over PUT_MIN_BYTES
    small = x_batch(5)
    assert big.nbytes >= handles.PUT_MIN_BYTES > small.nbytes
    res, failed = gather({i: h.submit("predict", big) for i, h in enumerate(hs)}, timeout=None)
    assert len(puts) == 1 and puts[0] is big and not failed
    assert all(r[1].shape == (2000, K) and r[1].flags.writeable for r in res.values())  # owned copies
    gather({i: h.submit("predict", small) for i, h in enumerate(hs)}, timeout=None)
    assert len(puts) == 1 and not handles._PUT  # small ones go by value; the cache is cleared per gather
    for h in hs:
        h.kill()
