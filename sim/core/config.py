"""The typed configuration: one dataclass per config group, choices as enums, checks in each class.

The dataclasses are registered in Hydra's ConfigStore as the schema of ``configs/config.yaml``;
every group YAML merges into a typed node, so a wrong type (``fleet.num_clients=abc``), an
unknown key or a choice outside an enum (``servers.routing=nearest``) is refused by OmegaConf
while the config is composed. :func:`to_config` turns the composed config into these dataclass
instances (``OmegaConf.to_object``), and each class checks its own ranges in ``__post_init__``,
raising :class:`~sim.core.errors.ConfigError` with one line that names the key, its value and the
fix; :class:`Config` checks what spans several groups (a failure naming a server that does not
exist, ...). Components receive only their own part (``cfg.servers``, ``cfg.strategy``, ...).

Each method's knobs live in a subclass of :class:`StrategyConfig` (``strategies/config.py``), which
holds their defaults; ``configs/strategy/<name>.yaml`` names that class by dotted path in its defaults
list and the method's device and server classes in ``strategy.device`` / ``strategy.server``
(:mod:`sim.core.schemas`). See docs/adding.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, List, Optional

from omegaconf import MISSING, OmegaConf

from sim.core.errors import ConfigError


class Choice(str, Enum):
    """A config choice: compares equal to its string value and prints as it."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    """A :class:`Choice` enum whose member names are its values (so ``sample+legacy`` is allowed)."""
    return Choice(name, {v: v for v in values}, module=__name__)  # type: ignore[return-value]


DataSource = choice("DataSource", ("sklearn", "hf", "file", "mnist1d"))
PartitionName = choice("PartitionName", ("iid", "dirichlet", "pathological", "sampled"))
Pretrain = choice("Pretrain", ("batched", "sequential"))
LegacySource = choice("LegacySource", ("product_line", "per_device"))
Arch = choice("Arch", ("logreg", "mlp", "cnn", "cnn1d"))
Routing = choice("Routing", ("auto", "learned", "round_robin", "least_loaded", "all"))
Training = choice("Training", ("independent", "mel", "dml", "coop"))
FailureKind = choice("FailureKind", ("none", "crash_stop", "crash_recover", "transient", "query_drop", "partition",
                                      "slow", "device_dropout", "random"))
RecoverFrom = choice("RecoverFrom", ("checkpoint", "scratch"))
Backend = choice("Backend", ("ray", "inprocess"))
RejectorInputs = choice("RejectorInputs", ("sample", "legacy", "sample+legacy"))
Bound = choice("Bound", ("quantile", "stochastic"))
ServerLabels = choice("ServerLabels", ("prequential", "holdout", "in_sample", "crossfit"))
Federation = choice("Federation", ("local", "fedavg", "fedavg_finetune"))
FederateBy = choice("FederateBy", ("group", "fleet"))


MAX_ROUNDS = 100_000
"""Most rounds a run may have (the failure schedule holds one entry per round)."""
MAX_DEVICES = 100_000
"""Most devices a fleet may have (each has its legacy model on disk and its splits in memory)."""
MAX_SIDE = 4096
"""Largest sensor block (``fleet.groups.<i>.downsample``); the data's own side is checked once it is loaded."""
MAX_SAMPLES = 10_000_000
"""Most samples ``data.num_samples`` may generate (MNIST-1D)."""
MAX_HIDDEN = 4096
"""Widest hidden layer, in units or channels, of any model: ``servers.hidden``,
``strategy.rejector.hidden``, ``fleet.groups.<i>.hidden``. The largest network this allows is
:class:`sim.core.zoo.SmallCNN`'s second 3x3 convolution from 4,096 to 8,192 channels: 3.0e8 weights,
1.2 GB in float32 and 4.8 GB with its gradient and Adam's two moments -- still built and trained on a
16 GB machine. Twice the width is four times that (19 GB: an allocation failure on the 23 GB
reference machine), and ``hidden=1000000000`` failed with an allocation traceback. The widths in use
are far below (defaults 32-128; MNIST-1D's ConvBase 25). The bound is per model: a fleet of many
devices holds one legacy model and one rejector per device, checked by what it builds, not here."""
MNIST1D_MIN_SAMPLES = 10_000
MNIST1D_PER_DEVICE = 50


def mnist1d_samples(num_clients: Any) -> int:
    """``data.num_samples`` of ``data=mnist1d`` (the ``${mnist1d_samples:${fleet.num_clients}}`` resolver):
    10,000, or 50 per device for fleets over 200 devices, so the iid partition stays disjoint with at
    least 50 samples on every device. A non-integer fleet size is left to the fleet's own validation."""
    try:
        n = int(num_clients)
    except (TypeError, ValueError):
        return MNIST1D_MIN_SAMPLES
    return max(MNIST1D_MIN_SAMPLES, MNIST1D_PER_DEVICE * n)


OmegaConf.register_new_resolver("mnist1d_samples", mnist1d_samples, replace=True)


def scaled_width(hidden: Any, factor: Any) -> int:
    """``${scaled_width:${servers.hidden},f}``: a server width ``max(1, round(f * hidden))``, so a tiered
    pool's preset (configs/tier/) fits any dataset's server size. Non-numbers are left to validation (1)."""
    try:
        return max(1, int(round(float(factor) * int(hidden))))
    except (TypeError, ValueError):
        return 1


OmegaConf.register_new_resolver("scaled_width", scaled_width, replace=True)


