"""Datasets, partitioning across devices, per-device splits and sensor degradation.

Flow: :func:`load_source` reads a dataset (scikit-learn's digits, a Hugging Face dataset
through flwr-datasets, or a local .npz/.parquet) into arrays; :func:`partition` assigns
samples to devices with flwr-datasets partitioners; :func:`prepare` splits each device's
samples into legacy / rejector / test and caches the result as ``.npy`` files that Ray
workers memory-map (one copy in the page cache, none per worker); :func:`device_data`
returns one device's splits, degraded by its sensor (resolution, noise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.cache import build_entry, content_key
from sim.schema import ConfigError
from sim.training import derive_seed

SPLIT_LEGACY, SPLIT_REJECTOR, SPLIT_TEST = 0, 1, 2
PREP_VERSION = 1


class DataError(ConfigError):
    """The dataset cannot be used as configured (one line: what is wrong, how to fix it)."""


def _to_nchw(x: np.ndarray) -> np.ndarray:
    """Images ``(N,H,W)``, ``(N,H,W,C)``, ``(N,C,H,W)`` or vectors ``(N,D)`` -> ``(N,C,H,W)`` float32.

    Values are scaled into [0, 1] when they exceed 1: by 255 if the maximum is above 16 (8-bit
    images), else by the maximum (e.g. digits' 0..16). Raises DataError on NaN/inf.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = np.transpose(x, (0, 3, 1, 2))
    elif x.ndim != 4:
        raise DataError(f"inputs have shape {x.shape}: expected (N,D), (N,H,W), (N,H,W,C) or (N,C,H,W)")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError("inputs contain NaN or infinite values: clean the dataset first")
    hi = float(x.max()) if x.size else 1.0
    if hi > 1.0:
        x = x / (255.0 if hi > 16.0 else hi)
    return np.ascontiguousarray(x)


def _from_hf(ds: Any, image_key: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    for key in (image_key, label_key):
        if key not in ds.column_names:
            raise DataError(f"column {key!r} not in the dataset (columns: {', '.join(ds.column_names)}): "
                            "set data.image_key / data.label_key")
    images = ds[image_key]
    x = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    y = np.asarray(ds[label_key])
    return x, y


def _load_file(path: Path, dcfg: Any) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"data.path {path} does not exist: give the path of a .npz or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"data.path {path} is empty: regenerate or re-download the file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"{path} lacks arrays 'x' and 'y' (has: {', '.join(z.files)})")
                return z["x"], z["y"]
        except DataError:
            raise
        except Exception as exc:  # zipfile/pickle/format errors from a truncated or foreign file
            raise DataError(f"cannot read {path} as .npz ({type(exc).__name__}): the file is truncated or not an npz") from None
    if suffix == ".parquet":
        from flwr_datasets import FederatedDataset

        try:
            fds = FederatedDataset(dataset="parquet", data_files={"train": str(path)},
                                   partitioners={"train": 1}, shuffle=False)
            ds = fds.load_split("train")
        except Exception as exc:
            raise DataError(f"cannot read {path} as parquet ({type(exc).__name__}): the file is truncated or not parquet") from None
        return _from_hf(ds, dcfg["image_key"], dcfg["label_key"])
    raise DataError(f"data.path {path} has suffix {suffix!r}: use a .npz or .parquet file")


def load_source(dcfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Load the configured dataset.

    Args:
        dcfg: the ``data`` config node.

    Returns:
        ``x: (N, C, H, W)`` float32 in [0, 1] and ``y: (N,)`` int64 labels (unmapped).

    Raises:
        DataError: missing/empty/truncated/foreign file, unreachable hub dataset, bad columns, NaNs.
    """
    source = dcfg["source"]
    if source == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images / 16.0, d.target
    elif source == "file" or (source == "hf" and dcfg.get("path")):
        x, y = _load_file(Path(str(dcfg["path"])).expanduser(), dcfg)
    elif source == "hf":
        from flwr_datasets import FederatedDataset

        try:
            fds = FederatedDataset(dataset=dcfg["hf_name"], subset=dcfg.get("hf_subset"),
                                   partitioners={"train": 1}, shuffle=False)
            ds = fds.load_split("train")
        except Exception as exc:
            raise DataError(
                f"cannot load {dcfg['hf_name']!r} from the Hugging Face hub or its local cache "
                f"({type(exc).__name__}); offline, export it to parquet and pass data.path=FILE.parquet") from None
        x, y = _from_hf(ds, dcfg["image_key"], dcfg["label_key"])
    else:
        raise DataError(f"data.source={source!r} is invalid: choose sklearn, hf or file")
    return _to_nchw(x), _check_labels(y)


def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels have shape {y.shape}: expected one integer label per sample")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError("labels contain NaN: every sample needs an integer class label")
        if not np.all(y == np.round(y)):
            raise DataError("labels are not integers: classification needs integer class labels")
    elif y.dtype.kind not in "iub":
        raise DataError(f"labels have dtype {y.dtype}: expected integer class labels")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"labels contain {int(y.min())}: class labels must be >= 0")
    return y


def select(x: np.ndarray, y: np.ndarray, dcfg: Any, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Apply ``data.classes`` and ``data.max_samples``; map labels to ``0..K-1``.

    Returns:
        ``x, y`` (subset) and ``K``. Raises DataError for fewer than 2 classes.
    """
    if dcfg.get("classes"):
        keep = np.asarray(list(dcfg["classes"]), dtype=np.int64)
        missing = sorted(set(keep.tolist()) - set(np.unique(y).tolist()))
        if missing:
            raise DataError(f"data.classes names labels {missing} that do not occur in the dataset")
        mask = np.isin(y, keep)
        x, y = x[mask], np.searchsorted(np.sort(keep), y[mask])
    else:
        values = np.unique(y)
        y = np.searchsorted(values, y)
    if dcfg.get("max_samples") and len(y) > dcfg["max_samples"]:
        idx = np.sort(np.random.default_rng(derive_seed(seed, "max_samples")).permutation(len(y))[: dcfg["max_samples"]])
        x, y = x[idx], y[idx]
    k = int(y.max()) + 1 if y.size else 0
    if len(np.unique(y)) < 2:
        raise DataError(f"the dataset has {len(np.unique(y))} class(es) after selection: deferral needs at least 2")
    return x, y, k


def partition(y: np.ndarray, pcfg: Any, num_clients: int, seed: int) -> list[np.ndarray]:
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
    name = pcfg["name"]
    if name == "iid":
        part = IidPartitioner(num_partitions=num_clients)
        # IidPartitioner does not shuffle; shuffle the order deterministically first.
        order = np.random.default_rng(derive_seed(seed, "iid")).permutation(len(y))
    elif name == "dirichlet":
        part = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=float(pcfg["alpha"]),
                                    min_partition_size=int(pcfg["min_partition_size"]), seed=seed)
        order = np.arange(len(y))
    elif name == "pathological":
        part = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                       num_classes_per_partition=int(pcfg["classes_per_device"]),
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


def sampled_rows(n: int, pcfg: Any, num_clients: int, fractions: tuple[float, float, float],
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``sampled`` partition: every device draws its own samples from a shared pool, so a fleet
    can have more devices than the dataset has samples / 3 (1000 devices on digits' 1797 images).

    The dataset's unique samples are first split once, globally, into legacy / rejector / test
    pools by ``fractions``; each device then draws ``round(f * samples_per_device)`` samples
    (at least one per split) from each pool, without replacement within the device, independently
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
    per = int(pcfg["samples_per_device"])
    rng = np.random.default_rng(derive_seed(seed, "sampled-pools"))
    order = rng.permutation(n)
    n_leg, n_test = int(round(fractions[0] * n)), int(round(fractions[2] * n))
    pools = {SPLIT_LEGACY: order[:n_leg], SPLIT_TEST: order[n_leg:n_leg + n_test],
             SPLIT_REJECTOR: order[n_leg + n_test:]}
    take = {code: max(1, int(round(f * per))) for code, f in
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
    """Split labels for one device's ``indices``: an int8 array of SPLIT_* codes, seeded per device.

    Raises:
        DataError: the device has too few samples for three non-empty splits.
    """
    n = len(indices)
    if n < 3:
        raise DataError(f"device {device} got {n} samples, fewer than the 3 needed for legacy/rejector/test "
                        "splits: lower fleet.num_clients, use an iid partition or data.partition.name=sampled")
    rng = np.random.default_rng(derive_seed(seed, "split", device))
    order = rng.permutation(n)
    n_legacy = max(1, int(round(fractions[0] * n)))
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
        x: ``(N, C, H, W)`` float32 in [0, 1]; y: ``(N,)`` int64 in ``0..K-1``.
        owner: ``(N,)`` int32 device id of each sample (-1: not assigned).
        split: ``(N,)`` int8 SPLIT_* code within the owner's partition.
        num_classes: K.
    """

    x: np.ndarray
    y: np.ndarray
    owner: np.ndarray
    split: np.ndarray
    num_classes: int
    path: Path | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]


def data_key(cfg: Any) -> dict[str, Any]:
    """Everything that determines the prepared dataset (a local file by path, size and mtime)."""
    d = cfg["data"]
    key = {"v": PREP_VERSION, "data": d, "num_clients": cfg["fleet"]["num_clients"], "seed": cfg["seed"]}
    if d.get("path"):
        st = Path(str(d["path"])).expanduser().stat()
        key["file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return key


def prepare(cfg: Any, cache_dir: Path) -> Prepared:
    """Load, select, partition and split the dataset for the fleet; cached and memory-mapped.

    Args:
        cfg: the whole run config (plain nested dict).
        cache_dir: root of the on-disk caches.

    Raises:
        DataError: see :func:`load_source`, :func:`select`, :func:`partition`, :func:`split_device`.
    """
    key = data_key(cfg)
    entry = cache_dir / "data" / f"{cfg['data']['name']}-{content_key(key)}"

    def build(tmp: Path) -> dict[str, Any]:
        x, y = load_source(cfg["data"])
        x, y, k = select(x, y, cfg["data"], cfg["seed"])
        n_dev = cfg["fleet"]["num_clients"]
        fr = cfg["data"]["split"]
        fractions = (fr["legacy"], fr["rejector"], fr["test"])
        if cfg["data"]["partition"]["name"] == "sampled":  # devices share a pool: rows are materialised
            rows, owner, split = sampled_rows(len(y), cfg["data"]["partition"], n_dev, fractions, cfg["seed"])
            x, y = x[rows], y[rows]
        else:
            parts = partition(y, cfg["data"]["partition"], n_dev, cfg["seed"])
            owner = np.full(len(y), -1, dtype=np.int32)
            split = np.full(len(y), -1, dtype=np.int8)
            for dev, idx in enumerate(parts):
                owner[idx] = dev
                split[idx] = split_device(idx, fractions, cfg["seed"], dev)
        for name, arr in (("x", x), ("y", y), ("owner", owner), ("split", split)):
            np.save(tmp / f"{name}.npy", arr)
        return {"num_classes": k, "key": key}

    manifest = build_entry(entry, build, "dataset")
    return load_prepared(entry, manifest)


def load_prepared(entry: Path, manifest: dict[str, Any] | None = None) -> Prepared:
    """Memory-map a prepared dataset written by :func:`prepare` (read-only arrays)."""
    if manifest is None:
        manifest = json.loads((entry / "manifest.json").read_text())
    arrs = {n: np.load(entry / f"{n}.npy", mmap_mode="r") for n in ("x", "y", "owner", "split")}
    return Prepared(**arrs, num_classes=int(manifest["meta"]["num_classes"]), path=entry)


def degrade(x: np.ndarray, downsample: int, noise_std: float, seed: int) -> np.ndarray:
    """A device's sensor: block-average by ``downsample`` (then nearest upsample to the same shape)
    and add Gaussian noise of std ``noise_std`` (clipped to [0, 1]). Seeded, so the same device
    always sees the same degraded samples. ``x: (N, C, H, W)`` -> same shape, float32.
    """
    x = np.array(x, dtype=np.float32, copy=True)
    if downsample > 1:
        n, c, h, w = x.shape
        f = downsample
        hp, wp = -(-h // f) * f, -(-w // f) * f
        padded = np.pad(x, ((0, 0), (0, 0), (0, hp - h), (0, wp - w)), mode="edge")
        low = padded.reshape(n, c, hp // f, f, wp // f, f).mean(axis=(3, 5))
        x = np.repeat(np.repeat(low, f, axis=2), f, axis=3)[:, :, :h, :w]
    if noise_std > 0:
        x = x + np.random.default_rng(seed).normal(0.0, noise_std, size=x.shape).astype(np.float32)
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


def device_data(prep: Prepared, device: int, group: Any, seed: int) -> DeviceData:
    """The splits of ``device`` as seen through its sensor (``group``: its fleet group config)."""
    idx = np.flatnonzero(np.asarray(prep.owner) == device)
    x = degrade(prep.x[idx], int(group["downsample"]), float(group["noise_std"]), derive_seed(seed, "sensor", device))
    y = np.asarray(prep.y[idx])
    s = np.asarray(prep.split[idx])
    leg, rej, tst = (s == SPLIT_LEGACY), (s == SPLIT_REJECTOR), (s == SPLIT_TEST)
    return DeviceData(x[leg], y[leg], x[rej], y[rej], idx[rej], x[tst], y[tst])
