"""Pooled fleet metrics and matched-rate baselines on hand-made records."""
import numpy as np
import pytest

from sim.core.metrics import accuracy_at_rates, per_device, pooled_metrics, tie_keys


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
    acc = accuracy_at_rates(r["score"], m_ok, e_ok, np.array([0.0, 1 / 3, 1.0]), tie_keys(r["device"]))
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


def _tied_fleet(seed=0, devices=6, per=50):
    """A pooled record with many exact ties in every ranking (max softmax of 1.0, repeated scores)."""
    rng = np.random.default_rng(seed)
    n = devices * per
    rec = {"device": np.repeat(np.arange(devices), per), "y": rng.integers(0, 3, n), "m_pred": rng.integers(0, 3, n),
           "e_pred": rng.integers(0, 3, n), "score": rng.integers(0, 4, n).astype(np.float32),
           "m_conf": rng.choice([0.5, 0.9, 1.0], n).astype(np.float32),
           "m_conf_cal": rng.choice([0.4, 0.7], n).astype(np.float32)}
    rec["defer"] = rng.random(n) < 0.3
    return rec


def test_confidence_baselines_defer_exactly_the_stated_counts():
    """Global, calibrated: exactly as many deferrals as the method made; per device: exactly the
    method's count on every device -- also when the ranking has ties."""
    from sim.core.metrics import device_counts, per_device_topk, topk_defer

    rec = _tied_fleet()
    keys = tie_keys(rec["device"])
    k = int(rec["defer"].sum())
    assert topk_defer(-rec["m_conf"], k, keys).sum() == k
    assert topk_defer(-rec["m_conf_cal"], k, keys).sum() == k
    counts = device_counts(rec["defer"], rec["device"])
    mask = per_device_topk(-rec["m_conf"], rec["device"], counts, keys)
    assert device_counts(mask, rec["device"]) == counts
    # the deferred samples are the least confident on each device: none kept is less confident
    for d in counts:
        mine = rec["device"] == d
        if mask[mine].any() and (~mask[mine]).any():
            assert rec["m_conf"][mine][mask[mine]].max() <= rec["m_conf"][mine][~mask[mine]].min()


def test_tie_breaking_does_not_depend_on_device_order():
    """The same samples pooled in another device order (devices renamed and their rows moved, each
    device's own rows in the same order) give the same baselines and curves to the last digit."""
    rec = _tied_fleet(seed=3)
    a = pooled_metrics(rec, 0.1, 1.0)
    perm = np.array([4, 2, 5, 0, 3, 1])  # device d's rows now come in position perm[d]
    order = np.argsort(perm[rec["device"]], kind="stable")
    moved = {k: v[order] for k, v in rec.items()}
    b = pooled_metrics(moved, 0.1, 1.0)
    assert a["baselines"] == b["baselines"] and a["operating_points"] == b["operating_points"]
    assert a["curves"] == b["curves"] and a["accuracy_at_defer_rate"] == b["accuracy_at_defer_rate"]
    # and ties are not broken by device order: the tied 1.0s deferred come from every device
    keys = tie_keys(rec["device"])
    from sim.core.metrics import topk_defer
    top = topk_defer(-rec["m_conf"], int((rec["m_conf"] < 1.0).sum()) + 60, keys)
    tied = top & (rec["m_conf"] == 1.0)
    assert tied.sum() == 60 and len(np.unique(rec["device"][tied])) >= 4


def test_calibration_changes_which_samples_a_global_threshold_defers():
    """Two devices whose raw confidences sit on different scales: the global threshold on raw
    confidence defers only from the less confident-looking device; on calibrated confidence, from
    the device whose samples are really wrong."""
    n = 10
    rec = {"device": np.repeat([0, 1], n), "y": np.zeros(2 * n, dtype=int),
           # device 0: right everywhere but shy (conf 0.4-0.5); device 1: wrong on half, overconfident
           "m_pred": np.r_[np.zeros(n, int), np.tile([0, 1], n // 2)], "e_pred": np.zeros(2 * n, dtype=int),
           "m_conf": np.r_[np.linspace(0.4, 0.5, n), np.tile([0.99, 0.9], n // 2)].astype(np.float32),
           "m_conf_cal": np.r_[np.linspace(0.9, 0.95, n), np.tile([0.8, 0.3], n // 2)].astype(np.float32),
           "score": np.zeros(2 * n, np.float32), "defer": np.r_[np.zeros(n, bool), np.tile([False, True], n // 2)]}
    m = pooled_metrics(rec, 0.1, 1.0)
    assert m["baselines"]["confidence"]["system_accuracy"] == pytest.approx(0.75)  # defers 5 right ones of device 0
    assert m["baselines"]["confidence_calibrated"]["system_accuracy"] == pytest.approx(1.0)
    assert m["baselines"]["confidence_per_device"]["system_accuracy"] == pytest.approx(1.0)


def test_operating_points_compare_rankings_at_the_same_rates():
    rec = _tied_fleet(seed=5)
    m = pooled_metrics(rec, 0.1, 1.0)
    ops = m["operating_points"]
    assert list(ops) == ["0.1", "0.2", "0.3", "0.5"]
    n = len(rec["y"])
    m_ok, e_ok = rec["m_pred"] == rec["y"], rec["e_pred"] == rec["y"]
    for rate, v in ops.items():
        k = round(float(rate) * n)
        assert v["method"] == pytest.approx(accuracy_at_rates(rec["score"], m_ok, e_ok, np.array([k / n]),
                                                              tie_keys(rec["device"]))[0])
        assert v["random"] == pytest.approx((1 - k / n) * m_ok.mean() + k / n * e_ok.mean())
        assert set(v) == {"method", "confidence", "confidence_per_device", "confidence_calibrated", "random"}
