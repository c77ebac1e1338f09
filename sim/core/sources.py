"""Reading a dataset into arrays: scikit-learn's digits, a Hugging Face dataset through
flwr-datasets, a local .npz / .parquet file, or MNIST-1D generated offline (the ``mnist1d``
package; Greydanus & Kobak 2020, arXiv 2011.14439).

:func:`load_source` returns ``(N, C, H, W)`` float32 inputs (images in [0, 1]; MNIST-1D's 1-D signals
z-scored, ``(N, 1, 1, 40)``) and integer labels ``(N,)``;
everything after that (selection, partitioning, splits) is :mod:`sim.core.data`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.config import DataConfig, DataSource
from sim.core.errors import DataError


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
    """The image and label columns of a Hugging Face dataset as arrays.

    Raises:
        DataError: a column is missing, an image is not numbers, or the images differ in shape.
    """
    for key in (image_key, label_key):
        if key not in ds.column_names:
            raise DataError(f"column {key!r} not in the dataset (columns: {', '.join(ds.column_names)}): "
                            "set data.image_key / data.label_key")
    images = []
    for i, im in enumerate(ds[image_key]):
        try:
            arr = np.asarray(im, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"column {image_key!r} row {i} is not an image or an array of numbers "
                            f"({type(im).__name__}): every row must hold one image of the same shape") from None
        if images and arr.shape != images[0].shape:
            raise DataError(f"column {image_key!r} holds images of different shapes ({images[0].shape} in row 0, "
                            f"{arr.shape} in row {i}): every image must have the same shape")
        images.append(arr)
    x = np.stack(images) if images else np.empty((0, 0), np.float32)
    y = np.asarray(ds[label_key])
    return x, y


def check_arrays(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x`` and labels ``y`` as loaded, checked against each other before anything uses them.

    Raises:
        DataError: x is not numeric, has no feature, is not one row per sample, or has more or fewer
            rows than y has labels.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"inputs x have dtype {x.dtype}: expected numbers (images or feature vectors)")
    if x.ndim < 2:
        raise DataError(f"inputs x have shape {x.shape}: expected one row per sample, (N,D), (N,H,W), (N,H,W,C) "
                        "or (N,C,H,W)")
    if 0 in x.shape[1:]:
        raise DataError(f"inputs x have shape {x.shape}: a sample has no features")
    if y.ndim >= 1 and len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)} labels: they must match one to one")
    if len(x) == 0:
        raise DataError("the dataset has no samples")
    return x, y


HUB_TIMEOUT_S = 1.5
"""How long the check that the Hugging Face hub answers may take (:func:`hub_offline`)."""


def hub_cached(name: str) -> bool:
    """Whether the local Hugging Face caches hold anything of dataset ``name`` (``org/name``): the hub
    cache (``HF_HUB_CACHE``, ``$HF_HOME/hub``: ``datasets--org--name``) or the datasets cache
    (``HF_DATASETS_CACHE``, ``$HF_HOME/datasets``: ``org___name``). Read without importing the libraries."""
    import os

    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub"))).expanduser()
    local = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    return (hub / f"datasets--{name.replace('/', '--')}").is_dir() or (local / name.replace("/", "___")).is_dir()


def check_hub(dcfg: DataConfig) -> None:
    """Fail at once (not after half a minute of retries) when ``dcfg`` needs the Hugging Face hub,
    the hub does not answer (:func:`hub_offline`) and the local cache has nothing of the dataset.

    Raises:
        DataError: one line, with the offline way (a parquet export and ``data.path``).
    """
    if dcfg.source != DataSource.hf or dcfg.path or not dcfg.hf_name:
        return
    if hub_offline() and not hub_cached(str(dcfg.hf_name)):
        raise DataError(f"data={dcfg.name} needs {dcfg.hf_name!r} from the Hugging Face hub, which does not answer "
                        "(or HF_HUB_OFFLINE is set), and the local cache does not have it: connect once to download "
                        "it, or export it to parquet and pass data.path=FILE.parquet")


def hub_offline(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether datasets must come from the local Hugging Face cache only: ``HF_HUB_OFFLINE`` /
    ``HF_DATASETS_OFFLINE`` set, or the hub (``HF_ENDPOINT``, default huggingface.co) does not accept
    a connection within ``timeout`` seconds -- then both are switched on for this process, so the
    libraries fail at once on a dataset the cache lacks instead of retrying for half a minute."""
    import os
    import socket
    import sys
    from urllib.parse import urlparse

    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return False
    except OSError:
        pass
    for f in flags:
        os.environ[f] = "1"
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules and hasattr(sys.modules[module], attr):
            setattr(sys.modules[module], attr, True)
    return True


def _holds_objects(z: Any, name: str) -> bool:
    """Whether the array ``name`` of the open .npz ``z`` has an object dtype (stored as a pickle), read
    from its ``.npy`` header alone (``numpy.lib.format``; nothing is unpickled)."""
    from numpy.lib import format as npy

    try:
        with z.zip.open(f"{name}.npy") as member:
            version = npy.read_magic(member)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            return bool(read(member)[2].hasobject)
    except Exception:  # noqa: BLE001 -- an unreadable header is reported when the array is loaded
        return False


