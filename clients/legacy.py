"""The heterogeneous legacy fleet: group assignment, one-off pretraining, frozen on-disk cache.

``fleet.legacy=product_line`` (the default): a fleet group is a product line. Its legacy model (or
a few versions of it) is trained once by its vendor on the vendor pool
(:func:`sim.core.data.vendor_pool`) and shipped to every device of the group; devices differ by
what they see (their data, their sensor), never by a private training run, so the fleet's size
does not change legacy quality. ``per_device``: each device trains its own model on its own
legacy split (the earlier setting; tiny per-device training sets make large fleets sit near chance).

Models are saved as ``state_dict`` files (loaded with ``torch.load(weights_only=True)``), never
updated afterwards: L2H trains only the rejector and the helper server.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from clients.calibration import fit_temperature
from clients.stacked import CACHE_TAG, STACKED_GRADS
from sim.core.zoo import build_model
from sim.core.cache import build_entry, content_key
from sim.core.config import DataConfig, DeviceGroupConfig, FleetConfig, LegacySource, Pretrain, plain
from sim.core.data import Prepared, data_key, degrade, device_data, group_ranks
from sim.core.errors import DataError
from sim.core.seeding import derive_seed
from sim.core.training import predict_logits, train_minibatch, train_stacked

Progress = Callable[[int, int], None]
"""A fleet build's progress callback: ``(models ready, models in all)``."""

FLEET_VERSION = 3  # 2: product lines; per-device entries also keep each group's temperature; 3: float64 product lines
PRODUCT_LINE_DTYPE = torch.float64
"""The precision a product line's model trains in (then stored as float32). In float32 its ~850 Adam
steps (digits: 450 samples, 60 epochs) turned the rounding differences between CPU kernel families
into different models: on the golden runs, 2 of 540 test decisions flipped under
``ATEN_CPU_CAPABILITY=default`` against AVX2 (issue 28). In float64 a gradient's rounding (~1e-16
relative) stays far below Adam's eps (1e-8), so the trained weights agree across kernel families to
far below float32's resolution. The initial weights are drawn in float64 too: torch's float32
``uniform_`` differs by an ulp between the AVX2 and the portable kernels (measured), and 850 steps
grow that to 2e-6 relative, enough to flip decisions; float64 draws differ by 1e-17. Measured on the
digits product lines, AVX2 against ``default``: see ``tests/test_fleet.py``
(``test_a_product_line_is_the_same_model_under_every_kernel_family``). A product line trains once
per fleet (a handful of models), so the slower arithmetic is cheap; per-device fleets (thousands of
models, batched) keep float32."""


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
def torch_setting(get: Callable[[], Any], put: Callable[[Any], None], value: Any) -> Iterator[None]:
    """Run the block with a process-wide torch setting at ``value`` (``put(value)``), then put back
    what ``get()`` said before."""
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


def build_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the count a run's rounds use
    (``sim.torch_threads``)."""
    return torch_setting(torch.get_num_threads, torch.set_num_threads, threads)


def legacy_file(device: int) -> str:
    """The state_dict file of a device's own model in a ``per_device`` fleet entry."""
    return f"device_{device:05d}.pt"


MODEL_FILE = "model.pt"
"""The state_dict file of a product line's model version, one per cache entry under ``legacy/``."""


def product_line_models(group_cfgs: list[DeviceGroupConfig]) -> list[tuple[int, int]]:
    """The product lines' model versions, ``(group, version)`` in order (the model index of
    :func:`model_index` is a position in this list)."""
    return [(gi, v) for gi, g in enumerate(group_cfgs) for v in range(g.versions)]


def model_index(groups: list[int], group_cfgs: list[DeviceGroupConfig]) -> np.ndarray:
    """``(N,)`` the model each device runs in a ``product_line`` fleet: the k-th device of a group
    (in device order) runs version ``k mod versions`` of its group's model, so every prefix of the
    fleet, and every fleet size, gets the same mix."""
    first = {}
    for i, (gi, v) in enumerate(product_line_models(group_cfgs)):
        first.setdefault(gi, i)
    seen = [0] * len(group_cfgs)
    out = np.empty(len(groups), dtype=np.int64)
    for d, gi in enumerate(groups):
        out[d] = first[gi] + seen[gi] % int(group_cfgs[gi].versions)
        seen[gi] += 1
    return out