def times(a: Any, b: Any) -> int:
    """``${times:${fleet.num_clients},100}``: the integer product ``a * b`` (e.g. a dataset of 100
    samples per device, experiment=fleet_size). Non-numbers give 0, refused by the key's own check."""
    try:
        return int(a) * int(b)
    except (TypeError, ValueError):
        return 0


OmegaConf.register_new_resolver("times", times, replace=True)


def invalid(key: str, value: Any, rule: str) -> ConfigError:
    """The one-line error for a bad value: ``<key>=<value> is invalid: <rule>``."""
    return ConfigError(f"{key}={value.value if isinstance(value, Enum) else value!r} is invalid: {rule}")


def need(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise :func:`invalid` unless ``ok``."""
    if not ok:
        raise invalid(key, value, rule)


def check_fields(obj: Any, prefix: str, rules: dict[str, tuple[Any, str]]) -> None:
    """Check ``rules``: field name -> (predicate of the value, rule text); first failure raises.
    A NaN or infinite value fails first, with its own rule (:func:`check_finite`)."""
    for name, (ok, rule) in rules.items():
        value = getattr(obj, name)
        check_finite(f"{prefix}.{name}", value)
        need(bool(ok(value)), f"{prefix}.{name}", value, rule)


def check_finite(key: str, value: Any) -> None:
    """Refuse a NaN or infinite float (alone or in a list): ``key=nan is invalid: must be a finite number``."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise invalid(key, value, "must be a finite number (NaN and infinity are not values a run can use)")


def check_all_finite(obj: Any, prefix: str = "") -> None:
    """Every float field of a config dataclass, nested ones and lists included, is finite
    (:func:`check_finite`), whatever its own checks are."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_all_finite(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            check_finite(key, list(value))
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_all_finite(item, f"{key}.{i}.")
        else:
            check_finite(key, value)


def _at_least(n: float) -> tuple[Any, str]:
    return (lambda v: v >= n, f"must be >= {n:g}")


def _width() -> tuple[Any, str]:
    return (lambda v: 1 <= v <= MAX_HIDDEN, f"must be 1 to {MAX_HIDDEN} units/channels (a wider model does not fit "
                                            "in memory: see sim.core.config.MAX_HIDDEN)")


def _positive() -> tuple[Any, str]:
    return (lambda v: v > 0, "must be > 0")


# ---- data -------------------------------------------------------------------------------------
@dataclass
class PartitionConfig:
    name: PartitionName = PartitionName.iid  # iid | dirichlet | pathological | sampled (devices draw from shared pools)
    alpha: float = 0.5  # dirichlet concentration
    classes_per_device: int = 2  # pathological
    min_partition_size: int = 10  # dirichlet
    samples_per_device: int = 20  # sampled: samples each device draws (split by data.split)

    def __post_init__(self) -> None:
        check_fields(self, "data.partition", {
            "samples_per_device": (lambda v: v >= 3, "need at least 3 samples per device (legacy, rejector and "
                                                     "test splits)"),
            "alpha": (lambda v: v > 0, "the Dirichlet concentration must be > 0"),
            "classes_per_device": _at_least(1),
            "min_partition_size": _at_least(0),
        })


@dataclass
class SplitConfig:
    # fraction of a device's partition its own legacy model is trained on: only with
    # fleet.legacy=per_device (e.g. 0.4 / 0.4 / 0.2); a product line's model trains on the vendor pool
    legacy: float = 0.0
    rejector: float = 0.6  # fraction used to train the rejector (and sent to servers)
    test: float = 0.4  # held-out test split of the device

    def __post_init__(self) -> None:
        inside = (lambda v: 0 < v < 1, "each split fraction must be in (0, 1)")
        check_fields(self, "data.split", {"legacy": (lambda v: 0 <= v < 1, "must be in [0, 1) (0: no legacy split, "
                                                                          "the default with fleet.legacy=product_line)"),
                                          "rejector": inside, "test": inside})
        total = self.legacy + self.rejector + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"data.split fractions sum to {total:g}, not 1: adjust data.split.legacy/rejector/test")

    def fractions(self) -> tuple[float, float, float]:
        return self.legacy, self.rejector, self.test


@dataclass
class DataConfig:
    name: str = MISSING  # digits | mnist | fashion_mnist | cifar10 | svhn | local | mnist1d
    source: DataSource = DataSource.sklearn  # sklearn | hf | file | mnist1d
    hf_name: Optional[str] = None  # Hugging Face dataset id (source=hf)
    hf_subset: Optional[str] = None
    path: Optional[str] = None  # local .npz or .parquet (source=file, or source=hf offline)
    image_key: str = "image"
    label_key: str = "label"
    classes: Optional[List[int]] = None  # keep only these labels (e.g. [3, 8] for a binary task)
    max_samples: Optional[int] = None  # cap on the number of samples used (seeded subsample)
    num_samples: int = 5000  # mnist1d: samples generated, total (a multiple of 10; 5000: the benchmark's)
    # The vendor's pretraining pool (fleet.legacy=product_line): samples reserved before the devices'
    # partition (loaded datasets) or generated apart from theirs (mnist1d), the same for every fleet size.
    # null: a quarter of a loaded dataset (after data.classes / max_samples), 4000 for mnist1d.
    vendor_samples: Optional[int] = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        need(self.max_samples is None or self.max_samples >= 1, "data.max_samples", self.max_samples,
             "must be >= 1 or null")
        need(self.vendor_samples is None or 10 <= self.vendor_samples <= MAX_SAMPLES, "data.vendor_samples",
             self.vendor_samples, f"must be 10 to {MAX_SAMPLES} samples (or null: a quarter of a loaded dataset, "
                                  "4000 for mnist1d)")
        need(10 <= self.num_samples <= MAX_SAMPLES and self.num_samples % 10 == 0, "data.num_samples",
             self.num_samples, f"mnist1d generates as many samples of each of its 10 classes: give a multiple of 10, "
                               f"10 to {MAX_SAMPLES}")
        if self.source == DataSource.file and not self.path:
            raise ConfigError("data.path is not set: data=local needs data.path=/path/to/file.npz or .parquet")
        if self.path and not os.path.exists(os.path.expanduser(str(self.path))):
            raise ConfigError(f"data.path {self.path} does not exist: give the path of a .npz or .parquet file")


# ---- fleet ------------------------------------------------------------------------------------
@dataclass
class DriftConfig:
    """How a group's deployed inputs differ from what its legacy model was trained on (sensor drift
    after deployment): on the drifting devices (``fraction`` of the group, chosen by a seeded draw per
    device), every rejector-split and test sample becomes ``gain * roll(x, shift) + offset + N(0,
    noise_std^2)`` (images clipped back to [0, 1]); the legacy model and the data it was trained on
    are untouched. The defaults change nothing."""

    fraction: float = 0.0  # share of the group's devices that drift (0: none)
    noise_std: float = 0.0  # extra Gaussian sensor noise, in the data's units
    gain: float = 1.0  # multiplicative gain change
    offset: float = 0.0  # additive offset (a calibration shift)
    shift: int = 0  # samples (pixels) the signal is shifted along its last axis (circularly)

    def check(self, prefix: str) -> None:
        check_fields(self, prefix, {
            "fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1] (the share of the group's devices that drift)"),
            "noise_std": _at_least(0),
            "gain": (lambda v: 0 < v <= 100, "must be in (0, 100]"),
            "offset": (lambda v: abs(v) <= 100, "must be in [-100, 100] (the data's units)"),
            "shift": (lambda v: abs(v) <= MAX_SIDE, f"must be in -{MAX_SIDE}..{MAX_SIDE} samples"),
        })

    @property
    def active(self) -> bool:
        """Whether this drift changes anything."""
        return self.fraction > 0 and (self.noise_std > 0 or self.gain != 1 or self.offset != 0 or self.shift != 0)


@dataclass
class DeviceGroupConfig:
    name: str = MISSING
    share: float = 1.0  # relative share of the fleet in this group
    arch: Arch = Arch.mlp  # logreg | mlp | cnn
    hidden: int = 32  # MLP hidden width / CNN channels
    # fraction of the vendor pool the product line's model trains on (fleet.legacy=product_line), or
    # of each device's own legacy split (per_device)
    pretrain_fraction: float = 1.0
    versions: int = 1  # product_line: model versions shipped (device k of the group runs version k mod versions)
    drift: DriftConfig = field(default_factory=DriftConfig)  # deployed inputs that drift away from training
    downsample: int = 1  # sensor resolution divisor (1 = full resolution)
    noise_std: float = 0.0  # Gaussian sensor noise in the data's units (images: the [0, 1] range; mnist1d: its std)
    epochs: int = 60  # legacy pretraining epochs
    lr: float = 0.01

    def check(self, index: int) -> None:
        """Range checks, naming the group by its index (``fleet.groups.<i>.<key>``)."""
        check_fields(self, f"fleet.groups.{index}", {
            "share": _positive(),
            "pretrain_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
            "downsample": (lambda v: 1 <= v <= MAX_SIDE, f"must be in 1..{MAX_SIDE} (a sensor block of that many "
                                                          "pixels; at most the inputs' side)"),
            "noise_std": _at_least(0),
            "epochs": _at_least(1),
            "hidden": _width(),
            "lr": _positive(),
            "versions": (lambda v: 1 <= v <= 64, "must be 1 to 64 model versions per group"),
        })
        self.drift.check(f"fleet.groups.{index}.drift")


@dataclass
class FleetConfig:
    name: str = MISSING
    num_clients: int = 10
    groups: List[DeviceGroupConfig] = field(default_factory=list)
    # product_line: each group's legacy model (a few versions of it) is trained once by its vendor on
    # the vendor pool (data.vendor_samples) and shipped to every device of the group, so fleet size
    # never changes legacy quality | per_device: each device trains its own on its legacy split
    # (needs data.split.legacy > 0)
    legacy: LegacySource = LegacySource.product_line
    # drift of every group that sets none of its own (fleet.groups.<i>.drift): e.g. half of every group's
    # devices drifting, fleet.drift.fraction=0.5 fleet.drift.offset=0.5 (experiment=device_drift)
    drift: DriftConfig = field(default_factory=DriftConfig)
    # batched: same-shaped legacy models pretrain together (torch.func); sequential: one by one (the
    # same training up to float rounding; kept to reproduce exactly figures pretrained one by one)
    pretrain: Pretrain = Pretrain.batched
    # torch threads of the one-off legacy build (e.g. 2 on a 2-core machine: 10,000 MNIST-1D models
    # in 51 s instead of 75 s); another count rounds differently, so it is its own cache entry.
    build_threads: int = 1

    def __post_init__(self) -> None:
        need(self.num_clients >= 1, "fleet.num_clients", self.num_clients, "need at least 1 device")
        need(self.num_clients <= MAX_DEVICES, "fleet.num_clients", self.num_clients,
             f"at most {MAX_DEVICES} devices can be simulated")
        need(self.build_threads >= 1, "fleet.build_threads", self.build_threads,
             "must be >= 1 (torch threads for building the legacy models)")
        if len(self.groups) == 0:
            raise ConfigError("fleet.groups is empty: the fleet needs at least one device group")
        self.drift.check("fleet.drift")
        for i, g in enumerate(self.groups):
            g.check(i)
            if self.drift.active and not g.drift.active:  # the fleet's drift, for a group with none of its own
                g.drift = dataclasses.replace(self.drift)


# ---- strategy (the part every method shares; each method extends it) --------------------------
@dataclass
class RejectorConfig:
    inputs: RejectorInputs = RejectorInputs["sample+legacy"]  # sample | legacy | sample+legacy
    hidden: int = 64
    epochs: int = 5  # local epochs per round
    batch_size: int = 32
    lr: float = 0.003
    # local: each device learns alone; fedavg: the devices of a federation group train one model
    # together (FedAvg of the trained parts every round; each evaluates with the average);
    # fedavg_finetune: as fedavg, each device then personalises the average with its local epochs
    federation: Federation = Federation.local
    federate_by: FederateBy = FederateBy.group  # group: devices of one fleet group (architecture, sensor) | fleet

    def __post_init__(self) -> None:
        check_fields(self, "strategy.rejector", {"hidden": _width(), "epochs": _at_least(1),
                                                 "batch_size": _at_least(1), "lr": _positive()})


@dataclass
class StrategyConfig:
    """What every method has: its name and classes, the L2H prices (every run reports the L01 cost),
    how stale a server copy devices train against, and the device's trained part (``rejector``).

    The method's classes are dotted paths (:mod:`sim.core.schemas`): ``config`` is this config's own
    class (set by the ``schema`` entry the method's YAML names), ``device`` its
    :class:`strategies.method.DeviceMethod`, ``server`` its ServerApp strategy
    (:class:`strategies.pool_strategy.PoolStrategy`). They are the method's wiring, not parameters:
    ``summary.json``'s config and the checkpoint's leave them out (:data:`WIRING`; ``name`` identifies
    the method there); Hydra's ``.hydra/config.yaml`` keeps them, so it reads back typed."""

    name: str = MISSING
    config: str = MISSING  # this class, by dotted path (set by its schema entry: do not give it)
    device: str = MISSING  # the device side, e.g. strategies.l2h.L2HMethod
    server: str = MISSING  # the ServerApp side, e.g. strategies.l2h.L2HStrategy
    c_e: float = 0.1  # price of one deferral
    c_1: float = 1.0  # extra cost when the server is wrong on a deferred sample
    staleness: int = 1  # S: devices train against a server copy refreshed every S rounds
    rejector: RejectorConfig = field(default_factory=RejectorConfig)
    # Where a device's labels of the servers' errors come from (L2H, CompareConfidence; docs/methods.md §8):
    # prequential: the answer a sample got when it was first sent, before any server trained on it
    # (never-sent samples: the current servers) | holdout: a part of the rejector split that is never
    # sent | in_sample: the current servers, which have trained on every sample sent before | crossfit:
    # each server also trains crossfit_folds copies, copy j on its buffer minus fold j; a sample is
    # labelled by the copy of its fold (K times the server compute; docs/methods.md §8).
    # Default in_sample, by measurement (README "Findings", docs/methods.md §8): the lowest L01 cost on
    # digits and MNIST-1D (5 seeds, paired); the out-of-sample options pay more in halved data (holdout)
    # or stale labels (prequential) than the bias costs, and none ranks samples better at a fixed defer rate.
    server_labels: ServerLabels = ServerLabels.in_sample
    holdout: float = 0.5  # server_labels=holdout: fraction of the rejector split never sent to a server
    label_max_age: Optional[int] = None  # prequential: labels older than this many rounds are dropped (null: kept)
    crossfit_folds: int = 3  # server_labels=crossfit: K, the folds (and fold copies of every server)

    WIRING: ClassVar[tuple[str, ...]] = ("config", "device", "server")
    """The keys that name the method's classes (left out by :func:`sim.checkpoint.comparable`)."""

    def __post_init__(self) -> None:
        from sim.core.schemas import dotted

        own = dotted(type(self))
        if self.config == MISSING:  # built in Python rather than composed: it is this class
            self.config = own
        need(self.config == own, "strategy.config", self.config,
             f"it names the method's config class, which is {own}: choose the method with strategy=<name>")
        for key in ("device", "server"):
            value = getattr(self, key)
            need(value == MISSING or "." in value, f"strategy.{key}", value,
                 "give the class's dotted path, package.module.ClassName")
        check_fields(self, "strategy", {
            "c_e": (lambda v: v >= 0, "the deferral cost must be >= 0"),
            "c_1": (lambda v: v >= 0, "the server-error cost must be >= 0"),
            "staleness": (lambda v: v >= 1, "S must be >= 1 (1 = synchronous)"),
            "holdout": (lambda v: 0 < v < 1, "must be in (0, 1)"),
            "label_max_age": (lambda v: v is None or v >= 1, "must be >= 1 round (or null: labels never expire)"),
            "crossfit_folds": (lambda v: 2 <= v <= 100, "K must be in 2 .. 100 (each fold is a copy of every server)"),
        })

    def check_with(self, servers: "ServersConfig") -> None:
        """Checks that involve the ``servers`` config (a method that adds some calls this one too).

        Raises:
            ConfigError: ``server_labels=crossfit`` with jointly trained servers (``mel``, ``dml``,
                ``coop``): a fold copy would have to be a copy of the whole jointly trained pool.
        """
        if self.server_labels == ServerLabels.crossfit and servers.training != Training.independent:
            raise ConfigError(f"strategy.server_labels=crossfit needs servers.training=independent, not "
                              f"{servers.training.value}: jointly trained servers have no per-server fold copies")

    def inert_keys(self) -> list[str]:
        """Keys that have no effect with this config (left out of the run's recorded config, so runs
        that differ only in them are one configuration): ``crossfit_folds`` unless ``crossfit``."""
        return [] if self.server_labels == ServerLabels.crossfit else ["crossfit_folds"]

    def check_data(self, num_classes: int) -> None:
        """Checks that need the dataset's number of classes K (run once the data is prepared)."""

    def notes(self) -> list[str]:
        """Warnings about a valid but risky choice, shown once at the start of a run."""
        return []


@dataclass
class BoundedConfig(StrategyConfig):
    """A method whose deferrals can be capped (L2H scenario 3: bounded reject rate)."""

    max_defer_rate: Optional[float] = None  # defer at most this fraction (null: no bound)
    bound: Bound = Bound.quantile  # quantile (threshold fitted on a calibration split) | stochastic (post-hoc thinning)
    calibration: float = 0.25  # fraction of the rejector split held out to fit the bound

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self.max_defer_rate is None or 0 <= self.max_defer_rate <= 1, "strategy.max_defer_rate",
             self.max_defer_rate, "delta must be in [0, 1] (or null: no bound)")
        need(0 < self.calibration < 1, "strategy.calibration", self.calibration, "must be in (0, 1)")


