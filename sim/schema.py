"""Typed schema of the Hydra configuration, and value checks.

The dataclasses below are registered in Hydra's ConfigStore as the base of
``configs/config.yaml``: every group YAML is merged into a typed node, so a wrong
type (``fleet.num_clients=abc``) or an unknown key is rejected by OmegaConf at
composition time. Range checks that types cannot express (``c_e >= 0``,
``num_clients >= 1``, ...) live in :func:`validate`, which raises
:class:`ConfigError` with a one-line message naming the key and the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line: what and how to fix."""


@dataclass
class PartitionConfig:
    name: str = "iid"  # iid | dirichlet | pathological
    alpha: float = 0.5  # dirichlet concentration
    classes_per_device: int = 2  # pathological
    min_partition_size: int = 10  # dirichlet


@dataclass
class SplitConfig:
    legacy: float = 0.4  # fraction of a device's partition its legacy model was trained on
    rejector: float = 0.4  # fraction used to train the rejector (and sent to servers)
    test: float = 0.2  # held-out test split of the device


@dataclass
class DataConfig:
    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | svhn | local
    source: str = "sklearn"  # sklearn | hf | file
    hf_name: Optional[str] = None  # Hugging Face dataset id (source=hf)
    hf_subset: Optional[str] = None
    path: Optional[str] = None  # local .npz or .parquet (source=file, or source=hf offline)
    image_key: str = "image"
    label_key: str = "label"
    classes: Optional[List[int]] = None  # keep only these labels (e.g. [3, 8] for a binary task)
    max_samples: Optional[int] = None  # cap on the number of samples used (seeded subsample)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class DeviceGroupConfig:
    name: str = MISSING
    share: float = 1.0  # relative share of the fleet in this group
    arch: str = "mlp"  # logreg | mlp | cnn
    hidden: int = 32  # MLP hidden width / CNN channels
    pretrain_fraction: float = 1.0  # fraction of the device's legacy split used to pretrain
    downsample: int = 1  # sensor resolution divisor (1 = full resolution)
    noise_std: float = 0.0  # Gaussian sensor noise, in units of the [0, 1] pixel range
    epochs: int = 60  # legacy pretraining epochs
    lr: float = 0.01


@dataclass
class FleetConfig:
    name: str = MISSING
    num_clients: int = 10
    groups: List[DeviceGroupConfig] = field(default_factory=list)


@dataclass
class RejectorConfig:
    inputs: str = "sample+legacy"  # sample | legacy | sample+legacy (legacy softmax appended)
    hidden: int = 64
    epochs: int = 5  # local epochs per round
    batch_size: int = 32
    lr: float = 0.003


@dataclass
class StrategyConfig:
    name: str = MISSING
    c_e: float = 0.1  # price of one deferral
    c_1: float = 1.0  # extra cost when the server is wrong on a deferred sample
    weights: str = "shifted"  # shifted | paper | repo  (METHODS.md section 1)
    surrogate: str = "auto"  # auto | multiclass | binary (binary: METHODS.md section 2)
    binary_beta: float = 2.0
    binary_p: float = 0.18
    explore: float = 0.2  # fraction of kept samples also sent to the server
    staleness: int = 1  # S: the rejector trains against a server copy refreshed every S rounds
    rejector: RejectorConfig = field(default_factory=RejectorConfig)


@dataclass
class ResourcesConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class ServersConfig:
    name: str = MISSING
    count: int = 1
    arch: str = "mlp"
    hidden: int = 128
    buffer_size: int = 5000  # bounded replay buffer of deferred samples, per server
    epochs: int = 20  # passes over the buffer per round
    batch_size: int = 64
    lr: float = 0.001
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class SimConfig:
    num_rounds: int = 10
    backend: str = "ray"  # ray: Flower simulation engine on Ray | inprocess: same apps, called in-process
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    eval_every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or "host:port": join
    client_resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    num_cpus: Optional[int] = None  # CPUs a local Ray may use (None: all)
    torch_threads: int = 1
    verbose: bool = False
    progress: bool = True
    plots: bool = True
    cache_dir: str = "~/.cache/l2h-fleet-sim"
    round_timeout: float = 3600.0  # seconds to wait for device replies in a round


@dataclass
class FailuresConfig:
    name: str = MISSING


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = MISSING
    fleet: FleetConfig = MISSING
    strategy: StrategyConfig = MISSING
    servers: ServersConfig = MISSING
    sim: SimConfig = MISSING
    failures: FailuresConfig = MISSING


