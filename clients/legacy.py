"""The heterogeneous legacy fleet: group assignment, one-off pretraining, frozen on-disk cache.

Legacy models are trained once per fleet key (dataset, partition, fleet groups, seed), saved as
one ``state_dict`` file per device (loaded with ``torch.load(weights_only=True)``), and never
updated afterwards: L2H trains only the rejector and the helper server.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from clients.stacked import CACHE_TAG, STACKED_GRADS
from clients.zoo import build_model
from sim.core.cache import build_entry, content_key
from sim.core.config import DataConfig, DeviceGroupConfig, FleetConfig, Pretrain, plain
from sim.core.data import Prepared, data_key, device_data
from sim.core.seeding import derive_seed
from sim.core.training import predict_logits, train_minibatch, train_stacked

FLEET_VERSION = 1


def assign_groups(num_clients: int, shares: list[float]) -> list[int]:
    """Group index of each device: proportional to ``shares`` and interleaved, so every prefix of
    the fleet (and every fleet size) gets the mix. Deterministic.
    """
    total = float(sum(shares))
    counts = [0] * len(shares)
    out = []
    for i in range(num_clients):
        deficit = [s / total * (i + 1) - c for s, c in zip(shares, counts)]
        g = int(np.argmax(deficit))
        counts[g] += 1
        out.append(g)
    return out


@contextmanager
def build_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the count a run's rounds use
    (``sim.torch_threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def legacy_file(device: int) -> str:
    return f"device_{device:05d}.pt"


@dataclass
class Fleet:
    """The built legacy fleet.

    Attributes:
        path: cache entry holding one state_dict per device.
        groups: group index per device; group_cfgs: the fleet's group configs (``fleet.groups``).
        legacy_accuracy: ``(num_clients,)`` accuracy of each legacy model on its own test split.
        pretrain_size: ``(num_clients,)`` samples each legacy model was trained on.
        built: True when this call trained the models (False: reused from cache).
    """

    path: Path
    groups: list[int]
    group_cfgs: list[DeviceGroupConfig]
    legacy_accuracy: np.ndarray
    pretrain_size: np.ndarray
    built: bool


def pretrain_legacy(xs: np.ndarray, ys: np.ndarray, group: DeviceGroupConfig, in_shape, num_classes: int,
                    seeds: list[int], batched: bool = True) -> list[torch.nn.Module]:
    """Train the legacy models of devices of one group with equally many pretraining samples.

    Model i is initialised from ``seeds[i]`` and trained with cross-entropy and Adam (batch 32,
    ``group.epochs``, ``group.lr``) on ``xs[i]: (n, C, H, W)``, ``ys[i]: (n,)``; all M models train
    together (:func:`sim.core.training.train_stacked`; 1-D CNNs with the hand-written gradients of
    :mod:`clients.stacked`), or one after the other with
    :func:`sim.core.training.train_minibatch` when ``batched`` is False (``fleet.pretrain=sequential``:
    the same training up to float rounding). Returns the M models, frozen.
    """
    models = []
    for s in seeds:
        torch.default_generator.manual_seed(derive_seed(s, "legacy-init"))  # torch.manual_seed, less CUDA bookkeeping
        models.append(build_model(group.arch, in_shape, num_classes, hidden=int(group.hidden)))
    xt, yt = torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys))
    hp = {"epochs": int(group.epochs), "batch_size": 32, "lr": float(group.lr)}
    if batched:
        train_stacked(models, xt, yt, seeds=[derive_seed(s, "legacy") for s in seeds], grads=STACKED_GRADS.get(group.arch),
                      **hp)
    else:
        for model, x, y, s in zip(models, xt, yt, seeds):
            model.train()
            train_minibatch(model.parameters(), (x, y), lambda xb, yb, m=model: F.cross_entropy(m(xb), yb),
                            seed=derive_seed(s, "legacy"), **hp)
    for model in models:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return models


def build_fleet(fleet_cfg: FleetConfig, data_cfg: DataConfig, prep: Prepared, seed: int, cache_dir: Path) -> Fleet:
    """Build (or reuse from cache) the frozen legacy model of every device.

    Args:
        fleet_cfg: the ``fleet`` config. data_cfg: the ``data`` config (part of the cache key).
        prep: the prepared dataset. seed: the run seed. cache_dir: cache root.

    Returns:
        The :class:`Fleet`. A corrupt cache entry is rebuilt with a warning.
    """
    n = int(fleet_cfg.num_clients)
    group_cfgs = list(fleet_cfg.groups)
    groups = assign_groups(n, [g.share for g in group_cfgs])
    batched = fleet_cfg.pretrain == Pretrain.batched
    key: dict[str, Any] = {"v": FLEET_VERSION, "data": data_key(data_cfg, n, seed),
                           "groups": [plain(g) for g in group_cfgs]}
    if batched:  # a different float rounding, so a different entry (sequential keeps the earlier key)
        key["pretrain"] = "batched"
        if any(g.arch in STACKED_GRADS for g in group_cfgs):  # hand-written gradients: their own rounding
            key["grads"] = CACHE_TAG
    if fleet_cfg.build_threads != 1:  # so does another thread count (1 keeps the earlier key)
        key["build_threads"] = int(fleet_cfg.build_threads)
    entry = cache_dir / "fleets" / f"{data_cfg.name}-{n}-{content_key(key)}"
    built = {"flag": False}

    def build(tmp: Path) -> dict[str, Any]:
        built["flag"] = True
        # Devices of one group with equally many pretraining samples train together (one batch).
        data, buckets = {}, {}
        for dev in range(n):
            g = group_cfgs[groups[dev]]
            d = device_data(prep, dev, g, seed)
            n_pre = max(1, int(round(g.pretrain_fraction * len(d.y_legacy))))
            order = np.random.default_rng(derive_seed(seed, "pretrain-subset", dev)).permutation(len(d.y_legacy))
            sel = np.sort(order[:n_pre])
            data[dev] = (d.x_legacy[sel], d.y_legacy[sel], d.x_test, d.y_test)
            buckets.setdefault((groups[dev], n_pre), []).append(dev)
        accs, sizes = [0.0] * n, [0] * n
        for (gi, n_pre), devs in sorted(buckets.items()):
            models = pretrain_legacy(np.stack([data[v][0] for v in devs]), np.stack([data[v][1] for v in devs]),
                                     group_cfgs[gi], prep.in_shape, prep.num_classes,
                                     [derive_seed(seed, v) for v in devs], batched)
            for dev, model in zip(devs, models):
                torch.save(model.state_dict(), tmp / legacy_file(dev))
                pred = predict_logits(model, torch.from_numpy(data[dev][2])).argmax(1).numpy()
                accs[dev], sizes[dev] = float((pred == data[dev][3]).mean()), int(n_pre)
        return {"key": key, "legacy_accuracy": accs, "pretrain_size": sizes}

    with build_threads(fleet_cfg.build_threads):
        manifest = build_entry(entry, build, "legacy fleet")
    meta = manifest["meta"]
    return Fleet(entry, groups, group_cfgs, np.asarray(meta["legacy_accuracy"]), np.asarray(meta["pretrain_size"]),
                 built["flag"])


def load_legacy(path: Path, device: int, group: DeviceGroupConfig, in_shape, num_classes: int) -> torch.nn.Module:
    """Load a device's frozen legacy model from the fleet cache (weights only, no unpickling)."""
    model = build_model(group.arch, tuple(in_shape), num_classes, hidden=int(group.hidden))
    model.load_state_dict(torch.load(Path(path) / legacy_file(device), weights_only=True))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