# ---- servers ----------------------------------------------------------------------------------
@dataclass
class ResourcesConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class MELConfig:
    standalone_weight: float = 1.0  # lambda_s of each server's own head (docs/methods.md, MEL)
    combiner_weight: float = 1.0  # lambda_A of each combiner head (equal weights: the authors' best)

    def __post_init__(self) -> None:
        check_fields(self, "servers.mel", {"standalone_weight": _at_least(0), "combiner_weight": _at_least(0)})


@dataclass
class CoopConfig:
    """Cooperative learning (arXiv 2312.08532): Teammates' multi-exit networks and serving depth."""

    depth: int = 4  # hidden blocks of each server's MLP, one exit after each (depth fractions 1/D ... 1)
    temperature: float = 3.0  # distillation temperature of the sub-network term (not given in the paper)
    serve_depth: float = 1.0  # cost pressure: Teammates answer at most at this depth fraction
    capacity: Optional[float] = None  # full-depth answers per Teammate per round; above it the depth drops

    def __post_init__(self) -> None:
        # checked whatever servers.training is, so a bad value is caught before someone switches to coop
        check_fields(self, "servers.coop", {
            "depth": (lambda v: 1 <= v <= 16, "must be 1 to 16 blocks"),
            "temperature": _positive(),
            "serve_depth": (lambda v: 0 < v <= 1, "must be a depth fraction in (0, 1]"),
            "capacity": (lambda v: v is None or v > 0, "must be > 0 answers per round (null: unlimited)"),
        })