def _load_file(path: Path, dcfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DataError(f"data.path {path} does not exist: give the path of a .npz or .parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"data.path {path} is empty: regenerate or re-download the file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # our handle: closed on a bad file
                if "x" not in z or "y" not in z:
                    raise DataError(f"{path} lacks arrays 'x' and 'y' (has: {', '.join(z.files)})")
                pickled = [name for name in ("x", "y") if _holds_objects(z, name)]
                if pickled:
                    raise DataError(f"{path}: its array {pickled[0]!r} holds Python objects (a pickle, which is never "
                                    "loaded: it could run code); save numbers instead, e.g. np.savez(path, "
                                    "x=x.astype(np.float32), y=y.astype(np.int64))")
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
        return _from_hf(ds, dcfg.image_key, dcfg.label_key)
    raise DataError(f"data.path {path} has suffix {suffix!r}: use a .npz or .parquet file")


MNIST1D_SEED = 42
"""The seed of the MNIST-1D benchmark (``mnist1d.data.get_dataset_args().seed``): with it and
``data.num_samples=5000`` the samples are those of the paper's ``mnist1d_data.pkl``."""


MNIST1D_VENDOR_SEED = 4242
"""The generator seed of MNIST-1D's vendor pool (``fleet.legacy=product_line``): a seed other than
:data:`MNIST1D_SEED`, so the pool shares no sample with the devices' data (calls with one seed and
different sizes share samples: the generator goes class by class)."""


def make_mnist1d(num_samples: int, seed: int = MNIST1D_SEED) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D generated offline: ``mnist1d.data.make_dataset`` (never ``get_dataset``, which downloads).

    The benchmark's train (first 80%) and test rows are concatenated in that order; partitioning
    and per-device splits are the simulator's. ``make_dataset`` reseeds numpy's and ``random``'s
    global RNGs: both states are saved and restored, so loading leaves them unchanged.

    Args:
        num_samples: N, total samples (N/10 per class; a multiple of 10). seed: generation seed.

    Returns:
        ``x: (N, 40)`` float64 (z-scored by the package over the whole set), ``y: (N,)`` int64 in 0..9.

    Raises:
        DataError: the ``mnist1d`` package is not installed.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("data=mnist1d needs the mnist1d package: pip install mnist1d") from None
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = int(num_samples), 0.8, int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.concatenate([d["x"], d["x_test"]]), np.concatenate([d["y"], d["y_test"]]).astype(np.int64)


def signals(x: np.ndarray) -> np.ndarray:
    """1-D signals ``(N, L)`` as ``(N, 1, 1, L)`` float32, values as they are (MNIST-1D: z-scored by
    the package over the whole set, mean 0 and std 1). Not rescaled into [0, 1]: that affine map
    loses no information but conditions the first layer so badly that every model of the zoo
    loses 10 to 28 accuracy points (benchmarks/results/mnist1d_models.md); the sensor model takes
    unbounded values (:func:`sim.core.data.degrade` with ``clip=False``).

    Raises:
        DataError: NaN or infinite values.
    """
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("inputs contain NaN or infinite values: clean the dataset first")
    return np.ascontiguousarray(x[:, None, None, :])


BOUNDED = {DataSource.sklearn, DataSource.hf, DataSource.file}
"""Sources whose inputs are images scaled into [0, 1] (the sensor's noise is clipped to it);
MNIST-1D's signals are unbounded (z-scored)."""


def load_source(dcfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Load the configured dataset.

    Args:
        dcfg: the ``data`` config.

    Returns:
        ``x: (N, C, H, W)`` float32 (images in [0, 1]; MNIST-1D's signals z-scored, see
        :data:`BOUNDED`) and ``y: (N,)`` int64 labels (unmapped).

    Raises:
        DataError: missing/empty/truncated/foreign file, unreachable hub dataset, bad columns, NaNs,
            the ``mnist1d`` package missing (``data=mnist1d``).
    """
    source = dcfg.source
    if source == DataSource.mnist1d:  # x (N, 1, 1, 40), generated: data.num_samples, the benchmark's seed
        x, y = check_arrays(*make_mnist1d(int(dcfg.num_samples)))
        return signals(x), _check_labels(y)
    if source == DataSource.sklearn:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.images / 16.0, d.target
    elif source == DataSource.file or (source == DataSource.hf and dcfg.path):
        x, y = _load_file(Path(str(dcfg.path)).expanduser(), dcfg)
    elif source == DataSource.hf:
        offline = hub_offline()
        from flwr_datasets import FederatedDataset

        try:
            fds = FederatedDataset(dataset=dcfg.hf_name, subset=dcfg.hf_subset,
                                   partitioners={"train": 1}, shuffle=False)
            ds = fds.load_split("train")
        except Exception as exc:
            where = "its local cache (the hub is not reachable)" if offline else "the Hugging Face hub or its local cache"
            raise DataError(
                f"cannot load {dcfg.hf_name!r} from {where} ({type(exc).__name__}); offline, export it to parquet "
                "and pass data.path=FILE.parquet") from None
        x, y = _from_hf(ds, dcfg.image_key, dcfg.label_key)
    else:
        raise DataError(f"data.source={source!r} is invalid: choose sklearn, hf, file or mnist1d")
    x, y = check_arrays(x, y)
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
