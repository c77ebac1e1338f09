"""README's "What a run prints" block is what the default run prints: its numbers are checked against a
real run of the default config (in-process: the same numbers as Flower on Ray, tests/test_engine.py)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def printed_block() -> str:
    text = README.read_text()
    start = text.index("## What a run prints")
    return text[start:].split("```", 2)[1]


def test_the_block_holds_the_summary_rows_it_is_checked_on():
    rows = dict(re.findall(r"│ ([a-z_0-9 @()]+?)\s+│\s+([0-9.]+)", printed_block()))
    assert {"system_accuracy", "legacy_accuracy", "defer_rate", "l01_cost",
            "confidence @ same defer rate"} <= set(rows)


@pytest.mark.slow
def test_the_default_run_prints_the_numbers_in_the_readme(tmp_path, shared_cache):
    """Every number of the block's summary table and fleet line equals the default run's, as printed (4 and
    3 decimals); on a CPU whose float rounding differs from the recording one, to the golden files'
    relative tolerance (tests/golden RTOL: below one test sample of 540, so a changed decision fails)."""
    from rich.console import Console

    from sim.cli import compose_checked
    from sim.run import simulate
    from tests.golden import RTOL

    block = printed_block()
    s = simulate(compose_checked(["sim.backend=inprocess", f"sim.cache_dir={shared_cache}", "sim.plots=false",
                                  "sim.progress=false"]), tmp_path / "run", console=Console(quiet=True))
    got = {k: s[k] for k in ("system_accuracy", "legacy_accuracy", "server_accuracy", "oracle_accuracy",
                             "defer_rate", "coverage", "l01_cost")}
    for name in ("confidence", "confidence_per_device", "confidence_calibrated", "random"):
        got[f"{name} @ same defer rate"] = s["baselines"][name]["system_accuracy"]
    rows = dict(re.findall(r"│ ([a-z_0-9 @()]+?)\s+│\s+([0-9.]+)", block))
    fleet = re.search(r"legacy accuracy min ([0-9.]+) / median ([0-9.]+) / max ([0-9.]+)", block)
    want = {**{k: float(v) for k, v in rows.items() if k in got},
            "legacy_accuracy_min": float(fleet[1]), "legacy_accuracy_median": float(fleet[2]),
            "legacy_accuracy_max": float(fleet[3])}
    got.update({k: s["fleet"][k] for k in ("legacy_accuracy_min", "legacy_accuracy_median", "legacy_accuracy_max")})
    assert set(want) == set(got)
    for k, v in want.items():
        digits = 3 if k.startswith("legacy_accuracy_m") else 4
        assert round(got[k], digits) == v or abs(got[k] - v) <= RTOL * abs(v), (k, got[k], v)
