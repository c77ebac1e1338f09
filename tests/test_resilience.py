"""MEL's resilience measures per round (summary.resilience): a fault that ends before the last round
is measured while it lasts, not at the end; a run where nothing fails keeps exactly 1; the
inference-only ratio compares the same trained servers with and without the failure."""
import pytest

from sim.resilience import kept

pytestmark = pytest.mark.slow


def run(tmp_path, shared_cache, name, **over):
    from sim.run import simulate
    from tests.conftest import small_cfg

    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "sim.num_rounds": 7,
                       "strategy.c_e": 0.0, **over})
    return simulate(cfg, tmp_path / name)


def test_nothing_failing_keeps_exactly_one(tmp_path, shared_cache):
    res = run(tmp_path, shared_cache, "none")["resilience"]
    assert res["fraction_kept"] == 1.0 and res["fraction_kept_run"] == 1.0 and res["fraction_kept_min"] is None
    assert res["inference_kept"] == 1.0 and res["inference_kept_system"] == 1.0
    assert res["rounds_degraded"] == 0


def test_a_fault_that_ends_before_the_last_round_is_measured_while_it_lasts(tmp_path, shared_cache):
    """Every device cut off from the only server in rounds 4-5 of 7: those rounds keep only the
    legacy model's accuracy; the last rounds are all up again, so the final-round ratio (the old
    definition) hides most of the loss."""
    s = run(tmp_path, shared_cache, "cut", failures="partition",
            **{"failures.partition.devices": "[0,1,2,3]", "failures.partition.servers": "[0]",
               "failures.partition.start": 4, "failures.partition.end": 5})
    res = s["resilience"]
    assert res["rounds_degraded"] == 2 and set(res["fraction_kept_by_round"]) == {str(t) for t in range(1, 8)}
    by_round = res["fraction_kept_by_round"]
    assert res["fraction_kept"] == pytest.approx((by_round["4"] + by_round["5"]) / 2)
    # cut off, the devices keep every sample: those rounds are the legacy models alone, measured against
    # the reference run's same rounds (where the server helped), so the fraction kept is below 1
    import json

    rounds = {r["round"]: r for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines())}
    ref = {r["round"]: r for r in map(json.loads, (tmp_path / "cut" / "reference" / "metrics.jsonl").read_text()
                                      .splitlines())}
    for t in (4, 5):
        assert rounds[t]["system_accuracy"] == rounds[t]["legacy_accuracy"] and rounds[t]["defer_rate"] == 0.0
        assert by_round[str(t)] == pytest.approx(rounds[t]["legacy_accuracy"] / ref[t]["system_accuracy"])
    # The final-round ratio (the old definition) sees less of the fault than the rounds it lasted: all up
    # again, only the server's missed training samples remain (measured 0.988 final against 0.973 while cut
    # off, with the float64 product lines; 0.99+ with the earlier models).
    assert res["fraction_kept"] < res["fraction_kept_final"] <= 1.0
    assert all(by_round[t] == 1.0 for t in ("1", "2", "3"))  # before the fault: the reference's own rounds
    # the same trained server, reachable, answers the samples better than the legacy fallback did
    for t in (4, 5):  # cut off, every sample falls back to the legacy model: the server answers none
        assert rounds[t]["server_accuracy"] == rounds[t]["legacy_accuracy"]
        assert res["inference_kept_by_round"][str(t)] == pytest.approx(
            rounds[t]["server_accuracy"] / rounds[t]["server_accuracy_all_up"])
    assert res["inference_kept"] < 1.0 and res["inference_kept_by_round"]["7"] == 1.0
    # the devices' own decisions: cut off, they deferred nothing, so the system-level ratio is 1
    assert res["inference_kept_system"] == 1.0


def test_kept_ratios_on_records():
    rounds = [{"round": t, "system_accuracy": a, "availability": av, "server_accuracy": sa,
               "server_accuracy_all_up": su, "system_accuracy_all_up": a, "num_samples": 360}
              for t, a, av, sa, su in [(1, 0.8, [1, 1], 0.9, 0.9), (2, 0.6, [0, 1], 0.7, 0.9),
                                       (3, 0.7, [0, 1], 0.8, 0.9), (4, 0.9, [1, 1], 0.9, 0.9)]]
    ref = [{"round": t, "system_accuracy": 0.8, "availability": [1, 1], "num_samples": 360} for t in range(1, 5)]
    k = kept(rounds, ref, num_classes=10)
    assert k["rounds_degraded"] == [2, 3]
    assert k["fraction_kept"]["mean"] == pytest.approx((0.6 / 0.8 + 0.7 / 0.8) / 2)
    assert k["fraction_kept"]["min"] == pytest.approx(0.75) and k["fraction_kept"]["final"] == pytest.approx(1.125)
    assert k["inference_kept"]["mean"] == pytest.approx((0.7 / 0.9 + 0.8 / 0.9) / 2)


def test_a_ratio_over_a_reference_no_better_than_guessing_is_undefined():
    """Issue 28 item 3: a pool whose only server came back untrained answered 0.122 of 360 samples of
    10 classes right with every server up, and "inference kept" printed 0.825 / 0.122 = 6.75. A
    reference within two standard errors of guessing (1/K) has no ratio: null, left out of the means."""
    from sim.core.metrics import chance_floor

    assert chance_floor(10, 360) == pytest.approx(0.1 + 2 * (0.1 * 0.9 / 360) ** 0.5)  # 0.1316
    rounds = [{"round": t, "system_accuracy": 0.825, "availability": av, "server_accuracy": 0.825,
               "server_accuracy_all_up": su, "system_accuracy_all_up": 0.825, "num_samples": 360}
              for t, av, su in [(1, [0], 0.122), (2, [1], 0.8), (3, [0], 0.6)]]
    k = kept(rounds, None, num_classes=10)
    assert k["inference_kept"]["by_round"] == {"1": None, "2": pytest.approx(0.825 / 0.8), "3": 1.375}
    assert k["inference_kept"]["mean"] == 1.375 and k["inference_kept"]["min"] == 1.375  # round 3 alone
    only = kept(rounds[:1], None, num_classes=10)["inference_kept"]
    assert only == {"mean": None, "min": None, "run": None, "final": None, "by_round": {"1": None}}
    # the only degraded round undefined: no "kept in the degraded rounds", not the all-up rounds' 1.0
    first_two = kept(rounds[:2], None, num_classes=10)["inference_kept"]
    assert first_two["mean"] is None and first_two["min"] is None and first_two["run"] == pytest.approx(0.825 / 0.8)
    # just above the floor it is a ratio; with 2 classes the floor is 0.553
    assert kept([{**rounds[0], "server_accuracy_all_up": 0.1317}], None, 10)["inference_kept"]["final"] > 6
    assert kept([{**rounds[0], "server_accuracy_all_up": 0.55}], None, 2)["inference_kept"]["final"] is None
