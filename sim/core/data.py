"""Partitioning across devices, per-device splits and sensor degradation.

Flow: :func:`sim.core.sources.load_source` reads a dataset into arrays; :func:`vendor_pool`
reserves the vendor's pretraining pool (``fleet.legacy=product_line``: the same samples for every
fleet size); :func:`partition` assigns the rest to devices with flwr-datasets partitioners;
:func:`prepare` splits each device's samples into legacy (``per_device`` fleets only) / rejector /
test and caches the result as ``.npy`` files that Ray workers memory-map (one copy in the page
cache, none per worker); :func:`device_data` returns one device's splits, degraded by its sensor
(resolution, noise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.cache import build_entry, content_key
from sim.core.config import DataConfig, DataSource, DeviceGroupConfig, DriftConfig, PartitionConfig, PartitionName, plain
from sim.core.errors import DataError
from sim.core.seeding import derive_seed
from sim.core.sources import BOUNDED, MNIST1D_VENDOR_SEED, check_arrays, load_source, make_mnist1d, signals

SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST = 0, 1, 2
PREP_VERSION = 2  # 2: the vendor pool (product-line legacy models), legacy splits optional
MNIST1D_VENDOR_SAMPLES = 4000
"""The vendor pool of ``data=mnist1d`` when ``data.vendor_samples`` is null: the paper's training-set size."""


