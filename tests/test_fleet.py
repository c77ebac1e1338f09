"""The legacy fleet: heterogeneous, deterministic for a seed, cached, corrupt entries rebuilt."""
import numpy as np
import pytest
import torch

from clients.legacy import assign_groups, legacy_file, load_legacy, model_index
from tests.conftest import PER_DEVICE, fleet_for, prepare_for, small_cfg

FRESH_8 = "fresh-8-device-per-device-fleet"
"""The pytest-xdist group of the tests that share :func:`fresh_fleet` (``--dist loadgroup``): one worker
builds it once for all of them."""


@pytest.fixture(scope="module")
def fresh_fleet(tmp_path_factory):
    """An 8-device per-device fleet (1 build thread) built from nothing into a cache of its own:
    ``(cache, prep, fleet)``. Three tests each built this same fleet into an empty cache as their
    first step (the fresh build they compare a second fleet with); they now share one build. The
    ones that add entries to its cache (the sequential, the 2-thread fleet) add entries under other
    keys, which no other user of this cache looks up."""
    cache = tmp_path_factory.mktemp("fresh-8-per-device")
    torch.set_num_threads(1)  # as a run does: the thread count the 1-thread entry is built under
    cfg = small_cfg(**{"fleet.num_clients": 8, **PER_DEVICE})
    prep = prepare_for(cfg, cache)
    fleet = fleet_for(cfg, prep, cache)
    assert fleet.built  # really built here, not found in a cache
    assert torch.get_num_threads() == 1  # the build's thread count comes back (checked after 2 threads too)
    return cache, prep, fleet


def test_assign_groups_is_proportional_and_interleaved():
    g = assign_groups(10, [1, 1, 2])
    assert np.bincount(g).tolist() == [3, 2, 5] or np.bincount(g).tolist() == [2, 3, 5]
    assert len(set(g[:3])) == 3  # the first devices already mix the groups
    assert assign_groups(1, [1, 1]) == [0]


