"""Figures that fit their labels (sim/style.py), short configuration labels and the researcher's own
(sim/naming.py, ``--label``), and the per-state points of resilience_states (sim/plots.py). Fast: no
simulation."""
import json

import pytest

from sim import report as R
from sim.naming import LabelError, parse_label, short_labels
from sim.plots import state_points
from sim.style import SINGLE, figure, fit, legend_outside, styled, wrap_label
from tests.test_report import cfg, fake_run

LONG = ["weights = shifted, rejector inputs = sample, federation = fedavg",
        "weights = paper, rejector inputs = sample_and_logits, federation = local",
        "L2H, $c_e$ = 0.3, rejector inputs = sample_and_logits (n=3)"]


@styled
def _drawn_inside(labels, ylabels=None):
    import matplotlib.pyplot as plt

    fig, ax = figure(SINGLE, 2.4)
    for i, lab in enumerate(labels):
        ax.plot([0, 1], [i, i + 1], label=lab)
    if ylabels:
        ax.set_yticks(range(len(ylabels)))
        ax.set_yticklabels([wrap_label(y) for y in ylabels])
    ax.set_xlabel("system accuracy $-$ confidence's at the same defer rate (same run)")
    legend_outside(fig, ax)
    fit(fig)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    plt.close(fig)
    return box, w, h


@pytest.mark.parametrize("n", [2, 3])
def test_a_one_column_figure_holds_its_long_legend_and_labels(n):
    """2-3 configurations with 55-70 character labels in a 3.4-inch figure with a 2-column legend
    (before: the legend and the axis label ran off the page): everything drawn lies inside."""
    box, w, h = _drawn_inside(LONG[:n], ylabels=LONG[:n])
    assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01, (box, w, h)
    assert w < 7.5  # widened to hold the labels (here also 50-character tick labels), not blown up


def test_long_labels_break_after_commas():
    assert wrap_label("L2H, $c_e$ = 0.1") == "L2H, $c_e$ = 0.1"
    assert wrap_label(LONG[1]) == "weights = paper,\nrejector inputs = sample_and_logits,\nfederation = local"
    assert wrap_label("a\nb" + "x" * 60) == "a\nb" + "x" * 60  # the user's own line breaks kept


def test_short_labels_keep_only_the_keys_in_which_a_configuration_differs():
    keys = ("strategy.name", "strategy.weights", "strategy.rejector.inputs", "strategy.c_e")
    rows = [dict(zip(keys, v)) for v in (("l2h", "shifted", "sample", 0.1), ("l2h", "paper", "sample", 0.1),
                                         ("l2h", "shifted", "logits", 0.1), ("l2d", "shifted", "sample", 0.1))]
    assert short_labels(rows) == ["L2H, weights = shifted, rejector inputs = sample, $c_e$ = 0.1",  # all common
                                  "L2H, weights = paper", "L2H, rejector inputs = logits", "L2D"]
    assert short_labels(rows, reference=rows[0])[0] == (
        "L2H, weights = shifted, rejector inputs = sample, $c_e$ = 0.1 (baseline)")


def test_a_label_is_which_then_text():
    varying = ["strategy.name", "strategy.c_e"]
    assert parse_label("g3=Mine", varying) == ("g3", "Mine")
    assert parse_label("strategy.name=confidence=Confidence (global)", varying) == (
        {"strategy.name": "confidence"}, "Confidence (global)")
    assert parse_label("strategy.name=l2h,strategy.c_e=0.3=$c_e = 0.3$", varying) == (
        {"strategy.name": "l2h", "strategy.c_e": "0.3"}, "$c_e = 0.3$")
    for bad, says in (("strategy.weights=paper=X", "does not vary"), ("strategy.name=l2h=", "the text is empty"),
                      ("nothing", "give ID=TEXT")):
        with pytest.raises(LabelError, match=says) as err:
            parse_label(bad, varying)
        assert "\n" not in str(err.value)


def test_report_labels_from_the_command_line_and_a_file(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for name in ("l2h", "l2d", "confidence"):
            fake_run(runs, f"{name}-{seed}", seed, 0.8 + seed / 100, cfg(name=name))
    (tmp_path / "labels.txt").write_text("# mine\nstrategy.name=l2d=Learning to defer\n")
    assert R.main([str(runs), "--out", str(tmp_path / "out"), "--no-plots", "--labels", str(tmp_path / "labels.txt"),
                   "--label", "strategy.name=confidence=Confidence (global)"]) == 0
    labels = {g["config"]["strategy.name"]: g["label"]
              for g in json.loads((tmp_path / "out" / "report.json").read_text())["groups"]}
    assert labels == {"l2h": "L2H", "l2d": "Learning to defer", "confidence": "Confidence (global)"}
    capsys.readouterr()
    assert R.main([str(runs), "--out", str(tmp_path / "out"), "--no-plots", "--label", "strategy.name=x=X"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --label 'strategy.name=x=X' matches 0 configurations") and "\n" not in err


def test_resilience_states_sets_each_states_last_round_beside_the_reference_at_that_round():
    """Not a mean over a state's rounds (round 1's untrained servers mixed in) beside a final accuracy."""
    rounds = [{"round": 1, "system_accuracy": 0.5, "availability": [1, 1]},
              {"round": 2, "system_accuracy": 0.8, "availability": [1, 1]},
              {"round": 3, "system_accuracy": 0.7, "availability": [0, 1]},
              {"round": 4, "system_accuracy": 0.75, "availability": [0, 1]}]
    ref = [{"round": t, "system_accuracy": 0.6 + 0.1 * t} for t in (1, 2, 3, 4)]
    assert state_points(rounds, ref) == [("all up", 2, 0.8, pytest.approx(0.8)),
                                         ("down 0", 4, 0.75, pytest.approx(1.0))]
    (_, _, _, none), _ = state_points(rounds)
    assert none != none  # NaN without a reference run


def test_a_baseline_adds_the_paired_difference_figures(tmp_path):
    """Where the configurations' bands overlap, their differences seed by seed: paired_differences and
    accuracy_vs_defer_rate_paired (one panel per configuration), named in report.md."""
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        for name, gain in (("l2h", 0.02), ("confidence", 0.0)):
            fake_run(runs, f"{name}-{seed}", seed, 0.8 + gain + seed / 20, cfg(name=name))
    res = R.report([runs], tmp_path / "out", baseline="strategy.name=confidence")
    names = {p.name for p in res["files"]}
    for stem in ("paired_differences", "accuracy_vs_defer_rate_paired", "vs_confidence"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert stem in (tmp_path / "out" / "report.md").read_text()
