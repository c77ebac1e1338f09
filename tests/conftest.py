import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory, worker_id):
    """One dataset/fleet cache for the tests that do not test caching, shared by every pytest-xdist
    worker of the run (each entry built once per suite, not once per worker). Two workers building the
    same entry at once is safe: entries are written aside and renamed into place (sim/core/cache.py;
    tests/test_robustness.py runs two jobs doing exactly that)."""
    if worker_id == "master":  # not under xdist
        return tmp_path_factory.mktemp("shared-cache")
    path = tmp_path_factory.getbasetemp().parent / "shared-cache"  # the run's root, the same for every worker
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


PER_DEVICE = {"fleet.legacy": "per_device", "data.split.legacy": 0.4, "data.split.rejector": 0.4,
              "data.split.test": 0.2}
"""Overrides of a fleet whose devices each train their own legacy model on a legacy split of their data."""


_COMPOSED: dict = {}
""":func:`small_cfg`'s configs composed so far, by overrides (and ``L2H_SIM_CACHE``, which the config
reads when it is composed): Hydra takes ~0.18 s of CPU to compose one, and tests ask for the same
configs again and again (tests/test_pool.py's random-schedule property test composed 24 per case, 85%
of its time; the file took 54.7 s of CPU before, 21.2 s after)."""


def small_cfg(**over):
    """A composed config (plain dict) for a small fleet, with overrides as Hydra strings.

    Each call returns a config of its own (a deep copy: a test may change it); one that is refused
    (:class:`sim.core.errors.ConfigError`) is composed, and refused, on every call."""
    import copy

    from sim.cli import compose_checked

    base = {"fleet.num_clients": 4, "sim.num_rounds": 2, "sim.progress": "false", "sim.plots": "false"}
    base.update(over)
    overrides = [f"{k}={v}" for k, v in base.items()]
    key = (tuple(overrides), os.environ.get("L2H_SIM_CACHE"))
    if key not in _COMPOSED:
        _COMPOSED[key] = compose_checked(overrides)
    return copy.deepcopy(_COMPOSED[key])


def prepare_for(cfg, cache_dir):
    """The prepared dataset of a composed config."""
    from sim.core.data import prepare

    return prepare(cfg.data, cfg.fleet.num_clients, cfg.seed, cache_dir, vendor=cfg.fleet.legacy == "product_line")


def fleet_for(cfg, prep, cache_dir):
    """The legacy fleet of a composed config."""
    from clients.legacy import build_fleet

    return build_fleet(cfg.fleet, cfg.data, prep, cfg.seed, cache_dir)


RAY_GROUP = "ray-in-process"
"""The pytest-xdist group of the tests that use :func:`ray_local` (``--dist loadgroup``, pyproject.toml):
they run one after another on one worker, so one Ray serves them all."""


@pytest.fixture
def ray_local():
    """A local Ray for the Ray cases that run in the test process: a run joins a Ray that is already
    up and leaves it up, as a sweep's jobs do (sim/sweep.py). The tests asking for it form one
    pytest-xdist group, so they run back to back on one worker and share one Ray, which is shut down
    after the last of them (:func:`pytest_runtest_teardown`): an idle local Ray keeps about 0.2 of a
    core busy on this machine (0.07-0.12 without its two prestarted workers, which these runs do not
    need), and kept up for the whole suite on both workers that was a fifth of the machine.
    ``address="local"`` never joins another job's cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _system_config={"prestart_worker_first_driver": False})
    yield


def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


def pytest_runtest_teardown(item, nextitem):
    """Shut :func:`ray_local`'s Ray down once the next test does not need it (or there is none)."""
    if "ray_local" in getattr(item, "fixturenames", ()) and (
            nextitem is None or "ray_local" not in getattr(nextitem, "fixturenames", ())):
        import ray

        ray.shutdown()