@dataclass
class ServersConfig:
    name: str = MISSING
    count: int = 1  # S helper servers, each a Ray actor
    routing: Routing = Routing.auto  # auto (mel: all, else learned) | learned | round_robin | least_loaded | all
    training: Training = Training.independent  # independent | mel | dml | coop
    c_e: Optional[List[float]] = None  # per-server deferral price (null: strategy.c_e for every server)
    mel: MELConfig = field(default_factory=MELConfig)
    coop: CoopConfig = field(default_factory=CoopConfig)
    arch: Arch = Arch.mlp
    hidden: int = 128
    # per-server width (a tiered pool: e.g. [16, 256], a small edge server beside a large cloud one);
    # null: servers.hidden for every server
    widths: Optional[List[int]] = None
    # per-server classes it knows (a specialist or partial server: it learns only from deferred samples
    # of those classes and answers only with them), e.g. [[0,1,2,3,4,5]] or [[0,1,2,3,4],[5,6,7,8,9]];
    # null (or a null entry): every class
    known_classes: Optional[List[Optional[List[int]]]] = None
    buffer_size: int = 5000  # bounded replay buffer of deferred samples, per server
    epochs: int = 20  # passes over the buffer per round
    batch_size: int = 64
    lr: float = 0.001
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(num_cpus=0.0))

    def __post_init__(self) -> None:
        need(1 <= self.count <= 8, "servers.count", self.count,
             "need 1 to 8 helper servers (MEL has 2^S - S - 1 combiner heads)")
        if self.c_e is not None:
            if len(self.c_e) != self.count:
                raise ConfigError(f"servers.c_e has {len(self.c_e)} prices for {self.count} servers: give one per "
                                  "server, e.g. servers.c_e=[0.1,0.2], or null to use strategy.c_e")
            if any(v < 0 for v in self.c_e):
                raise ConfigError(f"servers.c_e={list(self.c_e)} is invalid: deferral prices must be >= 0")
        self._check_tiers()
        if self.training == Training.coop:
            need(self.count >= 2, "servers.count", self.count, "cooperative learning needs a Leader and at least "
                                                               "one Teammate (3: the paper's two Teammates)")
            need(self.arch == Arch.mlp, "servers.arch", self.arch,
                 "cooperative learning builds multi-exit MLPs: use servers.arch=mlp")
        check_fields(self.resources, "servers.resources", {"num_cpus": _at_least(0), "num_gpus": _at_least(0)})
        check_fields(self, "servers", {"hidden": _width(), "buffer_size": _at_least(1), "epochs": _at_least(1),
                                       "batch_size": _at_least(1), "lr": _positive()})

    def _check_tiers(self) -> None:
        """``widths`` and ``known_classes``: one entry per server, sane values, and specialists only
        where each server learns alone."""
        if self.widths is not None:
            if len(self.widths) != self.count:
                raise ConfigError(f"servers.widths has {len(self.widths)} widths for {self.count} servers: give one per "
                                  "server, e.g. servers.widths=[16,256], or null to use servers.hidden")
            need(all(w >= 1 for w in self.widths), "servers.widths", list(self.widths), "every width must be >= 1")
            need(self.training != Training.coop, "servers.widths", list(self.widths),
                 "cooperative learning's Teammates share one multi-exit shape: use servers.hidden")
        if self.known_classes is None:
            return
        if len(self.known_classes) != self.count:
            raise ConfigError(f"servers.known_classes has {len(self.known_classes)} entries for {self.count} servers: "
                              "give one list (or null: every class) per server, e.g. servers.known_classes=[[0,1,2],null]")
        for s, known in enumerate(self.known_classes):
            if known is not None and (not known or any(c < 0 for c in known) or len(set(known)) != len(known)):
                raise ConfigError(f"servers.known_classes[{s}]={list(known)} is invalid: give distinct class indices "
                                  ">= 0 (at least one), or null for every class")
        if any(k is not None for k in self.known_classes):
            need(self.training == Training.independent, "servers.training", self.training,
                 "servers.known_classes needs servers.training=independent (a specialist learns alone from its "
                 "classes; MEL, DML and coop train every server on one shared buffer)")

    def width(self, server: int) -> int:
        """The hidden width (MLP units / CNN channels) of server ``server``."""
        return self.widths[server] if self.widths is not None else self.hidden

    def known(self, server: int) -> list[int] | None:
        """The classes server ``server`` knows, sorted (None: every class)."""
        if self.known_classes is None or self.known_classes[server] is None:
            return None
        return sorted(self.known_classes[server])

    def check_data(self, num_classes: int) -> None:
        """``known_classes`` against the dataset's K classes (run once the data is prepared).

        Raises:
            ConfigError: a class index >= K.
        """
        for s in range(self.count):
            known = self.known(s)
            if known is not None and known[-1] >= num_classes:
                raise ConfigError(f"servers.known_classes[{s}] names class {known[-1]}, but the data has {num_classes} "
                                  f"classes (0..{num_classes - 1})")

    @property
    def resolved_routing(self) -> Routing:
        """``routing`` with ``auto`` resolved: MEL servers answer as an ensemble (``all``, so the
        combiner heads serve), every other pool routes by the learned rejector (``learned``)."""
        if self.routing != Routing.auto:
            return self.routing
        return Routing.all if self.training == Training.mel else Routing.learned

    @property
    def learned_options(self) -> bool:
        """Whether a rejector has one defer output per server (learned routing over > 1 servers)."""
        return self.resolved_routing == Routing.learned and self.count > 1

    def prices(self, c_e: float) -> list[float]:
        """Per-server deferral price: ``servers.c_e`` when set, else ``c_e`` (``strategy.c_e``) for
        every server. The only place prices are resolved: the ServerApp calls it once per run for
        the pool, each :class:`strategies.method.DeviceMethod` once as ``self.prices``."""
        return list(self.c_e) if self.c_e is not None else [c_e] * self.count


