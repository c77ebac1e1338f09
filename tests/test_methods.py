"""A method is one class and one YAML (docs/adding.md): ``configs/strategy/<name>.yaml`` names its
config class (``- /schema@_here_: <dotted path>``) and its device and ServerApp classes
(``strategy.device`` / ``strategy.server``); the config class holds every default, the YAML only
overrides; every method has a golden case; a wrong class is one line naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.core.errors import ConfigError

STRATEGIES = Path(__file__).resolve().parent.parent / "configs" / "strategy"
NAMES = sorted(p.stem for p in STRATEGIES.glob("*.yaml"))
WIRING_KEYS = ("name", "config", "device", "server", "defaults")


def _leaves(node, prefix=""):
    """``{dotted key: value}`` for every leaf of a plain nested dict."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _strategy_part(name: str) -> dict:
    """What ``configs/strategy/<name>.yaml`` itself sets in ``strategy`` (its defaults list left out)."""
    raw = OmegaConf.to_container(OmegaConf.load(STRATEGIES / f"{name}.yaml"))
    header = (STRATEGIES / f"{name}.yaml").read_text()
    part = raw.get("strategy", {}) if "@package _global_" in header else raw
    return {k: v for k, v in part.items() if k not in WIRING_KEYS}


@pytest.mark.parametrize("name", NAMES)
def test_a_method_yaml_sets_no_knob_to_its_config_class_default(name):
    """The dataclass holds the defaults; a YAML that restates one (or sets it otherwise without
    saying so in the class) is how defaults drifted apart (issue 31: ``rejector.federation``)."""
    from sim.cli import compose_checked
    from sim.core.schemas import resolve

    cls = resolve(compose_checked([f"strategy={name}"]).strategy.config, "strategy.config")
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(cls)))
    restated = {k: v for k, v in _leaves(_strategy_part(name)).items() if k in defaults and defaults[k] == v}
    assert not restated, f"configs/strategy/{name}.yaml restates {cls.__name__}'s defaults: {restated}"
    unknown = [k for k in _leaves(_strategy_part(name)) if k not in defaults]
    assert not unknown, f"configs/strategy/{name}.yaml sets keys {cls.__name__} does not have: {unknown}"


@pytest.mark.parametrize("name", NAMES)
def test_every_method_yaml_names_classes_that_import(name):
    from sim.cli import compose_checked
    from sim.server_app import method_classes

    cfg = compose_checked([f"strategy={name}"])
    assert cfg.strategy.name == name
    device, server = method_classes(cfg.strategy)
    assert device.__name__ and server.__name__


def test_every_method_has_a_golden_case():
    """A method without a golden case could move without a test noticing (tests/golden)."""
    from sim.cli import compose_checked
    from tests.golden import BASE, CASES

    first = compose_checked([]).strategy.name  # configs/config.yaml's default
    chosen = set()
    for overrides in CASES.values():
        picks = [o.split("=", 1)[1] for o in BASE + overrides if o.startswith("strategy=")]
        chosen.add(picks[-1] if picks else first)
    assert set(NAMES) <= chosen, f"no golden case for strategy={sorted(set(NAMES) - chosen)} (tests/golden CASES)"


@pytest.mark.parametrize("overrides,key", [
    (["strategy=nope"], "strategy"),
    (["strategy.name=nope"], "strategy.name"),
    (["strategy.device=nonsense"], "strategy.device"),
    (["strategy.server=nonsense"], "strategy.server"),
    (["strategy.config=strategies.config.L2DConfig"], "strategy.config"),
])
def test_a_wrong_method_is_one_line_at_composition(overrides, key):
    from sim.cli import compose_checked

    with pytest.raises(ConfigError) as err:
        compose_checked(overrides)
    msg = str(err.value)
    assert "\n" not in msg and key in msg, msg


def test_a_method_yaml_that_names_no_config_class_is_one_line(tmp_path):
    from sim.cli import CommandLine, compose_checked

    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "bare.yaml").write_text(
        "name: bare\ndevice: strategies.baselines.RandomDeferral\nserver: strategies.l2h.L2HStrategy\n")
    with pytest.raises(ConfigError) as err:
        compose_checked(["strategy=bare"], CommandLine(config_dir=str(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg and "strategy=bare names no config class" in msg, msg


@pytest.mark.parametrize("override,key", [
    ("strategy.device=nosuchpackage.Method", "strategy.device"),
    ("strategy.device=strategies.l2h.NoSuchClass", "strategy.device"),
    ("strategy.device=strategies.l2h.L2HStrategy", "strategy.device"),  # a ServerApp class, not a device's
    ("strategy.server=strategies.l2h.L2HMethod", "strategy.server"),
])
def test_a_class_that_does_not_resolve_is_one_line_naming_its_key(override, key):
    """Resolved where a run starts (:func:`sim.pipeline.prepare_inputs`, before any data is made)."""
    from sim.cli import compose_checked
    from sim.server_app import method_classes

    with pytest.raises(ConfigError) as err:
        method_classes(compose_checked([override]).strategy)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(key), msg


def test_the_recorded_config_leaves_the_wiring_out():
    """``summary.json`` and the checkpoint record what the method computes with; its classes are
    named by ``strategy.name``'s YAML, not parameters of the run."""
    from sim.checkpoint import comparable
    from sim.cli import compose_checked

    recorded = comparable(compose_checked(["strategy=l2d"]))["strategy"]
    assert recorded["name"] == "l2d" and not {"config", "device", "server"} & recorded.keys()


def _toy_method():
    """A toy method, the way docs/adding.md adds one: this class and the YAML below, nothing else."""
    import numpy as np

    from strategies.baselines import Baseline

    class EveryOther(Baseline):
        """Defer every other sample of a split."""

        def rule(self, device, learner, split, rng):
            n = len(getattr(device.data, f"y_{split}"))
            defer = np.arange(n) % 2 == 0
            return defer, defer.astype(np.float32)

    return EveryOther


EveryOther = _toy_method()

TOY_YAML = f"""\
defaults:
  - /schema@_here_: strategies.config.BaselineConfig
  - _self_
name: every_other
device: {__name__}.EveryOther
server: strategies.l2h.L2HStrategy
"""


@pytest.mark.slow
def test_a_toy_method_is_one_class_and_one_yaml_and_runs_end_to_end(tmp_path, shared_cache):
    import json
    import os

    from rich.console import Console

    from sim.cli import CommandLine, compose_checked
    from sim.pipeline import simulate
    from tests.golden import BASE

    (tmp_path / "conf" / "strategy").mkdir(parents=True)
    (tmp_path / "conf" / "strategy" / "every_other.yaml").write_text(TOY_YAML)
    line = CommandLine(config_dir=str(tmp_path / "conf"))
    cfg = compose_checked(BASE + ["strategy=every_other", "sim.num_rounds=2", f"sim.cache_dir={shared_cache}"], line)
    with open(os.devnull, "w") as sink:
        simulate(cfg, tmp_path / "run", console=Console(file=sink))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["strategy"]["name"] == "every_other"
    assert 0.45 < summary["defer_rate"] < 0.55  # every other test sample, every server up


def test_a_sweep_over_a_name_that_is_no_method_is_refused_before_it_runs():
    """``python -m sim.run -m strategy.name=l2h,nope`` (the runner's precheck): one line."""
    from sim.cli import precheck

    with pytest.raises(ConfigError) as err:
        precheck(["-m", "strategy.name=l2h,nope"])
    assert "\n" not in str(err.value) and str(err.value).startswith("strategy.name=nope is invalid"), err.value
