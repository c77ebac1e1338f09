"""Pooled fleet metrics and matched-rate baselines on hand-made records."""
import numpy as np
import pytest

from sim.core.metrics import accuracy_at_rates, per_device, pooled_metrics


def records():
    # 6 samples on 2 devices. m correct on 0,1,2,3; e correct on 2,3,4 (and 5 wrong for both)
    return {
        "device": np.array([0, 0, 0, 1, 1, 1]),
        "y": np.zeros(6, dtype=int),
        "m_pred": np.array([0, 0, 0, 0, 1, 1]),
        "e_pred": np.array([1, 1, 0, 0, 0, 1]),
        "score": np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8], dtype=np.float32),
        "m_conf": np.array([0.9, 0.8, 0.3, 0.7, 0.5, 0.6], dtype=np.float32),
        "defer": np.array([0, 0, 0, 0, 1, 1], dtype=bool),
    }


def test_pooled_metrics_values():
    m = pooled_metrics(records(), c_e=0.1, c_1=1.0)
    assert m["system_accuracy"] == pytest.approx(5 / 6)
    assert m["defer_rate"] == pytest.approx(2 / 6) and m["coverage"] == pytest.approx(4 / 6)
    assert m["legacy_accuracy"] == pytest.approx(4 / 6)
    assert m["server_accuracy"] == pytest.approx(3 / 6)
    assert m["oracle_accuracy"] == pytest.approx(5 / 6)
    # L01: kept 0..3 all m-correct -> 0; deferred 4 (e right) 0.1, 5 (e wrong) 1.1
    assert m["l01_cost"] == pytest.approx((0.1 + 1.1) / 6)
    t = m["table"]
    assert t["kept"]["n"] == 4 and t["kept"]["legacy_accuracy"] == 1.0 and t["kept"]["server_accuracy"] == 0.5
    assert t["deferred"]["n"] == 2 and t["deferred"]["legacy_accuracy"] == 0.0
    assert t["deferred"]["difference"] == pytest.approx(0.5)


def test_baselines_at_the_same_defer_rate():
    m = pooled_metrics(records(), 0.1, 1.0)
    # confidence defers the 2 lowest m_conf globally: samples 2 (0.3) and 4 (0.5) -> correct: 0,1,2(e),3,4(e)
    assert m["baselines"]["confidence"]["system_accuracy"] == pytest.approx(5 / 6)
    # per device (device 0 defers 0, device 1 defers 2 lowest: 4, 5) -> same as the rejector here
    assert m["baselines"]["confidence_per_device"]["system_accuracy"] == pytest.approx(5 / 6)
    # random at rate 1/3 in expectation: (2/3)*acc_m + (1/3)*acc_e
    assert m["baselines"]["random"]["system_accuracy"] == pytest.approx(2 / 3 * 4 / 6 + 1 / 3 * 3 / 6)
    assert m["baselines"]["confidence"]["defer_rate"] == m["defer_rate"]


def test_accuracy_curve_endpoints():
    r = records()
    m_ok, e_ok = r["m_pred"] == 0, r["e_pred"] == 0
    acc = accuracy_at_rates(r["score"], m_ok, e_ok, np.array([0.0, 1 / 3, 1.0]))
    assert acc.tolist() == pytest.approx([4 / 6, 5 / 6, 3 / 6])


def test_per_device_rows():
    rows = per_device(records(), {0: {"group": "a"}, 1: {"group": "b"}})
    assert [r["device"] for r in rows] == [0, 1]
    assert rows[1]["system_accuracy"] == pytest.approx(2 / 3) and rows[1]["legacy_accuracy"] == pytest.approx(1 / 3)
    assert rows[0]["group"] == "a" and rows[1]["defer_rate"] == pytest.approx(2 / 3)


def test_aurc_by_hand_and_e_aurc_of_the_ideal_ranking_is_zero():
    from sim.core.metrics import aurc

    # 4 samples, local model right on samples 0 and 2; score ranks 3, 1, 0, 2 deferred first,
    # so the kept order (lowest score first) is 2, 0, 1, 3: risks 0/1, 0/2, 1/3, 2/4.
    score = np.array([0.2, 0.7, 0.1, 0.9])
    m_ok = np.array([True, False, True, False])
    got = aurc(score, m_ok)
    assert np.isclose(got["aurc"], (0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert np.isclose(got["e_aurc"], 0.0)  # this ranking is ideal
    worst = aurc(-score, m_ok)  # wrong ones kept first: risks 1, 1, 2/3, 2/4
    assert np.isclose(worst["aurc"], (1 + 1 + 2 / 3 + 2 / 4) / 4) and worst["e_aurc"] > 0


def test_fairness_worst_and_tenth_percentile():
    from sim.core.metrics import fairness

    rows = [{"system_accuracy": v} for v in np.linspace(0.5, 0.95, 10)]
    f = fairness(rows)
    assert f["worst"] == 0.5 and np.isclose(f["p10"], np.percentile(np.linspace(0.5, 0.95, 10), 10))
    assert np.isclose(f["p10"], 0.545)
