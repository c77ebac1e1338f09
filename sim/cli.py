"""Command-line config checks: every config error becomes one line and a non-zero exit.

Before Hydra starts any job, :func:`precheck` composes the config for the command-line
overrides -- once per value of every swept key in a multirun -- and runs the schema's
value checks, so a bad value in the third job of a sweep fails before the first job runs.
Hydra's multi-line composition errors are condensed into one line.
"""
from __future__ import annotations

import os
from pathlib import Path

from typing import Iterable

from sim.core.config import Config, register, to_config
from sim.core.errors import ConfigError
from strategies.config import register_all

CONFIG_MODULE = "configs"
CONFIG_NAME = "config"
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


def one_line(exc: BaseException) -> str:
    """Condense a Hydra/OmegaConf exception into one readable line."""
    choice = _bad_choice(exc.__cause__ or exc)
    if choice:
        return choice
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Available options" in text:
        head = lines[0].replace("In 'config': ", "")
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        opts = []
        for ln in lines[idx + 1:]:
            if ln.startswith("Config search path"):
                break
            opts.append(ln)
        group = lines[idx].split("'")[1] if "'" in lines[idx] else "the group"
        return f"{head}; available options for {group}: {', '.join(opts)}"
    msg = lines[0] if lines else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        cause_lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        if cause_lines:
            msg = f"{msg}: {cause_lines[0]}"
    return msg


def _bad_choice(exc: BaseException) -> str | None:
    """OmegaConf's error for a value outside an enum, as ``key='value' is invalid: choose one of ...``."""
    import re

    m = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", str(exc))
    key = getattr(exc, "full_key", None)
    if not m or not key:
        return None
    return f"{key}={m.group(1)!r} is invalid: choose one of {m.group(2)}"


def user_overrides(argv: Iterable[str]) -> list[str]:
    """The key=value overrides of a Hydra command line (flags, their values and hydra.* dropped)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in FLAGS_WITH_VALUE:
            skip = True
            continue
        if a.startswith("-"):
            continue
        key = a.lstrip("+~")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        out.append(a)
    return out


def _expand(overrides: list[str]) -> list[list[str]]:
    """Override lists to check: the first value of every sweep, then each other swept value in turn."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    base, sweeps = [], []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            values = [f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()]
            if not values:
                continue
            base.append(values[0])
            sweeps.append((len(base) - 1, values[1:]))
        else:
            base.append(text)
    combos = [base]
    for pos, rest in sweeps:
        for v in rest:
            combos.append(base[:pos] + [v] + base[pos + 1:])
    return combos


def compose_checked(overrides: list[str]) -> Config:
    """Compose the config for ``overrides`` and check its values; returns the typed config.

    Raises:
        ConfigError: one line, for any composition, type or range error.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    register_all()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
        return to_config(cfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def precheck(argv: list[str]) -> None:
    """Check every job a command line would run; raises ConfigError (one line) on the first bad one."""
    from hydra.errors import HydraException

    overrides = user_overrides(argv)
    try:
        combos = _expand(overrides)
    except HydraException as exc:
        raise ConfigError(one_line(exc)) from None
    for combo in combos:
        cfg = compose_checked(combo)
        if cfg.sim.resume:
            if len(combos) > 1 or "-m" in argv or "--multirun" in argv:
                raise ConfigError("sim.resume continues one run: give one run directory, without -m or sweeps")
            from sim.checkpoint import open_for_resume

            open_for_resume(cfg, Path(os.path.expanduser(str(cfg.sim.resume))))