# ---- sim --------------------------------------------------------------------------------------
@dataclass
class SimConfig:
    num_rounds: int = 10
    backend: Backend = Backend.ray  # ray: Flower simulation engine on Ray | inprocess: same apps, called in-process
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    eval_every: int = 1  # evaluate every k rounds (the last round is always evaluated)
    devices_per_node: Optional[int] = None  # devices one Flower node simulates (null: ceil(N / max_nodes))
    max_nodes: int = 10  # with devices_per_node=null: at most this many Flower nodes
    ray_address: Optional[str] = None  # None: start a local Ray; "auto" or "host:port": join
    shared_ray_session: bool = True  # a sweep (-m) starts Ray once for all its jobs (sim/sweep.py)
    sweep_parallel: int = 1  # a sweep (-m) runs this many jobs at once (Hydra's joblib launcher; sim/sweep.py)
    client_resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    num_cpus: Optional[int] = None  # CPUs a local Ray may use (None: all)
    torch_threads: int = 1
    verbose: bool = False
    progress: bool = True
    plots: bool = True
    tensorboard: bool = False  # per-round scalars in <run dir>/tensorboard (tensorboard --logdir <run dir>)
    mlflow: bool = False  # params, per-round metrics, figures in the local MLflow store sim.mlflow_dir (sim/tracking.py)
    mlflow_dir: str = "mlruns"  # the MLflow store (SQLite database and artifacts), shared by the runs started here
    cache_dir: str = "~/.cache/l2h-fleet-sim"
    round_timeout: float = 3600.0  # seconds to wait for device replies in a round
    checkpoint: bool = True  # write checkpoint.npz at the end of every round
    resume: Optional[str] = None  # a run directory to continue from its last finished round

    def __post_init__(self) -> None:
        inside = (lambda v: 0 < v <= 1, "must be in (0, 1]")
        check_fields(self, "sim", {
            "num_rounds": (lambda v: 1 <= v <= MAX_ROUNDS, f"need 1 to {MAX_ROUNDS} rounds"),
            "fraction_train": inside, "fraction_evaluate": inside,
            "eval_every": _at_least(1),
            "devices_per_node": (lambda v: v is None or v >= 1,
                                 "must be >= 1 or null (automatic: ceil(num_clients / sim.max_nodes))"),
            "max_nodes": _at_least(1), "torch_threads": _at_least(1),
            "round_timeout": (lambda v: v > 0, "must be > 0 seconds"),
            "num_cpus": (lambda v: v is None or v >= 1, "must be >= 1 or null"),
            "sweep_parallel": (lambda v: v >= 1, "must be >= 1 (jobs of a sweep run at once; 1: one after another)"),
        })
        check_fields(self.client_resources, "sim.client_resources",
                     {"num_cpus": _positive(), "num_gpus": _at_least(0)})


