"""The helper-server pool with small real servers: failover order, routing, MEL's split gradient,
checkpoints, random fault schedules, and (on Ray) a really killed actor."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from servers.losses import dml_loss, mel_combiner_loss
from servers.models import Combiners, ServerNet
from servers.failover import FAILOVER_KINDS
from servers.pool import ServerPool
from sim.core.faults import RoundFaults, build_schedule
from tests.conftest import small_cfg

KINDS = ("none",) + FAILOVER_KINDS
IN_SHAPE, K = (1, 4, 4), 3


def make_pool(count=3, routing="all", training="independent", placement="local", **over):
    cfg = small_cfg(**{"servers.count": count, "servers.routing": routing, "servers.training": training,
                       "servers.hidden": 8, "servers.epochs": 2, "servers.batch_size": 8, **over})
    return ServerPool(cfg.servers, IN_SHAPE, K, cfg.seed, cfg.failures.query_timeout_s, placement)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    x = (rng.random((n, *IN_SHAPE)) * 0.3 + y[:, None, None, None] / K).astype(np.float32)
    return np.arange(n) + 1000 * seed, x, y


def batch(device, n=20, seed=0, route=-1):
    ids, x, y = data(n, seed)
    return {"device": device, "ids": ids, "x": x, "y": y, "route": np.full(n, route), "explore": np.zeros(n, bool)}


def answer(pool, n=30, route=-1, round_=1):
    _, x, y = data(n, 99)
    m_pred = (y + 1) % K  # the legacy model is always wrong here, so fallbacks are visible
    dev = np.arange(n) % 2
    out = pool.answer(round_, x, dev, np.full(n, route), np.ones(n, bool), m_pred)
    return out, m_pred


def test_failover_order_full_ensemble_then_subset_then_standalone_then_legacy():
    pool = make_pool(3, "all", "mel")
    pool.begin_round(RoundFaults(round=1))
    pool.train(1, [batch(0), batch(1, seed=1)])
    out, _ = answer(pool)
    assert (out.answers.failover == KINDS.index("none")).all() and out.answers.served.all()

    pool.begin_round(RoundFaults(round=2, kill=[0]))
    assert pool.up == [1, 2]
    out, _ = answer(pool, round_=2)
    assert (out.answers.failover == KINDS.index("subset")).all() and out.answers.served.all()
    assert out.failovers == {"subset": 30} and out.dead == [0] and out.availability == [0, 1, 1]

    pool.begin_round(RoundFaults(round=3, kill=[1]))
    out, _ = answer(pool, round_=3)
    assert (out.answers.failover == KINDS.index("standalone")).all()
    assert out.load == [0, 0, 30]  # only the survivor answered

    pool.begin_round(RoundFaults(round=4, kill=[2]))
    out, m_pred = answer(pool, round_=4)
    assert (out.answers.failover == KINDS.index("legacy")).all() and not out.answers.served.any()
    assert np.array_equal(out.answers.e_pred, m_pred)  # the device's own legacy answer, exactly


def test_learned_routing_goes_to_the_chosen_server_and_a_dropped_query_fails_over():
    pool = make_pool(3, "learned")
    pool.begin_round(RoundFaults(round=1))
    out, _ = answer(pool, route=2)
    assert out.load == [0, 0, 30] and (out.answers.failover == 0).all() and not out.degraded
    # every query lost: each deferred sample falls back to the legacy model
    pool.begin_round(RoundFaults(round=2, query_drop=1.0))
    out, m_pred = answer(pool, route=2, round_=2)
    assert not out.answers.served.any() and np.array_equal(out.answers.e_pred, m_pred)
    assert out.failovers == {"legacy": 30} and out.degraded and out.all_up is not None


def test_partitioned_devices_never_reach_the_cut_servers():
    pool = make_pool(3, "round_robin")
    pool.begin_round(RoundFaults(round=1, partition=[[[0], [0, 1]]]))
    assert pool.reachable(0) == [2] and pool.reachable(1) == [0, 1, 2]
    fit = pool.train(1, [batch(0, n=12), batch(1, n=12, seed=1)])
    assert fit["train_load"] == [4, 4, 16]  # device 0's 12 samples all went to server 2


def test_least_loaded_balances_and_round_robin_cycles():
    for routing in ("least_loaded", "round_robin"):
        pool = make_pool(3, routing)
        pool.begin_round(RoundFaults(round=1))
        assert pool.train(1, [batch(0, n=30)])["train_load"] == [10, 10, 10], routing


def test_outage_and_slow_server_count_as_down_and_come_back():
    pool = make_pool(3, "learned", **{"failures.query_timeout_s": 0.5})
    assert pool.begin_round(RoundFaults(round=1, outage=[1], slow={2: 2.0})) == [0]
    assert pool.begin_round(RoundFaults(round=2, slow={2: 0.1})) == [0, 1, 2]


def test_crash_recover_from_checkpoint_restores_the_weights_and_from_scratch_does_not():
    pool = make_pool(2, "round_robin")
    pool.begin_round(RoundFaults(round=1))
    pool.train(1, [batch(0, n=40)])
    pool.end_round()
    trained = pool.servers.handles[0].obj.weights()
    fresh = ServerPool(pool.cfg, IN_SHAPE, K, pool.seed, pool.timeout, "local").servers.handles[0].obj.weights()
    pool.begin_round(RoundFaults(round=2, kill=[0]))
    assert pool.up == [1]
    pool.begin_round(RoundFaults(round=3, restart=[0], recover_from="checkpoint"))
    assert pool.up == [0, 1]
    for k, v in pool.servers.handles[0].obj.weights().items():
        assert np.array_equal(v, trained[k])
    assert len(pool.servers.handles[0].obj.buffer) == 20  # its replay buffer came back too
    pool.begin_round(RoundFaults(round=4, kill=[0]))
    pool.begin_round(RoundFaults(round=5, restart=[0], recover_from="scratch"))
    for k, v in pool.servers.handles[0].obj.weights().items():
        assert np.array_equal(v, fresh[k])
    assert len(pool.servers.handles[0].obj.buffer) == 0


@pytest.mark.numeric
def test_mel_split_training_step_equals_the_joint_gradient_step():
    """The pool's MEL step (features to the pool, feature gradients back to each actor) must be the
    same optimisation step as computing the whole MEL loss in one process."""
    pool = make_pool(2, "all", "mel", **{"servers.epochs": 1, "servers.batch_size": 64})
    nets = {s: ServerNet("mlp", IN_SHAPE, K, 8) for s in (0, 1)}
    for s in (0, 1):
        nets[s].load_state_dict(pool.servers.handles[s].obj.model.state_dict())
    comb = Combiners(2, 8, K)
    comb.load_state_dict(pool.combiners.state_dict())
    ids, x, y = data(30)
    pool.begin_round(RoundFaults(round=1))
    pool.train(1, [{"device": 0, "ids": ids, "x": x, "y": y, "route": np.full(30, -1),
                    "explore": np.zeros(30, bool)}])
    # the same step in one process: sum of the standalone CEs and the combiner CE, one Adam step each
    opts = [torch.optim.Adam(nets[s].parameters(), lr=1e-3) for s in (0, 1)] + \
        [torch.optim.Adam(comb.parameters(), lr=1e-3)]
    order = np.sort(torch.randperm(30, generator=torch.Generator().manual_seed(
        __import__("sim.core.seeding", fromlist=["derive_seed"]).derive_seed(0, "pool-fit", 1))).numpy())
    xb, yb = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    feats = {s: nets[s].trunk(xb) for s in (0, 1)}
    loss = sum(F.cross_entropy(nets[s].head(feats[s]), yb) for s in (0, 1)) + \
        mel_combiner_loss(comb, feats, yb, [(0, 1)], 1.0)
    for o in opts:
        o.zero_grad()
    loss.backward()
    for o in opts:
        o.step()
    # The split step runs the same operations in the same order (trunk forward, the heads' losses,
    # their feature gradients summed into the trunk's backward, one Adam step), so it is exact on any
    # CPU. No tolerance could be argued here instead: Adam's first step is lr * g / (|g| + eps), which
    # turns a rounding difference in a near-zero gradient into a step of up to lr.
    for s in (0, 1):
        for k, v in pool.servers.handles[s].obj.model.state_dict().items():
            assert torch.equal(v, nets[s].state_dict()[k]), (s, k)
    for k, v in pool.combiners.state_dict().items():
        assert torch.equal(v, comb.state_dict()[k]), k


@pytest.mark.numeric
def test_dml_loss_is_ce_plus_mean_kl_from_peers():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    peers = torch.softmax(torch.randn(2, 5, 3, dtype=torch.float64), -1)
    logp = F.log_softmax(logits, 1)
    kl = [F.kl_div(logp, p, reduction="batchmean") for p in peers]  # KL(p_peer || p_self)
    expect = F.cross_entropy(logits, y) + (kl[0] + kl[1]) / 2
    # float64: means over 5 samples of sums over 3 classes of terms below 2^4 (|log p| of randn
    # logits): two orders are within 2 * 2^5 * 2^-53 * 2^4 = 2^-43 of each other
    tol = 2.0 ** -43
    assert torch.allclose(dml_loss(logits, y, peers), expect, rtol=0, atol=tol)
    # agreeing with a peer that equals you costs nothing beyond the cross-entropy
    same = torch.softmax(logits, 1)[None]
    assert torch.allclose(dml_loss(logits, y, same), F.cross_entropy(logits, y), rtol=0, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("training,routing", [("independent", "learned"), ("mel", "all"), ("dml", "least_loaded"),
                                              ("coop", "learned")])
def test_random_fault_schedules_never_break_the_pool(training, routing):
    """Property: over many seeded random schedules, every round completes, every deferred sample
    gets an answer (a server's or the legacy model's), and the failover kinds are consistent."""
    for seed in range(12):
        pool = make_pool(3, routing, training, **{"servers.epochs": 1, "failures.query_timeout_s": 0.5})
        f = small_cfg(**{"failures": "random", "failures.random.crash_p": 0.3, "failures.random.outage_p": 0.2,
                         "failures.random.slow_p": 0.2, "failures.random.partition_p": 0.5,
                         "failures.random.query_drop_q": 0.3, "servers.count": 3}).failures
        for faults in build_schedule(f, 3, 2, 6, seed):
            up = pool.begin_round(faults)
            assert set(up) <= set(range(3)) - pool.dead
            rng = np.random.default_rng(seed)
            pool.train(faults.round, [batch(d, n=10, seed=faults.round, route=int(rng.integers(-1, 3)))
                                      for d in (0, 1)])
            pool.end_round()
            out, m_pred = answer(pool, round_=faults.round)
            a = out.answers
            legacy = a.failover == KINDS.index("legacy")
            assert np.array_equal(a.served, ~legacy)
            assert np.array_equal(a.e_pred[~a.served], m_pred[~a.served])
            assert ((a.e_pred >= 0) & (a.e_pred < K)).all()


def test_schedule_presets():
    cfg = small_cfg(**{"failures": "crash_recover", "failures.servers": "[0,1]", "failures.round": 2,
                       "failures.recover_after": 2, "servers.count": 2, "sim.num_rounds": 5})
    sched = build_schedule(cfg.failures, 2, 4, 5, 0)
    assert sched[1].kill == [0, 1] and sched[3].restart == [0, 1]
    assert not any(r.kill or r.restart for i, r in enumerate(sched) if i not in (1, 3))
    rnd = small_cfg(**{"failures": "random", "servers.count": 3}).failures
    assert build_schedule(rnd, 3, 10, 30, 7) == build_schedule(rnd, 3, 10, 30, 7)
    assert build_schedule(rnd, 3, 10, 30, 7) != build_schedule(rnd, 3, 10, 30, 8)
    drop = small_cfg(**{"failures": "device_dropout", "failures.dropout.fraction": 0.5}).failures
    assert sum(len(r.dropout) for r in build_schedule(drop, 1, 10, 10, 0)) > 20



@pytest.mark.slow
def test_killed_actor_is_really_dead_and_its_samples_go_elsewhere(ray_local):
    import ray

    pool = make_pool(3, "learned", placement="ray")
    pool.wait_ready(60)
    pool.begin_round(RoundFaults(round=1))
    assert pool.train(1, [batch(0, n=12, route=0)])["train_load"] == [12, 0, 0]
    actor = pool.servers.handles[0].actor
    pool.begin_round(RoundFaults(round=2, kill=[0]))
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.ping.remote(), timeout=30)
    assert pool.up == [1, 2]
    fit = pool.train(2, [batch(0, n=12, route=0)])  # the device still names server 0: rerouted
    assert fit["train_load"][0] == 0 and sum(fit["train_load"]) == 12 and fit["train_rerouted"] == 12
    out, _ = answer(pool, route=0, round_=2)
    assert out.answers.served.all() and out.load[0] == 0
    pool.shutdown()


def test_answers_are_not_timed_only_the_health_check_is(monkeypatch):
    """Whether a server is slower than failures.query_timeout_s is decided by the round's health check
    (ping, which sleeps an injected delay as every call does). The answer call carries the round's
    every deferred test sample -- 100,000 at 10,000 devices -- so timing it too made an un-faulted
    server whose compute took longer than the timeout count as down (measured: a whole evaluation
    round of a 10,000-device run failed over to legacy on a busy machine)."""
    pool = make_pool(2)
    pool.begin_round(RoundFaults(round=1))
    seen = []
    real = pool.call
    monkeypatch.setattr(pool, "call", lambda method, servers, *a, timeout=None, **k: (
        seen.append((method, timeout)), real(method, servers, *a, timeout=timeout, **k))[1])
    out, _ = answer(pool)
    assert ("predict", None) in seen and out.answers.served.all()
    pool.begin_round(RoundFaults(round=2, slow={1: 5.0}))  # slower than the timeout: down this round
    assert ("ping", pool.timeout) in seen and pool.up == [0]
