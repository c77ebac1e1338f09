"""Data loading, partitioning, splits and the hub/local-file paths (offline, with files made here)."""
import numpy as np
import pytest

from sim.core.config import DataConfig, DataSource, DeviceGroupConfig, PartitionConfig
from sim.core.data import SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST, degrade, device_data, partition, select, split_device
from sim.core.errors import DataError
from sim.core.sources import load_source
from tests.conftest import PER_DEVICE, prepare_for, small_cfg


def file_cfg(path, **kw):
    """A ``data=local`` config naming ``path`` (which may not exist: the loader's own checks are tested)."""
    c = DataConfig(name="local", **kw)
    c.source, c.path = DataSource.file, str(path)
    return c

Y = np.repeat(np.arange(10), 60)


def test_iid_partition_deterministic_disjoint_and_complete():
    p1 = partition(Y, PartitionConfig(name="iid"), 7, seed=3)
    p2 = partition(Y, PartitionConfig(name="iid"), 7, seed=3)
    p3 = partition(Y, PartitionConfig(name="iid"), 7, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2))
    assert not all(np.array_equal(a, b) for a, b in zip(p1, p3))
    allidx = np.concatenate(p1)
    assert len(allidx) == len(Y) == len(np.unique(allidx))
    # iid: every device sees most classes
    assert min(len(np.unique(Y[p])) for p in p1) >= 8


def test_pathological_partition_limits_classes_per_device():
    parts = partition(Y, PartitionConfig(name="pathological", classes_per_device=2), 5, seed=0)
    assert all(len(np.unique(Y[p])) <= 2 for p in parts)
    assert len(np.unique(np.concatenate(parts))) == sum(len(p) for p in parts)


def test_dirichlet_partition_is_skewed_and_seeded():
    pcfg = PartitionConfig(name="dirichlet", alpha=0.1, min_partition_size=5)
    a, b = partition(Y, pcfg, 5, seed=1), partition(Y, pcfg, 5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # a small alpha concentrates each device on few classes
    top_share = [np.bincount(Y[p], minlength=10).max() / len(p) for p in a]
    assert np.mean(top_share) > 0.3


def test_fewer_samples_than_devices_is_a_clear_error():
    with pytest.raises(DataError, match="lower fleet.num_clients"):
        partition(np.arange(3) % 2, PartitionConfig(name="iid"), 5, seed=0)


def test_split_device_disjoint_nonempty_and_seeded():
    idx = np.arange(100)
    c1 = split_device(idx, (0.4, 0.4, 0.2), seed=0, device=3)
    assert np.array_equal(c1, split_device(idx, (0.4, 0.4, 0.2), seed=0, device=3))
    assert not np.array_equal(c1, split_device(idx, (0.4, 0.4, 0.2), seed=0, device=4))
    assert [(c1 == s).sum() for s in (SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST)] == [40, 40, 20]
    tiny = split_device(np.arange(3), (0.4, 0.4, 0.2), 0, 0)
    assert sorted(tiny.tolist()) == [0, 1, 2]
    with pytest.raises(DataError, match="fewer than the 3"):
        split_device(np.arange(2), (0.4, 0.4, 0.2), 0, 0)


def test_degrade_lowres_and_noise_are_deterministic():
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    low = degrade(x, 2, 0.0, seed=0)
    assert low.shape == x.shape
    # numpy float32 means of 4 values in [0, 1]: at most 4 roundings of 2^-24 apart, far inside 1e-5
    assert np.allclose(low[:, :, 0, 0], low[:, :, 1, 1])  # 2x2 blocks share one value
    assert np.allclose(low[:, :, ::2, ::2], x.reshape(4, 1, 4, 2, 4, 2).mean(axis=(3, 5)))
    n1, n2 = degrade(x, 1, 0.2, seed=5), degrade(x, 1, 0.2, seed=5)
    assert np.array_equal(n1, n2) and not np.array_equal(n1, x)
    assert n1.min() >= 0 and n1.max() <= 1


def test_prepare_digits_is_cached_and_devices_get_disjoint_splits(cache_dir):
    cfg = small_cfg()
    p1 = prepare_for(cfg, cache_dir)
    p2 = prepare_for(cfg, cache_dir)
    assert p1.path == p2.path and p1.num_classes == 10 and p1.in_shape == (1, 8, 8)
    assert isinstance(p2.x, np.memmap)
    seen = []
    for dev in range(4):
        d = device_data(p1, dev, DeviceGroupConfig(name="g"), seed=0)
        # product lines (the default): no legacy split, the model was trained on the vendor pool
        assert not len(d.y_legacy) and len(d.y_rejector) and len(d.y_test)
        assert abs(len(d.y_rejector) / (len(d.y_rejector) + len(d.y_test)) - 0.6) < 0.02
        seen.append(d.ids_rejector)
    allids = np.concatenate(seen)
    assert len(allids) == len(np.unique(allids))
    assert len(p1.vendor_y) == 1797 // 4 and len(p1.y) == 1797 - 1797 // 4
    per_device = prepare_for(small_cfg(**PER_DEVICE), cache_dir)
    assert len(per_device.vendor_y) == 0 and len(per_device.y) == 1797
    d = device_data(per_device, 0, DeviceGroupConfig(name="g"), seed=0)
    assert len(d.y_legacy) and len(d.y_rejector) and len(d.y_test)


def _write_mnist_like_parquet(path, n=60):
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [PILImage.fromarray((np.kron(im, np.ones((3, 3))) / 16 * 255).astype(np.uint8)).resize((28, 28))
            for im in d.images[:n]]
    feats = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    Dataset.from_dict({"image": imgs, "label": d.target[:n].tolist()}, features=feats).to_parquet(str(path))
    return d.target[:n]


def test_hub_dataset_path_reads_a_local_parquet_export(tmp_path):
    """data=mnist offline: the flwr-datasets/HF loading path on a parquet file written here."""
    path = tmp_path / "mnist.parquet"
    labels = _write_mnist_like_parquet(path)
    cfg = small_cfg(data="mnist", **{"data.path": str(path)})
    x, y = load_source(cfg.data)
    assert x.shape == (60, 1, 28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(y, labels)


def test_local_npz_and_bad_files(tmp_path):
    good = tmp_path / "d.npz"
    np.savez(good, x=np.random.default_rng(0).random((30, 5)), y=np.arange(30) % 3)
    x, y = load_source(file_cfg(good))
    assert x.shape == (30, 1, 1, 5)
    cases = {
        tmp_path / "missing.npz": "does not exist",
        tmp_path / "empty.npz": "is empty",
        tmp_path / "trunc.npz": "truncated",
        tmp_path / "d.csv": "use a .npz or .parquet",
        tmp_path / "trunc.parquet": "truncated",
    }
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:40])
    (tmp_path / "d.csv").write_text("1,2\n")
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1garbage")
    for path, msg in cases.items():
        with pytest.raises(DataError, match=msg) as err:
            load_source(file_cfg(path))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("x,y,msg", [
    (np.full((10, 4), np.nan), np.arange(10) % 2, "NaN"),
    (np.zeros((10, 4)), np.zeros(10, dtype=int), "at least 2"),
    (np.zeros((10, 4)), np.arange(10) - 5, "must be >= 0"),
    (np.zeros((10, 4)), np.where(np.arange(10) % 2, 1.0, np.nan), "NaN"),
])
def test_hostile_datasets_are_rejected(tmp_path, x, y, msg):
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(DataError, match=msg):
        xs, ys = load_source(file_cfg(path))
        select(xs, ys, file_cfg(path), 0)


