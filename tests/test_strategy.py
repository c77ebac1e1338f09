"""Server-side strategy logic without the engine: staleness, sampling, replay buffer."""
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord

from servers.helper import ReplayBuffer
from sim.core.faults import build_schedule
from sim.inprocess import InProcessGrid
from strategies.l2h import L2HStrategy
from tests.conftest import small_cfg


def weights(v: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(2, v, dtype=np.float32))})


class StubPool:
    """Stands in for the server pool (one server): its weights are the number of the round in progress."""

    def __init__(self):
        self.up = [0]
        self.recovery = SimpleNamespace(reset_round=np.zeros(1, dtype=np.int64))  # servers.recovery.Recovery's
        self.masked = {}

    def begin_round(self, faults):
        self.round = faults.round
        return self.up

    def begin_eval(self, masked=None):
        self.masked = masked or {}

    def snapshot(self):
        return {f"s{s}.w": np.full(2, self.round, dtype=np.float32) for s in self.up}


def strategy(**over) -> tuple[L2HStrategy, InProcessGrid]:
    cfg = small_cfg(**over)
    sched = build_schedule(cfg.failures, 1, cfg.fleet.num_clients, 10, 0)
    s = L2HStrategy(cfg, StubPool(), sched, on_round=lambda r: None)
    grid = InProcessGrid(client_app=None, num_nodes=s.num_nodes)
    s.node_of = {i: nid for i, nid in enumerate(sorted(grid.get_node_ids()))}
    return s, grid


def sent_weight(msgs) -> float:
    return float(msgs[0].content["server"]["s0.w"].numpy()[0])


def test_asynchronous_rejectors_train_against_a_copy_refreshed_every_s_rounds():
    s, grid = strategy(**{"strategy.staleness": 3})
    seen = [sent_weight(s.configure_train(r, weights(r), None, grid)) for r in range(1, 8)]
    # the server's weights change every round (value r); devices see the copy of rounds 1, 4, 7
    assert seen == [1, 1, 1, 4, 4, 4, 7]


def test_a_reset_server_is_in_the_stale_copy_at_once_and_masked_for_devices_that_missed_it():
    """docs/methods.md §1, "Synchronous and asynchronous": S delays what devices learn of a server's
    training, not that it was reset. The server reset in round 2 is sent as it is now in round 2 (not
    round 1's copy until round 4); a device whose last copy predates the reset may not defer to it."""
    import json

    s, grid = strategy(**{"strategy.staleness": 3, "sim.num_rounds": 10})
    seen = [sent_weight(s.configure_train(1, weights(1), None, grid))]
    s.pool.recovery.reset_round[0] = 2  # the pool's begin_round of round 2 restarted it from scratch
    seen += [sent_weight(s.configure_train(r, weights(r), None, grid)) for r in range(2, 6)]
    assert seen == [1, 2, 2, 4, 4] and s.stale_round.tolist() == [4]
    s.states = {0: {}, 1: {}, 2: {}}  # devices with a trained rejector (3 never trained: keeps its samples)
    s.known[:, 0] = [2, 1, -1, -1]  # device 0 trained on the round-2 copy, 1 on round 1's, 2 never
    assert s.masked() == {0: [1, 2]}
    s.eval_content(5, weights(5))
    assert json.loads(s.faults_json)["partition"] == [[[1, 2], [0]]] and s.pool.masked == {1: {0}, 2: {0}}
    s.pool.recovery.reset_round[0] = 0  # never reset: only the device that never trained against it is masked
    assert s.masked() == {0: [2]}


def test_synchronous_is_staleness_one():
    s, grid = strategy()
    assert [sent_weight(s.configure_train(r, weights(r), None, grid)) for r in (1, 2, 3)] == [1, 2, 3]


def test_device_sampling_is_seeded_and_every_device_is_evaluated_in_the_last_round():
    s, grid = strategy(**{"fleet.num_clients": 10, "sim.fraction_train": 0.3, "sim.fraction_evaluate": 0.5,
                          "sim.num_rounds": 3})
    a = s.sample(2, 0.3, "train")
    assert a == s.sample(2, 0.3, "train") and len(a) == 3 and a == sorted(a)
    assert len({tuple(s.sample(r, 0.3, "train")) for r in range(1, 20)}) > 1
    assert len(list(s.configure_evaluate(1, weights(0), None, grid))) == 5
    assert len(list(s.configure_evaluate(3, weights(0), None, grid))) == 10


