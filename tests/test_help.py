"""``python -m sim.run --help`` is the app's own help (configs/hydra/help/l2h.yaml): the groups and their
options without the ``base_*`` schemas, the common overrides and three examples; the two console
scripts (``l2h-sim``, ``l2h-report``) point at the two commands."""
import re
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
GROUPS = ("data", "fleet", "strategy", "servers", "sim", "failures", "experiment", "+variant", "+tier")


def help_text() -> str:
    return subprocess.run([sys.executable, "-m", "sim.run", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=True).stdout


def listed_options(text: str) -> dict[str, set[str]]:
    """``group -> options`` of the help's group section (continuation lines joined, notes dropped)."""
    section = text.split("== Config groups (GROUP=OPTION) ==")[1].split("==")[0]
    out: dict[str, str] = {}
    last = None
    for line in section.splitlines():
        if not line.strip():
            continue
        head = line.split()[0]
        if head in GROUPS:
            last = head
            out[last] = line[len(head):]
        elif last is not None:
            out[last] += " " + line
    return {g: {re.sub(r"\s*\(.*", "", o).strip() for o in re.sub(r"\([^)]*\)", "", v).split(",") if o.strip()}
            for g, v in out.items()}


@pytest.mark.slow
def test_help_lists_every_groups_options_without_schemas_and_gives_examples():
    text = help_text()
    assert text.startswith("l2h-sim (python -m sim.run)") and "base_" not in text
    listed = listed_options(text)
    assert set(listed) == set(GROUPS)
    for group, options in listed.items():
        files = {p.stem for p in (ROOT / "configs" / group.lstrip("+")).glob("*.yaml")}
        assert options == files, (group, options ^ files)
    examples = text.split("== Examples ==")[1].split("\n\n")[0].strip().splitlines()
    assert len(examples) == 3 and all(e.startswith("python -m sim.run ") for e in examples)
    assert "== Common overrides (KEY=VALUE) ==" in text and "sim.backend=ray|inprocess" in text
    assert len(text.splitlines()) < 60  # Hydra's default printed the whole config: ~190 lines


def test_the_console_scripts_point_at_the_two_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"l2h-sim": "sim.run:main", "l2h-report": "sim.report:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(import_module(module), name))