@dataclass
class Fleet:
    """The built legacy fleet.

    Attributes:
        path: the fleet's cache entry (``per_device``: it holds one state_dict per device).
        groups: group index per device; group_cfgs: the fleet's group configs (``fleet.groups``).
        legacy_accuracy: ``(num_clients,)`` accuracy of each device's legacy model on its own test split.
        pretrain_size: ``(num_clients,)`` samples each device's legacy model was trained on.
        temperature: ``(num_groups,)`` each group's temperature-scaling T (:mod:`clients.calibration`),
            fitted on the rejector splits of its devices (the calibrated confidence baseline).
        built: True when this call trained any model (False: every model reused from cache).
        legacy: ``product_line`` or ``per_device`` (``fleet.legacy``).
        models: the state_dict file of each model (``product_line``: one per group version, in the
            order of :func:`product_line_models`; ``per_device``: one per device).
        model_of: ``(num_clients,)`` index into ``models`` of each device's model.
    """

    path: Path
    groups: list[int]
    group_cfgs: list[DeviceGroupConfig]
    legacy_accuracy: np.ndarray
    pretrain_size: np.ndarray
    built: bool
    temperature: np.ndarray = field(default_factory=lambda: np.ones(0))
    legacy: str = "per_device"
    models: list[Path] = field(default_factory=list)
    model_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def model_file(self, device: int) -> Path:
        """The state_dict file of ``device``'s legacy model."""
        return self.models[int(self.model_of[device])]


def pretrain_legacy(xs: np.ndarray, ys: np.ndarray, group: DeviceGroupConfig, in_shape, num_classes: int,
                    seeds: list[int], batched: bool = True, dtype: torch.dtype = torch.float32
                    ) -> list[torch.nn.Module]:
    """Train M legacy models of one group on equally many samples each.

    Model i is initialised from ``seeds[i]`` and trained with cross-entropy and Adam (batch 32,
    ``group.epochs``, ``group.lr``) on ``xs[i]: (n, C, H, W)``, ``ys[i]: (n,)``; all M models train
    together (:func:`sim.core.training.train_stacked`; 1-D CNNs with the hand-written gradients of
    :mod:`clients.stacked`), or one after the other with
    :func:`sim.core.training.train_minibatch` when ``batched`` is False (``fleet.pretrain=sequential``:
    the same training up to float rounding). ``dtype``: the precision in which the initial weights
    are drawn and the models trained; the models returned are float32. Returns the M models, frozen.
    """
    models = []
    for s in seeds:
        torch.default_generator.manual_seed(derive_seed(s, "legacy-init"))  # torch.manual_seed, less CUDA bookkeeping
        with default_dtype(dtype):  # drawn in dtype: float32 draws differ by an ulp between kernel families
            models.append(build_model(group.arch, in_shape, num_classes, hidden=group.hidden))
    xt = torch.from_numpy(np.ascontiguousarray(xs)).to(dtype)
    yt = torch.from_numpy(np.ascontiguousarray(ys))
    hp = {"epochs": group.epochs, "batch_size": 32, "lr": group.lr}
    if batched:
        train_stacked(models, xt, yt, seeds=[derive_seed(s, "legacy") for s in seeds], grads=STACKED_GRADS.get(group.arch),
                      **hp)
    else:
        for model, x, y, s in zip(models, xt, yt, seeds):
            model.train()
            train_minibatch(model.parameters(), (x, y), lambda xb, yb, m=model: F.cross_entropy(m(xb), yb),
                            seed=derive_seed(s, "legacy"), **hp)
    return [freeze(m.float()) for m in models]


