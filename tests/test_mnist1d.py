"""MNIST-1D (data=mnist1d): offline generation, the 1-D CNN, sensors along W, the config preset, a run."""
import importlib.util
import os
import random

import numpy as np
import pytest
import torch

from sim.core.config import DataConfig, DataSource
from sim.core.errors import ConfigError, DataError
from tests.conftest import small_cfg

needs_mnist1d = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="pip install mnist1d")


def mnist1d_cfg(num_samples: int = 200) -> DataConfig:
    return DataConfig(name="mnist1d", source=DataSource.mnist1d, num_samples=num_samples)


@needs_mnist1d
def test_loader_gives_z_scored_signals_balanced_labels_and_is_deterministic():
    from sim.core.sources import load_source

    x, y = load_source(mnist1d_cfg(200))
    assert x.shape == (200, 1, 1, 40) and x.dtype == np.float32 and x.flags.c_contiguous
    # z-scored over the whole set (numpy, float32): pairwise sums of 8,000 values of size ~1 round by at
    # most log2(8000) * 2^-24 * 8000 ~ 6e-3 in total, 8e-7 of the mean, far inside 1e-4
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
    assert x.min() < -1.0 and x.max() > 1.0  # not rescaled into [0, 1]
    assert y.shape == (200,) and y.dtype == np.int64
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    x2, y2 = load_source(mnist1d_cfg(200))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


@needs_mnist1d
def test_loader_is_the_packages_train_then_test_rows_as_they_are():
    from mnist1d.data import get_dataset_args, make_dataset

    from sim.core.sources import load_source

    args = get_dataset_args()
    args.num_samples = 100
    state = np.random.get_state(), random.getstate()
    d = make_dataset(args)  # seed 42, train_split 0.8: the benchmark's
    np.random.set_state(state[0]), random.setstate(state[1])
    raw = np.concatenate([d["x"], d["x_test"]])
    x, y = load_source(mnist1d_cfg(100))
    assert np.array_equal(y, np.concatenate([d["y"], d["y_test"]]))
    assert np.array_equal(x[:, 0, 0, :], raw.astype(np.float32))  # the package's z-scored values, no rescale


@needs_mnist1d
def test_loading_leaves_the_global_rngs_untouched():
    from sim.core.sources import load_source

    np.random.seed(1234)
    random.seed(1234)
    np_state, py_state = np.random.get_state(), random.getstate()
    load_source(mnist1d_cfg(100))
    after_np, after_py = np.random.get_state(), random.getstate()
    assert after_py == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np_state, after_np))


def test_missing_package_is_a_one_line_data_error(monkeypatch):
    from sim.core.sources import load_source

    monkeypatch.setitem(__import__("sys").modules, "mnist1d.data", None)  # `import mnist1d.data` raises ImportError
    with pytest.raises(DataError, match="pip install mnist1d") as err:
        load_source(mnist1d_cfg(100))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("n", [0, 5, 15, 4999])
def test_bad_num_samples_is_a_one_line_config_error(n):
    with pytest.raises(ConfigError, match="data.num_samples") as err:
        mnist1d_cfg(n)
    assert "\n" not in str(err.value) and "multiple of 10" in str(err.value)
    with pytest.raises(ConfigError, match="data.num_samples") as err:
        small_cfg(data="mnist1d", **{"data.num_samples": n})
    assert "\n" not in str(err.value)


@needs_mnist1d
def test_prepare_generates_once_per_config_and_keys_the_cache_on_num_samples(cache_dir, monkeypatch):
    from sim.core import data

    calls = []
    real = data.load_source
    monkeypatch.setattr(data, "load_source", lambda dcfg: calls.append(dcfg.num_samples) or real(dcfg))
    a = data.prepare(mnist1d_cfg(100), 4, 0, cache_dir)
    b = data.prepare(mnist1d_cfg(100), 4, 0, cache_dir)
    data.prepare(mnist1d_cfg(120), 4, 0, cache_dir)
    assert calls == [100, 120] and a.in_shape == (1, 1, 40) and a.num_classes == 10
    assert np.array_equal(a.x, b.x)
    assert a.bounded is False and b.bounded is False  # z-scored signals: the sensor's noise is not clipped
    key = data.data_key(mnist1d_cfg(100), 4, 0)
    assert key["data"]["num_samples"] == 100 and key["mnist1d"] and key["scaling"] == "z-scored"
    digits = data.data_key(DataConfig(name="digits"), 4, 0)  # unchanged: digits caches made before stay valid
    assert "num_samples" not in digits["data"] and "mnist1d" not in digits


