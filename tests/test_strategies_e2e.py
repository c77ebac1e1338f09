"""Every strategy runs on a real small fleet and does what its name says (in-process backend:
identical results to Flower on Ray, tests/test_e2e.py)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.test_e2e import small_cfg


def run(tmp_path, shared_cache, name="run", **over):
    from rich.console import Console

    from sim.run import simulate

    cfg = small_cfg(**{"sim.cache_dir": str(shared_cache), "sim.backend": "inprocess", **over})
    out = tmp_path / name
    summary = simulate(cfg, out, console=Console(quiet=True))
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rounds, out


def noise(p, n):
    return 3 * math.sqrt(p * (1 - p) / n)


@pytest.mark.slow
def test_legacy_only_and_server_only(tmp_path, shared_cache):
    s, _, _ = run(tmp_path, shared_cache, "legacy", strategy="legacy_only")
    assert s["defer_rate"] == 0 and s["system_accuracy"] == s["legacy_accuracy"]
    s, _, _ = run(tmp_path, shared_cache, "server", strategy="server_only")
    assert s["defer_rate"] == 1 and s["system_accuracy"] == s["server_accuracy"]


@pytest.mark.slow
def test_random_and_confidence_defer_at_the_requested_rate(tmp_path, shared_cache):
    s, _, _ = run(tmp_path, shared_cache, "random", strategy="random", **{"strategy.defer_rate": 0.5})
    assert abs(s["defer_rate"] - 0.5) <= noise(0.5, s["num_test_samples"])
    # confidence with tau fitted on each device's rejector split to defer 30%
    s, _, _ = run(tmp_path, shared_cache, "conf", strategy="confidence", **{"strategy.defer_rate": 0.3})
    assert abs(s["defer_rate"] - 0.3) <= noise(0.3, s["num_test_samples"]) + 0.05


@pytest.mark.numeric
def test_baseline_rules_on_one_device():
    from clients.device import Device
    from sim.core.zoo import build_model
    from sim.core.config import ServersConfig
    from sim.core.data import DeviceData
    from strategies.baselines import CompareConfidence, Confidence, confidence_tau
    from strategies.config import BaselineConfig

    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 200)
    data = DeviceData(x, y, x, y, np.arange(200), x[:100], y[:100])
    torch.manual_seed(0)
    dev = Device.create(0, data, build_model("logreg", (1, 8, 8), 10))
    conf = torch.softmax(dev.legacy_test, 1).max(1).values.numpy()
    cfg = BaselineConfig(name="confidence", tau=0.15, defer_rate=0.3)
    cfg.rejector.inputs = "legacy"
    servers = ServersConfig(name="s")
    defer, score = Confidence(cfg, servers, 0, 10).rule(dev, None, "test", rng)
    # both 1 - the same float32 max softmax: at most one rounding (2^-24) apart, inside allclose's 1e-5
    assert (defer == (conf < 0.15)).all() and np.allclose(score, 1 - conf)
    cfg.tau = None
    tau = confidence_tau(dev, cfg)
    rej_conf = torch.softmax(dev.legacy_rejector, 1).max(1).values.numpy()
    assert abs((rej_conf < tau).mean() - 0.3) <= 0.01
    # CompareConfidence: defer iff the estimate of P(server correct) beats the legacy confidence
    est = torch.nn.Linear(10, 1)
    torch.nn.init.zeros_(est.weight)
    torch.nn.init.constant_(est.bias, 0.0)  # P_hat = 0.5 everywhere
    cc = CompareConfidence(cfg, servers, 0, 10)
    defer, score = cc.rule(dev, est, "test", rng)
    assert (defer == (conf < 0.5)).all()
    never, _ = cc.rule(dev, None, "test", rng)
    assert not never.any()  # an untrained estimator defers nothing


@pytest.mark.slow
def test_compare_confidence_runs_and_learns(tmp_path, shared_cache):
    s, rounds, _ = run(tmp_path, shared_cache, "cc", strategy="compare_confidence", **{"sim.num_rounds": 3})
    assert all(np.isfinite(r["rejector_loss"]) for r in rounds)
    assert 0 < s["defer_rate"] <= 1


@pytest.mark.slow
def test_l2d_experts_stay_fixed_and_the_classifier_trains(tmp_path, shared_cache):
    base, _, _ = run(tmp_path, shared_cache, "legacy", strategy="legacy_only")
    s, rounds, _ = run(tmp_path, shared_cache, "l2d", strategy="l2d", **{"sim.num_rounds": 3})
    # the fixed expert answers the same test samples identically every round
    assert len({r["server_accuracy"] for r in rounds}) == 1
    assert all(r["samples_sent"] == 0 for r in rounds)  # nothing is sent to a fixed expert to learn from
    # the device's classifier started from its legacy model and was trained: its accuracy moved
    assert s["legacy_accuracy"] != base["legacy_accuracy"]
    assert 0 < s["defer_rate"] < 1
    assert list((shared_cache / "experts").iterdir())  # the experts are cached


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "ova"])
def test_l2d_other_losses_run(tmp_path, shared_cache, loss):
    s, _, _ = run(tmp_path, shared_cache, loss, strategy="l2d", **{"strategy.l2d.loss": loss})
    assert 0 <= s["defer_rate"] <= 1 and s["system_accuracy"] >= s["legacy_accuracy"] - 0.05


@pytest.mark.slow
def test_l2d_fedavg_averages_devices_of_the_same_architecture(tmp_path, shared_cache):
    _, _, out = run(tmp_path, shared_cache, "fed", strategy="l2d",
                    **{"strategy.rejector.federation": "fedavg", "strategy.rejector.federate_by": "fleet"})
    from sim import checkpoint
    from sim.core.arrays import sub, unstack_states

    arrays, _ = checkpoint.load(out)
    states = unstack_states(sub(arrays, "strategy"), "rejectors")

    def model(d):
        return states.get(d, {})

    # default fleet, 4 devices: 0 logreg, 1 mlp-32, 2 cnn-8, 3 mlp-32 -> devices 1 and 3 share a model
    m1, m3 = model(1), model(3)
    assert m1 and set(m1) == set(m3) and all(np.array_equal(m1[k], m3[k], equal_nan=True) for k in m1)
    assert set(model(0)) != set(m1) or any(not np.array_equal(model(0)[k], m1[k]) for k in m1)


@pytest.mark.slow
def test_l2d_never_defers_to_a_dead_expert(tmp_path, shared_cache):
    s, rounds, _ = run(tmp_path, shared_cache, "dead", strategy="l2d", failures="crash_stop",
                       **{"servers.count": 2, "failures.servers": "[1]", "failures.round": 1,
                          "failures.reference": "false"})
    assert all(r["load"][1] == 0 for r in rounds)
    assert s["defer_rate"] > 0  # it still defers, to expert 0


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["quantile", "stochastic"])
def test_bounded_reject_rate_end_to_end(tmp_path, shared_cache, bound):
    delta = 0.1
    s, _, _ = run(tmp_path, shared_cache, bound, **{"strategy.c_e": 0.0, "strategy.max_defer_rate": delta,
                                                    "strategy.bound": bound, "sim.num_rounds": 3})
    assert s["config"]["strategy"]["max_defer_rate"] == delta and s["config"]["strategy"]["bound"] == bound
    assert s["defer_rate"] <= delta + noise(delta, s["num_test_samples"])


PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiment"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_experiment_presets_compose_for_every_swept_value(preset):
    from sim.cli import compose_checked

    params = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]
    for key, values in params.items():
        for v in str(values).split(","):
            cfg = compose_checked([f"experiment={preset}", f"{key}={v}"])
            if key.startswith("+"):  # a config group added per job (configs/variant/): composing is the check
                continue
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert str(node) in (v, str(float(v)) if v.replace(".", "").isdigit() else v) or key == "strategy"


def test_mutual_learning_strategy_names_set_the_servers():
    from sim.cli import compose_checked

    dml = compose_checked(["strategy=dml"])
    assert dml.strategy.name == "dml" and dml.servers.training == "dml" and dml.servers.count == 2
    mel = compose_checked(["strategy=mel", "servers.count=3"])
    assert mel.servers.training == "mel" and mel.servers.count == 3


@pytest.mark.slow
def test_coop_runs_end_to_end_and_reports_depth_and_exits(tmp_path, shared_cache):
    """Devices rebuild the multi-exit Teammates from the broadcast; under a tight capacity the
    Teammates' serving depth drops below 1 and the summary carries the accuracy of every exit."""
    from tests.conftest import PER_DEVICE

    # per-device legacy models (weak) and c_e 0: deferrals that load the Teammates within 3 rounds
    s, rounds, _ = run(tmp_path, shared_cache, "coop", strategy="coop",
                       **{"servers.coop.capacity": 0.5, "servers.routing": "round_robin", "sim.num_rounds": 3,
                          "strategy.c_e": 0.0, **PER_DEVICE})
    loaded = [(r["load"][int(t)], f) for r in rounds for t, f in (r.get("serve_depth") or {}).items()]
    assert any(n > 0 for n, _ in loaded)
    assert all((f < 1.0) == (n > 0) for n, f in loaded)  # any answer exceeds half a full-depth answer
    exits = s["servers"]["table"]["exits"]
    assert set(exits) == {"1", "2"} and all(len(v) == 4 for v in exits.values())
    assert 0 <= s["system_accuracy"] <= 1 and s["config"]["servers"]["count"] == 3