def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block (parameters created there are ``dtype``), restored after."""
    return torch_setting(torch.get_default_dtype, torch.set_default_dtype, dtype)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a legacy model never changes)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_fleet(fleet_cfg: FleetConfig, data_cfg: DataConfig, prep: Prepared, seed: int, cache_dir: Path,
                progress: Progress | None = None) -> Fleet:
    """Build (or reuse from cache) the frozen legacy model of every device (``fleet.legacy``:
    :func:`build_product_line` or :func:`build_per_device`).

    Args:
        fleet_cfg: the ``fleet`` config. data_cfg: the ``data`` config (part of the cache key).
        prep: the prepared dataset. seed: the run seed. cache_dir: cache root. progress: called
            with ``(models ready, models in all)`` as models are built or found in the cache (a
            status line, :mod:`sim.progress`); per-device models count as they are trained.

    Returns:
        The :class:`Fleet`. A corrupt cache entry is rebuilt with a warning.
    """
    if fleet_cfg.legacy == LegacySource.product_line:
        return build_product_line(fleet_cfg, data_cfg, prep, seed, cache_dir, progress)
    return build_per_device(fleet_cfg, data_cfg, prep, seed, cache_dir, progress)


# ---- product lines: one model per group version, trained on the vendor pool -----------------------
MODEL_FIELDS = ("arch", "hidden", "pretrain_fraction", "downsample", "noise_std", "epochs", "lr")
"""What of a group's config determines its product line's model (its name, share and version count do not)."""


def product_line_key(prep: Prepared, group: DeviceGroupConfig, version: int) -> dict[str, Any]:
    """Everything that determines one model version of a product line: the vendor pool
    (:func:`sim.core.data.vendor_key`, never the fleet size or the devices' data), the group's
    :data:`MODEL_FIELDS` and the version."""
    return {"v": FLEET_VERSION, "vendor": prep.vendor, "group": {k: plain(getattr(group, k)) for k in MODEL_FIELDS},
            "version": int(version), "in_shape": list(prep.in_shape), "num_classes": int(prep.num_classes)}


def train_product_line(prep: Prepared, group: DeviceGroupConfig, version: int, seed: int) -> tuple[torch.nn.Module, int]:
    """One model version of a product line, as its vendor trains it.

    The vendor pool (``prep.vendor_x``, ``vendor_y``) is seen through the group's nominal sensor
    (its ``downsample`` and ``noise_std``, noise seeded for this version), a seeded subset of
    ``round(pretrain_fraction * V)`` samples is drawn, and the model is initialised and trained
    (:func:`pretrain_legacy`) with seeds derived from the run seed, the group's model fields and
    the version. Returns the frozen model and its training-set size.

    Raises:
        DataError: the prepared dataset has no vendor pool (a ``per_device`` preparation).
    """
    vx, vy = np.asarray(prep.vendor_x), np.asarray(prep.vendor_y)
    if not len(vy):
        raise DataError("the prepared dataset has no vendor pool for fleet.legacy=product_line: prepare it with "
                        "vendor=True")
    tag = content_key({k: plain(getattr(group, k)) for k in MODEL_FIELDS})
    x = degrade(vx, group.downsample, group.noise_std, derive_seed(seed, "vendor-sensor", tag, version),
                clip=prep.bounded)
    n_pre = max(1, int(round(group.pretrain_fraction * len(vy))))
    pick = np.sort(np.random.default_rng(derive_seed(seed, "vendor-subset", tag, version)).permutation(len(vy))[:n_pre])
    model, = pretrain_legacy(x[pick][None], vy[pick][None].astype(np.int64), group, prep.in_shape, prep.num_classes,
                             [derive_seed(seed, "product-line", tag, version)], batched=False, dtype=PRODUCT_LINE_DTYPE)
    return model, n_pre


def build_product_line(fleet_cfg: FleetConfig, data_cfg: DataConfig, prep: Prepared, seed: int, cache_dir: Path,
                       progress: Progress | None = None) -> Fleet:
    """A ``product_line`` fleet: each group version's model trained once (:func:`train_product_line`)
    and cached on its own (``legacy/``, keyed by :func:`product_line_key`: reused by every fleet size
    and partition), then the fleet's view of them (``fleets/``: each device's model, legacy accuracy
    on its own test split, each group's temperature; :func:`fleet_view`)."""
    n = int(fleet_cfg.num_clients)
    group_cfgs = list(fleet_cfg.groups)
    groups = assign_groups(n, [g.share for g in group_cfgs])
    built = {"flag": False}
    files, sizes = [], []
    models = product_line_models(group_cfgs)
    with build_threads(fleet_cfg.build_threads):
        for gi, v in models:
            key = product_line_key(prep, group_cfgs[gi], v)
            if fleet_cfg.build_threads != 1:  # another thread count rounds differently: its own entry
                key["build_threads"] = int(fleet_cfg.build_threads)
            entry = cache_dir / "legacy" / f"{data_cfg.name}-{group_cfgs[gi].arch}-{content_key(key)}"

            def build(tmp: Path, gi: int = gi, v: int = v, key: dict = key) -> dict[str, Any]:
                built["flag"] = True
                model, n_pre = train_product_line(prep, group_cfgs[gi], v, seed)
                torch.save(model.state_dict(), tmp / MODEL_FILE)
                return {"key": key, "pretrain_size": n_pre}

            manifest = build_entry(entry, build, "legacy model")
            files.append(entry / MODEL_FILE)
            sizes.append(int(manifest["meta"]["pretrain_size"]))
            if progress is not None:
                progress(len(files), len(models))
    model_of = model_index(groups, group_cfgs)
    view_key = {"v": FLEET_VERSION, "data": data_key(data_cfg, n, seed), "models": [f.parent.name for f in files],
                "groups": groups, "group_cfgs": [plain(g) for g in group_cfgs]}
    entry = cache_dir / "fleets" / f"{data_cfg.name}-{n}-{content_key(view_key)}"
    manifest = build_entry(entry, lambda tmp: {"key": view_key, **fleet_view(prep, groups, group_cfgs, files, model_of,
                                                                             seed)}, "legacy fleet")
    meta = manifest["meta"]
    return Fleet(entry, groups, group_cfgs, np.asarray(meta["legacy_accuracy"]),
                 np.asarray([sizes[i] for i in model_of]), built["flag"], np.asarray(meta["temperature"]),
                 "product_line", files, model_of)


def fleet_view(prep: Prepared, groups: list[int], group_cfgs: list[DeviceGroupConfig], files: list[Path],
               model_of: np.ndarray, seed: int) -> dict[str, Any]:
    """Each device's legacy accuracy on its own test split and each group's temperature (fitted on
    the pooled rejector splits of its devices, each through its own model): one forward pass per
    model over all its devices' samples. Returns ``{"legacy_accuracy": [...], "temperature": [...]}``."""
    accs = [0.0] * len(groups)
    ranks = group_ranks(groups)
    cal: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for mi, path in enumerate(files):
        devs = np.flatnonzero(model_of == mi)
        if not len(devs):
            continue
        gi = groups[int(devs[0])]
        model = load_legacy(path, group_cfgs[gi], prep.in_shape, prep.num_classes)
        data = [device_data(prep, int(d), group_cfgs[gi], seed, int(ranks[d])) for d in devs]
        test = predict_logits(model, torch.from_numpy(np.concatenate([dd.x_test for dd in data]))).argmax(1).numpy()
        rej = predict_logits(model, torch.from_numpy(np.concatenate([dd.x_rejector for dd in data]))).numpy()
        at = np.cumsum([0] + [len(dd.y_test) for dd in data])
        for j, (d, dd) in enumerate(zip(devs, data)):
            accs[int(d)] = float((test[at[j]:at[j + 1]] == dd.y_test).mean()) if len(dd.y_test) else float("nan")
        cal.setdefault(gi, []).append((rej, np.concatenate([dd.y_rejector for dd in data])))
    return {"legacy_accuracy": accs, "temperature": group_temperatures(cal, len(group_cfgs))}


def group_temperatures(cal: dict[int, list[tuple[np.ndarray, np.ndarray]]], num_groups: int) -> list[float]:
    """Per group, the temperature fitted on its pooled (logits, labels) pairs (1.0 for a group with no device)."""
    out = []
    for gi in range(num_groups):
        parts = cal.get(gi, [])
        logits = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 1))
        labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        out.append(fit_temperature(logits, labels))
    return out


