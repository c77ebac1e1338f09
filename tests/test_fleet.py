"""The legacy fleet: heterogeneous, deterministic for a seed, cached, corrupt entries rebuilt."""
import numpy as np
import pytest
import torch

from clients.legacy import assign_groups, build_fleet, legacy_file, load_legacy
from sim.data import prepare
from tests.conftest import small_cfg


def test_assign_groups_is_proportional_and_interleaved():
    g = assign_groups(10, [1, 1, 2])
    assert np.bincount(g).tolist() == [3, 2, 5] or np.bincount(g).tolist() == [2, 3, 5]
    assert len(set(g[:3])) == 3  # the first devices already mix the groups
    assert assign_groups(1, [1, 1]) == [0]


def test_fleet_is_heterogeneous_deterministic_and_cached(tmp_path):
    cfg = small_cfg(**{"fleet.num_clients": 8})
    fleets = []
    for name in ("a", "b"):
        cache = tmp_path / name
        prep = prepare(cfg, cache)
        fleets.append((build_fleet(cfg, prep, cache), prep))
    (f1, prep), (f2, _) = fleets
    assert f1.built and f2.built
    np.testing.assert_array_equal(f1.legacy_accuracy, f2.legacy_accuracy)
    for dev in range(8):
        g = f1.group_cfgs[f1.groups[dev]]
        s1 = torch.load(f1.path / legacy_file(dev), weights_only=True)
        s2 = torch.load(f2.path / legacy_file(dev), weights_only=True)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
        model = load_legacy(f1.path, dev, g, prep.in_shape, prep.num_classes)
        assert not any(p.requires_grad for p in model.parameters())
    # the default fleet mixes architectures and its legacy accuracies genuinely differ
    assert len({f1.group_cfgs[g]["arch"] for g in f1.groups}) == 3
    assert f1.legacy_accuracy.max() - f1.legacy_accuracy.min() > 0.1
    again = build_fleet(cfg, prep, tmp_path / "a")
    assert not again.built
    np.testing.assert_array_equal(again.legacy_accuracy, f1.legacy_accuracy)


def test_corrupt_cache_entry_is_rebuilt_not_used(tmp_path):
    cfg = small_cfg()
    prep = prepare(cfg, tmp_path)
    fleet = build_fleet(cfg, prep, tmp_path)
    target = fleet.path / legacy_file(1)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])  # truncated, as by a crash mid-write
    with pytest.warns(UserWarning, match="corrupt or incomplete; rebuilding"):
        rebuilt = build_fleet(cfg, prep, tmp_path)
    assert rebuilt.built and target.read_bytes() == good
    # flipped bytes of the same size are caught by the checksum too
    target.write_bytes(bytes(255 - b for b in good))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert build_fleet(cfg, prep, tmp_path).built
    assert target.read_bytes() == good


def test_corrupt_dataset_cache_is_rebuilt(tmp_path):
    cfg = small_cfg()
    p = prepare(cfg, tmp_path)
    y = (p.path / "y.npy").read_bytes()
    (p.path / "y.npy").write_bytes(y[:-8])
    with pytest.warns(UserWarning, match="dataset cache entry"):
        p2 = prepare(cfg, tmp_path)
    assert (p2.path / "y.npy").read_bytes() == y
