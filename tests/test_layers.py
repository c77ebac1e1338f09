"""The layers contracts (pyproject.toml [tool.importlinter]): dependencies point one way, runner ->
strategies -> servers -> clients -> sim.core, and within the runner entry points -> a run's steps ->
engine -> Flower's apps -> analysis -> run records, with no exception; every sim module is declared."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter)")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout
    assert "ignore_imports" not in (ROOT / "pyproject.toml").read_text()  # no exceptions to the contract