@pytest.mark.slow
@pytest.mark.xdist_group(FRESH_8)
def test_per_device_fleet_is_heterogeneous_deterministic_and_cached(tmp_path, fresh_fleet):
    cfg = small_cfg(**{"fleet.num_clients": 8, **PER_DEVICE})
    cache_a, prep, f1 = fresh_fleet  # built from nothing in its own cache ...
    f2 = fleet_for(cfg, prepare_for(cfg, tmp_path / "b"), tmp_path / "b")  # ... and again in another
    assert f1.built and f2.built
    np.testing.assert_array_equal(f1.legacy_accuracy, f2.legacy_accuracy)
    for dev in range(8):
        g = f1.group_cfgs[f1.groups[dev]]
        s1 = torch.load(f1.path / legacy_file(dev), weights_only=True)
        s2 = torch.load(f2.path / legacy_file(dev), weights_only=True)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
        model = load_legacy(f1.path / legacy_file(dev), g, prep.in_shape, prep.num_classes)
        assert not any(p.requires_grad for p in model.parameters())
    # the default fleet mixes architectures and its legacy accuracies genuinely differ
    assert len({f1.group_cfgs[g].arch for g in f1.groups}) == 3
    assert f1.legacy_accuracy.max() - f1.legacy_accuracy.min() > 0.1
    again = fleet_for(cfg, prep, cache_a)
    assert not again.built
    np.testing.assert_array_equal(again.legacy_accuracy, f1.legacy_accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("legacy", ["per_device", "product_line"])
def test_corrupt_cache_entry_is_rebuilt_not_used(tmp_path, legacy):
    cfg = small_cfg(**(PER_DEVICE if legacy == "per_device" else {}))
    prep = prepare_for(cfg, tmp_path)
    fleet = fleet_for(cfg, prep, tmp_path)
    target = fleet.model_file(1)
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


# Tolerance of test_batched_pretraining_is_the_one_by_one_training, a first-order bound on how far
# float rounding can carry two trainings that do the same arithmetic in different summation orders:
STEPS = 40  # Adam steps: 20 epochs of 2 batches (32 + 8 samples)
LR = 1e-2
TERMS = 2 ** 12  # accumulated terms behind any gradient element here: the 2-D CNN's weight gradient sums
#                  32 samples x 8x8 positions = 2^11 products, plus the shorter sums of the <= 3 layers above
U64 = 2.0 ** -53  # float64 unit roundoff: a K-term sum is within K * U64 * sum|terms| of the exact one
KAPPA = 2 ** 17  # condition of the Adam step: sum|terms| / (sqrt(v_hat) + eps) over every coordinate and
#                  step, measured in float64 on these inputs (torch.func per-sample gradients, a property of
#                  the data, not of the CPU): <= 8.1e3 (mlp; logreg 2.4e3, cnn 7.8e3, cnn1d 2.7e3) at the
#                  batch level, x10 for the sums inside each sample (positions, channels), rounded up
ADAM = 8  # Adam's own gain on a gradient difference delta: lr * delta / (sqrt(v_hat) + eps) through m_hat,
#           (1 - beta1) / sqrt(1 - beta2) = 3.2 times that through v_hat: 4.2 in all, rounded up
BATCHED_TOL = ADAM * STEPS * LR * TERMS * U64 * KAPPA  # = 1.9e-7


@pytest.mark.numeric
@pytest.mark.parametrize("arch", ["logreg", "mlp", "cnn", "cnn1d"])
def test_batched_pretraining_is_the_one_by_one_training(arch):
    """Stacked (torch.func) training of M models == M separate train_minibatch runs (same seeds,
    same shuffles, same Adam), up to float rounding; ``cnn1d`` with its hand-written gradients
    (clients/stacked.py), the others through vmap and autograd.

    In float64, with :data:`BATCHED_TOL` (above). In float32 no CPU-independent tolerance exists:
    its rounding (2^-24 per operation) of a gradient whose terms cancel is as large as Adam's
    eps = 1e-8, so a coordinate with a near-zero gradient steps up to lr either way by chance
    (measured for cnn1d: 7.6e-5 with the AVX2 kernels, 1.4e-4 with the portable ones, of weights
    moved 0.263). In float64 that noise is 2^29 times smaller, far below eps, and Adam passes it on
    linearly: measured <= 1e-14 on every kernel family, while one Adam step of a different
    schedule or gradient moves a weight by ~lr = 1e-2."""
    import torch.nn.functional as F

    from clients.stacked import STACKED_GRADS
    from sim.core.zoo import build_model
    from sim.core.training import train_minibatch, train_stacked

    m, n = 4, 40  # n > batch 32: two steps per epoch, the second a short one
    torch.manual_seed(0)
    xs, ys = torch.rand(m, n, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (m, n))
    models, ref = [], []
    for i in range(m):
        for out in (models, ref):
            torch.manual_seed(i)
            out.append(build_model(arch, (1, 8, 8), 10, hidden=8).double())
    for i, r in enumerate(ref):
        train_minibatch(r.parameters(), (xs[i], ys[i]), lambda xb, yb, r=r: F.cross_entropy(r(xb), yb),
                        epochs=STEPS // 2, batch_size=32, lr=LR, seed=7 + i)
    before = [[p.detach().clone() for p in mod.parameters()] for mod in models]
    train_stacked(models, xs, ys, epochs=STEPS // 2, batch_size=32, lr=LR, seeds=[7 + i for i in range(m)],
                  grads=STACKED_GRADS.get(arch))
    assert BATCHED_TOL < 2e-7
    for a, b, b0 in zip(models, ref, before):
        assert all(p.dtype == torch.float64 for p in a.parameters())
        moved = max(float((pb.detach() - p0).abs().max()) for pb, p0 in zip(b.parameters(), b0))
        diff = max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))
        assert moved > 0.1 and diff <= BATCHED_TOL, (arch, diff, moved)


@pytest.mark.slow
@pytest.mark.numeric
@pytest.mark.xdist_group(FRESH_8)
def test_sequential_and_batched_fleets_agree_and_are_cached_apart(fresh_fleet):
    cfg_s = small_cfg(**{"fleet.num_clients": 8, "fleet.pretrain": "sequential", **PER_DEVICE})
    cache, prep, fb = fresh_fleet  # batched (the default), built from nothing
    fs = fleet_for(cfg_s, prep, cache)
    assert fb.path != fs.path and fb.built and fs.built
    assert np.abs(fb.legacy_accuracy - fs.legacy_accuracy).max() <= 1 / 36  # at most one test sample flips