def register() -> None:
    """Register the schema as ``base_config`` (used by configs/config.yaml's defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


KNOWN = {
    "data.source": ("sklearn", "hf", "file"),
    "data.partition.name": ("iid", "dirichlet", "pathological"),
    "strategy.name": ("l2h",),
    "strategy.weights": ("shifted", "paper", "repo"),
    "strategy.surrogate": ("auto", "multiclass", "binary"),
    "strategy.rejector.inputs": ("sample", "legacy", "sample+legacy"),
    "servers.arch": ("logreg", "mlp", "cnn"),
    "failures.name": ("none",),
    "sim.backend": ("ray", "inprocess"),
}
ARCHS = ("logreg", "mlp", "cnn")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: Any) -> None:
    """Check value ranges the schema's types cannot express.

    Args:
        cfg: the composed config (DictConfig or plain nested dict).

    Raises:
        ConfigError: one line naming the offending key, its value and the valid range.
    """

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is invalid: {rule}")

    for key, options in KNOWN.items():
        need(_get(cfg, key) in options, key, f"choose one of {', '.join(options)}")
    need(cfg["fleet"]["num_clients"] >= 1, "fleet.num_clients", "need at least 1 device")
    need(cfg["sim"]["num_rounds"] >= 1, "sim.num_rounds", "need at least 1 round")
    need(cfg["strategy"]["c_e"] >= 0, "strategy.c_e", "the deferral cost must be >= 0")
    need(cfg["strategy"]["c_1"] >= 0, "strategy.c_1", "the server-error cost must be >= 0")
    need(0 <= cfg["strategy"]["explore"] <= 1, "strategy.explore", "must be in [0, 1]")
    need(cfg["strategy"]["staleness"] >= 1, "strategy.staleness", "S must be >= 1 (1 = synchronous)")
    need(cfg["strategy"]["binary_beta"] > 0, "strategy.binary_beta", "must be > 0")
    need(0 < cfg["strategy"]["binary_p"] < 1, "strategy.binary_p", "must be in (0, 1)")
    rej = cfg["strategy"]["rejector"]
    for k in ("hidden", "epochs", "batch_size"):
        need(rej[k] >= 1, f"strategy.rejector.{k}", "must be >= 1")
    need(rej["lr"] > 0, "strategy.rejector.lr", "must be > 0")
    need(cfg["servers"]["count"] == 1, "servers.count",
         "only one helper server is supported so far; set servers.count=1")
    for k in ("hidden", "buffer_size", "epochs", "batch_size"):
        need(cfg["servers"][k] >= 1, f"servers.{k}", "must be >= 1")
    need(cfg["servers"]["lr"] > 0, "servers.lr", "must be > 0")
    for k in ("fraction_train", "fraction_evaluate"):
        need(0 < cfg["sim"][k] <= 1, f"sim.{k}", "must be in (0, 1]")
    need(cfg["sim"]["eval_every"] >= 1, "sim.eval_every", "must be >= 1")
    need(cfg["sim"]["torch_threads"] >= 1, "sim.torch_threads", "must be >= 1")
    need(cfg["sim"]["round_timeout"] > 0, "sim.round_timeout", "must be > 0 seconds")
    need(cfg["sim"]["client_resources"]["num_cpus"] > 0, "sim.client_resources.num_cpus", "must be > 0")
    need(cfg["sim"]["client_resources"]["num_gpus"] >= 0, "sim.client_resources.num_gpus", "must be >= 0")
    need(cfg["sim"]["num_cpus"] is None or cfg["sim"]["num_cpus"] >= 1, "sim.num_cpus", "must be >= 1 or null")
    split = cfg["data"]["split"]
    for k in ("legacy", "rejector", "test"):
        need(0 < split[k] < 1, f"data.split.{k}", "each split fraction must be in (0, 1)")
    total = split["legacy"] + split["rejector"] + split["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"data.split fractions sum to {total:g}, not 1: adjust data.split.legacy/rejector/test")
    part = cfg["data"]["partition"]
    need(part["alpha"] > 0, "data.partition.alpha", "the Dirichlet concentration must be > 0")
    need(part["classes_per_device"] >= 1, "data.partition.classes_per_device", "must be >= 1")
    need(part["min_partition_size"] >= 0, "data.partition.min_partition_size", "must be >= 0")
    need(cfg["data"]["max_samples"] is None or cfg["data"]["max_samples"] >= 1, "data.max_samples", "must be >= 1 or null")
    if cfg["data"]["source"] in ("file",) and not cfg["data"]["path"]:
        raise ConfigError("data.path is not set: data=local needs data.path=/path/to/file.npz or .parquet")
    path = cfg["data"]["path"]
    if path and not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(f"data.path {path} does not exist: give the path of a .npz or .parquet file")
    groups = cfg["fleet"]["groups"]
    if len(groups) == 0:
        raise ConfigError("fleet.groups is empty: the fleet needs at least one device group")
    for i, g in enumerate(groups):
        key = f"fleet.groups.{i}"
        if g["arch"] not in ARCHS:
            raise ConfigError(f"{key}.arch={g['arch']!r} is invalid: choose one of {', '.join(ARCHS)}")
        checks = [
            (g["share"] > 0, "share", "must be > 0"),
            (0 < g["pretrain_fraction"] <= 1, "pretrain_fraction", "must be in (0, 1]"),
            (g["downsample"] >= 1, "downsample", "must be >= 1"),
            (g["noise_std"] >= 0, "noise_std", "must be >= 0"),
            (g["epochs"] >= 1, "epochs", "must be >= 1"),
            (g["hidden"] >= 1, "hidden", "must be >= 1"),
            (g["lr"] > 0, "lr", "must be > 0"),
        ]
        for ok, k, rule in checks:
            if not ok:
                raise ConfigError(f"{key}.{k}={g[k]!r} is invalid: {rule}")