# ---- per-device models: each device trains its own on its legacy split ---------------------------
def build_per_device(fleet_cfg: FleetConfig, data_cfg: DataConfig, prep: Prepared, seed: int, cache_dir: Path,
                     progress: Progress | None = None) -> Fleet:
    """A ``per_device`` fleet: each device's own model, trained on ``pretrain_fraction`` of its own
    legacy split; devices of a group with equally many samples train together
    (:func:`pretrain_legacy`). Cached as one entry (one state_dict per device)."""
    n = int(fleet_cfg.num_clients)
    group_cfgs = list(fleet_cfg.groups)
    groups = assign_groups(n, [g.share for g in group_cfgs])
    batched = fleet_cfg.pretrain == Pretrain.batched
    key: dict[str, Any] = {"v": FLEET_VERSION, "data": data_key(data_cfg, n, seed, vendor=False),
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
        ranks = group_ranks(groups)
        for dev in range(n):
            g = group_cfgs[groups[dev]]
            d = device_data(prep, dev, g, seed, int(ranks[dev]))
            n_pre = max(1, int(round(g.pretrain_fraction * len(d.y_legacy))))
            order = np.random.default_rng(derive_seed(seed, "pretrain-subset", dev)).permutation(len(d.y_legacy))
            sel = np.sort(order[:n_pre])
            data[dev] = (d.x_legacy[sel], d.y_legacy[sel], d)
            buckets.setdefault((groups[dev], n_pre), []).append(dev)
        accs, sizes = [0.0] * n, [0] * n
        cal: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        done = 0
        if progress is not None:
            progress(0, n)
        for (gi, n_pre), devs in sorted(buckets.items()):
            models = pretrain_legacy(np.stack([data[v][0] for v in devs]), np.stack([data[v][1] for v in devs]),
                                     group_cfgs[gi], prep.in_shape, prep.num_classes,
                                     [derive_seed(seed, v) for v in devs], batched)
            for dev, model in zip(devs, models):
                d = data[dev][2]
                torch.save(model.state_dict(), tmp / legacy_file(dev))
                pred = predict_logits(model, torch.from_numpy(d.x_test)).argmax(1).numpy()
                accs[dev], sizes[dev] = float((pred == d.y_test).mean()), int(n_pre)
                cal.setdefault(gi, []).append((predict_logits(model, torch.from_numpy(d.x_rejector)).numpy(),
                                               d.y_rejector))
            done += len(devs)
            if progress is not None:
                progress(done, n)
        return {"key": key, "legacy_accuracy": accs, "pretrain_size": sizes,
                "temperature": group_temperatures(cal, len(group_cfgs))}

    with build_threads(fleet_cfg.build_threads):
        manifest = build_entry(entry, build, "legacy fleet")
    meta = manifest["meta"]
    return Fleet(entry, groups, group_cfgs, np.asarray(meta["legacy_accuracy"]), np.asarray(meta["pretrain_size"]),
                 built["flag"], np.asarray(meta["temperature"]), "per_device",
                 [entry / legacy_file(d) for d in range(n)], np.arange(n))


def load_legacy(path: Path, group: DeviceGroupConfig, in_shape, num_classes: int) -> torch.nn.Module:
    """Load a frozen legacy model from its state_dict file ``path`` (weights only, no unpickling)."""
    model = build_model(group.arch, tuple(in_shape), num_classes, hidden=group.hidden)
    model.load_state_dict(torch.load(Path(path), weights_only=True))
    return freeze(model)