def test_degrade_downsamples_signals_along_w_only():
    from sim.core.data import degrade

    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 1, 40), dtype=np.float32)
    for f in (2, 3, 4):
        out = degrade(x, f, 0.0, seed=0)
        assert out.shape == x.shape
        padded = np.concatenate([x, np.repeat(x[..., -1:], -(-40 // f) * f - 40, axis=3)], axis=3)
        means = padded.reshape(5, 1, 1, -1, f).mean(axis=4)
        assert np.array_equal(out, np.repeat(means, f, axis=3)[..., :40])  # H untouched: no rounding from it
    assert np.array_equal(degrade(x, 1, 0.0, seed=0), x)


def test_degrade_of_unbounded_signals_adds_noise_in_their_units_without_clipping():
    from sim.core.data import degrade

    x = np.random.default_rng(2).standard_normal((50, 1, 1, 40)).astype(np.float32)  # z-scored-like
    out = degrade(x, 1, 0.3, seed=7, clip=False)
    noise = np.random.default_rng(7).normal(0.0, 0.3, size=x.shape).astype(np.float32)
    assert np.array_equal(out, x + noise)  # nothing clipped: values below 0 and above 1 stay
    assert out.min() < -1.0 and out.max() > 2.0
    assert abs(float((out - x).std()) - 0.3) < 0.01
    assert np.array_equal(degrade(x, 2, 0.0, seed=0, clip=False), degrade(x, 2, 0.0, seed=0))  # no noise: no clip
    clipped = degrade(x, 1, 0.3, seed=7)  # the default, for images in [0, 1]
    assert clipped.min() == 0.0 and clipped.max() == 1.0


@needs_mnist1d
def test_a_noisy_mnist1d_device_sees_unclipped_noise_of_the_groups_std(cache_dir):
    from sim.core.config import DeviceGroupConfig
    from sim.core.data import device_data, prepare

    prep = prepare(mnist1d_cfg(400), 2, 0, cache_dir)
    clean = device_data(prep, 0, DeviceGroupConfig(name="full"), seed=0)
    noisy = device_data(prep, 0, DeviceGroupConfig(name="noisy", noise_std=0.3), seed=0)
    diff = np.concatenate([(noisy.x_rejector - clean.x_rejector).ravel(), (noisy.x_test - clean.x_test).ravel()])
    assert abs(float(diff.std()) - 0.3) < 0.02 and abs(float(diff.mean())) < 0.02
    assert noisy.x_rejector.min() < -1.0 and noisy.x_rejector.max() > 1.0


def test_degrade_of_images_is_unchanged():
    """H > 1: block means over H and W, as before signals were treated along W only."""
    from sim.core.data import degrade

    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    out = degrade(x, 2, 0.0, seed=0)
    want = np.repeat(np.repeat(x.reshape(3, 1, 4, 2, 4, 2).mean(axis=(3, 5)), 2, axis=2), 2, axis=3)
    assert np.array_equal(out, want)


@pytest.mark.numeric
@pytest.mark.parametrize("w", [8, 40, 41, 64])
def test_cnn1d_runs_on_any_length_and_its_trunk_head_split_reproduces_it(w):
    from servers.models import ServerNet
    from sim.core.zoo import build_model, split_model

    torch.manual_seed(0)
    model = build_model("cnn1d", (1, 1, w), 10, hidden=25).eval()
    x = torch.rand(6, 1, 1, w)
    out = model(x)
    assert out.shape == (6, 10)
    trunk, head = split_model(model)
    assert torch.equal(head(trunk(x)), out)
    net = ServerNet("cnn1d", (1, 1, w), 10, hidden=8)
    assert net.trunk(x).shape == (6, net.feature_dim)


def test_cnn1d_has_the_papers_convbase_shape():
    from sim.core.zoo import build_model

    model = build_model("cnn1d", (1, 1, 40), 10, hidden=25)
    assert sum(p.numel() for p in model.parameters()) == 5210  # ConvBase: 25 channels, 125 features
    assert model.head.in_features == 125


def test_flat_models_work_on_signals_and_the_2d_cnn_is_refused_with_a_hint():
    from sim.core.zoo import build_model

    x = torch.rand(4, 1, 1, 40)
    for arch in ("logreg", "mlp"):
        assert build_model(arch, (1, 1, 40), 10, hidden=16)(x).shape == (4, 10)
    with pytest.raises(ConfigError, match="cnn1d") as err:
        build_model("cnn", (1, 1, 40), 10)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="W >= 8"):
        build_model("cnn1d", (1, 1, 4), 10)


def test_the_run_names_the_group_whose_arch_cannot_read_signals():
    from sim.pipeline import check_archs

    cfg = small_cfg(data="mnist1d", fleet="default")
    with pytest.raises(ConfigError, match=r"fleet\.groups\.2\.arch=cnn .*cnn1d") as err:
        check_archs(cfg, (1, 1, 40))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"servers\.arch=cnn "):
        check_archs(small_cfg(data="mnist1d", **{"servers.arch": "cnn"}), (1, 1, 40))
    check_archs(small_cfg(data="mnist1d"), (1, 1, 40))
    check_archs(small_cfg(), (1, 8, 8))  # digits' default fleet has a 2-D cnn group: fine on 8x8 images


def test_data_mnist1d_brings_its_fleet_and_cnn1d_servers_but_the_user_still_chooses():
    cfg = small_cfg(data="mnist1d")
    assert cfg.data.source == DataSource.mnist1d and cfg.fleet.name == "mnist1d"
    assert {str(g.arch) for g in cfg.fleet.groups} == {"logreg", "mlp", "cnn1d"}
    assert str(cfg.servers.arch) == "cnn1d" and cfg.fleet.num_clients == 4  # small_cfg's override wins
    assert small_cfg(data="mnist1d", fleet="default").fleet.name == "default"
    mel = small_cfg(data="mnist1d", strategy="mel")
    assert str(mel.servers.arch) == "cnn1d" and str(mel.servers.training) == "mel"
    assert str(small_cfg(data="mnist1d", **{"servers.arch": "mlp"}).servers.arch) == "mlp"
    digits = small_cfg()
    assert digits.data.name == "digits" and digits.fleet.name == "default" and str(digits.servers.arch) == "mlp"


@needs_mnist1d
@pytest.mark.slow
def test_a_tiny_mnist1d_fleet_runs_end_to_end(tmp_path, shared_cache):
    from rich.console import Console

    from sim.run import simulate

    # data.vendor_samples=400: the product lines train on 400 vendor samples, not the default 4,000
    # (168 s -> 40 s measured on a loaded 2-core machine), and for 10 epochs, not their 60 (17.9 ->
    # 12.4 s of CPU for the test): nothing checked here depends on their accuracy, and every group's
    # model (logreg, mlp, two cnn1d) is still built, trained, cached and run on the signals
    epochs = {f"fleet.groups.{g}.epochs": 10 for g in range(4)}
    cfg = small_cfg(data="mnist1d", **{"data.num_samples": 400, "data.vendor_samples": 400,
                                       "sim.cache_dir": str(shared_cache), **epochs,
                                       "sim.backend": "inprocess", "servers.epochs": 2, "strategy": "mel"})
    with open(os.devnull, "w") as null:
        summary = simulate(cfg, tmp_path / "run", console=Console(file=null))
    assert summary["num_clients"] == 4 and summary["num_rounds"] == 2 and summary["num_classes"] == 10
    assert 0 <= summary["system_accuracy"] <= 1 and 0 <= summary["defer_rate"] <= 1
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "clients.csv").exists()


def test_mnist1d_grows_with_the_fleet_so_every_device_keeps_50_samples():
    from sim.cli import compose_checked

    assert compose_checked(["data=mnist1d"]).data.num_samples == 10_000  # the default fleet: unchanged
    assert compose_checked(["data=mnist1d", "fleet.num_clients=200"]).data.num_samples == 10_000
    assert compose_checked(["data=mnist1d", "fleet.num_clients=1000"]).data.num_samples == 50_000
    assert compose_checked(["data=mnist1d", "fleet.num_clients=10000"]).data.num_samples == 500_000
    assert compose_checked(["data=mnist1d", "fleet.num_clients=1000", "data.num_samples=60000"]
                           ).data.num_samples == 60_000  # the user's value wins


@pytest.mark.slow
def test_a_grown_mnist1d_fleet_has_disjoint_data_with_50_samples_each(cache_dir):
    """300 devices: past the default 10,000 samples (200 devices), so the data grew with the fleet
    (15,000 samples); the same code path as 10,000 devices, at a fraction of the generation time."""
    from sim.cli import compose_checked
    from sim.core import data

    c = compose_checked(["data=mnist1d", "fleet.num_clients=300"])
    assert c.data.num_samples == 15_000
    prep = data.prepare(c.data, 300, 0, cache_dir)
    owned = prep.owner[prep.owner >= 0]
    counts = np.bincount(owned, minlength=300)
    assert len(counts) == 300 and counts.min() >= 50  # every sample has one owner: disjoint by construction
