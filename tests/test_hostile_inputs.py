"""The hostile inputs of the reliability issue, each refused with one line before anything runs.

Config values go through the same checks as ``python -m sim.run`` (:func:`sim.cli.compose_checked`,
:func:`sim.run.check_command_line`); data arrays through :func:`sim.core.sources.check_arrays`;
checkpoint headers through :func:`sim.checkpoint.header_problem`. The subprocess form of the same
path (one ``error:`` line, exit 2) is tested in tests/test_cli.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from sim.core.errors import ConfigError, DataError

CONFIGS = [
    (["seed=18446744073709551616"], "seed"),                      # beyond 64 bits
    (["sim.num_rounds=1000000000000"], "sim.num_rounds"),          # memory would grow until killed
    (["fleet.num_clients=1000000000"], "fleet.num_clients"),
    (["fleet.groups.0.downsample=100000"], "downsample"),          # MemoryError before
    (["servers.lr=inf"], "servers.lr"),
    (["strategy.rejector.lr=inf"], "strategy.rejector.lr"),
    (["strategy.c_e=inf"], "strategy.c_e"),
    (["strategy.c_e=nan"], "strategy.c_e"),
    (["servers.count=1", "servers.c_e=[nan]"], "servers.c_e"),
    (["failures=slow", "failures.slow.delay_s=nan"], "failures.slow.delay_s"),
    (["+foo=1"], "foo"),                                         # unknown + keys
    (["+sim.num_round=3"], "num_round"),                         # a typo of an existing key
    (["data.num_samples=7"], "data.num_samples"),
    # model widths beyond sim.core.config.MAX_HIDDEN: an allocation traceback before
    (["servers.hidden=1000000000"], "servers.hidden"),
    (["strategy.rejector.hidden=1000000000"], "strategy.rejector.hidden"),
    (["fleet.groups.1.hidden=1000000000"], "fleet.groups.1.hidden"),
    (["servers.hidden=4097"], "servers.hidden"),
]


@pytest.mark.parametrize("overrides,key", CONFIGS, ids=[" ".join(o) for o, _ in CONFIGS])
def test_a_hostile_config_value_is_one_line_naming_its_key(overrides, key):
    from sim.cli import compose_checked

    with pytest.raises(ConfigError) as err:
        compose_checked(overrides)
    msg = str(err.value)
    assert "\n" not in msg and key in msg, msg


def test_the_widest_model_allowed_is_accepted():
    """The bound refuses only what cannot be built: MAX_HIDDEN itself is a valid width everywhere."""
    from sim.cli import compose_checked
    from sim.core.config import MAX_HIDDEN

    cfg = compose_checked([f"servers.hidden={MAX_HIDDEN}", f"strategy.rejector.hidden={MAX_HIDDEN}",
                           f"fleet.groups.0.hidden={MAX_HIDDEN}"])
    assert cfg.servers.hidden == cfg.strategy.rejector.hidden == cfg.fleet.groups[0].hidden == MAX_HIDDEN


def test_an_unknown_primary_config_is_one_line():
    from sim.run import check_command_line

    with pytest.raises(ConfigError, match="no such primary config") as err:
        check_command_line(["--config-name", "nonexistent"])
    assert "\n" not in str(err.value)


def test_an_existing_file_as_run_dir_is_one_line(tmp_path):
    from sim.results import check_run_dir

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="existing file") as err:
        check_run_dir(f)
    assert "\n" not in str(err.value)


ARRAYS = [
    (np.zeros((5, 3)), np.zeros(4), "5 samples but y has 4"),        # x longer than y: no silent prefix
    (np.zeros((3, 3)), np.zeros(5), "3 samples but y has 5"),
    (np.array([["a", "b"], ["c", "d"]]), np.zeros(2), "dtype"),     # string x
    (np.zeros((4, 0)), np.zeros(4), "no features"),
    (np.zeros(4), np.zeros(4), "one row per sample"),
]


@pytest.mark.parametrize("x,y,expect", ARRAYS, ids=[e for *_, e in ARRAYS])
def test_mismatched_or_non_numeric_arrays_are_refused(x, y, expect):
    from sim.core.sources import check_arrays

    with pytest.raises(DataError, match=expect):
        check_arrays(x, y)


HEADERS = [
    ([1, 2], "not an object"),
    ({"round": "abc", "config": {}, "pool": {}, "strategy": {}}, "not a round number"),
    ({"round": -2, "config": {}, "pool": {}, "strategy": {}}, "outside"),
    ({"round": 1, "pool": {}, "strategy": {}}, "no 'config'"),
]


@pytest.mark.parametrize("meta,expect", HEADERS, ids=[e for _, e in HEADERS])
def test_a_forged_checkpoint_header_is_named(meta, expect):
    from sim.checkpoint import header_problem

    problem = header_problem(meta, num_rounds=3)
    assert problem is not None and expect in problem
    assert header_problem({"round": 2, "config": {}, "pool": {}, "strategy": {}}, num_rounds=3) is None


def test_cfg_with_a_sweep_is_one_line_not_hydras_traceback():
    from sim.run import check_command_line

    with pytest.raises(ConfigError, match="leave out -m"):
        check_command_line(["-m", "seed=0,1", "--cfg", "job"])


def test_a_hydra_quoted_run_dir_is_checked_as_the_path_hydra_uses(tmp_path):
    """`hydra.run.dir='a,b=c'` is the directory a,b=c: an existing run there is found (and no stray
    directory named with the quotes is made)."""
    from sim.run import check_command_line

    run = tmp_path / "x,y=1"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(ConfigError):
        check_command_line([f"hydra.run.dir='{run}'", "sim.num_rounds=1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x,y=1"]