# ---- failures ---------------------------------------------------------------------------------
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


def _probability(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"{key}={value!r} is invalid: a probability must be in [0, 1]")


@dataclass
class FailuresConfig:
    name: FailureKind = MISSING  # none | crash_stop | crash_recover | transient | query_drop | partition | slow | device_dropout | random
    servers: List[int] = field(default_factory=list)  # servers that crash at failures.round
    round: int = 1
    recover_after: Optional[int] = None  # crash-recover: back after d rounds (null: crash-stop)
    recover_from: RecoverFrom = RecoverFrom.checkpoint  # checkpoint | scratch
    outage_p: float = 0.0  # transient: each server down for a whole round with probability p
    query_drop_q: float = 0.0  # each query to each server lost with probability q
    query_timeout_s: float = 1.0  # a server answering later than this counts as down
    partition: PartitionFaultConfig = field(default_factory=PartitionFaultConfig)
    slow: SlowFaultConfig = field(default_factory=SlowFaultConfig)
    dropout: DropoutFaultConfig = field(default_factory=DropoutFaultConfig)
    random: RandomFaultConfig = field(default_factory=RandomFaultConfig)
    reference: bool = True  # also run the same seed with no failures, for resilience.fraction_kept

    def __post_init__(self) -> None:
        if self.recover_after is not None and self.recover_after < 1:
            raise ConfigError(f"failures.recover_after={self.recover_after} is invalid: must be >= 1 round (or null)")
        _probability("failures.outage_p", self.outage_p)
        _probability("failures.query_drop_q", self.query_drop_q)
        _probability("failures.dropout.fraction", self.dropout.fraction)
        for k in ("crash_p", "recover_p", "outage_p", "slow_p", "partition_p", "dropout_p", "query_drop_q"):
            _probability(f"failures.random.{k}", getattr(self.random, k))
        if self.random.max_down < 1:
            raise ConfigError(f"failures.random.max_down={self.random.max_down} is invalid: must be >= 1")
        if not self.query_timeout_s > 0:
            raise ConfigError(f"failures.query_timeout_s={self.query_timeout_s} is invalid: must be > 0 seconds")
        if self.slow.delay_s < 0:
            raise ConfigError(f"failures.slow.delay_s={self.slow.delay_s} is invalid: must be >= 0 seconds")
        for part in ("partition", "slow", "dropout"):
            start, end = getattr(self, part).start, getattr(self, part).end
            if start < 1 or (end is not None and end < start):
                raise ConfigError(f"failures.{part}.start/end = {start}/{end} is invalid: need 1 <= start <= end")

    def none(self) -> "FailuresConfig":
        """This config with every fault switched off and no reference run (the all-up reference)."""
        return FailuresConfig(name=FailureKind.none, query_timeout_s=self.query_timeout_s, reference=False)


