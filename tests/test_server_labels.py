"""Out-of-sample server labels (strategy.server_labels): on a synthetic device whose helper server
memorises its replay buffer, the learned rejector matches the Bayes rule computed with the server's
true (held-out) error with prequential, held-out or cross-fitted labels, and does not with in-sample
labels; cross-fitted labels never come from a server copy that trained on the sample (real servers,
instrumented), and a crossfit run gives the same numbers every time."""
import numpy as np
import pytest
import torch

from clients.device import Device
from servers.crossfit import fold_of
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
FOLDS = 3


class MemorisingServer:
    """The device's view of one helper server that answers every sample in its buffer correctly and
    is wrong on a sample it has not trained on with probability P_E of its bin (fixed per sample).
    Its ``folds`` are its crossfit copies: copy j memorises the buffer minus fold j (sample ids
    ``0 .. N-1``, seed 0) and is asked about the rows of fold j only, in order."""

    present = [0]
    combiners = None

    def __init__(self, y, bins, rng):
        self.y, self.buffer = y, np.zeros(len(y), dtype=bool)
        self.unseen_wrong = rng.random(len(y)) < np.asarray(P_E)[bins]
        fold = fold_of(np.arange(len(y)), 0, FOLDS)
        self.folds = [MemorisingFold(self, fold, j) for j in range(FOLDS)]

    def answers(self, rows, memorised):
        wrong = self.unseen_wrong[rows] & ~memorised[rows]
        pred = np.where(wrong, (self.y[rows] + 1) % K, self.y[rows])
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), K).float() * 5
        return {0: logits}, {0: logits}

    def outputs(self, x, reach):
        return self.answers(np.arange(len(self.y)), self.buffer)


class MemorisingFold:
    """Fold j's copy of a :class:`MemorisingServer`."""

    present = [0]
    combiners = None
    folds: list = []

    def __init__(self, server, fold, j):
        self.server, self.rows, self.memorised = server, np.flatnonzero(fold == j), lambda: server.buffer & (fold != j)

    def outputs(self, x, reach):
        assert len(x) == len(self.rows)
        return self.server.answers(self.rows, self.memorised())


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
    rejector.eval()
    with torch.no_grad():
        defer, _, _ = decide(rejector(feats), availability_mask(servers, [0]), servers)
    return defer.tolist(), server


@pytest.mark.parametrize("mode", ["prequential", "holdout", "crossfit"])
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


