"""Out-of-sample server labels (strategy.server_labels): on a synthetic device whose helper server
memorises its replay buffer, the learned rejector matches the Bayes rule computed with the server's
true (held-out) error with prequential or held-out labels, and does not with in-sample labels."""
import numpy as np
import pytest
import torch

from clients.device import Device
from sim.core.config import RejectorConfig, ServersConfig
from sim.core.data import DeviceData
from strategies.config import L2HConfig
from strategies.l2h import L2HMethod, availability_mask, decide
from strategies.method import RoundContext

K = 3
# Per bin of the input: P(legacy wrong), P(server wrong on a sample it has not trained on).
P_M = [0.6, 0.5, 0.05, 0.45]
P_E = [0.1, 0.6, 0.5, 0.6]
C_E, C_1 = 0.1, 1.0
BAYES = [pm > C_E + C_1 * pe for pm, pe in zip(P_M, P_E)]  # defer, keep, keep, keep
PER_BIN = 200


class MemorisingServer:
    """The device's view of one helper server that answers every sample in its buffer correctly and
    is wrong on a sample it has not trained on with probability P_E of its bin (fixed per sample)."""

    present = [0]
    combiners = None

    def __init__(self, y, bins, rng):
        self.y, self.buffer = y, np.zeros(len(y), dtype=bool)
        self.unseen_wrong = rng.random(len(y)) < np.asarray(P_E)[bins]

    def outputs(self, x, reach):
        wrong = self.unseen_wrong & ~self.buffer
        pred = np.where(wrong, (self.y + 1) % K, self.y)
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), K).float() * 5
        return {0: logits}, {0: logits}


def device(rng):
    bins = np.repeat(np.arange(len(P_M)), PER_BIN)
    n = len(bins)
    x = np.eye(len(P_M), dtype=np.float32)[bins][:, None, None, :]  # one-hot bin: (N, 1, 1, B)
    y = rng.integers(0, K, n)
    legacy_pred = np.where(rng.random(n) < np.asarray(P_M)[bins], (y + 1) % K, y)
    legacy = torch.nn.functional.one_hot(torch.from_numpy(legacy_pred), K).float() * 5
    data = DeviceData(x, y, x, y, np.arange(n), x, y)
    return Device(0, data, torch.nn.Identity(), legacy, legacy), bins


def learned_decisions(mode, rounds=4):
    rng = np.random.default_rng(0)
    dev, bins = device(rng)
    server = MemorisingServer(dev.data.y_rejector, bins, rng)
    cfg = L2HConfig(name="l2h", c_e=C_E, c_1=C_1, explore=1.0, server_labels=mode,  # every sample is sent
                    rejector=RejectorConfig(inputs="sample", epochs=10, lr=0.01))
    servers = ServersConfig(name="one")
    method = L2HMethod(cfg, servers, seed=0, num_classes=K)
    rejector = method.new_learner(dev)
    for r in range(1, rounds + 1):
        res = method.train(RoundContext(dev, rejector, [0], r, server))
        server.buffer |= res.defer | res.explore  # the server trains on (memorises) what it is sent
    feats = torch.eye(len(P_M))
    defer, _ = decide(rejector, feats, availability_mask(servers, [0]), servers)
    return defer.tolist(), server


@pytest.mark.parametrize("mode", ["prequential", "holdout"])
def test_out_of_sample_labels_give_the_bayes_rule_of_the_held_out_server_error(mode):
    got, server = learned_decisions(mode)
    assert got == BAYES
    assert server.buffer.mean() > 0.45  # the server did memorise most of the split


def test_in_sample_labels_do_not():
    """The same fleet with today's in-sample labels: the memorised buffer looks error-free, so the
    rejector defers wherever the legacy model is often wrong (bins 1 and 3), against the Bayes rule."""
    got, _ = learned_decisions("in_sample")
    assert got != BAYES
    assert got == [pm > C_E for pm in P_M]  # "is the legacy model wrong?" -- what confidence estimates


def test_holdout_never_sends_its_held_out_part():
    rng = np.random.default_rng(1)
    dev, bins = device(rng)
    cfg = L2HConfig(name="l2h", explore=1.0, server_labels="holdout", holdout=0.25)
    method = L2HMethod(cfg, ServersConfig(name="one"), seed=0, num_classes=K)
    held = method.labels.held_out(len(bins), 0)
    assert held.sum() == 0.25 * len(bins)
    res = method.train(RoundContext(dev, method.new_learner(dev), [0], 1, MemorisingServer(dev.data.y_rejector, bins, rng)))
    assert not (res.defer | res.explore)[held].any() and (res.defer | res.explore)[~held].all()


def test_prequential_labels_are_recorded_once_and_can_expire():
    rng = np.random.default_rng(2)
    dev, bins = device(rng)
    server = MemorisingServer(dev.data.y_rejector, bins, rng)
    cfg = L2HConfig(name="l2h", explore=1.0, server_labels="prequential", label_max_age=1)
    method = L2HMethod(cfg, ServersConfig(name="one"), seed=0, num_classes=K)
    rej = method.new_learner(dev)
    method.train(RoundContext(dev, rej, [0], 1, server))
    assert (rej.local_answer_round == 1).all()  # every sample was sent in round 1, its answer kept
    first = rej.local_answer_pool_wrong.clone()
    server.buffer[:] = True
    method.train(RoundContext(dev, rej, [0], 2, server))
    assert (rej.local_answer_round == 1).all() and torch.equal(rej.local_answer_pool_wrong, first)
    rows, _ = method.labels.labels(rej, method_answers(method, dev, server), 0, 3)
    assert not rows.any()  # round 3: every label is 2 rounds old, older than label_max_age=1


def method_answers(method, dev, server):
    from strategies.labels import current_answers

    return current_answers(server, torch.from_numpy(dev.data.x_rejector), torch.from_numpy(dev.data.y_rejector),
                           [0], method.servers)


def test_the_measured_defaults():
    """The defaults README "Findings" chose by measurement: in-sample server labels; federated (FedAvg
    within a fleet group) rejectors for L2H and the strategies built on it; L2D's models stay local."""
    from sim.cli import compose_checked

    for strategy in ("l2h", "dml", "mel", "coop"):
        cfg = compose_checked([f"strategy={strategy}"])
        assert cfg.strategy.server_labels.value == "in_sample"
        assert cfg.strategy.rejector.federation.value == "fedavg"
        assert cfg.strategy.rejector.federate_by.value == "group"
    assert compose_checked(["strategy=l2d"]).strategy.rejector.federation.value == "local"
    assert compose_checked([]).data.name == "digits"
