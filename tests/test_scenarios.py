"""Uneven help (issue 30): specialist and partial servers, drifting devices, the oracle references."""
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.device import Rejector
from servers.helper import HelperServer
from servers.models import ServerNet
from servers.view import PoolView
from sim.core.metrics import oracle_references, tie_keys, topk_defer
from sim.core.training import train_minibatch
from strategies.l2h_losses import l2h_weights, multiclass_rejector_loss
from tests.conftest import PER_DEVICE, fleet_for, prepare_for, small_cfg

K, KNOWN = 10, [0, 1, 2, 3, 4, 5]


def test_a_specialist_server_never_answers_a_class_it_does_not_know():
    """servers.known_classes: the server keeps only samples of its classes, trains on them, and
    neither it nor the devices' copy of it ever answers another class -- even on inputs of them."""
    cfg = small_cfg(**{"servers.known_classes": "[[0,1,2]]", "servers.epochs": 3})
    server = HelperServer(cfg.servers, (1, 8, 8), K, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 1, 8, 8)).astype(np.float32), rng.integers(0, K, 200)
    assert server.add(np.arange(200), x, y) == int(np.isin(y, [0, 1, 2]).sum())
    assert set(server.buffer.y.tolist()) <= {0, 1, 2}
    server.fit(1)
    assert set(server.predict_labels(x).tolist()) <= {0, 1, 2}
    probs = torch.softmax(torch.from_numpy(server.predict(x)[1]), 1)
    assert float(probs[:, 3:].sum()) == 0.0  # no mass at all on the unknown classes
    view = PoolView(cfg.servers, (1, 8, 8), K).load({f"s0.{k}": v for k, v in server.weights().items()})
    _, logits = view.outputs(torch.from_numpy(x), [0])
    assert set(logits[0].argmax(1).tolist()) <= {0, 1, 2}


