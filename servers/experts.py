"""Fixed experts for Learning to Defer: helper servers pretrained once, before the simulation.

In L2D (docs/methods.md §3) the expert is fixed and the device learns around it. Here each
helper server is pretrained on the *held-out pool*: the data the fleet's legacy models were
trained on -- the vendor pool through each product line's sensor, or (per-device models) the
legacy splits of every device through its sensor; never a rejector or test split, so the expert's
errors on the devices' rejector splits are honest held-out errors. With several
servers, server s trains on its own seeded bootstrap resample of the pool, so the experts differ.

Trained experts are cached on disk (keyed by everything that determines them; integrity-checked,
rebuilt with a warning when corrupt; arrays read with ``allow_pickle=False``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clients.legacy import Fleet
from servers.models import ServerNet
from sim.core.cache import build_entry, content_key
from sim.core.config import DataConfig, ServersConfig, plain
from sim.core.data import Prepared, data_key, degrade, device_data
from sim.core.seeding import derive_seed, seeded
from sim.core.training import train_minibatch

EXPERTS_VERSION = 1


def expert_file(index: int) -> str:
    return f"expert_{index:02d}.npz"


def held_out_pool(prep: Prepared, fleet: Fleet, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The data the fleet's legacy models were trained on, ``x (M, C, H, W)``, ``y (M,)``: with
    product lines, the vendor pool through each group's sensor (one copy per group); with per-device
    models, the legacy splits of every device through its sensor."""
    if fleet.legacy == "product_line":
        vx, vy = np.asarray(prep.vendor_x), np.asarray(prep.vendor_y)
        xs = [degrade(vx, g.downsample, g.noise_std, derive_seed(seed, "expert-sensor", gi), clip=prep.bounded)
              for gi, g in enumerate(fleet.group_cfgs)]
        return np.concatenate(xs), np.concatenate([vy] * len(xs))
    xs, ys = [], []
    for dev, g in enumerate(fleet.groups):
        d = device_data(prep, dev, fleet.group_cfgs[g], seed)
        xs.append(d.x_legacy)
        ys.append(d.y_legacy)
    return np.concatenate(xs), np.concatenate(ys)


def pretrain_experts(sv: ServersConfig, epochs: int, lr: float, data_cfg: DataConfig, prep: Prepared, fleet: Fleet,
                     seed: int, cache_dir: Path) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Train (or load from the cache) one fixed expert per helper server.

    Args:
        sv: the ``servers`` config (arch, hidden, count, batch_size). epochs, lr: the experts'
            pretraining (``strategy.l2d.expert_epochs`` / ``expert_lr``). data_cfg: the ``data``
            config (part of the cache key). prep, fleet: the data and fleet. seed: run seed.
        cache_dir: cache root.

    Returns:
        ``(states, meta)``: per server a :meth:`HelperServer.state`-style dict (``net.<param>``
        arrays), and ``meta`` (``pool_size``, each expert's ``train_accuracy``).
    """
    count = int(sv.count)
    key = {"v": EXPERTS_VERSION, "data": data_key(data_cfg, len(fleet.groups), seed), "legacy": fleet.legacy,
           "groups": [plain(g) for g in fleet.group_cfgs], "n": len(fleet.groups), "arch": str(sv.arch),
           "hidden": int(sv.hidden), "count": count, "batch_size": int(sv.batch_size), "epochs": int(epochs),
           "lr": float(lr)}
    if sv.widths is not None or sv.known_classes is not None:  # tiered or specialist experts (else the earlier key)
        key["servers"] = {"widths": [sv.width(s) for s in range(count)], "known": [sv.known(s) for s in range(count)]}
    entry = Path(cache_dir) / "experts" / f"{data_cfg.name}-{content_key(key)}"

    def build(tmp: Path) -> dict[str, Any]:
        x, y = held_out_pool(prep, fleet, seed)
        accs = []
        for s in range(count):
            rng = np.random.default_rng(derive_seed(seed, "expert-bootstrap", s))
            idx = rng.integers(0, len(y), len(y)) if count > 1 else np.arange(len(y))
            if sv.known(s) is not None:  # a specialist expert is trained on its own classes only
                idx = idx[np.isin(y[idx], sv.known(s))]
            xt, yt = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            with seeded(derive_seed(seed, "expert-init", s)):
                net = ServerNet(sv.arch, prep.in_shape, prep.num_classes, sv.width(s), sv.known(s))
            net.train()
            train_minibatch(net.parameters(), (xt, yt), lambda xb, yb: F.cross_entropy(net(xb), yb),
                            epochs=int(epochs), batch_size=int(sv.batch_size), lr=float(lr),
                            seed=derive_seed(seed, "expert-fit", s))
            net.eval()
            with torch.no_grad():
                accs.append(float((net(xt).argmax(1) == yt).float().mean()))
            np.savez(tmp / expert_file(s), **{f"net.{k}": v.numpy() for k, v in net.state_dict().items()})
        return {"key": key, "pool_size": int(len(y)), "train_accuracy": accs}

    manifest = build_entry(entry, build, "L2D experts")
    states = []
    for s in range(count):
        with open(entry / expert_file(s), "rb") as f, np.load(f, allow_pickle=False) as z:
            states.append({k: np.array(z[k]) for k in z.files})
    meta = manifest["meta"]
    return states, {"pool_size": meta["pool_size"], "train_accuracy": meta["train_accuracy"]}