@pytest.mark.numeric
@pytest.mark.parametrize("in_shape", [(1, 1, 40), (2, 4, 8), (1, 1, 11)])
def test_hand_written_conv1d_gradients_are_autograds_in_any_chunking(monkeypatch, in_shape):
    """clients/stacked.py's gradients of M stacked 1-D CNNs == autograd's through vmap, also when M
    spans several chunks (the last one short), for C*H rows as channels, the shortest signal (W=8)
    and an odd length whose last sample no kernel reads."""
    import clients.stacked as stacked
    from sim.core.zoo import build_model
    from torch.func import functional_call, stack_module_state

    monkeypatch.setattr(stacked, "CHUNK", 3)
    m, b = 7, 12
    torch.manual_seed(0)
    models = [build_model("cnn1d", in_shape, 10, hidden=6).double() for _ in range(m)]
    params, buffers = stack_module_state(models)
    x, y = torch.randn(m, b, *in_shape, dtype=torch.float64), torch.randint(0, 10, (m, b))
    logits = torch.vmap(lambda p, bu, xx: functional_call(models[0], (p, bu), (xx,)))(params, buffers, x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(m, b).mean(1).sum().backward()
    got = stacked.conv1d_net_grads({k: v.detach() for k, v in params.items()}, x, y)
    assert set(got) == set(params)
    # In float64: both are sums of the same products in other orders, each within K * U64 * sum|terms|
    # of the exact gradient. K < 2^9 (the first layer's weight gradient sums 12 samples x 19 positions,
    # plus the <= 3 layers above); sum|terms| < 2^3 (measured on these inputs, float64 per-sample
    # gradients: sum over the batch <= 0.43, x10 for the sums inside a sample). So they differ by at most
    # 2 * 2^9 * 2^-53 * 2^3 = 2^-40 (measured: 5.6e-17); a wrong stride, padding or chunk moves a gradient
    # of size ~0.1 by far more. (In float32 the same bound is 2^-11, looser than the gradients' own digits.)
    for name, p in params.items():
        assert got[name].shape == p.shape and got[name].dtype == torch.float64
        assert (got[name] - p.grad).abs().max() <= 2.0 ** -40, name


@pytest.mark.slow
@pytest.mark.xdist_group(FRESH_8)
def test_another_build_thread_count_is_its_own_cache_entry_and_the_runs_count_comes_back(fresh_fleet):
    """fleet.build_threads=2 rounds differently from 1 (measured on the digits fleet), so it is built
    into its own cache entry, never mixed with the 1-thread one; the models agree to float rounding
    (a legacy accuracy moves by at most one test sample) and the run's torch thread count is back."""
    cache, prep, one = fresh_fleet  # fleet.build_threads=1 (the default), built from nothing
    torch.set_num_threads(1)
    cfg = small_cfg(**{"fleet.num_clients": 8, "fleet.build_threads": 2, **PER_DEVICE})
    two = fleet_for(cfg, prep, cache)
    assert torch.get_num_threads() == 1
    assert one.built and two.built and one.path != two.path
    assert np.abs(one.legacy_accuracy - two.legacy_accuracy).max() <= 1 / 36
    base = small_cfg(**{"fleet.num_clients": 8, **PER_DEVICE})
    again = fleet_for(base, prepare_for(base, cache), cache)
    assert not again.built and again.path == one.path


def test_a_build_thread_count_below_one_is_a_one_line_config_error():
    from sim.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^fleet.build_threads=0 is invalid: must be >= 1"):
        small_cfg(**{"fleet.build_threads": 0})
    assert small_cfg().fleet.build_threads == 1


def test_devices_of_a_group_run_its_model_versions_in_turn_whatever_the_fleet_size():
    """model_index: the k-th device of a group runs version k mod versions, so every prefix of a
    fleet (and so every fleet size) has the same mix of product lines and versions."""
    cfg = small_cfg(**{"fleet.num_clients": 12, "fleet.groups.1.versions": 3})
    groups = assign_groups(12, [g.share for g in cfg.fleet.groups])
    idx = model_index(groups, cfg.fleet.groups)
    assert len(set(idx.tolist())) == 4 + 2  # 4 groups, group 1 in 3 versions
    for gi in range(4):
        mine = idx[np.asarray(groups) == gi].tolist()
        if gi == 1:
            assert mine == [1 + k % 3 for k in range(len(mine))]
        else:
            assert len(set(mine)) == 1
    small = model_index(groups[:5], cfg.fleet.groups)
    assert small.tolist() == idx[:5].tolist()


@pytest.mark.slow
def test_a_product_lines_model_is_shared_by_its_devices_and_independent_of_the_fleet_size(shared_cache):
    """fleet.legacy=product_line (the default): every device of a group runs one model trained once
    on the vendor pool; the same model (file and weights) for a 4-device and a 24-device fleet, so
    legacy quality does not depend on how many devices there are. (The suite's shared cache: the
    4-device fleet's product lines are usually there already, built by any default-fleet test.)"""
    fleets = {}
    for n in (4, 24):
        cfg = small_cfg(**{"fleet.num_clients": n})
        prep = prepare_for(cfg, shared_cache)
        fleets[n] = (fleet_for(cfg, prep, shared_cache), prep)
    (small, prep4), (big, prep24) = fleets[4], fleets[24]
    assert small.legacy == big.legacy == "product_line"
    assert small.models == big.models and len(small.models) == 4  # one file per group, reused
    np.testing.assert_array_equal(np.asarray(prep4.vendor_y), np.asarray(prep24.vendor_y))
    for dev in range(24):
        assert big.model_file(dev) == big.models[big.groups[dev]]
    assert not big.built  # every model came from the 4-device fleet's (none trained for 24 devices)
    # the vendor pool is never a device's sample: no row of it is in the devices' data
    x_dev = np.asarray(prep24.x).reshape(len(prep24.x), -1)
    vendor = {v.tobytes() for v in np.asarray(prep24.vendor_x).reshape(len(prep24.vendor_x), -1)}
    assert not vendor & {v.tobytes() for v in x_dev}
    assert big.pretrain_size.tolist() == [small.pretrain_size[0 if g == 0 else small.groups.index(g)]
                                          for g in big.groups]
    # devices of one group share the model file, and its weights load identically
    g0 = [d for d in range(24) if big.groups[d] == 0]
    s0 = torch.load(big.model_file(g0[0]), weights_only=True)
    s1 = torch.load(big.model_file(g0[-1]), weights_only=True)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_product_line_and_per_device_splits_are_checked_against_each_other():
    from sim.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^fleet.legacy=per_device trains each device's model on its own legacy "
                                          r"split, but data.split.legacy=0"):
        small_cfg(**{"fleet.legacy": "per_device"})
    with pytest.raises(ConfigError, match=r"^data.split.legacy=0.4 gives each device a legacy split that "
                                          r"fleet.legacy=product_line never uses"):
        small_cfg(**{"data.split.legacy": 0.4, "data.split.rejector": 0.4, "data.split.test": 0.2})
    assert small_cfg(**PER_DEVICE).fleet.legacy == "per_device"