def test_crossfit_labels_never_come_from_a_model_that_trained_on_that_sample(monkeypatch):
    """Real servers (two, round-robin, two rounds of sends) and the real broadcast: every copy's
    training rows and every question a device asks a copy are recorded by the sample's own bytes;
    no sample is ever labelled by a copy that trained on it, and each buffered sample still trains
    K - 1 copies (and the production network, untouched: the pool trains it on the whole buffer)."""
    import servers.crossfit as crossfit
    from servers.pool import ServerPool
    from servers.view import PoolView
    from sim.core.faults import RoundFaults
    from strategies.labels import LabelSource
    from tests.conftest import small_cfg

    in_shape, folds, n = (1, 4, 4), 3, 300
    cfg = small_cfg(**{"servers.count": 2, "servers.routing": "round_robin", "servers.hidden": 8,
                       "servers.epochs": 2, "servers.batch_size": 16, "strategy.server_labels": "crossfit",
                       "strategy.crossfit_folds": folds})
    rng = np.random.default_rng(0)
    ids = rng.choice(10**6, n, replace=False)  # global ids, not the rows' positions
    y = rng.integers(0, K, n)
    x = rng.normal(size=(n, *in_shape)).astype(np.float32)
    id_of = {x[i].tobytes(): int(ids[i]) for i in range(n)}
    trained: dict[int, set] = {}  # id(optimizer) -> sample ids its copy trained on
    fit = crossfit.train_minibatch

    def recording_fit(opt, tensors, *args, **kwargs):
        trained.setdefault(id(opt), set()).update(id_of[r.tobytes()] for r in tensors[0].numpy())
        return fit(opt, tensors, *args, **kwargs)

    monkeypatch.setattr(crossfit, "train_minibatch", recording_fit)
    pool = ServerPool(cfg.servers, in_shape, K, cfg.seed, 10.0, "local", folds=folds)
    sent = rng.random(n) < 0.7
    for r, part in ((1, sent & (np.arange(n) < n // 2)), (2, sent & (np.arange(n) >= n // 2))):
        pool.begin_round(RoundFaults(round=r))
        m = int(part.sum())
        pool.train(r, [{"device": 0, "ids": ids[part], "x": x[part], "y": y[part], "route": np.full(m, -1),
                        "explore": np.zeros(m, bool)}])
    copies = {(s, j): trained[id(pool.servers.handles[s].obj.folds.opts[j])] for s in (0, 1) for j in range(folds)}
    view = PoolView(cfg.servers, in_shape, K).load(pool.snapshot())
    asked: list[tuple[int, list[int]]] = []
    outputs = PoolView.outputs

    def recording_outputs(self, xq, servers):
        asked.extend([(j, [id_of[r.tobytes()] for r in xq.numpy()]) for j, f in enumerate(view.folds) if f is self])
        return outputs(self, xq, servers)

    monkeypatch.setattr(PoolView, "outputs", recording_outputs)
    source = LabelSource(cfg.strategy, cfg.seed)
    now, oof = source.answers(view, torch.from_numpy(x), torch.from_numpy(y), ids, [0, 1], cfg.servers)
    rows, labels = source.labels(None, now, 0, 3, oof)

    assert rows.all() and labels is oof
    assert sorted(i for _, got in asked for i in got) == sorted(ids.tolist())  # each sample asked once
    for j, got in asked:
        for s in (0, 1):
            assert not set(got) & copies[(s, j)], f"fold {j}'s copy of server {s} labelled a sample it trained on"
    for s in (0, 1):  # the instrument sees real training: every buffered sample trained K - 1 copies
        buffer = pool.servers.handles[s].obj.buffer.ids.tolist()
        assert len(buffer) > n / 4
        assert all(sum(i in copies[(s, j)] for j in range(folds)) == folds - 1 for i in buffer)
    # the labels are the asked copies' answers: row by row, fold by fold
    which = fold_of(ids, cfg.seed, folds)
    for j in range(folds):
        rows_j = np.flatnonzero(which == j)
        for s in (0, 1):
            pred = view.folds[j].nets[s](torch.from_numpy(x[rows_j])).argmax(1)
            assert torch.equal(labels.wrong[rows_j, s], (pred != torch.from_numpy(y[rows_j])).float())
    # and they differ from the production servers' in-sample answers where those memorised
    assert (labels.wrong != now.wrong).any()


def test_fold_of_is_a_fixed_balanced_seeded_function_of_the_sample_id():
    ids = np.arange(30_000)
    a = fold_of(ids, 7, 3)
    assert np.array_equal(a, fold_of(ids, 7, 3)) and np.array_equal(a[::-1], fold_of(ids[::-1], 7, 3))
    assert set(a.tolist()) == {0, 1, 2} and abs(np.bincount(a) / len(ids) - 1 / 3).max() < 0.01
    assert (a != fold_of(ids, 8, 3)).mean() > 0.5  # another seed, other folds
    with pytest.raises(ValueError):
        fold_of(ids, 7, 1)


def test_crossfit_config_refuses_joint_training_and_one_fold_and_records_k_only_when_on():
    from sim.checkpoint import comparable
    from sim.cli import compose_checked
    from sim.core.errors import ConfigError

    for training in ("dml", "mel"):
        with pytest.raises(ConfigError, match="crossfit needs servers.training=independent") as e:
            compose_checked([f"strategy={training}", "strategy.server_labels=crossfit"])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="strategy.crossfit_folds=1 is invalid"):
        compose_checked(["strategy.server_labels=crossfit", "strategy.crossfit_folds=1"])
    assert "crossfit_folds" not in comparable(compose_checked([]))["strategy"]
    assert comparable(compose_checked(["strategy.server_labels=crossfit"]))["strategy"]["crossfit_folds"] == 3


def test_a_servers_fold_copies_survive_its_checkpoints():
    """``full_state`` (resume) restores the copies and their Adam state exactly: the next round trains
    both servers to the same weights; ``state`` (crash-recover) keeps the copies' weights."""
    from servers.helper import HelperServer
    from sim.core.config import ServersConfig

    cfg = ServersConfig(name="one", hidden=8, epochs=2, batch_size=16)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(90, 1, 4, 4)).astype(np.float32), rng.integers(0, K, 90)
    a = HelperServer(cfg, (1, 4, 4), K, seed=5, folds=3)
    a.add(np.arange(60), x[:60], y[:60])
    a.fit(1)
    b = HelperServer(cfg, (1, 4, 4), K, seed=5, folds=3)
    b.load_full_state(a.full_state())
    c = HelperServer(cfg, (1, 4, 4), K, seed=5, folds=3)
    c.load_state(a.state())
    assert all(np.array_equal(v, c.broadcast_weights()[k]) for k, v in a.broadcast_weights().items())
    for s in (a, b):
        s.add(np.arange(60, 90), x[60:], y[60:])
        s.fit(2)
    wa, wb = a.broadcast_weights(), b.broadcast_weights()
    assert sum(k.startswith("fold") for k in wa) == 3 * len(a.weights())
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def crossfit_run(run_dir, cache_dir, *over, backend="inprocess"):
    """A small crossfit run (the golden cases' fleet, K = 2): its summary and per-round records."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.run import simulate
    from tests.golden import BASE, read_run

    cfg = compose_checked([*BASE, "strategy.server_labels=crossfit", "strategy.crossfit_folds=2", *over,
                           f"sim.cache_dir={cache_dir}", f"sim.backend={backend}"])
    simulate(cfg, run_dir, console=Console(quiet=True))
    return read_run(run_dir)


@pytest.mark.parametrize("strategy", ["l2h", "compare_confidence"])
def test_a_crossfit_run_gives_the_same_numbers_every_time(strategy, tmp_path, shared_cache):
    a = crossfit_run(tmp_path / "a", shared_cache, f"strategy={strategy}")
    assert a == crossfit_run(tmp_path / "b", shared_cache, f"strategy={strategy}")
    assert a["summary"]["config"]["strategy"]["server_labels"] == "crossfit"
    assert sum(r["samples_sent"] for r in a["rounds"]) > 0  # the servers (and their fold copies) trained


@pytest.mark.slow
def test_a_crossfit_run_on_flower_and_ray_equals_the_in_process_one(tmp_path, shared_cache, ray_local):
    assert (crossfit_run(tmp_path / "ray", shared_cache, backend="ray")
            == crossfit_run(tmp_path / "inprocess", shared_cache))