def test_select_classes_makes_a_binary_task():
    x = np.zeros((20, 1, 2, 2), np.float32)
    y = np.arange(20) % 10
    xs, ys, k = select(x, y, DataConfig(name="d", classes=[3, 8]), 0)
    assert k == 2 and sorted(set(ys.tolist())) == [0, 1] and len(ys) == 4
    with pytest.raises(DataError, match="do not occur"):
        select(x, y, DataConfig(name="d", classes=[3, 42]), 0)


def test_changed_local_file_is_not_served_from_a_stale_cache(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((40, 4)), y=np.arange(40) % 2)
    cfg = small_cfg(data="local", **{"data.path": str(path)})
    first = prepare_for(cfg, tmp_path / "cache")
    np.savez(path, x=rng.random((50, 4)), y=np.arange(50) % 2)
    second = prepare_for(cfg, tmp_path / "cache")
    assert second.path != first.path and len(second.y) + len(second.vendor_y) == 50


def test_sampled_partition_shares_images_but_never_a_test_image():
    from sim.core.data import SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST, sampled_rows

    n, devices = 100, 300  # more devices than samples / 3
    rows, owner, split = sampled_rows(n, PartitionConfig(samples_per_device=10), devices, (0.4, 0.4, 0.2), seed=0)
    again = sampled_rows(n, PartitionConfig(samples_per_device=10), devices, (0.4, 0.4, 0.2), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((rows, owner, split), again))
    assert np.bincount(owner, minlength=devices).tolist() == [10] * devices
    for dev in (0, 150, 299):
        mine = split[owner == dev]
        assert [(mine == c).sum() for c in (SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST)] == [4, 4, 2]
        assert len(np.unique(rows[owner == dev])) == 10  # no image twice on one device
    test_images = set(rows[split == SPLIT_TEST].tolist())
    assert not test_images & set(rows[split != SPLIT_TEST].tolist())
    assert len(set(rows.tolist())) > 0.9 * n  # the devices together use nearly the whole pool


def test_sampled_partition_runs_a_fleet_larger_than_the_dataset_allows(cache_dir):
    cfg = small_cfg(**{"fleet.num_clients": 700, "data.partition.name": "sampled",
                       "data.partition.samples_per_device": 5})
    prep = prepare_for(cfg, cache_dir)
    assert len(prep.y) == 700 * 5 and prep.owner.max() == 699
    with pytest.raises(Exception, match="samples_per_device"):
        small_cfg(**{"data.partition.name": "sampled", "data.partition.samples_per_device": 2})
