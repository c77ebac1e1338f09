"""What a Flower node needs to build a run's devices and method: :class:`DeviceSpec`.

The runner builds one per run (:func:`sim.pipeline.device_spec`); it crosses Flower's message as
JSON text in ``config.spec`` (:meth:`DeviceSpec.to_json`, once per run on the server side) and is
read back by the ClientApp (:meth:`DeviceSpec.from_json`, once per worker process and run).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.core.config import DeviceGroupConfig, ServersConfig, StrategyConfig, from_plain, plain


@dataclass(frozen=True)
class DeviceSpec:
    """The device-runtime spec every message of a run carries.

    Attributes:
        key: the run's identity (run directory and start time): a worker rebuilds its caches when it changes.
        data_path: the prepared dataset's cache entry (memory-mapped by each worker).
        fleet_path: the legacy fleet's cache entry (a ``per_device`` fleet's model files are in it).
        legacy_models: a ``product_line`` fleet's model files, in the order of
            :func:`clients.legacy.product_line_models` (empty for a ``per_device`` fleet).
        groups: per device, the index of its fleet group (``fleet.groups``).
        group_cfgs: the fleet's group configs.
        temperatures: per group, its temperature-scaling T (unitless, > 0).
        in_shape: the inputs' ``(C, H, W)``.
        num_classes: K.
        seed: the run seed.
        strategy: the method's config (its own :class:`StrategyConfig` subclass, named by ``strategy.config``).
        servers: the helper servers' config.
        torch_threads: torch threads per worker process (``sim.torch_threads``).
        devices_per_node: devices a Flower node hosts (:mod:`sim.core.nodes`).
    """

    key: str
    data_path: Path
    fleet_path: Path
    legacy_models: tuple[Path, ...]
    groups: tuple[int, ...]
    group_cfgs: tuple[DeviceGroupConfig, ...]
    temperatures: tuple[float, ...]
    in_shape: tuple[int, ...]
    num_classes: int
    seed: int
    strategy: StrategyConfig
    servers: ServersConfig
    torch_threads: int
    devices_per_node: int

    def to_json(self) -> str:
        """The spec as the JSON text a message carries (``config.spec``)."""
        return json.dumps({
            "key": self.key, "data_path": str(self.data_path), "fleet_path": str(self.fleet_path),
            "legacy_models": [str(p) for p in self.legacy_models], "groups": [int(g) for g in self.groups],
            "group_cfgs": [plain(g) for g in self.group_cfgs], "temperatures": [float(t) for t in self.temperatures],
            "in_shape": [int(v) for v in self.in_shape], "num_classes": int(self.num_classes), "seed": int(self.seed),
            "strategy": plain(self.strategy), "servers": plain(self.servers), "torch_threads": int(self.torch_threads),
            "devices_per_node": int(self.devices_per_node),
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        """The spec :meth:`to_json` wrote (the method's config class resolved from ``strategy.config``).

        Raises:
            ValueError: one line naming the first missing or unknown key (a ServerApp and ClientApp
                of different versions), or text that is not a JSON object.
        """
        from sim.core.schemas import resolve

        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"device spec: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if k not in data]
        if missing:
            raise ValueError(f"device spec: missing key {missing[0]!r} (the ServerApp and ClientApp disagree)")
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ValueError(f"device spec: unknown key {unknown[0]!r} (the ServerApp and ClientApp disagree)")
        strategy: dict[str, Any] = data["strategy"]
        return cls(
            key=str(data["key"]), data_path=Path(data["data_path"]), fleet_path=Path(data["fleet_path"]),
            legacy_models=tuple(Path(p) for p in data["legacy_models"]),
            groups=tuple(int(g) for g in data["groups"]),
            group_cfgs=tuple(from_plain(DeviceGroupConfig, g) for g in data["group_cfgs"]),
            temperatures=tuple(float(t) for t in data["temperatures"]),
            in_shape=tuple(int(v) for v in data["in_shape"]),
            num_classes=int(data["num_classes"]), seed=int(data["seed"]),
            strategy=from_plain(resolve(strategy["config"], "strategy.config"), strategy),
            servers=from_plain(ServersConfig, data["servers"]), torch_threads=int(data["torch_threads"]),
            devices_per_node=int(data["devices_per_node"]),
        )
