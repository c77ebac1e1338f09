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
    definition) says nothing was lost."""
    s = run(tmp_path, shared_cache, "cut", failures="partition",
            **{"failures.partition.devices": "[0,1,2,3]", "failures.partition.servers": "[0]",
               "failures.partition.start": 4, "failures.partition.end": 5})
    res = s["resilience"]
    assert res["rounds_degraded"] == 2 and set(res["fraction_kept_by_round"]) == {str(t) for t in range(1, 8)}
    by_round = res["fraction_kept_by_round"]
    assert res["fraction_kept"] == pytest.approx((by_round["4"] + by_round["5"]) / 2)
    assert res["fraction_kept"] < 0.95 and res["fraction_kept_final"] > 0.99  # measured: 0.931 and 1.006
    assert all(by_round[t] == 1.0 for t in ("1", "2", "3"))  # before the fault: the reference's own rounds
    # the same trained server, reachable, answers the samples better than the legacy fallback did
    assert res["inference_kept"] < 0.95 and res["inference_kept_by_round"]["7"] == 1.0
    # the devices' own decisions: cut off, they deferred nothing, so the system-level ratio is 1
    assert res["inference_kept_system"] == 1.0


def test_kept_ratios_on_records():
    rounds = [{"round": t, "system_accuracy": a, "availability": av, "server_accuracy": sa,
               "server_accuracy_all_up": su, "system_accuracy_all_up": a}
              for t, a, av, sa, su in [(1, 0.8, [1, 1], 0.9, 0.9), (2, 0.6, [0, 1], 0.7, 0.9),
                                       (3, 0.7, [0, 1], 0.8, 0.9), (4, 0.9, [1, 1], 0.9, 0.9)]]
    ref = [{"round": t, "system_accuracy": 0.8, "availability": [1, 1]} for t in range(1, 5)]
    k = kept(rounds, ref)
    assert k["rounds_degraded"] == [2, 3]
    assert k["fraction_kept"]["mean"] == pytest.approx((0.6 / 0.8 + 0.7 / 0.8) / 2)
    assert k["fraction_kept"]["min"] == pytest.approx(0.75) and k["fraction_kept"]["final"] == pytest.approx(1.125)
    assert k["inference_kept"]["mean"] == pytest.approx((0.7 / 0.9 + 0.8 / 0.9) / 2)
