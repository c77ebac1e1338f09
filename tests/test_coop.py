"""Cooperative learning (arXiv 2312.08532): multi-exit networks, the SFSL distillation loss, the
Leader/Teammate roles in the pool's joint training, and the serving depth under load."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from servers.losses import sfsl_distillation_loss
from servers.models import MultiExitNet
from servers.failover import serving_fraction
from sim.core.faults import RoundFaults
from tests.test_pool import IN_SHAPE, K, batch, data, make_pool


@pytest.mark.numeric
def test_exit_d_depends_only_on_the_first_d_blocks():
    torch.manual_seed(0)
    net = MultiExitNet(IN_SHAPE, K, hidden=8, depth=4)
    x = torch.rand(5, *IN_SHAPE)
    feats, exits = net.forward_exits(x)
    assert len(exits) == 4 and net.fractions() == [0.25, 0.5, 0.75, 1.0]
    # the same modules on the same input: the same operations, so the same bits on any CPU
    assert torch.equal(exits[-1], net(x)) and torch.equal(feats, net.trunk(x))
    before = [e.detach().clone() for e in exits]
    with torch.no_grad():
        net.blocks[2][0].weight.add_(1.0)  # block 3 feeds exits 3 and 4 only
    _, after = net.forward_exits(x)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.allclose(after[2], before[2]) and not torch.allclose(after[3], before[3])  # moved by 0.25-0.45


@pytest.mark.numeric
def test_sfsl_loss_weights_each_exit_by_one_over_its_depth_fraction():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 1])
    teacher = torch.randn(4, K, requires_grad=True, dtype=torch.float64)
    subs = [torch.randn(4, K, requires_grad=True, dtype=torch.float64) for _ in range(2)]
    T = 3.0

    def term(z):  # CE + T^2 KL(teacher_T || z_T), computed by hand
        pt = torch.softmax(teacher.detach() / T, 1)
        kl = (pt * (pt.log() - F.log_softmax(z / T, 1))).sum(1).mean()
        return F.cross_entropy(z, y) + T * T * kl

    loss = sfsl_distillation_loss(subs, teacher, y, [0.25, 0.5], T)
    # float64: two orders of a few dozen operations on terms below 2^7 in size (|logits / T| < 2,
    # log-probabilities > -10, weights 1 / 0.25): within 2 * 2^6 * 2^-53 * 2^7 = 2^-39 of each other
    assert torch.allclose(loss, term(subs[0]) / 0.25 + term(subs[1]) / 0.5, rtol=0, atol=2.0 ** -39)
    loss.backward()
    assert teacher.grad is None  # the full network is the teacher, not pulled towards its exits
    # a sub-network that already copies a confident, correct teacher pays only its (small) CE
    sure = torch.nn.functional.one_hot(y, K).double() * 20
    # CE = log(1 + (K-1) e^-20) < 2e-8 per sample, / 0.5; the KL of identical distributions is 0 up to
    # float64 rounding of log-probabilities above -10 (~1e-15)
    assert float(sfsl_distillation_loss([sure], sure, y, [0.5], T)) < 1e-6
    with pytest.raises(ValueError, match="fractions"):
        sfsl_distillation_loss(subs, teacher, y, [0.5], T)


def test_serving_depth_drops_with_load_and_is_capped_by_cost_pressure():
    fr = [0.25, 0.5, 0.75, 1.0]
    assert serving_fraction(1000, fr) == 1.0  # no capacity: full depth whatever the load
    assert serving_fraction(40, fr, capacity=40) == 1.0
    assert serving_fraction(80, fr, capacity=40) == 0.5  # 80 * 0.5 <= 40 < 80 * 0.75
    assert serving_fraction(10_000, fr, capacity=40) == 0.25  # nothing fits: the shallowest exit
    assert serving_fraction(0, fr, max_fraction=0.6) == 0.5  # cost pressure caps the depth
    depths = [serving_fraction(n, fr, capacity=50) for n in range(0, 400, 10)]
    assert depths == sorted(depths, reverse=True)  # never deeper under more load


def coop_pool(count=3, **over):
    return make_pool(count, "learned", "coop", **{"servers.coop.depth": 3, "servers.epochs": 3, **over})


def fit_round(pool, round_=1):
    pool.begin_round(RoundFaults(round=round_))
    pool.train(round_, [batch(d, n=40, seed=d) for d in (0, 1)])
    pool.end_round()


def test_the_leader_learns_from_labels_only_and_teammates_from_each_other():
    """Same data and seeds: the Leader's weights do not depend on whether a second Teammate exists
    (it gets no peer term); Teammate 1's do (it learns from Teammate 2)."""
    big, small = coop_pool(3), coop_pool(2)
    fit_round(big)
    fit_round(small)
    sd = {n: p.servers.handles for n, p in (("big", big), ("small", small))}
    for k, v in sd["big"][0].obj.model.state_dict().items():
        assert torch.equal(v, sd["small"][0].obj.model.state_dict()[k]), k
    t_big, t_small = sd["big"][1].obj.model.state_dict(), sd["small"][1].obj.model.state_dict()
    assert any(not torch.equal(v, t_small[k]) for k, v in t_big.items())
    # Teammates train their shallow exits (SFSL); the Leader's exit heads stay as initialised
    init = coop_pool(3)
    assert not torch.equal(big.servers.handles[1].obj.model.exits[0].weight, init.servers.handles[1].obj.model.exits[0].weight)
    assert torch.equal(big.servers.handles[0].obj.model.exits[0].weight, init.servers.handles[0].obj.model.exits[0].weight)


def test_teammates_answer_from_a_shallower_exit_under_load():
    pool = coop_pool(3, **{"servers.coop.capacity": 10.0})
    for r in (1, 2):
        fit_round(pool, r)
    _, x, y = data(30, 99)
    n = len(x)
    pool.begin_eval()
    out = pool.answer(2, x, np.zeros(n, int), np.full(n, 1), np.ones(n, bool), (y + 1) % K)
    assert out.load[1] == n and out.depth[1] == 1 / 3  # 30 answers * 1/3 <= 10 < 30 * 2/3
    shallow = pool.outputs(x, None).exits[1][0].argmax(1).numpy()
    assert np.array_equal(out.answers.e_pred, shallow)
    table = pool.table(x, y)
    assert set(table["exits"]) == {"1", "2"} and len(table["exits"]["1"]) == 3


def test_coop_config_errors_are_one_line():
    from sim.cli import compose_checked
    from sim.core.errors import ConfigError

    cfg = compose_checked(["strategy=coop"])
    assert cfg.servers.training == "coop" and cfg.servers.count == 3
    with pytest.raises(ConfigError, match="servers.count"):
        compose_checked(["strategy=coop", "servers.count=1"])
    with pytest.raises(ConfigError, match="servers.arch"):
        compose_checked(["strategy=coop", "servers.arch=cnn"])
    with pytest.raises(ConfigError, match="serve_depth"):
        compose_checked(["strategy=coop", "servers.coop.serve_depth=0"])
