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
    # ran without a word before (issue 28)
    (["servers.lr=1e10"], "servers.lr"),                          # Adam moves each weight by ~lr per step
    (["fleet.groups.1.lr=5"], "fleet.groups.1.lr"),
    (["servers=mel", "servers.mel.standalone_weight=0", "servers.mel.combiner_weight=0"], "servers.mel"),
    (["servers=mel", "servers.count=1"], "servers.count"),      # MEL with no ensemble
    (["servers.training=dml"], "servers.count"),                # DML with no peer (servers.count=1)
    (["failures=crash_stop", "servers.count=2", "failures.servers=[0,0]"], "failures.servers"),
    (["failures=partition", "failures.partition.devices=[1,1]"], "failures.partition.devices"),
    (["sim.plots=2"], "sim.plots"),                             # a bool given as 2 (OmegaConf: true)
    (["sim.checkpoint=yes"], "sim.checkpoint"),
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


# ---- cache entries whose manifest checks out but whose files are not what the simulator writes ------

FORGED = {
    "object-dtype y": lambda e: np.save(e / "y.npy", np.array([object()] * 3, dtype=object), allow_pickle=True),
    "y one sample short": lambda e: np.save(e / "y.npy", np.load(e / "y.npy")[:-1]),
    "x flattened": lambda e: np.save(e / "x.npy", np.load(e / "x.npy").reshape(len(np.load(e / "y.npy")), -1)),
    "a label beyond the classes": lambda e: np.save(e / "y.npy", np.load(e / "y.npy") + 100),
}


@pytest.mark.parametrize("forge", list(FORGED))
def test_a_dataset_entry_with_a_forged_manifest_is_rebuilt_not_used(tmp_path, forge):
    """Files rewritten and the manifest rewritten to match them (before: a traceback, or -- one sample
    short -- a run on misaligned labels, exit 0): the entry is rebuilt with a warning naming the problem."""
    import json

    from sim.core.cache import write_manifest
    from tests.conftest import prepare_for, small_cfg

    cfg = small_cfg()
    p = prepare_for(cfg, tmp_path)
    good = {n: (p.path / f"{n}.npy").read_bytes() for n in ("x", "y", "owner", "split")}
    meta = json.loads((p.path / "manifest.json").read_text())["meta"]
    FORGED[forge](p.path)
    write_manifest(p.path, meta)
    with pytest.warns(UserWarning, match="dataset cache entry .* is corrupt or incomplete \\(.+\\); rebuilding"):
        again = prepare_for(cfg, tmp_path)
    assert {n: (again.path / f"{n}.npy").read_bytes() for n in good} == good


@pytest.mark.parametrize("legacy", ["per_device", "product_line"])
def test_a_fleet_entry_that_is_a_regular_file_is_rebuilt(tmp_path, legacy):
    """Before: the rename onto the file failed with a traceback. Per-device fleets keep their models in
    the fleet entry; a product line's models have entries of their own (``legacy/``), each rebuilt alike."""
    import shutil

    from tests.conftest import PER_DEVICE, fleet_for, prepare_for, small_cfg

    cfg = small_cfg(**(PER_DEVICE if legacy == "per_device" else {}))
    prep = prepare_for(cfg, tmp_path)
    first = fleet_for(cfg, prep, tmp_path)
    entry = first.path if legacy == "per_device" else first.models[0].parent
    shutil.rmtree(entry)
    entry.write_text("not a directory")
    what = "legacy fleet" if legacy == "per_device" else "legacy model"
    with pytest.warns(UserWarning, match=f"{what} cache entry .* rebuilding"):
        fleet = fleet_for(cfg, prep, tmp_path)
    assert fleet.built and entry.is_dir()
    if legacy == "per_device":
        assert len(list(entry.glob("device_*.pt"))) == cfg.fleet.num_clients
    else:
        assert fleet.models[0].is_file()


def test_resuming_into_a_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Hydra's job log is opened there first: before, a logging traceback (a new run there was already
    refused in one line)."""
    import errno

    from sim import results, run

    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setattr(run, "precheck", lambda argv: 1)  # the config and checkpoint checks: tested elsewhere

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(results.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match="sim.resume=.* cannot be written \\(Read-only file system\\)") as err:
        run.check_command_line(["fleet.num_clients=4", f"sim.resume={d}"])
    assert "\n" not in str(err.value) and "writable" in str(err.value)


@pytest.mark.parametrize("which", ["x", "y"])
def test_a_pickle_bearing_npz_is_named_as_such_not_truncated(tmp_path, which):
    """An object array is stored as a pickle, which is never loaded (before: "the file is truncated or not
    an npz", which sends the user looking for a broken download)."""
    from sim.core.config import DataConfig, DataSource
    from sim.core.sources import load_source

    arrays = {"x": np.zeros((10, 4)), "y": np.arange(10) % 2}
    arrays[which] = np.array([{"a": 1}] * 10, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    cfg = DataConfig(name="local")
    cfg.source, cfg.path = DataSource.file, str(path)
    with pytest.raises(DataError, match=f"array '{which}' holds Python objects") as err:
        load_source(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "truncated" not in msg and "np.savez" in msg