_TRAIN_PRODUCT_LINES = """
import hashlib, sys
from pathlib import Path
import torch
from clients.legacy import train_product_line
from tests.conftest import prepare_for, small_cfg
torch.set_num_threads(1)
cfg = small_cfg(**{"sim.cache_dir": sys.argv[1]})
prep = prepare_for(cfg, Path(sys.argv[1]))
digest = hashlib.sha256()
for group in cfg.fleet.groups:
    model, _ = train_product_line(prep, group, 0, 1)
    for value in model.state_dict().values():
        digest.update(value.numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""


@pytest.mark.slow
def test_a_product_line_is_the_same_model_under_every_kernel_family(shared_cache):
    """clients/legacy.py PRODUCT_LINE_DTYPE: the digits product lines (every group of the default
    fleet, 60 epochs) come out bit for bit the same under the AVX2 and the portable kernels
    (``ATEN_CPU_CAPABILITY``), so a golden run's legacy decisions do not depend on the CPU. In float32
    (weights drawn and trained) they did not: 2 of 540 golden test decisions flipped (issue 28)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    got = {}
    for family in ("avx2", "default"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": family}
        out = subprocess.run([sys.executable, "-c", _TRAIN_PRODUCT_LINES, str(shared_cache)], env=env,
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                             check=True).stdout.split()
        got[out[0].lower()] = out[1]
    if "avx2" not in got:  # a CPU without AVX2: torch fell back to the portable kernels both times
        pytest.skip(f"this CPU offers one kernel family only ({sorted(got)})")
    assert got["avx2"] == got["default"], got