# ---- the whole run ----------------------------------------------------------------------------
@dataclass
class Config:
    seed: int = 0
    data: DataConfig = MISSING
    fleet: FleetConfig = MISSING
    strategy: StrategyConfig = MISSING
    servers: ServersConfig = MISSING
    sim: SimConfig = MISSING
    failures: FailuresConfig = MISSING

    def __post_init__(self) -> None:
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed", self.seed,
             "must be an integer in 0 .. 2^63 - 1")
        check_all_finite(self)
        self.strategy.check_with(self.servers)
        check_failure_targets(self)
        check_legacy_split(self)
        check_learning(self)


def check_legacy_split(cfg: Config) -> None:
    """``fleet.legacy`` against ``data.split.legacy``: a per-device legacy model needs a legacy split
    of the device's data; a product line's model trains on the vendor pool, so a legacy split would
    be data no one uses.

    Raises:
        ConfigError: one line naming both keys and the fix.
    """
    legacy = cfg.data.split.legacy
    if cfg.fleet.legacy == LegacySource.per_device and legacy <= 0:
        raise ConfigError("fleet.legacy=per_device trains each device's model on its own legacy split, but "
                          "data.split.legacy=0: give it one, e.g. data.split.legacy=0.4 data.split.rejector=0.4 "
                          "data.split.test=0.2")
    if cfg.fleet.legacy == LegacySource.product_line and legacy > 0:
        raise ConfigError(f"data.split.legacy={legacy:g} gives each device a legacy split that fleet.legacy="
                          "product_line never uses (its models train on the vendor pool, data.vendor_samples): "
                          "set data.split.legacy=0 with rejector + test = 1, or fleet.legacy=per_device")


