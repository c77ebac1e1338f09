"""Classes the configs name by dotted path (``package.module.Name``), resolved when they are needed.

A method is one class and one YAML (docs/adding.md): ``configs/strategy/<name>.yaml`` names its
config class in its defaults list (``- /schema@_here_: strategies.config.L2HConfig``) and its device
and server classes in ``strategy.device`` / ``strategy.server``. Nothing lists the methods:

- the config class is imported when Hydra composes a config that names it -- the ``schema``
  group of Hydra's ConfigStore looks each name up as a dotted path (:class:`SchemaGroup`) -- so a
  config error is found without importing torch or any method's code;
- the device and server classes are imported (:func:`resolve`) only where a run starts
  (``sim.server_app.method_classes``, before any data is made) and in the ClientApp's workers.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from sim.core.errors import ConfigError

SCHEMA_GROUP = "schema"
"""The ConfigStore group whose entries are config classes named by dotted path."""


def resolve(path: str, key: str, base: type | None = None) -> Any:
    """The object at the dotted ``path`` (``strategies.l2h.L2HMethod``), its module imported now.

    Args:
        key: the config key that names it (for the message). base: a class it must subclass (None:
            anything).

    Raises:
        ConfigError: one line naming ``key``: no such module or attribute (an error raised while
            importing the module is chained), or not a subclass of ``base``.
    """
    module, _, name = str(path).rpartition(".")
    if not module or not name:
        raise ConfigError(f"{key}={path!r} is invalid: give a dotted path, package.module.ClassName")
    try:
        obj = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module.startswith(exc.name):
            raise  # the module exists, one of its own imports is missing: not a config error
        raise ConfigError(f"{key}={path} is invalid: there is no module {module}") from None
    except AttributeError:
        raise ConfigError(f"{key}={path} is invalid: module {module} has no {name}") from None
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{key}={path} is invalid: it is not a {base.__name__} subclass")
    return obj


def dotted(cls: type) -> str:
    """``cls``'s dotted path (:func:`resolve` of it gives ``cls`` back)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class SchemaGroup(dict):
    """Hydra's ConfigStore group :data:`SCHEMA_GROUP`, whose entries are config dataclasses named by
    dotted path: the first lookup of ``<dotted path>.yaml`` imports the class and stores it, with its
    ``config`` field set to that path (so a composed config records its own class).

    Hydra looks a config up by ``name in group`` and then ``group[name]`` (hydra-core 1.3's
    ``ConfigStore._open``); a name that does not import is "not found" (Hydra's own one-line error).
    """

    def __contains__(self, name: object) -> bool:
        if dict.__contains__(self, name):
            return True
        if not isinstance(name, str) or not name.endswith(".yaml"):
            return False
        try:
            cls = resolve(name[: -len(".yaml")], "schema")
        except ConfigError:
            return False
        from hydra.core.config_store import ConfigNode
        from omegaconf import OmegaConf

        node = OmegaConf.structured(cls)
        if "config" in {f.name for f in dataclasses.fields(cls)}:
            node.config = dotted(cls)
        self[name] = ConfigNode(name=name, node=node, group=SCHEMA_GROUP, package=None, provider="l2h-fleet-sim")
        return True


def install() -> None:
    """Put :class:`SchemaGroup` in Hydra's ConfigStore (idempotent; entries stored before are kept)."""
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    if not isinstance(repo.get(SCHEMA_GROUP), SchemaGroup):
        repo[SCHEMA_GROUP] = SchemaGroup(repo.get(SCHEMA_GROUP) or {})
