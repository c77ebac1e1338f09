"""``python -m sim.report``: grouping by recorded config, t-intervals, paired differences, figures,
one-line errors, and run directories left untouched. Most tests use hand-written summaries; the
``slow`` ones run tiny simulations."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from sim import report as R


def fake_run(root, name, seed, acc, config=None, defer=0.3, conf=None, **top):
    """A run directory with a minimal summary.json (``config=None``: an old, version-1 summary without
    one, naming its strategy and prices at the top level)."""
    d = root / name
    d.mkdir(parents=True)
    old = {"strategy": top.pop("strategy", "l2h"), "c_e": top.pop("c_e", 0.1), "c_1": 1.0} if config is None else {
        "summary_version": 2}
    s = {"seed": seed, **old, "num_clients": 4, "num_rounds": 2, "num_test_samples": 360, "system_accuracy": acc,
         "defer_rate": defer,
         "coverage": 1 - defer, "l01_cost": 1 - acc, "legacy_accuracy": 0.7, "server_accuracy": 0.9,
         "baselines": {"confidence": {"system_accuracy": acc - 0.01 if conf is None else conf}},
         "curves": {"defer_rate": [0.0, 0.5, 1.0], "rejector": [0.7, acc, 0.9]},
         "accuracy_at_defer_rate": {"0.5": acc}, **top}
    if config is not None:
        s["config"] = config
    (d / "summary.json").write_text(json.dumps(s))
    return d


def cfg(weights="shifted", name="l2h", c_e=0.1, **more):
    return {"data": {"name": "digits"}, "strategy": {"name": name, "c_e": c_e, "weights": weights, **more},
            "sim": {"num_rounds": 2}}


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_t_interval_matches_scipy():
    v = [0.81, 0.86, 0.83, 0.84]
    st = R.mean_ci(v)
    lo, hi = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert st["n"] == 4 and st["mean"] == pytest.approx(np.mean(v))
    assert st["std"] == pytest.approx(np.std(v, ddof=1))
    assert (st["lo"], st["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    one = R.mean_ci([0.8])
    assert one["n"] == 1 and one["mean"] == 0.8 and all(math.isnan(one[k]) for k in ("std", "lo", "hi"))
    assert R.fmt_stat(one) == "0.800 (no CI)" and R.fmt_stat(R.mean_ci([])) == "–"
    assert R.fmt_stat(st) == f"{np.mean(v):.3f} ± {hi - np.mean(v):.3f} ({np.std(v, ddof=1):.3f})"


def test_group_table_uses_sample_std_and_t_interval(tmp_path):
    accs = [0.80, 0.84, 0.85]
    for i, a in enumerate(accs):
        fake_run(tmp_path, f"r{i}", i, a, cfg())
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    st = res["stats"].loc[("g1", "system_accuracy")]
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(accs), scale=sps.sem(accs))
    assert st["n"] == 3 and st["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (st["lo"], st["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    js = json.loads((tmp_path / "out" / "report.json").read_text())
    m = js["groups"][0]["metrics"]["system_accuracy"]
    assert m["ci_low"] == pytest.approx(lo) and m["ci_high"] == pytest.approx(hi) and m["n"] == 3
    vs = js["groups"][0]["metrics"]["vs_confidence"]  # within-run paired difference: acc - (acc - 0.01)
    assert vs["mean"] == pytest.approx(0.01) and vs["std"] == pytest.approx(0, abs=1e-12)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "t-interval" in md and "ddof = 1" in md and "vs confidence @ same rate" in md


def test_groups_follow_the_recorded_config_and_show_only_varying_keys(tmp_path):
    for w in ("shifted", "repo"):
        for data in ("digits", "mnist"):
            for seed in (0, 1):
                c = cfg(w)
                c["data"]["name"] = data
                fake_run(tmp_path, f"{w}-{data}-{seed}", seed, 0.8 + 0.05 * (w == "repo") + 0.01 * seed, c)
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    assert res["varying"] == ["data.name", "strategy.weights"]
    assert [(g["values"], g["seeds"]) for g in res["groups"]] == [
        ({"data.name": d, "strategy.weights": w}, [0, 1]) for d in ("digits", "mnist") for w in ("repo", "shifted")]
    assert "| data.name | strategy.weights | n |" in (tmp_path / "out" / "report.md").read_text()
    csv = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("run,seed,group,data.name,strategy.weights,system_accuracy") and len(csv) == 9


def test_keys_of_one_strategy_only_do_not_become_columns(tmp_path):
    fake_run(tmp_path, "a", 0, 0.8, cfg(rejector={"hidden": 64}))
    fake_run(tmp_path, "b", 0, 0.8, {**cfg(name="confidence"), "strategy": {"name": "confidence", "c_e": 0.1,
                                                                            "tau": None}})
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    assert res["varying"] == ["strategy.name"]


def test_old_summaries_fall_back_to_group_keys_with_one_warning(tmp_path, capsys):
    fake_run(tmp_path, "a", 0, 0.8)
    fake_run(tmp_path, "b", 1, 0.82)
    fake_run(tmp_path, "c", 0, 0.9, strategy="confidence")
    assert R.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "record no config" in err
    assert err.count("\n") == 1
    js = json.loads((tmp_path / "out" / "report.json").read_text())
    assert js["grouped_by"] == "GROUP_KEYS" and js["varying"] == ["strategy.name"] and len(js["groups"]) == 2


def v1_summary(s):
    """A summary as version 1 wrote it (before ``summary_version``): the strategy, its prices and a few
    server parameters also at the top level, the failure preset also in ``resilience``."""
    c = s["config"]
    st, sv = c["strategy"], c["servers"]
    delta, coop = st.get("max_defer_rate"), sv["training"] == "coop"
    out = {k: v for k, v in s.items() if k != "summary_version"}
    out.update({"strategy": st["name"], "c_e": st["c_e"], "c_1": st["c_1"], "staleness": st["staleness"],
                "max_defer_rate": delta, "bound": str(st["bound"]) if delta is not None else None,
                "num_servers": sv["count"], "serve_depth": sv["coop"]["serve_depth"] if coop else None,
                "capacity": sv["coop"]["capacity"] if coop else None})
    if "resilience" in s:
        out["resilience"] = {"failures": c["failures"]["name"], **s["resilience"]}
    return out


def test_version_1_summaries_report_the_same_tables(tmp_path):
    """The golden runs' summaries written the old way (version 1) give the report today's form gives;
    without ``config``, a version-1 summary's fallback identity is what its top-level keys said."""
    from sim.results import upgrade_summary
    from tests.golden import CASES, golden_path

    golden = {n: upgrade_summary(json.loads(golden_path(n).read_text())["summary"]) for n in CASES}
    md = {}
    for form, make in (("new", dict), ("old", v1_summary)):
        for n, s in golden.items():
            (tmp_path / form / n).mkdir(parents=True)
            (tmp_path / form / n / "summary.json").write_text(json.dumps(make(s)))
        R.report([tmp_path / form], tmp_path / f"out-{form}", plots=False, baseline="strategy.name=confidence")
        md[form] = (tmp_path / f"out-{form}" / "report.md").read_text().replace(str(tmp_path / form), "RUNS")
    assert md["old"] == md["new"] and "## Paired differences" in md["new"] and "| mel |" in md["new"]
    for s in golden.values():
        old = {k: v for k, v in v1_summary(s).items() if k != "config"}
        said = {"strategy.name": old["strategy"], "strategy.c_e": old["c_e"], "strategy.c_1": old["c_1"],
                "strategy.staleness": old["staleness"], "strategy.max_defer_rate": old["max_defer_rate"],
                "strategy.bound": old["bound"], "servers.count": old["num_servers"],
                "servers.coop.serve_depth": old["serve_depth"], "servers.coop.capacity": old["capacity"],
                "failures.name": old["resilience"]["failures"], "num_clients": old["num_clients"],
                "num_rounds": old["num_rounds"]}
        assert R.fallback_identity(upgrade_summary(old)) == said == R.fallback_identity(s)
    bare = upgrade_summary({"strategy": "l2h", "c_e": 0.1, "c_1": 1.0, "num_clients": 4, "num_rounds": 2})
    assert R.fallback_identity(bare)["strategy.staleness"] == 1 and bare["servers.count"] == 1
    assert bare["failures.name"] == "none" and "strategy" not in bare and bare["summary_version"] == 2