def test_replay_buffer_dedupes_by_sample_id_and_evicts_oldest():
    b = ReplayBuffer(capacity=4)
    x = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)
    b.add(np.array([1, 2, 3]), x[:3], np.array([1, 2, 3]))
    b.add(np.array([2, 9]), x[3:5], np.array([7, 9]))  # id 2 re-sent: replaced and now newest
    assert b.ids.tolist() == [1, 3, 2, 9] and b.y.tolist() == [1, 3, 7, 9]
    b.add(np.array([5]), x[5:], np.array([5]))
    assert b.ids.tolist() == [3, 2, 9, 5] and len(b) == 4
    assert b.x[:, 0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]


def test_a_round_without_evaluation_counts_no_failed_evaluation():
    """``sim.eval_every=2``: round 1 sends no evaluation message, so none can fail (it used to count
    round 1's training devices as failed evaluations); round 2 asks every device, and a device
    that does not answer still counts."""
    s, grid = strategy(**{"sim.eval_every": 2, "sim.num_rounds": 4})
    records = []
    s.on_round = records.append
    assert len(list(s.configure_train(1, weights(1), None, grid))) > 0 and s.sent == [0, 1, 2, 3]
    assert list(s.configure_evaluate(1, weights(1), None, grid)) == []
    s.aggregate_evaluate(1, [])
    assert len(list(s.configure_evaluate(2, weights(2), None, grid))) > 0
    s.aggregate_evaluate(2, [])  # no reply: every asked device failed
    assert [(r.round, r.eval_devices, r.eval_errors) for r in records] == [(1, 0, 0), (2, 0, 4)]


def test_a_device_error_reply_is_one_line_on_either_backend():
    """The cause a failed final evaluation quotes (strategies.base.error_line): in-process the reply's
    reason is "Type: message"; on Ray Flower wraps the message and Ray's traceback around it."""
    from strategies.base import ERROR_LINE_CHARS, error_line

    assert error_line("RuntimeError: bad cache entry") == "RuntimeError: bad cache entry"
    ray = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'ray::ClientAppActor.run() (pid=1)\n"
           "  File \"x.py\", line 3, in run\nClientAppException: \nException ClientAppException occurred. "
           "Message: the legacy model of device 3 cannot be loaded\n(more)'>")
    assert error_line(ray) == "the legacy model of device 3 cannot be loaded"
    lost = ("<class 'ray.exceptions.ActorUnavailableError'>:<'The actor a1b6 is unavailable: The actor is "
            "temporarily unavailable: IOError: The actor is restarting..'>")
    assert error_line(lost) == ("ActorUnavailableError: The actor a1b6 is unavailable: The actor is temporarily "
                                "unavailable: IOError: The actor is restarting..")
    assert error_line("\n\n") == "no reason given"
    assert len(error_line("x" * 1000)) == ERROR_LINE_CHARS


def test_what_devices_know_of_the_servers_survives_a_resume_and_older_checkpoints_trust_the_copy():
    s, grid = strategy(**{"strategy.staleness": 3})
    s.configure_train(1, weights(1), None, grid)
    s.states = {0: {"w": np.zeros(2, np.float32)}, 2: {"w": np.ones(2, np.float32)}}
    s.known[0, 0] = 1
    arrays, meta = s.checkpoint()
    back, _ = strategy(**{"strategy.staleness": 3})
    back.restore(arrays, meta, finished_round=1)
    assert back.known.tolist() == s.known.tolist() and back.stale_round.tolist() == [1]
    # a checkpoint from before this was recorded (a MEL pool: combiner heads in the copy too)
    old = {k: v for k, v in arrays.items() if k not in ("known", "stale_round")}
    old["stale/comb.heads.0+1.weight"] = np.zeros(1, np.float32)
    again, _ = strategy(**{"strategy.staleness": 3})
    again.restore(old, meta, finished_round=1)
    assert again.stale_round.tolist() == [1] and again.known[:, 0].tolist() == [1, -1, 1, -1]
    assert again.masked() == {}
