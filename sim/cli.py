"""Command-line config checks: every config error becomes one line and a non-zero exit.

Before Hydra starts any job, :func:`precheck` composes the config of every job the command line
would run -- in a multirun (``-m``) the jobs Hydra's basic sweeper makes: the cartesian product
of the command-line sweeps and the ``hydra.sweeper.params`` of the composed config (an
experiment preset's), the command line winning for a key both set -- honouring
``--config-name``, ``--config-dir`` and ``--config-path``, and runs the schema's value checks,
so a bad combination in the last job of a sweep fails before the first job runs. Hydra itself
only composes each job (no value checks) and only as its batch starts. A sweep of more than
:data:`MAX_CHECKED` jobs is checked on a sample that covers every swept value (said on stderr).
Hydra's multi-line composition errors are condensed into one line.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from sim.core.config import Config, register, to_config
from sim.core.errors import ConfigError
from sim.core.stop import STOP

CONFIG_MODULE = "configs"
CONFIG_NAME = "config"
MAX_CHECKED = 100
"""Most jobs :func:`precheck` composes (about 0.1 s each); a larger sweep is sampled (:func:`sample_jobs`)."""
LAST_CHECK: dict[str, int] = {}
"""What the last :func:`precheck` found: ``jobs``, the number of jobs the command line runs (for
the sweep's ``job k/N`` line, :mod:`sim.progress`)."""
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
    if msg.endswith(":") and len(lines) > 1:  # Hydra's "... raised while composing config:" says why below
        msg = f"{msg} {lines[1]}"
        key = next((ln.split(":", 1)[1].strip() for ln in lines[2:] if ln.startswith("full_key:")), None)
        if key:
            msg = f"{msg} ({key})"
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


@dataclass
class CommandLine:
    """What a Hydra command line asks for (see :func:`parse_command_line`)."""

    overrides: list[str] = field(default_factory=list)
    """The task's overrides (``key=value``, ``+key=value``, ``~key``, group choices), in order."""
    hydra_overrides: list[str] = field(default_factory=list)
    """Overrides of Hydra's own config (``hydra.*``, ``hydra/...``)."""
    config_name: str = CONFIG_NAME
    config_dir: str | None = None
    config_path: str | None = None
    multirun: bool = False


def parse_command_line(argv: Iterable[str]) -> CommandLine:
    """Split ``python -m sim.run`` arguments into overrides and the flags that change composition
    (``-m``, ``-cn``/``--config-name``, ``-cd``/``--config-dir``, ``-cp``/``--config-path``; also
    ``--flag=value``). Other flags (``--cfg job``, ...) and their values are left out."""
    out = CommandLine()
    where = {"--config-name": "config_name", "-cn": "config_name", "--config-dir": "config_dir",
             "-cd": "config_dir", "--config-path": "config_path", "-cp": "config_path"}
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=") if a.startswith("-") else (a, "", "")
        if a in ("-m", "--multirun"):
            out.multirun = True
        elif flag in where:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            setattr(out, where[flag], value)
        elif a in FLAGS_WITH_VALUE:
            i += 1
        elif not a.startswith("-"):
            key = a.lstrip("+~")
            (out.hydra_overrides if key.startswith(("hydra.", "hydra/")) else out.overrides).append(a)
        i += 1
    return out


def _expand(overrides: list[str], sweeper_params: dict[str, Any] | None = None,
            config_loader: Any = None) -> list[list[str]]:
    """Every job of a multirun, as Hydra's basic sweeper makes them: the ``hydra.sweeper.params``
    (``key: "v1,v2"``) then the command-line ``overrides``; per key the last one wins (keeping the
    key's first position); the jobs are the cartesian product of each key's values, in that order.

    Raises:
        ConfigError: an override that does not parse, or a sweep the basic sweeper cannot run.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(overrides)
    try:
        parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(lines)
        final: dict[str, list[str]] = {}
        for ov in parsed:
            key = ov.get_key_element()
            if not ov.is_sweep_override():
                final[key] = [f"{key}={ov.get_value_element_as_str()}"]
            elif ov.is_discrete_sweep():
                final[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            else:
                raise ConfigError(f"{ov.input_line}: an interval sweep needs a sweeper plugin (e.g. Optuna); "
                                  "the basic sweeper takes choices (a,b,c) and range(start,stop,step)")
    except HydraException as exc:
        raise ConfigError(one_line(exc)) from None
    return [list(job) for job in itertools.product(*final.values())]


def sample_jobs(jobs: list[list[str]], cap: int) -> list[list[str]]:
    """``jobs`` if at most ``cap``; else a subset that has every value of every key at least once
    (each value swapped into the first job) filled up to ``cap`` with evenly spaced jobs, in order."""
    if len(jobs) <= cap:
        return jobs
    seen: set[str] = set()
    picked = {0}
    for i, job in enumerate(jobs):
        new = [o for o in job if o not in seen]
        if new:
            seen.update(new)
            picked.add(i)
    spare = max(0, cap - len(picked))
    if spare:
        step = len(jobs) / spare
        picked.update(min(len(jobs) - 1, math.floor(k * step)) for k in range(spare))
    return [jobs[i] for i in sorted(picked)]


@contextmanager
def _hydra(line: CommandLine | None = None) -> Iterator[Any]:
    """Hydra initialised for ``line``'s config path (default ``pkg://configs``; a relative ``--config-path``
    is relative to sim/, where sim.run's ``@hydra.main`` is, as Hydra resolves it); yields the config loader.

    Raises:
        ConfigError: ``--config-dir`` or ``--config-path`` is not a directory.
    """
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    path = line.config_path if line is not None and line.config_path else f"pkg://{CONFIG_MODULE}"
    if line is not None and line.config_dir and not os.path.isdir(line.config_dir):
        raise ConfigError(f"--config-dir {line.config_dir}: no such directory")
    if not path.startswith("pkg://"):
        path = path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
        if not os.path.isdir(path):
            raise ConfigError(f"--config-path {line.config_path if line else path}: no such directory")
    GlobalHydra.instance().clear()
    if line is not None and line.config_dir:
        _initialise_with_config_dir(path if path.startswith("pkg://") else f"file://{os.path.normpath(path)}",
                                    os.path.abspath(line.config_dir))
        init: Any = nullcontext()
    else:
        init = initialize_config_module(config_module=path[len("pkg://"):].replace("/", "."), version_base="1.3") \
            if path.startswith("pkg://") else initialize_config_dir(config_dir=os.path.normpath(path),
                                                                     version_base="1.3")
    try:
        with init:
            yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


def _initialise_with_config_dir(primary: str, config_dir: str) -> None:
    """Initialise Hydra's global state with the search path ``@hydra.main`` builds for ``--config-dir``:
    the primary config path, then ``config_dir`` before the structured configs, so a primary config that
    lives in ``config_dir`` is found (a ``hydra.searchpath`` override is applied only after the primary
    config is loaded, so it cannot do this).

    Hydra has no public API for it; this is what ``hydra._internal.utils._run_hydra`` does (hydra-core 1.3).

    Raises:
        ConfigError: this Hydra no longer has those internals (one line naming the tested version).
    """
    try:
        from hydra._internal.hydra import Hydra
        from hydra._internal.utils import create_config_search_path
        from hydra.core.config_search_path import SearchPathQuery

        search_path = create_config_search_path(primary)
        search_path.prepend(provider="command-line", path=f"file://{config_dir}",
                            anchor=SearchPathQuery(provider="schema"))
        Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
    except (ImportError, AttributeError, TypeError) as exc:  # pragma: no cover - only when Hydra changes
        import hydra

        raise ConfigError(f"--config-dir needs Hydra 1.3's internal search-path API, which hydra-core "
                          f"{hydra.__version__} lacks ({exc}); install hydra-core 1.3") from None


def _compose(overrides: list[str], config_name: str = CONFIG_NAME, hydra_config: bool = False) -> Any:
    """Compose with Hydra initialised (:func:`_hydra`); raises ConfigError (one line)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(one_line(exc)) from None
    check_bools(cfg, overrides)
    return cfg


def check_bools(cfg: Any, overrides: list[str]) -> None:
    """Refuse an override that gives a boolean key anything but ``true`` / ``false``: OmegaConf takes
    ``2``, ``-1`` or ``yes`` as true (``sim.plots=2`` ran without a word), so a typo (``sim.plots=20``
    for ``sim.rounds=20``) or a number meant for another key would pass silently.

    Raises:
        ConfigError: one line naming the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from omegaconf.nodes import BooleanNode

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return  # compose accepted them; nothing more to say here
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_delete() or ov.is_sweep_override() or key.startswith("hydra"):
            continue
        head, _, last = key.rpartition(".")
        try:
            parent = OmegaConf.select(cfg, head) if head else cfg
            node = parent._get_node(int(last) if isinstance(parent, ListConfig) else last) \
                if isinstance(parent, (DictConfig, ListConfig)) else None
        except (ValueError, KeyError, TypeError, AttributeError, OmegaConfBaseException):
            continue
        if isinstance(node, BooleanNode) and not isinstance(ov.value(), bool):
            raise ConfigError(f"{key}={ov.get_value_element_as_str()} is invalid: must be true or false")


def _checked(cfg: Any) -> Config:
    """The typed config of a composed one; raises ConfigError (one line)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    strategy = cfg.get("strategy")
    if OmegaConf.is_dict(strategy) and strategy._get_node("config") is not None \
            and OmegaConf.is_missing(strategy, "config"):
        raise ConfigError(f"strategy={strategy.get('name', '?')} names no config class: its YAML's defaults "
                          "list needs '- /schema@_here_: <dotted path>', e.g. strategies.config.L2HConfig "
                          "(docs/adding.md)")
    try:
        return to_config(cfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(one_line(exc)) from None


def compose_checked(overrides: list[str], line: CommandLine | None = None) -> Config:
    """Compose the config for ``overrides`` and check its values; returns the typed config.

    Args:
        overrides: Hydra overrides (``key=value``). line: the command line's ``--config-name``,
            ``--config-dir``, ``--config-path`` and ``hydra.*`` overrides (None: the defaults).

    Raises:
        ConfigError: one line, for any composition, type or range error.
    """
    with _hydra(line) as loader:
        extra = (line.hydra_overrides if line else [])
        cfg = _checked(_compose(extra + list(overrides), line.config_name if line else CONFIG_NAME))
        check_method_name(cfg.strategy.name, loader.get_group_options("strategy"))
        return cfg


def check_method_name(name: str, methods: list[str]) -> None:
    """Refuse a ``strategy.name`` that is no method's: the name picks nothing (``strategy=<name>``
    picks the method's YAML, which names its classes) but labels the run's results and seeds.

    Raises:
        ConfigError: one line listing the methods (``methods``: the ``strategy`` group's options).
    """
    if name not in methods:
        raise ConfigError(f"strategy.name={name} is invalid: no configs/strategy/{name}.yaml; choose the method "
                          f"with strategy=<name>, one of {', '.join(sorted(methods))}")


def sweep_jobs(line: CommandLine) -> list[list[str]]:
    """Every job's task overrides for ``line`` (one job without ``-m``), as Hydra would run them.

    Raises:
        ConfigError: the primary config does not compose, or the sweep cannot be expanded.
    """
    if not line.multirun:
        return [list(line.overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed = [o for o, p in zip(line.overrides, _parse(line.overrides, OverridesParser)) if not p.is_sweep_override()]
    with _hydra(line) as loader:
        primary = _compose(line.hydra_overrides + fixed, line.config_name, hydra_config=True)
        from omegaconf import OmegaConf

        params = OmegaConf.to_container(primary.hydra.sweeper.params, resolve=False) \
            if OmegaConf.select(primary, "hydra.sweeper.params") is not None else None
        return _expand(line.overrides, params, loader)


def _parse(overrides: list[str], parser_cls: Any) -> list[Any]:
    from hydra.errors import HydraException

    try:
        return parser_cls.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(one_line(exc)) from None


SWEEP_SETTINGS = ("sim.sweep_parallel",)
"""Keys that set up the sweep itself, so every job of a sweep must have the same value."""


def check_sweep_settings(jobs: list[list[str]]) -> None:
    """Refuse a sweep whose jobs differ in a :data:`SWEEP_SETTINGS` key.

    Raises:
        ConfigError: one line.
    """
    for key in SWEEP_SETTINGS:
        values = {next((o.split("=", 1)[1] for o in job if o.lstrip("+~").split("=", 1)[0] == key), "default")
                  for job in jobs}
        if len(values) > 1:
            raise ConfigError(f"{key} is one setting for the whole sweep, but its jobs would get "
                              f"{', '.join(sorted(values))}: give it one value")


def precheck(argv: list[str]) -> int:
    """Check every job a command line would run (see the module docstring).

    Returns:
        How many of the sweep's jobs run at once: ``sim.sweep_parallel`` with ``-m``, else 1.

    Raises:
        ConfigError: one line, for the first bad job (with ``sim.resume``: also a resume that does
            not fit the run directory, or a resume in a sweep; a sweep setting that differs between
            jobs, :func:`check_sweep_settings`; a tracker's missing package, :func:`sim.tracking.check_trackers`).

    A sweep that runs jobs at once and logs to MLflow has its store created here
    (:func:`sim.tracking.open_store`).
    """
    from sim.tracking import check_trackers

    line = parse_command_line(argv)
    jobs = sweep_jobs(line)
    LAST_CHECK["jobs"] = len(jobs)
    if line.multirun:
        check_sweep_settings(jobs)
    checked = sample_jobs(jobs, MAX_CHECKED)
    stores: set[str] = set()  # the MLflow stores the jobs log to
    if len(checked) < len(jobs):
        print(f"note: the sweep has {len(jobs)} jobs; checking {len(checked)} of them (every swept value at "
              "least once) before the first runs", file=sys.stderr)
    with _hydra(line) as loader:
        extra = line.hydra_overrides
        methods = loader.get_group_options("strategy")
        for job in checked:
            if STOP.is_set():  # a stop signal while checking (the runner holds it until here)
                raise KeyboardInterrupt
            cfg = _checked(_compose(extra + job, line.config_name))
            check_method_name(cfg.strategy.name, methods)
            check_trackers(cfg.sim)
            if cfg.sim.mlflow:
                stores.add(cfg.sim.mlflow_dir)
            if cfg.sim.resume:
                if len(jobs) > 1 or line.multirun:
                    raise ConfigError("sim.resume continues one run: give one run directory, without -m or sweeps")
                from sim.checkpoint import open_for_resume

                open_for_resume(cfg, Path(os.path.expanduser(cfg.sim.resume)))
    parallel = cfg.sim.sweep_parallel if line.multirun else 1
    if parallel > 1 and any(o.lstrip("+~").startswith("hydra/launcher=") for o in line.hydra_overrides):
        raise ConfigError(f"sim.sweep_parallel={parallel} runs the sweep on Hydra's joblib launcher: leave out "
                          "hydra/launcher=... (or set sim.sweep_parallel=1 to use the launcher you give)")
    if parallel > 1:  # jobs at once: their MLflow store made here, not by several jobs together
        from sim.tracking import open_store

        for store in sorted(stores):
            open_store(store)
    return parallel