def test_hydra_config_groups_old_summaries(tmp_path):
    """Summaries without ``config`` are grouped by the composed config Hydra saved next to them."""
    import yaml

    from sim.core.config import plain
    from tests.conftest import small_cfg

    for w, seed in (("shifted", 0), ("repo", 0), ("repo", 1)):
        d = fake_run(tmp_path, f"{w}{seed}", seed, 0.8)
        (d / ".hydra").mkdir()
        composed = plain(small_cfg(**{"strategy.weights": w, "seed": seed, "sim.cache_dir": f"/tmp/c{seed}"}))
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(composed))
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    assert "strategy.weights" in res["varying"] and [g["n"] for g in res["groups"]] == [2, 1]
    assert not res["warnings"]


def test_a_hydra_config_the_schema_no_longer_reads_is_grouped_as_composed(tmp_path):
    for w, seed in (("shifted", 0), ("repo", 0), ("repo", 1)):
        d = fake_run(tmp_path, f"{w}{seed}", seed, 0.8)
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nstrategy:\n  name: l2h\n  weights: {w}\n"
                                                  f"  surrogate: renamed_since\nsim:\n  cache_dir: /tmp/x{seed}\n")
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    assert res["varying"] == ["strategy.weights"] and [g["n"] for g in res["groups"]] == [2, 1]
    assert len(res["warnings"]) == 1 and "as composed" in res["warnings"][0]