def _partial_server_problem(n: int, seed: int):
    """Ten classes; the sample shows its class (a noisy one-hot) and a difficulty u in [0, 1]. The legacy
    model is wrong with probability 0.05 + 0.75 u whatever the class; its confidence is 1 minus that
    (so it ranks by u alone). The helper server is a specialist of classes 0-5: right on them, wrong on
    every sample of classes 6-9 (it cannot answer them)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    u = rng.random(n)
    x = np.concatenate([np.eye(K)[y] + 0.2 * rng.standard_normal((n, K)), u[:, None]], 1).astype(np.float32)
    p_m_wrong = 0.05 + 0.75 * u
    m_wrong = (rng.random(n) < p_m_wrong).astype(np.float32)
    known = np.isin(y, KNOWN)
    return x, y, u, p_m_wrong, m_wrong, known


def test_trained_rejector_keeps_the_unknown_classes_local_where_the_bayes_rule_says_and_confidence_does_not():
    """A partial server (Mozannar & Sontag 2020's expert right on k of 10 classes): the Bayes rule
    (docs/methods.md §1) defers iff P(m wrong | x) > c_e + c_1 P(e wrong | x), which never holds on the
    classes the server does not know (P(e wrong) = 1). The L2H rejector trained with the shifted
    surrogate against a real specialist ServerNet's errors learns that; confidence thresholding at the
    same defer rate cannot (the legacy confidence does not depend on the class)."""
    c_e, c_1 = 0.1, 1.0
    x, y, u, p_m_wrong, m_wrong, known = _partial_server_problem(12000, seed=0)
    torch.manual_seed(0)
    server = ServerNet("mlp", (1, 1, K + 1), K, hidden=16, known=KNOWN)
    xs, ys = torch.from_numpy(x[known][:, None, None, :]), torch.from_numpy(y[known])
    train_minibatch(server.parameters(), (xs, ys), lambda a, b: torch.nn.functional.cross_entropy(server(a), b),
                    epochs=5, batch_size=128, lr=1e-2, seed=0)
    with torch.no_grad():
        e_wrong = (server(torch.from_numpy(x[:, None, None, :])).argmax(1).numpy() != y).astype(np.float32)
    assert e_wrong[~known].mean() == 1.0 and e_wrong[known].mean() < 0.05
    rej = Rejector(K + 1, hidden=32)
    w0, w1 = l2h_weights(torch.from_numpy(m_wrong), torch.from_numpy(e_wrong), c_e, c_1, "shifted")
    train_minibatch(rej.parameters(), (torch.from_numpy(x), w0, w1), lambda f, a, b: multiclass_rejector_loss(rej(f), a, b),
                    epochs=20, batch_size=256, lr=3e-3, seed=0)
    xt, yt, ut, pt, mt, kt = _partial_server_problem(6000, seed=1)
    with torch.no_grad():
        defer = (rej(torch.from_numpy(xt)).argmax(1) == 1).numpy()
    bayes = pt > c_e + c_1 * np.where(kt, 0.0, 1.0)  # the specialist is right on its classes here
    assert defer[~kt].mean() < 0.03  # the unknown classes stay local
    assert (defer == bayes).mean() > 0.9
    # confidence thresholding at the same number of deferrals spends them on every class alike
    k = int(defer.sum())
    conf = topk_defer(-(1 - pt), k, tie_keys(np.zeros(len(pt), dtype=np.int64)))
    assert conf[~kt].sum() > 0.3 * k
    m_ok = mt == 0
    e_ok = kt  # the specialist: right on its classes (as trained above, < 5% error), wrong elsewhere
    assert np.where(defer, e_ok, m_ok).mean() > np.where(conf, e_ok, m_ok).mean() + 0.05


def test_oracle_references_at_the_runs_own_defer_rate():
    m_ok = np.array([1, 1, 0, 0, 0, 1], bool)
    e_ok = np.array([0, 1, 1, 0, 1, 0], bool)
    any_right = np.array([0, 1, 1, 1, 1, 0], bool)
    defer = np.array([1, 0, 0, 1, 0, 0], bool)  # 2 deferrals, both badly chosen
    o = oracle_references(m_ok, e_ok, defer, any_right)
    # best with 2 deferrals: samples 2 and 4 (legacy wrong, answer right) -> 3 + 2 right of 6
    assert o["at_defer_rate"] == pytest.approx(5 / 6)
    # the run's own deferrals (0, 3) each sent to a right server where one exists: 0 none, 3 yes
    assert o["routing"] == pytest.approx((0 + 1 + 0 + 1 + 0 + 1) / 6)
    # both: 3 samples (2, 3, 4) have legacy wrong and some server right; 2 may be deferred
    assert o["routing_at_defer_rate"] == pytest.approx(5 / 6)
    assert set(oracle_references(m_ok, e_ok, defer, None)) == {"at_defer_rate"}


@pytest.mark.slow
@pytest.mark.parametrize("legacy", ["product_line", "per_device"])
def test_drift_changes_the_deployed_inputs_and_not_the_legacy_models_training_data(shared_cache, legacy):
    """fleet.drift (and fleet.groups.<i>.drift): the drifting devices' rejector and test splits change,
    the other devices' do not, and the legacy models -- their files, weights and training data (the
    vendor pool, or a per-device model's legacy split) -- are the same as without drift."""
    from clients.legacy import assign_groups
    from sim.core.data import device_data, drifting, group_ranks

    base = PER_DEVICE if legacy == "per_device" else {}
    calm = small_cfg(**{"fleet.num_clients": 8, **base})
    drift = small_cfg(**{"fleet.num_clients": 8, "fleet.drift.fraction": 0.5, "fleet.drift.offset": 0.5, **base})
    # the suite's shared cache: the digits product lines are there already (every default-fleet test
    # uses them); what is compared is the drifting fleet's models with the calm fleet's, wherever built
    prep = prepare_for(calm, shared_cache)
    f_calm, f_drift = fleet_for(calm, prep, shared_cache), fleet_for(drift, prep, shared_cache)
    for d in range(8):
        a = torch.load(f_calm.model_file(d), weights_only=True)
        b = torch.load(f_drift.model_file(d), weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    groups = assign_groups(8, [g.share for g in calm.fleet.groups])
    ranks = group_ranks(groups)
    moved = []
    for d in range(8):
        g0, g1 = calm.fleet.groups[groups[d]], drift.fleet.groups[groups[d]]
        c, w = device_data(prep, d, g0, 0, int(ranks[d])), device_data(prep, d, g1, 0, int(ranks[d]))
        np.testing.assert_array_equal(c.x_legacy, w.x_legacy)  # what a per-device model trained on
        np.testing.assert_array_equal(c.y_test, w.y_test)
        if drifting(g1.drift, int(ranks[d])):
            moved.append(d)
            assert not np.array_equal(c.x_test, w.x_test) and not np.array_equal(c.x_rejector, w.x_rejector)
        else:
            np.testing.assert_array_equal(c.x_test, w.x_test)
    assert len(moved) == 4  # half of each group, as its devices come: ranks 1, 3, ...
    assert [int(ranks[d]) % 2 for d in moved] == [1] * 4
    # the legacy models are worse where the inputs drifted
    assert f_drift.legacy_accuracy[moved].mean() < f_calm.legacy_accuracy[moved].mean() - 0.2


@pytest.mark.parametrize("name", ["partial_server", "specialist_servers", "device_drift", "tiered_servers"])
@pytest.mark.parametrize("data", ["digits", "mnist1d"])
def test_every_scenario_preset_composes_on_both_datasets(name, data):
    """Each preset's own settings, with the first value of each of its sweep parameters, is a valid
    config on both offline datasets (the sweep values themselves are checked by sim.run before a sweep)."""
    from omegaconf import OmegaConf

    from sim.cli import compose_checked

    preset = OmegaConf.load(Path(__file__).parents[1] / "configs" / "experiment" / f"{name}.yaml")
    params = {k: str(v).split(",")[0] for k, v in preset.hydra.sweeper.params.items()}
    cfg = compose_checked([f"experiment={name}", f"data={data}", *(f"{k}={v}" for k, v in params.items())])
    if name == "device_drift":
        assert all(g.drift.active for g in cfg.fleet.groups)
    if name in ("partial_server", "specialist_servers"):
        assert cfg.servers.known(0) is not None
    if name == "tiered_servers":
        assert cfg.servers.widths[0] < cfg.servers.widths[-1] and cfg.servers.c_e[0] < cfg.servers.c_e[-1]
