"""Behaviour pinned by golden outputs (tests/golden/): every case's summary.json and per-round
records equal the recorded ones to the last digit, in-process and on Flower + Ray."""
import pytest

from tests.golden import CASES, RAY_CASES, dump, golden_path, load, machine, run_case

FAST = ("l2h", "l2d", "mel_crash_stop")
"""Cases in the quick suite (``-m "not slow"``); the full suite runs every case."""


def _check(name, got):
    want = load(name)
    if want["machine"] != machine():
        pytest.skip(f"golden files were recorded with {want['machine']}, this machine is {machine()}: exact "
                    "float equality is not expected; regenerate with `python -m tests.golden` to pin it here")
    assert dump({"machine": want["machine"], **got}) == golden_path(name).read_text(), (
        f"{name}: results moved; if that is intended, regenerate with `python -m tests.golden {name}` and say "
        "in the commit message which numbers moved and why")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in CASES])
def test_in_process_run_matches_its_golden_file(name, tmp_path, shared_cache):
    _check(name, run_case(name, tmp_path / "run", shared_cache))



@pytest.mark.slow
@pytest.mark.parametrize("name", RAY_CASES)
def test_flower_on_ray_matches_the_same_golden_file(name, tmp_path, shared_cache, ray_local):
    """Flower on Ray adds no arithmetic: the same golden file as in-process, to the last digit
    (a recorded file from another process: the same seed gives the same numbers)."""
    _check(name, run_case(name, tmp_path / "run", shared_cache, backend="ray"))
