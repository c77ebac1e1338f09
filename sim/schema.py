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
    name: str = "iid"  # iid | dirichlet | pathological | sampled (devices draw from shared pools)
    alpha: float = 0.5  # dirichlet concentration
    classes_per_device: int = 2  # pathological
    min_partition_size: int = 10  # dirichlet
    samples_per_device: int = 20  # sampled: samples each device draws (split by data.split)


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
    # batched: same-shaped legacy models pretrain together (torch.func); sequential: one by one, as
    # before 2026-11-21 (the same training up to float rounding; reproduces earlier figures exactly)
    pretrain: str = "batched"


@dataclass
class RejectorConfig:
    inputs: str = "sample+legacy"  # sample | legacy | sample+legacy (legacy softmax appended)
    hidden: int = 64
    epochs: int = 5  # local epochs per round
    batch_size: int = 32
    lr: float = 0.003


@dataclass
class L2DConfig:
    loss: str = "ce_cost"  # ce (Mozannar-Sontag, alpha) | ce_cost (cost-sensitive, c_e and c_1) | ova (Verma-Nalisnick)
    alpha: float = 1.0  # ce: weight of the classifier term when the expert is right (1 = consistent)
    fedavg: bool = False  # devices of the same architecture average their models with FedAvg each round
    expert_epochs: int = 30  # pretraining of the fixed expert(s) on the held-out pool (cached)
    expert_lr: float = 0.001


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
    # Baselines (METHODS.md section 4): random / confidence defer this fraction (confidence: unless tau is set)
    defer_rate: float = 0.3
    tau: Optional[float] = None  # confidence: defer iff the legacy max-softmax < tau (null: fit to defer_rate)
    # Bounded reject rate (L2H scenario 3): defer at most this fraction (null: no bound)
    max_defer_rate: Optional[float] = None
    bound: str = "quantile"  # quantile (threshold fitted on a calibration split) | stochastic (post-hoc thinning)
    calibration: float = 0.25  # fraction of the rejector split held out to fit the bound
    l2d: L2DConfig = field(default_factory=L2DConfig)


@dataclass
class ResourcesConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class MELConfig:
    standalone_weight: float = 1.0  # lambda_s of each server's own head (METHODS.md section 5)
    combiner_weight: float = 1.0  # lambda_A of each combiner head (equal weights: the authors' best)


@dataclass
class CoopConfig:
    """Cooperative learning (arXiv 2312.08532): Teammates' multi-exit networks and serving depth."""
    depth: int = 4  # hidden blocks of each server's MLP, one exit after each (depth fractions 1/D ... 1)
    temperature: float = 3.0  # distillation temperature of the sub-network term (not given in the paper)
    serve_depth: float = 1.0  # cost pressure: Teammates answer at most at this depth fraction
    capacity: Optional[float] = None  # full-depth answers per Teammate per round; above it the depth drops


@dataclass
class ServersConfig:
    name: str = MISSING
    count: int = 1  # S helper servers, each a Ray actor
    routing: str = "auto"  # auto (mel: all, else learned) | learned | round_robin | least_loaded | all
    training: str = "independent"  # independent | mel | dml | coop
    c_e: Optional[List[float]] = None  # per-server deferral price (null: strategy.c_e for every server)
    mel: MELConfig = field(default_factory=MELConfig)
    coop: CoopConfig = field(default_factory=CoopConfig)
    arch: str = "mlp"
    hidden: int = 128
    buffer_size: int = 5000  # bounded replay buffer of deferred samples, per server
    epochs: int = 20  # passes over the buffer per round
    batch_size: int = 64
    lr: float = 0.001
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(num_cpus=0.0))


@dataclass
class SimConfig:
    num_rounds: int = 10
    backend: str = "ray"  # ray: Flower simulation engine on Ray | inprocess: same apps, called in-process
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    eval_every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    devices_per_node: Optional[int] = None  # devices one Flower node simulates (null: ceil(N / max_nodes))
    max_nodes: int = 10  # with devices_per_node=null: at most this many Flower nodes
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or "host:port": join
    client_resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    num_cpus: Optional[int] = None  # CPUs a local Ray may use (None: all)
    torch_threads: int = 1
    verbose: bool = False
    progress: bool = True
    plots: bool = True
    cache_dir: str = "~/.cache/l2h-fleet-sim"
    round_timeout: float = 3600.0  # seconds to wait for device replies in a round
    checkpoint: bool = True  # write checkpoint.npz at the end of every round
    resume: Optional[str] = None  # a run directory to continue from its last finished round


