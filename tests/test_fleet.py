"""The legacy fleet: heterogeneous, deterministic for a seed, cached, corrupt entries rebuilt."""
import numpy as np
import pytest
import torch

from clients.legacy import assign_groups, legacy_file, load_legacy
from tests.conftest import fleet_for, prepare_for, small_cfg


def test_assign_groups_is_proportional_and_interleaved():
    g = assign_groups(10, [1, 1, 2])
    assert np.bincount(g).tolist() == [3, 2, 5] or np.bincount(g).tolist() == [2, 3, 5]
    assert len(set(g[:3])) == 3  # the first devices already mix the groups
    assert assign_groups(1, [1, 1]) == [0]


@pytest.mark.slow
def test_fleet_is_heterogeneous_deterministic_and_cached(tmp_path):
    cfg = small_cfg(**{"fleet.num_clients": 8})
    fleets = []
    for name in ("a", "b"):
        cache = tmp_path / name
        prep = prepare_for(cfg, cache)
        fleets.append((fleet_for(cfg, prep, cache), prep))
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
    assert len({f1.group_cfgs[g].arch for g in f1.groups}) == 3
    assert f1.legacy_accuracy.max() - f1.legacy_accuracy.min() > 0.1
    again = fleet_for(cfg, prep, tmp_path / "a")
    assert not again.built
    np.testing.assert_array_equal(again.legacy_accuracy, f1.legacy_accuracy)


@pytest.mark.slow
def test_corrupt_cache_entry_is_rebuilt_not_used(tmp_path):
    cfg = small_cfg()
    prep = prepare_for(cfg, tmp_path)
    fleet = fleet_for(cfg, prep, tmp_path)
    target = fleet.path / legacy_file(1)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])  # truncated, as by a crash mid-write
    with pytest.warns(UserWarning, match="corrupt or incomplete; rebuilding"):
        rebuilt = fleet_for(cfg, prep, tmp_path)
    assert rebuilt.built and target.read_bytes() == good
    # flipped bytes of the same size are caught by the checksum too
    target.write_bytes(bytes(255 - b for b in good))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert fleet_for(cfg, prep, tmp_path).built
    assert target.read_bytes() == good


def test_corrupt_dataset_cache_is_rebuilt(tmp_path):
    cfg = small_cfg()
    p = prepare_for(cfg, tmp_path)
    y = (p.path / "y.npy").read_bytes()
    (p.path / "y.npy").write_bytes(y[:-8])
    with pytest.warns(UserWarning, match="dataset cache entry"):
        p2 = prepare_for(cfg, tmp_path)
    assert (p2.path / "y.npy").read_bytes() == y


@pytest.mark.parametrize("arch", ["logreg", "mlp", "cnn"])
def test_batched_pretraining_is_the_one_by_one_training(arch):
    """Stacked (torch.func) training of M models == M separate train_minibatch runs (same seeds,
    same shuffles, same Adam), up to float rounding."""
    import torch.nn.functional as F

    from clients.zoo import build_model
    from sim.core.training import train_minibatch, train_stacked

    m, n = 4, 40  # n > batch 32: two steps per epoch, the second a short one
    torch.manual_seed(0)
    xs, ys = torch.rand(m, n, 1, 8, 8), torch.randint(0, 10, (m, n))
    models, ref = [], []
    for i in range(m):
        for out in (models, ref):
            torch.manual_seed(i)
            out.append(build_model(arch, (1, 8, 8), 10, hidden=8))
    for i, r in enumerate(ref):
        train_minibatch(r.parameters(), (xs[i], ys[i]), lambda xb, yb, r=r: F.cross_entropy(r(xb), yb),
                        epochs=20, batch_size=32, lr=1e-2, seed=7 + i)
    before = [[p.detach().clone() for p in mod.parameters()] for mod in models]
    train_stacked(models, xs, ys, epochs=20, batch_size=32, lr=1e-2, seeds=[7 + i for i in range(m)])
    # Rounding-level agreement: the batched and the one-by-one weights differ by less than 1e-4 of
    # how far training moved them (measured: <= 1e-5; Adam turns rounding noise in near-zero
    # gradients into steps of up to lr, so an absolute bound would depend on lr).
    for a, b, b0 in zip(models, ref, before):
        moved = max(float((pb.detach() - p0).abs().max()) for pb, p0 in zip(b.parameters(), b0))
        diff = max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
        assert moved > 0.1 and diff <= 1e-4 * moved, (arch, diff, moved)


@pytest.mark.slow
def test_sequential_and_batched_fleets_agree_and_are_cached_apart(tmp_path):
    cfg_b = small_cfg(**{"fleet.num_clients": 8})
    cfg_s = small_cfg(**{"fleet.num_clients": 8, "fleet.pretrain": "sequential"})
    prep = prepare_for(cfg_b, tmp_path)
    fb, fs = fleet_for(cfg_b, prep, tmp_path), fleet_for(cfg_s, prep, tmp_path)
    assert fb.path != fs.path and fb.built and fs.built
    assert np.abs(fb.legacy_accuracy - fs.legacy_accuracy).max() <= 1 / 36  # at most one test sample flips
