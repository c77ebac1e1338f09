"""Federated rejectors (strategy.rejector.federation): the devices of a group hold the same rejector
after aggregation (fedavg), and each its own after fine-tuning the average (fedavg_finetune)."""
import numpy as np
import pytest

from strategies.federation import weighted_mean


def test_weighted_mean_is_fedavg():
    a = {"w": np.array([1.0, 1.0], np.float32)}
    b = {"w": np.array([3.0, 5.0], np.float32)}
    out = weighted_mean([a, b], [1, 3])
    # (1 * 1 + 3 * 3) / 4 and (1 * 1 + 3 * 5) / 4: every intermediate is exact in binary
    assert np.array_equal(out["w"], [2.5, 4.0]) and out["w"].dtype == np.float32
    with pytest.raises(ValueError):
        weighted_mean([a], [0])


def rejectors(tmp_path, shared_cache, federation, federate_by="fleet"):
    import json

    from sim import checkpoint
    from sim.core.arrays import sub, unstack_states
    from sim.run import simulate
    from tests.conftest import small_cfg

    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "sim.num_rounds": 3,
                       "strategy.rejector.federation": federation, "strategy.rejector.federate_by": federate_by})
    out = tmp_path / federation
    summary = simulate(cfg, out)
    arrays, _ = checkpoint.load(out)
    states = unstack_states(sub(arrays, "strategy"), "rejectors")
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {d: {k: v for k, v in st.items() if k.startswith("net.")} for d, st in states.items()}, summary, rounds


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fedavg_gives_every_device_the_average_and_finetuning_personalises_it(tmp_path, shared_cache):
    local, s_local, _ = rejectors(tmp_path, shared_cache, "local")
    fed, s_fed, _ = rejectors(tmp_path, shared_cache, "fedavg")
    tuned, s_tuned, _ = rejectors(tmp_path, shared_cache, "fedavg_finetune")
    devices = sorted(local)
    assert len(devices) == 4
    assert not any(same(local[a], local[b]) for a in devices for b in devices if a < b)  # each its own
    assert all(same(fed[a], fed[devices[0]]) for a in devices)  # one rejector for the whole fleet
    assert not any(same(tuned[a], tuned[b]) for a in devices for b in devices if a < b)  # fine-tuned apart
    assert not same(fed[0], local[0]) and not same(tuned[0], fed[0])
    for s in (s_local, s_fed, s_tuned):
        assert 0 <= s["defer_rate"] <= 1


@pytest.mark.slow
def test_federation_by_group_averages_within_each_fleet_group_only(tmp_path, shared_cache):
    """Default fleet, 8 devices: 4 groups of 2 (interleaved: devices g and g + 4)."""
    import json

    from sim import checkpoint
    from sim.core.arrays import sub, unstack_states
    from sim.run import simulate
    from tests.conftest import small_cfg

    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "fleet.num_clients": 8,
                       "strategy.rejector.federation": "fedavg", "strategy.rejector.federate_by": "group"})
    simulate(cfg, tmp_path / "g")
    arrays, _ = checkpoint.load(tmp_path / "g")
    st = {d: {k: v for k, v in s.items() if k.startswith("net.")}
          for d, s in unstack_states(sub(arrays, "strategy"), "rejectors").items()}
    for g in range(4):
        assert same(st[g], st[g + 4])
        assert not any(same(st[g], st[h]) for h in range(4) if h != g)
    rounds = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["train_devices"] == 8