@dataclass
class PartitionFaultConfig:
    devices: List[int] = field(default_factory=list)  # devices that cannot reach ...
    servers: List[int] = field(default_factory=list)  # ... these servers
    start: int = 1
    end: Optional[int] = None  # last round (null: to the end)


@dataclass
class SlowFaultConfig:
    servers: List[int] = field(default_factory=list)
    delay_s: float = 2.0  # answer delay; past failures.query_timeout_s the server counts as down
    start: int = 1
    end: Optional[int] = None


@dataclass
class DropoutFaultConfig:
    devices: List[int] = field(default_factory=list)  # devices that fail their rounds
    fraction: float = 0.0  # or: each device fails each round with this probability
    start: int = 1
    end: Optional[int] = None


@dataclass
class RandomFaultConfig:
    crash_p: float = 0.05  # per server and round
    recover_p: float = 0.5  # a crashed server comes back (after 1..max_down rounds)
    max_down: int = 3
    outage_p: float = 0.1
    slow_p: float = 0.05
    partition_p: float = 0.1  # per round: half the devices lose one server
    dropout_p: float = 0.05  # per device and round
    query_drop_q: float = 0.02


@dataclass
class FailuresConfig:
    name: str = MISSING  # none | crash_stop | crash_recover | transient | query_drop | partition | slow | device_dropout | random
    servers: List[int] = field(default_factory=list)  # servers that crash at failures.round
    round: int = 1
    recover_after: Optional[int] = None  # crash-recover: back after d rounds (null: crash-stop)
    recover_from: str = "checkpoint"  # checkpoint | scratch
    outage_p: float = 0.0  # transient: each server down for a whole round with probability p
    query_drop_q: float = 0.0  # each query to each server lost with probability q
    query_timeout_s: float = 1.0  # a server answering later than this counts as down
    partition: PartitionFaultConfig = field(default_factory=PartitionFaultConfig)
    slow: SlowFaultConfig = field(default_factory=SlowFaultConfig)
    dropout: DropoutFaultConfig = field(default_factory=DropoutFaultConfig)
    random: RandomFaultConfig = field(default_factory=RandomFaultConfig)
    reference: bool = True  # also run the same seed with no failures, for resilience.fraction_kept


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


STRATEGY_NAMES = ("l2h", "l2d", "legacy_only", "server_only", "random", "confidence", "compare_confidence",
                  "dml", "mel", "coop")
"""``strategy=`` choices. ``dml``, ``mel`` and ``coop`` are L2H with mutually learning helper
servers (configs/strategy/{dml,mel,coop}.yaml set ``servers.training`` and ``servers.count``)."""