def test_paired_differences_use_only_common_seeds(tmp_path):
    base = {0: 0.80, 1: 0.82, 2: 0.84}
    other = {1: 0.85, 2: 0.90, 3: 0.99}
    for s, a in base.items():
        fake_run(tmp_path, f"conf{s}", s, a, cfg(name="confidence"))
    for s, a in other.items():
        fake_run(tmp_path, f"l2h{s}", s, a, cfg())
    res = R.report([tmp_path], tmp_path / "out", plots=False, baseline="strategy.name=confidence")
    diffs = [other[s] - base[s] for s in (1, 2)]
    st = res["paired"].loc[(res["groups"][1]["id"], "system_accuracy")]
    lo, hi = sps.t.interval(0.95, 1, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert st["n"] == 2 and st["mean"] == pytest.approx(np.mean(diffs))
    assert (st["lo"], st["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    js = json.loads((tmp_path / "out" / "report.json").read_text())
    assert js["paired"][0]["common_seeds"] == [1, 2] and js["baseline"]["config"] == {"strategy.name": "confidence"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Paired differences against strategy.name=confidence (n = 3 seeds)" in md and "| l2h | 2 |" in md
    with pytest.raises(R.ReportError, match="matches 0 configurations"):
        R.report([tmp_path], tmp_path / "out", plots=False, baseline="strategy.name=l2d")
    with pytest.raises(R.ReportError, match="does not vary"):
        R.report([tmp_path], tmp_path / "out", plots=False, baseline="data.name=digits")


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "nope")], [str(tmp_path / "empty")]):
        assert R.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    fake_run(tmp_path, "ok", 0, 0.8, cfg())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    assert R.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "broken" in err and err.count("\n") == 1
    assert R.main([str(tmp_path), "--no-plots", "--baseline", "oops"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_summary_with_a_non_finite_number_is_skipped_with_a_warning(tmp_path, capsys, token):
    """Python's json reads NaN / Infinity (and 1e999 as inf); the simulator never writes them. Before:
    the table printed nan / inf with no word."""
    for i, a in enumerate((0.8, 0.82)):
        fake_run(tmp_path, f"ok{i}", i, a, cfg())
    bad = fake_run(tmp_path, "bad", 2, 0.5, cfg())
    text = (bad / "summary.json").read_text().replace('"system_accuracy": 0.5', f'"system_accuracy": {token}')
    assert token in text
    (bad / "summary.json").write_text(text)
    assert R.main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("warning: ") and "bad" in err and "non-finite" in err, err
    assert "nan" not in out.lower() and "inf" not in out.lower().replace("info", "")
    assert json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON, two runs


@pytest.mark.parametrize("out", ["/proc/l2h-report", "file"])
def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys, out):
    """Before: a FileNotFoundError / FileExistsError traceback."""
    fake_run(tmp_path, "ok", 0, 0.8, cfg())
    if out == "file":
        out = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("x")
    before = snapshot(tmp_path)
    assert R.main([str(tmp_path), "--out", out, "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} cannot be written") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_figures_are_pdf_and_png_and_runs_are_untouched(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for name in ("l2h", "l2d"):
            for c_e in (0.0, 0.2):
                fake_run(runs, f"{name}{c_e}-{seed}", seed, 0.8 + c_e / 10 + seed / 100, cfg(name=name, c_e=c_e),
                         defer=0.5 - c_e)
        for S in (1, 2, 4):
            fake_run(runs, f"S{S}-{seed}", seed, 0.8 + seed / 100, cfg(staleness=S, max_defer_rate=0.2,
                                                                      bound="quantile"), defer=0.2)
    before = snapshot(runs)
    res = R.report([runs], tmp_path / "out")
    assert snapshot(runs) == before
    names = {p.name for p in res["files"]}
    for stem in ("accuracy_vs_defer_rate", "cost_coverage", "accuracy_vs_c_e", "accuracy_vs_staleness",
                 "accuracy_vs_staleness_paired",
                 "achieved_vs_requested_defer_rate"):
        for ext in ("pdf", "png"):
            assert f"{stem}.{ext}" in names and (tmp_path / "out" / f"{stem}.{ext}").stat().st_size > 5_000
    assert (tmp_path / "out" / "cost_coverage.pdf").read_bytes().startswith(b"%PDF")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "cost-coverage curve" in md and "not what the method would do at another deferral cost" in md


def test_runs_with_failures_report_mels_measures_with_intervals(tmp_path):
    """A sweep of server training under a crash: the table gains fraction kept (mean and worst round)
    and inference kept, each mean ± t-interval over seeds, and resilience_kept is drawn."""
    runs = tmp_path / "runs"
    kept = {"independent": (0.99, 0.97), "mel": (0.95, 0.92)}
    for training, (fk, ik) in kept.items():
        for seed in (0, 1, 2):
            fake_run(runs, f"{training}-{seed}", seed, 0.85, {**cfg(), "servers": {"training": training},
                                                           "failures": {"name": "crash_stop"}},
                     resilience={"fraction_kept": fk + seed / 100,
                                 "fraction_kept_min": fk - 0.02, "inference_kept": ik + seed / 100})
    R.report([runs], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| mel | 3 |") and "0.960 ±" in ln)
    half = sps.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)  # sample std of (0.95, 0.96, 0.97) is 0.01
    assert f"0.960 ± {half:.3f}" in row and f"0.930 ± {half:.3f}" in row and "0.930 ± 0.000" in row
    assert "| fraction kept | fraction kept, worst round | inference kept |" in md
    for ext in ("pdf", "png"):
        assert (tmp_path / "out" / f"resilience_kept.{ext}").stat().st_size > 5_000


def simulate_into(path, cache, **over):
    from rich.console import Console

    from sim.run import simulate
    from tests.conftest import small_cfg

    cfg_ = small_cfg(**{"sim.cache_dir": str(cache), "sim.backend": "inprocess", **over})
    with open(os.devnull, "w") as sink:
        return simulate(cfg_, path, console=Console(file=sink))


@pytest.mark.slow
def test_a_sweep_of_two_keys_is_never_merged(tmp_path, shared_cache):
    """`strategy.weights=shifted,repo` x `seed=0,1`, plus one run that also changes
    `strategy.rejector.inputs`: three configurations, never merged, both keys columns."""
    runs = [({"strategy.weights": w, "seed": seed}) for w in ("shifted", "repo") for seed in (0, 1)]
    runs.append({"strategy.weights": "shifted", "strategy.rejector.inputs": "sample", "seed": 0})
    for i, over in enumerate(runs):
        simulate_into(tmp_path / f"run{i}", shared_cache, **over)
    res = R.report([tmp_path], tmp_path / "out", plots=False)
    assert res["varying"] == ["strategy.rejector.inputs", "strategy.weights"] and not res["warnings"]
    assert sorted((tuple(g["values"].values()), g["seeds"]) for g in res["groups"]) == [
        (("sample", "shifted"), [0]), (("sample+legacy", "repo"), [0, 1]), (("sample+legacy", "shifted"), [0, 1])]
    for g in res["groups"]:
        for r in g["runs"]:
            recorded = json.loads((tmp_path / r["run"] / "summary.json").read_text())["config"]["strategy"]
            assert (recorded["rejector"]["inputs"], recorded["weights"]) == tuple(g["values"].values())
    assert "| strategy.rejector.inputs | strategy.weights | n |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_report_on_two_small_runs(tmp_path, shared_cache):
    """The command end to end: two runs of different strategies, a broken summary (one warning),
    a missing directory (one-line error), figures, the runs untouched."""
    simulate_into(tmp_path / "a", shared_cache, seed=0)
    simulate_into(tmp_path / "b", shared_cache, strategy="confidence", **{"seed": 1, "strategy.c_e": 0.2})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    before = snapshot(tmp_path)
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "sim.report", str(tmp_path / "a"), str(tmp_path / "b"),
                        str(tmp_path / "broken"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning:") == 1 and "broken" in r.stderr
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,seed,group,strategy.name,")
    md = (out / "report.md").read_text()
    assert "| l2h |" in md and "| confidence |" in md and "no CI" in md
    for name in ("accuracy_vs_defer_rate", "accuracy_vs_c_e", "cost_coverage"):
        assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.pdf").is_file()
    assert snapshot(tmp_path) == {**before, **{p: p.read_bytes() for p in out.rglob("*")}}
    bad = subprocess.run([sys.executable, "-m", "sim.report", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