def check_failure_targets(cfg: Config) -> None:
    """The failures config against the fleet: servers, devices and rounds named must exist.

    Raises:
        ConfigError: one line naming the key and the valid range.
    """
    f = cfg.failures
    num_servers, num_clients, num_rounds = cfg.servers.count, cfg.fleet.num_clients, cfg.sim.num_rounds

    def servers_ok(key: str, servers: list[int]) -> None:
        once(key, servers, "server")
        bad = [s for s in servers if not 0 <= s < num_servers]
        if bad:
            raise ConfigError(f"{key} names server {bad[0]}, but servers.count={num_servers} (servers 0.."
                              f"{num_servers - 1}): fix {key} or raise servers.count")

    def devices_ok(key: str, devices: list[int]) -> None:
        once(key, devices, "device")
        bad = [d for d in devices if not 0 <= d < num_clients]
        if bad:
            raise ConfigError(f"{key} names device {bad[0]}, but fleet.num_clients={num_clients} (devices 0.."
                              f"{num_clients - 1})")

    servers_ok("failures.servers", f.servers)
    servers_ok("failures.partition.servers", f.partition.servers)
    servers_ok("failures.slow.servers", f.slow.servers)
    devices_ok("failures.partition.devices", f.partition.devices)
    devices_ok("failures.dropout.devices", f.dropout.devices)
    if f.round < 1 or (f.servers and f.round > num_rounds):
        raise ConfigError(f"failures.round={f.round} is invalid: the crash round must be in 1..{num_rounds} "
                          "(sim.num_rounds)")


def once(key: str, values: list[int], what: str) -> None:
    """Refuse a list that names one ``what`` twice (``failures.servers=[0,0]``: a second crash of a dead server).

    Raises:
        ConfigError: one line naming the key.
    """
    twice = sorted({v for v in values if list(values).count(v) > 1})
    if twice:
        raise ConfigError(f"{key}={list(values)} names {what} {twice[0]} twice: list each {what} once")


MAX_LR = 1.0
"""Largest learning rate a run accepts. Every network here trains with Adam, whose step moves each
weight by about ``lr`` whatever the gradient's scale (Kingma & Ba 2015, §2.1: the step is bounded by
lr); the weights start at about 1/sqrt(fan-in) <= 1 and the inputs lie in [0, 1], so with lr > 1 each
step moves every weight by more than its own size and training cannot settle (without this bound,
``servers.lr=1e10`` runs to the end without a word)."""


def check_learning(cfg: "Config") -> None:
    """Checks that need more than one section, or that apply to every learning rate: each ``lr`` /
    ``*_lr`` at most :data:`MAX_LR`; MEL with a loss that is not all zero; MEL and DML with at least two
    servers (one has no ensemble or peer).

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    for key, value in _learning_rates(cfg):
        need(value <= MAX_LR, key, value, f"a learning rate must be at most {MAX_LR:g} (Adam moves every weight "
                                          "by about lr per step)")
    sv = cfg.servers
    if sv.training == Training.mel and sv.mel.standalone_weight == 0 and sv.mel.combiner_weight == 0:
        raise ConfigError("servers.mel.standalone_weight and servers.mel.combiner_weight are both 0: the MEL loss "
                          "would be zero and the servers would never learn; give one of them a positive weight")
    if sv.training in (Training.mel, Training.dml):
        need(sv.count >= 2, "servers.count", sv.count, f"servers.training={sv.training.value} needs at least 2 "
             "servers (one has no ensemble or peer to learn with): raise servers.count, or use "
             "servers.training=independent")


def _learning_rates(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every ``lr`` / ``*_lr`` field of a config dataclass and its parts (``fleet.groups.0.lr``, ...)."""
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _learning_rates(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    out += _learning_rates(item, f"{key}.{i}.")
        elif (f.name == "lr" or f.name.endswith("_lr")) and isinstance(value, (int, float)):
            out.append((key, float(value)))
    return out


def register() -> None:
    """Register the schema as ``base_config`` (used by configs/config.yaml's defaults) and the
    ``schema`` group the strategy YAMLs name their config classes in (:mod:`sim.core.schemas`)."""
    from hydra.core.config_store import ConfigStore

    from sim.core.schemas import install

    ConfigStore.instance().store(name="base_config", node=Config)
    install()


# ---- conversions ------------------------------------------------------------------------------
def to_config(node: Any) -> Config:
    """The composed config (a DictConfig) as :class:`Config` dataclasses, every check run.

    Raises:
        ConfigError: a value out of range (one line), or a key that is not in the schema (``+foo=1``).
    """
    from omegaconf import OmegaConf

    extra = unknown_keys(node)
    if extra:
        raise ConfigError(f"{extra[0]} is not a config key (a typo, or a '+' override of a key that does not "
                          "exist): remove it; `python -m sim.run --cfg job` lists the keys")
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that are not fields of its dataclass (added with ``+key=value``)."""
    from omegaconf import DictConfig, OmegaConf

    t = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else None
    out = []
    for k in node.keys():
        if names is not None and k not in names:
            out.append(f"{prefix}{k}")
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out += unknown_keys(child, f"{prefix}{k}.")
    return out


def plain(obj: Any) -> Any:
    """A config dataclass (or any part of one) as plain JSON-able values: enums as strings."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass of type ``cls`` from :func:`plain`'s output (checks run).

    ``cls`` may be :class:`Config` (the strategy part's class is the one its ``config`` key names)
    or any part, e.g. :class:`ServersConfig` or a method's config class.

    Raises:
        ConfigError: a value out of range, or a strategy ``config`` that is missing (a config recorded
            before methods named their classes) or does not resolve.
    """
    from omegaconf import OmegaConf

    from sim.core.schemas import resolve

    node = OmegaConf.structured(cls)
    if cls is Config:
        path = (data.get("strategy") or {}).get("config")
        if path is None:
            raise ConfigError("strategy.config is missing: the config does not name its method's config class")
        node.strategy = OmegaConf.structured(resolve(path, "strategy.config", StrategyConfig))
    return OmegaConf.to_object(OmegaConf.merge(node, data))


def replace(cfg: Any, **parts: Any) -> Any:
    """A copy of the config dataclass ``cfg`` with some fields replaced
    (``replace(cfg, failures=...)``); its checks run again."""
    return dataclasses.replace(cfg, **parts)

