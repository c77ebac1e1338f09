"""Real runs with several helper servers and injected failures (each costs seconds)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import small_cfg

pytestmark = pytest.mark.slow  # real runs: the full suite only (README)

PRESETS = {
    "crash_stop": {"failures.servers": "[1]", "failures.round": 2},
    "crash_recover": {"failures.servers": "[0]", "failures.round": 1, "failures.recover_after": 1},
    "transient": {"failures.outage_p": 0.5},
    "query_drop": {"failures.query_drop_q": 0.5},
    "partition": {"failures.partition.devices": "[0,1]", "failures.partition.servers": "[0]",
                  "failures.partition.start": 1},
    "slow": {"failures.slow.start": 1, "failures.slow.delay_s": 5.0},
    "device_dropout": {"failures.dropout.fraction": 0.5},
    "random": {"failures.random.crash_p": 0.3, "failures.random.outage_p": 0.3, "failures.random.partition_p": 0.5},
}


def run(tmp_path, cache, name, **over):
    """``cache``: the suite's shared cache (tests/conftest.py), not the user's default one, which on a
    fresh machine every worker would fill again with the same dataset and product lines."""
    from sim.run import simulate

    cfg = small_cfg(**{"sim.num_rounds": 3, "servers.count": 2, "failures.reference": "false",
                       "sim.cache_dir": str(cache), **over})
    return simulate(cfg, tmp_path / name)


@pytest.mark.parametrize("preset,training", [(p, "mel") for p in sorted(PRESETS)]
                         + [("random", "independent"), ("crash_recover", "dml"), ("partition", "independent")])
def test_every_failure_preset_runs_to_completion(tmp_path, shared_cache, preset, training):
    s = run(tmp_path, shared_cache, preset, **{"failures": preset, "servers.training": training,
                                               "sim.backend": "inprocess", **PRESETS[preset]})
    assert 0 <= s["system_accuracy"] <= 1 and s["num_test_samples"] > 0
    res = s["resilience"]
    assert s["config"]["failures"]["name"] == preset and set(res["failovers"]) == {"subset", "standalone", "legacy"}
    saved = json.loads((tmp_path / preset / "failure_schedule.json").read_text())
    assert len(saved["rounds"]) == 3 and saved["failures"]["name"] == preset
    if preset == "device_dropout":
        rounds = [json.loads(ln) for ln in (tmp_path / preset / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["train_errors"] for r in rounds) > 0  # dropouts are failed devices, counted
        assert rounds[-1]["eval_errors"] == 0 and rounds[-1]["eval_devices"] == 4  # the final round is complete


def test_every_server_dead_from_round_one_gives_exactly_the_legacy_accuracy(tmp_path, shared_cache, ray_local):
    s = run(tmp_path, shared_cache, "dead", **{"failures": "crash_stop", "failures.servers": "[0,1]", "failures.round": 1})
    assert s["system_accuracy"] == s["legacy_accuracy"]
    assert s["served_defer_rate"] == 0.0 and s["defer_rate"] == 0.0
    assert s["resilience"]["accuracy_by_state"].keys() == {"down 0,1"}
    assert s["servers"]["table"]["standalone"] == {}


def test_device_dropout_on_ray_is_counted_not_a_crash(tmp_path, shared_cache, ray_local):
    """Two devices per node (nodes {0,1} and {2,3}): each node has one device that drops out and
    one that answers."""
    s = run(tmp_path, shared_cache, "drop", **{"failures": "device_dropout", "failures.dropout.devices": "[1,2]",
                                 "failures.dropout.fraction": 0.0, "sim.devices_per_node": 2})
    rounds = [json.loads(ln) for ln in (tmp_path / "drop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_errors"] for r in rounds] == [2, 2, 2] and [r["train_devices"] for r in rounds] == [2, 2, 2]
    assert [r["eval_errors"] for r in rounds] == [2, 2, 0]  # every device answers the final evaluation
    assert s["resilience"]["device_errors"] == 10


def test_cli_mel_crash_stop_reports_resilience(tmp_path, shared_cache):
    """The issue's command, on a small fleet: the all-up reference, the schedule and the plots."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache)}
    r = subprocess.run([sys.executable, "-m", "sim.run", "servers.count=3", "servers.training=mel",
                        "failures=crash_stop", "failures.round=2", "fleet.num_clients=4", "sim.num_rounds=3",
                        "sim.backend=inprocess", f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((run_dir / "reference" / "summary.json").read_text())
    res = s["resilience"]
    assert res["same_test_samples"] and res["all_up_accuracy"] == ref["system_accuracy"]
    assert res["fraction_kept_final"] == pytest.approx(s["system_accuracy"] / ref["system_accuracy"])
    ref_rounds = [json.loads(x) for x in (run_dir / "reference" / "metrics.jsonl").read_text().splitlines()]
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_round = {str(a["round"]): a["system_accuracy"] / b["system_accuracy"] for a, b in zip(rounds, ref_rounds)}
    assert res["fraction_kept_by_round"] == pytest.approx(by_round)
    assert res["fraction_kept"] == pytest.approx((by_round["2"] + by_round["3"]) / 2)  # server 0 down from round 2
    assert ref["resilience"]["fraction_kept"] == 1.0 and ref["resilience"]["inference_kept"] == 1.0
    assert s["servers"]["training"] == "mel" and s["servers"]["routing"] == "all"
    assert s["servers"]["dead_at_end"] == [0] and set(s["servers"]["table"]["standalone"]) == {"1", "2"}
    assert set(s["servers"]["table"]["ensemble"]) == {"1+2"}
    for name in ("failure_schedule.json", "resilience_timeline.png", "resilience_states.png"):
        assert (run_dir / name).is_file(), name
    assert "round   2: crash [0]" in r.stdout and "accuracy kept in the 2 degraded round(s)" in r.stdout


def _failing_device(monkeypatch, device, rounds=None):
    """Make ``device``'s evaluation raise (in ``rounds``; None: every round), as a device whose legacy
    model cannot be loaded does."""
    from strategies.l2h import L2HMethod

    real = L2HMethod.evaluate

    def evaluate(self, ctx):
        if ctx.device.device_id == device and (rounds is None or ctx.round in rounds):
            raise RuntimeError(f"the legacy model of device {device} cannot be loaded")
        return real(self, ctx)

    monkeypatch.setattr(L2HMethod, "evaluate", evaluate)


def test_a_device_missing_from_the_final_evaluation_fails_the_run_in_one_line(tmp_path, shared_cache, monkeypatch):
    """Issue 28 item 4: a device that fails every round used to leave a summary over 3 of 4 devices,
    exit 0. The final evaluation has no injected dropout, so a missing device fails the run, naming
    the device and the cause; the final round is not checkpointed, so a resume repeats it."""
    from sim.checkpoint import load
    from sim.engine import EngineError
    from sim.run import simulate

    _failing_device(monkeypatch, 2)
    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": shared_cache})
    with pytest.raises(EngineError) as err:
        simulate(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith("device 2 failed in the final evaluation: RuntimeError: the legacy model of device 2 "
                          "cannot be loaded; the results would cover 3 of 4 devices"), msg
    assert msg.endswith(f"continue with sim.resume={tmp_path / 'run'}"), msg
    assert not (tmp_path / "run" / "summary.json").exists()
    assert load(tmp_path / "run")[1]["round"] == 1  # the incomplete final round (2) was not checkpointed


def test_a_device_failing_before_the_final_round_is_counted_not_fatal(tmp_path, shared_cache, monkeypatch):
    from sim.run import simulate

    _failing_device(monkeypatch, 2, rounds={1})
    s = simulate(small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": shared_cache}), tmp_path / "run")
    rounds = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_errors"] for r in rounds] == [1, 0] and s["resilience"]["device_errors"] == 1
    assert rounds[-1]["eval_devices"] == 4 and len((tmp_path / "run" / "clients.csv").read_text().splitlines()) == 5


@pytest.mark.parametrize("over", [
    # the reproduction: the server crashes before it ever trained, the stale copy (S=3) has
    # no entry for it; devices used to defer 47% to it (accuracy 0.12), system 0.486 vs legacy 0.825
    {"failures.round": 1, "failures.recover_after": 1},
    # reset after training, half the devices sampled per round: the unsampled ones still held a
    # rejector trained against the server before its reset (system 0.708 vs legacy 0.825 in round 3)
    {"sim.num_rounds": 5, "failures.round": 2, "failures.recover_after": 1, "failures.recover_from": "scratch",
     "sim.fraction_train": 0.5},
], ids=["never-trained", "scratch-half-sampled"])
def test_a_stale_rejector_never_trusts_a_server_it_has_not_seen_since_its_reset(tmp_path, shared_cache, over):
    """Issue 28 item 3 (docs/methods.md §1, "Synchronous and asynchronous"): with S = 3 a recovered
    server is deferred to only by devices that trained against its state since the recovery, so no
    round falls below the legacy models alone; a ratio over the untrained pool's accuracy is null."""
    from sim.run import simulate

    cfg = small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": shared_cache, "strategy.staleness": 3,
                       "failures": "crash_recover", "failures.reference": "false", **over})
    s = simulate(cfg, tmp_path / "run")
    rounds = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["system_accuracy"] >= r["legacy_accuracy"] for r in rounds), [
        (r["system_accuracy"], r["legacy_accuracy"]) for r in rounds]
    assert s["system_accuracy"] >= s["legacy_accuracy"]
    if over["failures.round"] == 1:  # round 1: the server is down and its all-up stand-in never trained
        assert rounds[0]["all_up_untrained"] == [0]
        assert s["resilience"]["inference_kept_by_round"]["1"] is None and s["resilience"]["inference_kept"] is None