KNOWN = {
    "data.source": ("sklearn", "hf", "file"),
    "data.partition.name": ("iid", "dirichlet", "pathological", "sampled"),
    "fleet.pretrain": ("batched", "sequential"),
    "strategy.name": STRATEGY_NAMES,
    "strategy.bound": ("quantile", "stochastic"),
    "strategy.l2d.loss": ("ce", "ce_cost", "ova"),
    "strategy.weights": ("shifted", "paper", "repo"),
    "strategy.surrogate": ("auto", "multiclass", "binary"),
    "strategy.rejector.inputs": ("sample", "legacy", "sample+legacy"),
    "servers.arch": ("logreg", "mlp", "cnn"),
    "servers.routing": ("auto", "learned", "round_robin", "least_loaded", "all"),
    "servers.training": ("independent", "mel", "dml", "coop"),
    "failures.name": ("none", "crash_stop", "crash_recover", "transient", "query_drop", "partition", "slow",
                      "device_dropout", "random"),
    "failures.recover_from": ("checkpoint", "scratch"),
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
    need(cfg["data"]["partition"]["samples_per_device"] >= 3, "data.partition.samples_per_device",
         "need at least 3 samples per device (legacy, rejector and test splits)")
    need(cfg["strategy"]["c_e"] >= 0, "strategy.c_e", "the deferral cost must be >= 0")
    need(cfg["strategy"]["c_1"] >= 0, "strategy.c_1", "the server-error cost must be >= 0")
    need(0 <= cfg["strategy"]["explore"] <= 1, "strategy.explore", "must be in [0, 1]")
    need(cfg["strategy"]["staleness"] >= 1, "strategy.staleness", "S must be >= 1 (1 = synchronous)")
    need(cfg["strategy"]["binary_beta"] > 0, "strategy.binary_beta", "must be > 0")
    need(0 < cfg["strategy"]["binary_p"] < 1, "strategy.binary_p", "must be in (0, 1)")
    need(0 <= cfg["strategy"]["defer_rate"] <= 1, "strategy.defer_rate", "must be in [0, 1]")
    need(cfg["strategy"]["tau"] is None or 0 <= cfg["strategy"]["tau"] <= 1, "strategy.tau",
         "a max-softmax threshold must be in [0, 1] (or null)")
    need(cfg["strategy"]["max_defer_rate"] is None or 0 <= cfg["strategy"]["max_defer_rate"] <= 1,
         "strategy.max_defer_rate", "delta must be in [0, 1] (or null: no bound)")
    need(0 < cfg["strategy"]["calibration"] < 1, "strategy.calibration", "must be in (0, 1)")
    l2d = cfg["strategy"]["l2d"]
    need(l2d["alpha"] >= 0, "strategy.l2d.alpha", "must be >= 0")
    need(l2d["expert_epochs"] >= 1, "strategy.l2d.expert_epochs", "must be >= 1")
    need(l2d["expert_lr"] > 0, "strategy.l2d.expert_lr", "must be > 0")
    rej = cfg["strategy"]["rejector"]
    for k in ("hidden", "epochs", "batch_size"):
        need(rej[k] >= 1, f"strategy.rejector.{k}", "must be >= 1")
    need(rej["lr"] > 0, "strategy.rejector.lr", "must be > 0")
    sv = cfg["servers"]
    need(1 <= sv["count"] <= 8, "servers.count", "need 1 to 8 helper servers (MEL has 2^S - S - 1 combiner heads)")
    if sv["c_e"] is not None:
        if len(sv["c_e"]) != sv["count"]:
            raise ConfigError(f"servers.c_e has {len(sv['c_e'])} prices for {sv['count']} servers: give one per "
                              "server, e.g. servers.c_e=[0.1,0.2], or null to use strategy.c_e")
        if any(v < 0 for v in sv["c_e"]):
            raise ConfigError(f"servers.c_e={list(sv['c_e'])} is invalid: deferral prices must be >= 0")
    multi = routing_of(sv) == "learned" and sv["count"] > 1
    if multi and cfg["strategy"]["weights"] != "shifted":
        raise ConfigError(f"strategy.weights={cfg['strategy']['weights']} is defined for one defer output only: "
                          "use strategy.weights=shifted with servers.routing=learned and several servers")
    if multi and cfg["strategy"]["surrogate"] == "binary":
        raise ConfigError("strategy.surrogate=binary has one defer output: use servers.routing=round_robin, "
                          "least_loaded or all with several servers")
    for k in ("standalone_weight", "combiner_weight"):
        need(sv["mel"][k] >= 0, f"servers.mel.{k}", "must be >= 0")
    c = sv["coop"]
    if sv["training"] == "coop":
        need(sv["count"] >= 2, "servers.count", "cooperative learning needs a Leader and at least one Teammate (3: "
                                                "the paper's two Teammates)")
        need(sv["arch"] == "mlp", "servers.arch", "cooperative learning builds multi-exit MLPs: use servers.arch=mlp")
    # checked whatever the training, so a bad value is caught before someone switches to coop
    need(1 <= c["depth"] <= 16, "servers.coop.depth", "must be 1 to 16 blocks")
    need(c["temperature"] > 0, "servers.coop.temperature", "must be > 0")
    need(0 < c["serve_depth"] <= 1, "servers.coop.serve_depth", "must be a depth fraction in (0, 1]")
    need(c["capacity"] is None or c["capacity"] > 0, "servers.coop.capacity", "must be > 0 answers per round "
                                                                               "(null: unlimited)")
    for k in ("num_cpus", "num_gpus"):
        need(sv["resources"][k] >= 0, f"servers.resources.{k}", "must be >= 0")
    validate_failures(cfg)
    for k in ("hidden", "buffer_size", "epochs", "batch_size"):
        need(cfg["servers"][k] >= 1, f"servers.{k}", "must be >= 1")
    need(cfg["servers"]["lr"] > 0, "servers.lr", "must be > 0")
    for k in ("fraction_train", "fraction_evaluate"):
        need(0 < cfg["sim"][k] <= 1, f"sim.{k}", "must be in (0, 1]")
    need(cfg["sim"]["eval_every"] >= 1, "sim.eval_every", "must be >= 1")
    need(cfg["sim"]["devices_per_node"] is None or cfg["sim"]["devices_per_node"] >= 1, "sim.devices_per_node",
         "must be >= 1 or null (automatic: ceil(num_clients / sim.max_nodes))")
    need(cfg["sim"]["max_nodes"] >= 1, "sim.max_nodes", "must be >= 1")
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


def routing_of(servers: Any) -> str:
    """``servers.routing`` with ``auto`` resolved: MEL servers answer as an ensemble (``all``, so
    the combiner heads serve), every other pool routes by the learned rejector (``learned``)."""
    if servers["routing"] != "auto":
        return str(servers["routing"])
    return "all" if servers["training"] == "mel" else "learned"


def validate_failures(cfg: Any) -> None:
    """Check the ``failures`` config against the fleet: servers and devices named must exist.

    Raises:
        ConfigError: one line naming the key and the valid range.
    """
    f = cfg["failures"]
    num_servers, num_clients = cfg["servers"]["count"], cfg["fleet"]["num_clients"]
    num_rounds = cfg["sim"]["num_rounds"]

    def servers_ok(key: str, servers: Any) -> None:
        bad = [s for s in servers if not 0 <= s < num_servers]
        if bad:
            raise ConfigError(f"{key} names server {bad[0]}, but servers.count={num_servers} (servers 0.."
                              f"{num_servers - 1}): fix {key} or raise servers.count")

    def devices_ok(key: str, devices: Any) -> None:
        bad = [d for d in devices if not 0 <= d < num_clients]
        if bad:
            raise ConfigError(f"{key} names device {bad[0]}, but fleet.num_clients={num_clients} (devices 0.."
                              f"{num_clients - 1})")

    def prob(key: str, value: float) -> None:
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value!r} is invalid: a probability must be in [0, 1]")

    servers_ok("failures.servers", f["servers"])
    servers_ok("failures.partition.servers", f["partition"]["servers"])
    servers_ok("failures.slow.servers", f["slow"]["servers"])
    devices_ok("failures.partition.devices", f["partition"]["devices"])
    devices_ok("failures.dropout.devices", f["dropout"]["devices"])
    if f["round"] < 1 or (f["servers"] and f["round"] > num_rounds):
        raise ConfigError(f"failures.round={f['round']} is invalid: the crash round must be in 1..{num_rounds} "
                          "(sim.num_rounds)")
    if f["recover_after"] is not None and f["recover_after"] < 1:
        raise ConfigError(f"failures.recover_after={f['recover_after']} is invalid: must be >= 1 round (or null)")
    prob("failures.outage_p", f["outage_p"])
    prob("failures.query_drop_q", f["query_drop_q"])
    prob("failures.dropout.fraction", f["dropout"]["fraction"])
    for k in ("crash_p", "recover_p", "outage_p", "slow_p", "partition_p", "dropout_p", "query_drop_q"):
        prob(f"failures.random.{k}", f["random"][k])
    if f["random"]["max_down"] < 1:
        raise ConfigError(f"failures.random.max_down={f['random']['max_down']} is invalid: must be >= 1")
    if not f["query_timeout_s"] > 0:
        raise ConfigError(f"failures.query_timeout_s={f['query_timeout_s']} is invalid: must be > 0 seconds")
    if f["slow"]["delay_s"] < 0:
        raise ConfigError(f"failures.slow.delay_s={f['slow']['delay_s']} is invalid: must be >= 0 seconds")
    for part in ("partition", "slow", "dropout"):
        start, end = f[part]["start"], f[part]["end"]
        if start < 1 or (end is not None and end < start):
            raise ConfigError(f"failures.{part}.start/end = {start}/{end} is invalid: need 1 <= start <= end")
