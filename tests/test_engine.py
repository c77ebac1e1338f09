"""The engine's contract with Flower and Ray, checked against the installed versions.

Every module of the project imports; every Flower behaviour the engine relies on is still there
(each test fails loudly, naming what changed, when a Flower release moves it): device-worker
actor options reach Ray through ``client_resources``, the one patched Flower function
(``dispatch_on_push``) is version- and signature-guarded and does what it claims, and the
in-process grid builds messages without Flower's private ``TaskIdentity``. Ray's runtime
environment ships the project's packages to cluster workers (``py_modules``).
"""
import importlib
import os
import pkgutil
import queue
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sim", "strategies", "servers", "clients", "configs")


def project_modules():
    for name in PACKAGES:
        pkg = importlib.import_module(name)
        yield name
        for info in pkgutil.walk_packages(pkg.__path__, name + "."):
            yield info.name


def test_every_module_of_the_project_imports():
    names = list(project_modules())
    assert len(names) > 50 and "sim.flwr_app" in names and "sim.core.config" in names
    for name in names:
        importlib.import_module(name)  # an ImportError / AttributeError here names the module


def test_every_benchmark_script_imports(monkeypatch):
    """The scripts of benchmarks/ load (their module-level code runs): a config or API change that
    breaks one shows here, not when someone next measures."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 5
    for path in scripts:
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        assert callable(getattr(module, "main", None)), path.name


def test_the_installed_flower_is_in_the_pinned_range():
    import tomllib

    from sim import engine

    low, high = engine.FLOWER_TESTED
    assert low <= engine.flower_version() < high
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = f"flwr[simulation]>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    assert pin in deps, f"pyproject.toml must pin {pin} (the range FLOWER_TESTED guards)"


def test_worker_restart_options_reach_ray_through_client_resources(monkeypatch):
    """Flower hands every client_resources key to ClientAppActor.options(): that is how a device worker
    that dies gets restarted by Ray (no patch of Flower's actor pool)."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport import ray_actor

    from sim import engine
    from sim.core.config import ResourcesConfig

    resources = engine.worker_resources(ResourcesConfig(num_cpus=1, num_gpus=0))
    assert resources == {"num_cpus": 1.0, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 0}
    fake_self = types.SimpleNamespace(client_resources_key="client_resources")
    assert RayBackend._validate_client_resources(fake_self, {"client_resources": resources}) == resources
    seen = []

    class Actor:
        @staticmethod
        def options(**kw):
            seen.append(kw)
            return types.SimpleNamespace(remote=lambda **_: object())

    monkeypatch.setattr(ray_actor, "pool_size_from_resources", lambda _: 1)
    ray_actor.BasicActorPool(Actor, resources, {}).add_actors_to_pool(1)
    assert seen == [resources], "Flower no longer passes client_resources to the worker actor's .options()"


def test_the_dispatch_patch_refuses_an_untested_flower(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    from sim import engine

    engine.check_dispatch_patch()  # the installed Flower is the one the patch was written for
    for version in ((1, 40), (1, 43), (2, 0)):
        monkeypatch.setattr(engine, "flower_version", lambda v=version: v)
        with pytest.raises(engine.FlowerChanged, match=r"install flwr\[simulation\]>=1.41,<1.43"):
            engine.check_dispatch_patch()
    monkeypatch.undo()

    def changed(state, queue, nodes_mapping, f_stop, metrics):  # a new parameter upstream
        pass

    monkeypatch.setattr(vce_api, "add_messages_to_queue", changed)
    with pytest.raises(engine.FlowerChanged, match="changed vce_api.add_messages_to_queue"):
        engine.dispatch_on_push()
    monkeypatch.delattr(vce_api, "add_messages_to_queue")
    with pytest.raises(engine.FlowerChanged):
        engine.dispatch_on_push()


class FakeState:
    """A LinkState with one node's pending messages (``get_message_ins`` as Flower calls it)."""

    def __init__(self):
        self.pending, self.lock = [], threading.Lock()

    def get_message_ins(self, node_id, limit):
        with self.lock:
            out, self.pending = self.pending[:limit], self.pending[limit:]
        return out


def test_the_patched_dispatcher_hands_over_a_pushed_message_at_once():
    """Flower's loop waits up to 0.1 s after each scan; the patched one wakes when the grid pushes."""
    from flwr.server.superlink.fleet.vce import vce_api

    from sim import engine

    engine.dispatch_on_push()
    state, q, stop = FakeState(), queue.Queue(), threading.Event()
    th = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, {7: 0}, stop), daemon=True)
    th.start()
    latencies = []
    try:
        for i in range(5):
            time.sleep(0.03)  # the loop has scanned and waits
            with state.lock:
                state.pending.append(i)
            t0 = time.perf_counter()
            engine.DISPATCH.set()
            assert q.get(timeout=5) == i
            latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        engine.DISPATCH.set()
        th.join(timeout=5)
    assert min(latencies) < 0.05, latencies  # Flower's own loop: up to 0.1 s


