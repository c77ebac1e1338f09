"""``python -m sim.report`` writes one long (tidy) table of every run's per-round metrics: rounds.csv and
rounds.parquet, each loaded by pandas in one line (sim/tidy.py)."""
import json

import pandas as pd

from sim import report as R
from tests.test_report import cfg, fake_run


def with_rounds(d, accs, availability=(1, 1)):
    """Give a fake run a metrics.jsonl: one record per round, with a list and a mapping field."""
    lines = [json.dumps({"round": t + 1, "system_accuracy": a, "defer_rate": 0.25, "availability": list(availability),
                         "failovers": {"subset": t}, "note": "text is left out", "server_loss": None})
             for t, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_report_writes_every_runs_rounds_as_one_long_table(tmp_path):
    for w, seed in (("shifted", 0), ("shifted", 1), ("repo", 0)):
        d = fake_run(tmp_path / "runs", f"{w}{seed}", seed, 0.8, cfg(w))
        with_rounds(d, [0.7, 0.8 + seed / 100])
    res = R.report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert {tmp_path / "out" / "rounds.csv", tmp_path / "out" / "rounds.parquet"} <= set(res["files"])
    df = pd.read_parquet(tmp_path / "out" / "rounds.parquet")
    assert df.equals(pd.read_csv(tmp_path / "out" / "rounds.csv")[df.columns].astype(df.dtypes.to_dict()))
    assert list(df.columns) == ["run", "seed", "group", "label", "strategy.weights", "round", "metric", "value"]
    # 3 runs x 2 rounds x (system_accuracy, defer_rate, availability.0, availability.1, failovers.subset)
    assert len(df) == 3 * 2 * 5
    assert set(df.metric) == {"system_accuracy", "defer_rate", "availability.0", "availability.1", "failovers.subset"}
    one = df[(df.metric == "system_accuracy") & (df["strategy.weights"] == "shifted") & (df["round"] == 2)]
    assert sorted(one.value) == [0.8, 0.81] and sorted(one.seed) == [0, 1]
    assert one.group.nunique() == 1 and one.label.iloc[0] == "weights = shifted"


def test_a_run_without_metrics_jsonl_adds_no_rows(tmp_path):
    fake_run(tmp_path / "runs", "a", 0, 0.8, cfg())
    R.report([tmp_path / "runs"], tmp_path / "out", plots=False)
    df = pd.read_csv(tmp_path / "out" / "rounds.csv")
    assert df.empty and "metric" in df.columns