def select(x: np.ndarray, y: np.ndarray, dcfg: DataConfig, seed: int, cap: bool = True
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """Apply ``data.classes`` and (``cap``) ``data.max_samples``; map labels to ``0..K-1``.

    Returns:
        ``x, y`` (subset) and ``K``. Raises DataError for fewer than 2 classes.
    """
    if dcfg.classes:
        keep = np.asarray(list(dcfg.classes), dtype=np.int64)
        missing = sorted(set(keep.tolist()) - set(np.unique(y).tolist()))
        if missing:
            raise DataError(f"data.classes names labels {missing} that do not occur in the dataset")
        mask = np.isin(y, keep)
        x, y = x[mask], np.searchsorted(np.sort(keep), y[mask])
    else:
        values = np.unique(y)
        y = np.searchsorted(values, y)
    if cap and dcfg.max_samples and len(y) > dcfg.max_samples:
        rng = np.random.default_rng(derive_seed(seed, "max_samples"))
        idx = np.sort(rng.permutation(len(y))[: dcfg.max_samples])
        x, y = x[idx], y[idx]
    k = int(y.max()) + 1 if y.size else 0
    if len(np.unique(y)) < 2:
        raise DataError(f"the dataset has {len(np.unique(y))} class(es) after selection: deferral needs at least 2")
    return x, y, k


def partition(y: np.ndarray, pcfg: PartitionConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Assign sample indices to devices with a flwr-datasets partitioner.

    Args:
        y: ``(N,)`` labels in ``0..K-1``.
        pcfg: ``data.partition`` (``iid`` | ``dirichlet`` alpha | ``pathological`` classes_per_device).
        num_clients: number of devices.
        seed: partitioner seed.

    Returns:
        One sorted index array per device (disjoint).

    Raises:
        DataError: fewer samples than devices, or a partitioner that cannot satisfy its constraints.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if len(y) < num_clients:
        raise DataError(f"the dataset has {len(y)} samples for {num_clients} devices: lower fleet.num_clients "
                        "or use data.partition.name=sampled (devices draw from shared pools)")
    name = pcfg.name
    if name == PartitionName.iid:
        part = IidPartitioner(num_partitions=num_clients)
        # IidPartitioner does not shuffle; shuffle the order deterministically first.
        order = np.random.default_rng(derive_seed(seed, "iid")).permutation(len(y))
    elif name == PartitionName.dirichlet:
        part = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=float(pcfg.alpha),
                                    min_partition_size=int(pcfg.min_partition_size), seed=seed)
        order = np.arange(len(y))
    elif name == PartitionName.pathological:
        part = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                       num_classes_per_partition=int(pcfg.classes_per_device),
                                       class_assignment_mode="random", seed=seed)
        order = np.arange(len(y))
    else:
        raise DataError(f"data.partition.name={name!r} is invalid: choose iid, dirichlet, pathological or sampled")
    part.dataset = Dataset.from_dict({"label": y[order].tolist(), "_idx": order.tolist()})
    try:
        parts = [np.sort(np.asarray(part.load_partition(i)["_idx"], dtype=np.int64)) for i in range(num_clients)]
    except (ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise DataError(f"partitioner {name!r} failed for {num_clients} devices ({msg}): "
                        "lower fleet.num_clients or relax data.partition") from None
    return parts


def sampled_rows(n: int, pcfg: PartitionConfig, num_clients: int, fractions: tuple[float, float, float],
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``sampled`` partition: every device draws its own samples from a shared pool, so a fleet
    can have more devices than the dataset has samples / 3 (1000 devices on digits' 1797 images).

    The dataset's unique samples are first split once, globally, into legacy / rejector / test
    pools by ``fractions``; each device then draws ``round(f * samples_per_device)`` samples
    (at least one per split whose fraction is not 0) from each pool, without replacement within the device, independently
    of the other devices. Devices therefore share images, but a test image is never in any
    device's legacy or rejector split (nor, through deferrals, in a helper server's buffer).

    Args:
        n: dataset size. pcfg: ``data.partition`` (``samples_per_device``). num_clients: devices.
        fractions: ``(legacy, rejector, test)``. seed: run seed.

    Returns:
        ``(rows (M,), owner (M,), split (M,))``: the dataset index, device and SPLIT_* code of each
        of the ``M = num_clients * samples_per_device`` (approximately) materialised rows.

    Raises:
        DataError: a global pool smaller than what one device draws from it.
    """
    per = int(pcfg.samples_per_device)
    rng = np.random.default_rng(derive_seed(seed, "sampled-pools"))
    order = rng.permutation(n)
    n_leg, n_test = int(round(fractions[0] * n)), int(round(fractions[2] * n))
    pools = {SPLIT_LEGACY: order[:n_leg], SPLIT_TEST: order[n_leg:n_leg + n_test],
             SPLIT_REJECTOR: order[n_leg + n_test:]}
    take = {code: (max(1, int(round(f * per))) if f > 0 else 0) for code, f in
            ((SPLIT_LEGACY, fractions[0]), (SPLIT_REJECTOR, fractions[1]), (SPLIT_TEST, fractions[2]))}
    for code, k in take.items():
        if k > len(pools[code]):
            raise DataError(f"data.partition.samples_per_device={per} draws {k} samples per device from a global "
                            f"split of {len(pools[code])}: lower samples_per_device")
    rows, owner, split = [], [], []
    for dev in range(num_clients):
        drng = np.random.default_rng(derive_seed(seed, "sampled", dev))
        for code in (SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST):
            pick = np.sort(drng.choice(pools[code], size=take[code], replace=False))
            rows.append(pick)
            owner.append(np.full(len(pick), dev, dtype=np.int32))
            split.append(np.full(len(pick), code, dtype=np.int8))
    return np.concatenate(rows), np.concatenate(owner), np.concatenate(split)


def split_device(indices: np.ndarray, fractions: tuple[float, float, float], seed: int, device: int) -> np.ndarray:
    """Split labels for one device's ``indices``: an int8 array of SPLIT_* codes, seeded per device
    (no legacy split when ``fractions[0]`` is 0, the product-line default).

    Raises:
        DataError: the device has too few samples for three non-empty splits.
    """
    n = len(indices)
    need_n = 3 if fractions[0] > 0 else 2
    if n < need_n:
        raise DataError(f"device {device} got {n} samples, fewer than the {need_n} needed for its "
                        f"{'legacy/' if need_n == 3 else ''}rejector/test splits: lower fleet.num_clients, use an iid "
                        "partition or data.partition.name=sampled")
    rng = np.random.default_rng(derive_seed(seed, "split", device))
    order = rng.permutation(n)
    n_legacy = max(1, int(round(fractions[0] * n))) if fractions[0] > 0 else 0
    n_test = max(1, int(round(fractions[2] * n)))
    n_legacy = min(n_legacy, n - 2)
    n_test = min(n_test, n - n_legacy - 1)
    codes = np.full(n, SPLIT_REJECTOR, dtype=np.int8)
    codes[order[:n_legacy]] = SPLIT_LEGACY
    codes[order[n_legacy:n_legacy + n_test]] = SPLIT_TEST
    return codes


@dataclass
class Prepared:
    """A prepared dataset: arrays (memory-mapped when loaded from the cache) and metadata.

    Attributes:
        x: ``(N, C, H, W)`` float32 (images in [0, 1]); y: ``(N,)`` int64 in ``0..K-1``: the devices' samples.
        owner: ``(N,)`` int32 device id of each sample (-1: not assigned).
        split: ``(N,)`` int8 SPLIT_* code within the owner's partition.
        num_classes: K. bounded: inputs are images in [0, 1] (the sensor's noise is clipped to it).
        vendor_x: ``(V, C, H, W)``, vendor_y: ``(V,)``: the vendor's pretraining pool
            (:func:`vendor_pool`; ``V = 0`` for a ``per_device`` fleet), never a device's sample.
        vendor: what determines the vendor pool (:func:`vendor_key`), for the legacy models' cache keys.
    """

    x: np.ndarray
    y: np.ndarray
    owner: np.ndarray
    split: np.ndarray
    num_classes: int
    path: Path | None = None
    bounded: bool = True
    vendor_x: np.ndarray | None = None
    vendor_y: np.ndarray | None = None
    vendor: dict[str, Any] | None = None
    _rows: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def rows_of(self, device: int) -> np.ndarray:
        """The sorted row indices ``(n_d,)`` of ``device``'s samples. The first call sorts the owner
        column once (``O(N log N)``), every call after is a slice, so a worker hosting thousands of
        devices does not scan all ``N`` rows per device."""
        if self._rows is None:
            owner = np.asarray(self.owner)
            order = np.argsort(owner, kind="stable")
            top = int(owner.max()) + 1 if owner.size else 0
            bounds = np.searchsorted(owner[order], np.arange(top + 1))
            self._rows = (order, bounds)
        order, bounds = self._rows
        if not 0 <= device < len(bounds) - 1:
            return np.empty(0, dtype=np.int64)
        return order[bounds[device]:bounds[device + 1]]


def vendor_key(dcfg: DataConfig, seed: int) -> dict[str, Any]:
    """What determines the vendor pool (and so, with a group's config, its product line's legacy
    model): the dataset and its selection, the pool's size and the seed -- never the fleet size,
    the partition, the devices' splits or (MNIST-1D) how many device samples are generated."""
    data = plain(dcfg)
    for k in ("partition", "split", "num_samples"):
        data.pop(k, None)
    key: dict[str, Any] = {"v": PREP_VERSION, "data": data, "seed": seed}
    if dcfg.source == DataSource.mnist1d:
        key["mnist1d"] = _package_version("mnist1d")
        data.pop("max_samples", None)  # caps the devices' samples, not the separately generated pool
    if dcfg.path:
        st = Path(str(dcfg.path)).expanduser().stat()
        key["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return key


def data_key(dcfg: DataConfig, num_clients: int, seed: int, vendor: bool = True) -> dict[str, Any]:
    """Everything that determines the prepared dataset (a local file by path, size and mtime;
    MNIST-1D by ``data.num_samples`` and the generating package's version; whether a vendor pool
    is reserved)."""
    key = {"v": PREP_VERSION, "data": plain(dcfg), "num_clients": num_clients, "seed": seed, "vendor": vendor}
    if dcfg.source == DataSource.mnist1d:
        key["mnist1d"] = _package_version("mnist1d")
        key["scaling"] = "z-scored"  # (2026-12-02: was min-max into [0, 1])
    else:  # used by mnist1d only
        key["data"].pop("num_samples", None)
    if dcfg.path:
        st = Path(str(dcfg.path)).expanduser().stat()
        key["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return key


def _package_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def vendor_pool(dcfg: DataConfig, x: np.ndarray, y: np.ndarray, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reserve the vendor's pretraining pool (``fleet.legacy=product_line``).

    A loaded dataset gives up ``data.vendor_samples`` of its (selected) samples, drawn by a seeded
    permutation that depends on the seed alone, so the pool is the same for every fleet size and
    partition; MNIST-1D generates its pool apart from the devices' samples (its own generator seed,
    :data:`sim.core.sources.MNIST1D_VENDOR_SEED`), so the devices keep every generated sample.

    Args:
        dcfg: the ``data`` config. x: ``(N, C, H, W)``, y: ``(N,)`` the selected samples (labels
            ``0..K-1``). seed: the run seed.

    Returns:
        ``(vendor_x (V, C, H, W), vendor_y (V,), x_rest, y_rest)``, the rest in their original order.

    Raises:
        DataError: a pool of more than half a loaded dataset (the devices would have too little).
    """
    if dcfg.source == DataSource.mnist1d:
        v = int(dcfg.vendor_samples or MNIST1D_VENDOR_SAMPLES)
        vx, vy = check_arrays(*make_mnist1d(-(-v // 10) * 10, MNIST1D_VENDOR_SEED))
        vx, vy, _ = select(signals(vx), vy.astype(np.int64), dcfg, seed, cap=False)
        return vx[:v], vy[:v], x, y
    n = len(y)
    v = int(dcfg.vendor_samples) if dcfg.vendor_samples is not None else n // 4
    if v > n // 2:
        raise DataError(f"data.vendor_samples={v} reserves more than half of the dataset's {n} samples for the "
                        f"vendor's pretraining pool: lower it (e.g. data.vendor_samples={n // 4})")
    take = np.zeros(n, dtype=bool)
    take[np.random.default_rng(derive_seed(seed, "vendor-pool")).permutation(n)[:v]] = True
    return x[take], y[take], x[~take], y[~take]


def prepare(dcfg: DataConfig, num_clients: int, seed: int, cache_dir: Path, vendor: bool = True) -> Prepared:
    """Load, select, partition and split the dataset for the fleet; cached and memory-mapped.

    Args:
        dcfg: the ``data`` config. num_clients: devices. seed: the run seed.
        cache_dir: root of the on-disk caches. vendor: reserve the vendor pool
            (``fleet.legacy=product_line``; :func:`vendor_pool`).

    Raises:
        DataError: see :func:`sim.core.sources.load_source`, :func:`select`, :func:`vendor_pool`,
            :func:`partition`, :func:`split_device`.
    """
    key = data_key(dcfg, num_clients, seed, vendor)
    entry = cache_dir / "data" / f"{dcfg.name}-{content_key(key)}"

    def build(tmp: Path) -> dict[str, Any]:
        x, y = load_source(dcfg)
        x, y, k = select(x, y, dcfg, seed)
        if vendor:
            vx, vy, x, y = vendor_pool(dcfg, x, y, seed)
        else:
            vx, vy = x[:0], y[:0]
        fractions = dcfg.split.fractions()
        if dcfg.partition.name == PartitionName.sampled:  # devices share a pool: rows are materialised
            rows, owner, split = sampled_rows(len(y), dcfg.partition, num_clients, fractions, seed)
            x, y = x[rows], y[rows]
        else:
            parts = partition(y, dcfg.partition, num_clients, seed)
            owner = np.full(len(y), -1, dtype=np.int32)
            split = np.full(len(y), -1, dtype=np.int8)
            for dev, idx in enumerate(parts):
                owner[idx] = dev
                split[idx] = split_device(idx, fractions, seed, dev)
        for name, arr in (("x", x), ("y", y), ("owner", owner), ("split", split), ("vendor_x", vx),
                          ("vendor_y", vy)):
            np.save(tmp / f"{name}.npy", arr)
        return {"num_classes": k, "key": key, "bounded": dcfg.source in BOUNDED, "vendor": vendor_key(dcfg, seed)}

    manifest = build_entry(entry, build, "dataset", check=lambda e, m: prepared_problem(e, m, num_clients))
    return load_prepared(entry, manifest)


ARRAYS = ("x", "y", "owner", "split", "vendor_x", "vendor_y")
"""The arrays of a prepared dataset entry (``<name>.npy``)."""


def prepared_problem(entry: Path, manifest: dict[str, Any], num_clients: int) -> str | None:
    """What is wrong with the arrays of a prepared-dataset entry whose manifest checks out (None:
    nothing) -- a manifest proves the files are the ones it lists, not that they are what
    :func:`prepare` writes: ``x`` ``(N, C, H, W)`` float, ``y`` / ``owner`` / ``split`` ``(N,)``
    integers with labels in ``0..K-1``, devices in ``-1..num_clients-1`` and SPLIT_* codes, and the
    vendor pool ``(V, C, H, W)`` / ``(V,)`` likewise. Read with
    ``allow_pickle=False``, memory-mapped (the labels, devices and codes are read whole)."""
    try:
        arrs = {n: np.load(entry / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in ARRAYS}
        k = int(manifest["meta"]["num_classes"])
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"
    x, n = arrs["x"], len(arrs["x"]) if arrs["x"].ndim else 0
    if x.ndim != 4 or x.dtype.kind != "f" or not n:
        return f"x is {x.dtype} {x.shape}, not (N, C, H, W) floats"
    for name, low, high in (("y", 0, k - 1), ("owner", -1, num_clients - 1), ("split", -1, SPLIT_TEST)):
        a = arrs[name]
        if a.shape != (n,) or a.dtype.kind not in "iu":
            return f"{name} is {a.dtype} {a.shape}, not {n} integers"
        if n and (int(a.min()) < low or int(a.max()) > high):
            return f"{name} holds values outside {low}..{high}"
    vx, vy = arrs["vendor_x"], arrs["vendor_y"]  # the vendor pool (empty for a per-device fleet)
    if vx.ndim != 4 or vx.shape[1:] != x.shape[1:] or vx.dtype.kind != "f" or vy.shape != (len(vx),) \
            or vy.dtype.kind not in "iu" or (len(vy) and (int(vy.min()) < 0 or int(vy.max()) > k - 1)):
        return f"the vendor pool is {vx.dtype} {vx.shape} / {vy.dtype} {vy.shape}, not samples like x with labels"
    return None


def load_prepared(entry: Path, manifest: dict[str, Any] | None = None) -> Prepared:
    """Memory-map a prepared dataset written by :func:`prepare` (read-only arrays)."""
    if manifest is None:
        manifest = json.loads((entry / "manifest.json").read_text())
    arrs = {n: np.load(entry / f"{n}.npy", mmap_mode="r") for n in ARRAYS}
    meta = manifest["meta"]
    return Prepared(**arrs, num_classes=int(meta["num_classes"]), path=entry, bounded=bool(meta.get("bounded", True)),
                    vendor=meta.get("vendor"))


def degrade(x: np.ndarray, downsample: int, noise_std: float, seed: int, clip: bool = True) -> np.ndarray:
    """A device's sensor: block-average by ``downsample`` (then nearest upsample to the same shape)
    and add Gaussian noise of std ``noise_std`` in the data's units (images: clipped back to
    [0, 1] when ``clip``). Seeded, so the same device always sees the same degraded samples.
    ``x: (N, C, H, W)`` -> same shape, float32.

    Images are block-averaged along H and W; 1-D signals (``H == 1``, e.g. MNIST-1D's
    ``(N, 1, 1, 40)``) along W only (a lower sampling rate over the same window), so H stays 1 and
    no value is averaged with itself.
    """
    x = np.array(x, dtype=np.float32, copy=True)
    if downsample > 1:
        n, c, h, w = x.shape
        fh, fw = (1 if h == 1 else downsample), downsample
        hp, wp = -(-h // fh) * fh, -(-w // fw) * fw
        padded = np.pad(x, ((0, 0), (0, 0), (0, hp - h), (0, wp - w)), mode="edge")
        low = padded.reshape(n, c, hp // fh, fh, wp // fw, fw).mean(axis=(3, 5))
        x = np.repeat(np.repeat(low, fh, axis=2), fw, axis=3)[:, :, :h, :w]
    if noise_std > 0:
        x = x + np.random.default_rng(seed).normal(0.0, noise_std, size=x.shape).astype(np.float32)
        if clip:
            x = np.clip(x, 0.0, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class DeviceData:
    """One device's splits (already degraded by its sensor). ``ids_*`` are global sample ids."""

    x_legacy: np.ndarray
    y_legacy: np.ndarray
    x_rejector: np.ndarray
    y_rejector: np.ndarray
    ids_rejector: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def group_ranks(groups: list[int]) -> np.ndarray:
    """``(N,)`` each device's rank within its fleet group (0 for the group's first device, in device
    order): the same for a device whatever the fleet's size, since groups are interleaved."""
    seen: dict[int, int] = {}
    out = np.empty(len(groups), dtype=np.int64)
    for d, g in enumerate(groups):
        out[d] = seen.get(g, 0)
        seen[g] = out[d] + 1
    return out


def drifting(drift: DriftConfig, rank: int) -> bool:
    """Whether the group's device of rank ``rank`` (:func:`group_ranks`) drifts: rank ``k`` does iff
    ``floor((k + 1) f) > floor(k f)`` for ``f = drift.fraction``, so every prefix of the group has
    ``floor(n f)`` drifting devices, spread evenly (f = 0.5: ranks 1, 3, 5, ...), whatever the fleet size."""
    if not drift.active:
        return False
    f = drift.fraction
    return int(np.floor((rank + 1) * f + 1e-9)) > int(np.floor(rank * f + 1e-9))


def apply_drift(x: np.ndarray, drift: DriftConfig, seed: int, clip: bool) -> np.ndarray:
    """A drifted sensor's view of ``x (N, C, H, W)``: ``gain * roll(x, shift, last axis) + offset``
    plus seeded Gaussian noise of std ``drift.noise_std`` (clipped back into [0, 1] for images,
    ``clip``). Same shape, float32."""
    out = np.roll(np.asarray(x, dtype=np.float32), drift.shift, axis=-1) * drift.gain + drift.offset
    if drift.noise_std > 0:
        out = out + np.random.default_rng(seed).normal(0.0, drift.noise_std, size=out.shape).astype(np.float32)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def device_data(prep: Prepared, device: int, group: DeviceGroupConfig, seed: int, rank: int | None = None
                ) -> DeviceData:
    """The splits of ``device`` as seen through its sensor (``group``: its fleet group config). With
    its ``rank`` in the group (:func:`group_ranks`; None: no drift), a drifting device
    (:func:`drifting`) sees its deployed samples -- rejector and test splits -- through the drifted
    sensor (:func:`apply_drift`); its legacy split, what a per-device legacy model was trained on
    before deployment, is never drifted."""
    idx = prep.rows_of(device)
    x = degrade(prep.x[idx], group.downsample, group.noise_std, derive_seed(seed, "sensor", device),
                clip=prep.bounded)
    y = np.asarray(prep.y[idx])
    s = np.asarray(prep.split[idx])
    leg, rej, tst = (s == SPLIT_LEGACY), (s == SPLIT_REJECTOR), (s == SPLIT_TEST)
    if rank is not None and drifting(group.drift, rank):
        deployed = rej | tst
        x[deployed] = apply_drift(x[deployed], group.drift, derive_seed(seed, "drift-noise", device), prep.bounded)
    return DeviceData(x[leg], y[leg], x[rej], y[rej], idx[rej], x[tst], y[tst])