def test_the_in_process_grid_needs_no_private_flower_state():
    """Messages are built with the public Message(content, metadata=Metadata(...)); Flower's private
    TaskIdentity is never set or read (a fresh process, where nothing else has set it)."""
    source = (ROOT / "sim" / "inprocess.py").read_text()
    assert "from flwr.supercore" not in source and "import flwr.supercore" not in source
    code = ("from flwr.app import RecordDict, MessageType\n"
            "from sim.inprocess import InProcessGrid, NODE_ID_OFFSET\n"
            "g = InProcessGrid(None, 2)\n"
            "m = g.create_message(RecordDict(), MessageType.TRAIN, NODE_ID_OFFSET + 1, 'r1')\n"
            "n = g.create_message(RecordDict(), MessageType.TRAIN, NODE_ID_OFFSET, 'r1')\n"
            "assert m.metadata.dst_node_id == NODE_ID_OFFSET + 1 and m.metadata.group_id == 'r1'\n"
            "assert m.metadata.message_id != n.metadata.message_id\n"
            "from flwr.supercore.task_identity import TaskIdentity\n"
            "try:\n    TaskIdentity.run_id\nexcept RuntimeError:\n    print('unset')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "unset", r.stderr[-2000:]


def test_a_local_ray_gets_the_drivers_path_and_a_cluster_gets_the_packages():
    from sim import engine

    local = engine.runtime_env(None)
    assert "py_modules" not in local and str(ROOT) in local["env_vars"]["PYTHONPATH"].split(os.pathsep)
    cluster = engine.runtime_env("10.0.0.5:6379")
    assert "PYTHONPATH" not in cluster["env_vars"] and cluster["env_vars"]["FLWR_TELEMETRY_ENABLED"] == "0"
    assert [Path(p).name for p in cluster["py_modules"]] == list(engine.PROJECT_PACKAGES)
    assert all((Path(p) / "__init__.py").is_file() for p in cluster["py_modules"])


def test_a_local_ray_inherits_the_workers_environment_instead_of_a_runtime_env(monkeypatch):
    """A local Ray's processes are the driver's children: the variables are in os.environ while
    ray.init starts them (no runtime_env, which would keep actors off Ray's prestarted workers) and
    os.environ is as it was afterwards. Joining a cluster still passes the runtime_env."""
    import ray

    from sim import engine

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append((dict(os.environ), kw)))
    monkeypatch.setattr(engine, "_STARTED", [])
    monkeypatch.setattr(engine, "check_reachable", lambda address: None)
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/before")
    before = dict(os.environ)
    assert engine.start_ray(None, 1, False)
    env, kwargs = seen[-1]
    assert "runtime_env" not in kwargs and kwargs["address"] == "local"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert dict(os.environ) == before
    assert engine.start_ray("10.0.0.5:6379", None, False)
    assert seen[-1][1]["runtime_env"] == engine.runtime_env("10.0.0.5:6379") and dict(os.environ) == before


SHIPPED = """
import ray
from sim import engine

def where():
    import servers
    import sim.core.config  # noqa: F401 -- the shipped sim package is complete

    return servers.__file__

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         runtime_env=engine.runtime_env("auto"))
print(ray.get(ray.remote(where).remote(), timeout=300))
ray.shutdown()
"""


@pytest.mark.slow
def test_ray_ships_the_project_packages_to_its_workers(tmp_path):
    """With the cluster runtime environment, a worker imports the project from Ray's unpacked copy
    (py_modules). The driver runs outside the checkout (on one machine Ray would otherwise also put
    the driver's working directory on the workers' path, which hides whether anything was shipped)."""
    r = subprocess.run([sys.executable, "-c", SHIPPED], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    where = r.stdout.strip().splitlines()[-1]
    assert "py_modules_files" in where and not where.startswith(str(ROOT)), where


def test_the_terminate_patch_refuses_an_untested_flower(monkeypatch):
    """release_device_workers replaces a private Flower method: outside the tested range it must fail
    loudly instead of silently patching something else."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from sim import engine

    monkeypatch.delattr(RayBackend, "_leaves_ray_up", raising=False)
    monkeypatch.setattr(engine, "flower_version", lambda: (1, 99))
    with pytest.raises(engine.FlowerChanged, match="release_device_workers"):
        engine.release_device_workers()
