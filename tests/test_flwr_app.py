"""``flwr run .`` (sim/flwr_app.py): the run config's checks, and one real run through Flower's CLI.

The end-to-end test runs what a user types (README "Running with flwr run")::

    flwr run . --stream --federation-config "num-supernodes=2 client-resources-num-cpus=1" \\
        -c 'overrides="fleet.num_clients=4 sim.num_rounds=2 data=digits" run-dir="/abs/run"'

With flwr 1.42 the positional argument after the app is a SuperLink *connection* of the Flower
config (``$FLWR_HOME/config.toml``; federations are no longer read from pyproject.toml). Left out,
the default connection ``local`` (``address = ":local:"``, written by the CLI on first use) is
taken, and the CLI starts a local simulation SuperLink by itself, detached from the CLI (its own
session) and left running after the run. The test isolates that from everything else on the
machine: its own ``FLWR_HOME`` (config, SuperLink database and log, installed FABs), its own free
ports for the local SuperLink, no runtime dependency installation (``uv sync`` would need the
network; the dependencies are installed already), and ``RAY_ADDRESS=local`` (a private Ray, never
another job's cluster). Afterwards it ends, by process id, the CLI's
process group, the SuperLink it started, and every process below them (SuperExec, the simulation
process, Ray's processes), and any process that still carries the test's own marker variable.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sim.core.errors import ConfigError
from sim.flwr_app import config_from, run_dir_from

ROOT = Path(__file__).resolve().parents[1]
MARKER = "L2H_FLWR_RUN_TEST"
"""Environment variable (a fresh uuid per run) that every process of the end-to-end run inherits."""


# --------------------------------------------------------------------------- config_from (fast)

def _one_line(exc: ConfigError) -> str:
    text = str(exc)
    assert text and "\n" not in text.strip(), text
    assert "Traceback" not in text
    return text


def test_config_from_composes_the_overrides():
    cfg = config_from({"overrides": "fleet.num_clients=4 sim.num_rounds=2 data=digits", "run-dir": ""})
    assert cfg.fleet.num_clients == 4 and cfg.sim.num_rounds == 2


def test_config_from_empty_overrides_is_the_default_config():
    assert config_from({}).fleet.num_clients == config_from({"overrides": ""}).fleet.num_clients


@pytest.mark.parametrize("overrides,expect", [
    ("fleet.num_clients=abc", "could not be converted to Integer"),
    ("fleet.num_clients=0", "fleet.num_clients=0 is invalid"),
    ("strategy.c_e=-1", "strategy.c_e=-1.0 is invalid"),
    ("data=foo", "available options for data"),
    ("servers.routing=nearest", "servers.routing='nearest' is invalid"),
    ('data="digits', "run config overrides="),  # unbalanced quote: shlex cannot split it
])
def test_config_from_bad_override_is_one_line(overrides, expect):
    with pytest.raises(ConfigError) as info:
        config_from({"overrides": overrides})
    assert expect in _one_line(info.value)


def test_config_from_refuses_resume(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from({"overrides": f"sim.resume={tmp_path}"})
    line = _one_line(info.value)
    assert "sim.resume is not supported by `flwr run`" in line and "python -m sim.run" in line


@pytest.mark.parametrize("failure", ["crash_stop", "query_drop"])
def test_config_from_refuses_failures_with_reference(failure):
    with pytest.raises(ConfigError) as info:
        config_from({"overrides": f"failures={failure}"})  # failures.reference defaults to true
    line = _one_line(info.value)
    assert "failures.reference=true" in line and "failures.reference=false" in line


def test_config_from_accepts_failures_without_reference():
    cfg = config_from({"overrides": "failures=crash_stop failures.reference=false"})
    assert str(cfg.failures.name.value if hasattr(cfg.failures.name, "value") else cfg.failures.name) == "crash_stop"
    assert cfg.failures.reference is False


def test_run_dir_from(tmp_path):
    assert run_dir_from({"run-dir": str(tmp_path)}) == tmp_path
    default = run_dir_from({"run-dir": ""})
    assert default.parts[:2] == ("outputs", "flwr") and len(default.parts) == 4


# --------------------------------------------------------------------------- flwr run . (slow)

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, int]:
    """pid -> parent pid of every process now (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _descendants(roots: set[int]) -> set[int]:
    table = _proc_table()
    found, frontier = set(), set(roots)
    while frontier:
        found |= frontier
        frontier = {pid for pid, ppid in table.items() if ppid in frontier} - found
    return found & set(table)


def _marked(token: str) -> set[int]:
    """Processes whose environment carries this run's marker (started, at some depth, by this test)."""
    needle = f"{MARKER}={token}".encode()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    out.add(int(entry))
            except OSError:
                continue
    return out


def _superlinks(flwr_home: Path) -> set[int]:
    """The local SuperLink(s) the CLI started for this FLWR_HOME (its log file is under it)."""
    needle = str(flwr_home).encode()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flower-superlink" in cmd and needle in cmd:
                out.add(int(entry))
    return out


def _kill(pids: set[int], grace: float = 5.0) -> None:
    pids.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _flwr() -> str:
    here = Path(sys.executable).parent / "flwr"
    found = str(here) if here.exists() else shutil.which("flwr")
    if not found:
        pytest.skip("the flwr CLI is not installed")
    return found


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path, shared_cache):
    """``flwr run .`` from the project directory: a local SuperLink, 2 SuperNodes, 2 rounds, summary.json."""
    flwr = _flwr()
    run_dir = tmp_path / "run"
    flwr_home = tmp_path / "flwr-home"
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env.update({
        MARKER: token,
        # Flower's Ray backend calls ray.init() without an address: Ray then joins the cluster that
        # /tmp/ray/ray_current_cluster names (another job's `ray start`, possibly dead: a hang of
        # minutes). "local" always starts a fresh private instance.
        "RAY_ADDRESS": "local",
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: no `uv sync` of the app's deps
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "L2H_SIM_CACHE": str(shared_cache),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    cmd = [flwr, "run", ".", "--stream",
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1",
           "-c", f'overrides="fleet.num_clients=4 sim.num_rounds=2 data=digits" run-dir="{run_dir}"']
    log = tmp_path / "flwr-run.log"
    t0 = time.monotonic()
    proc = None
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            # --stream returns once the run has finished; the SuperLink (detached) stays up.
            rc = proc.wait(timeout=300)
            # the ServerApp writes summary.json before the run ends; allow the file system a moment
            deadline = time.monotonic() + 30
            while not (run_dir / "summary.json").exists() and time.monotonic() < deadline:
                time.sleep(0.5)
        elapsed = time.monotonic() - t0
        text = log.read_text()
        superlink_log = flwr_home / "local-superlink" / "superlink.log"
        tail = text[-4000:] + ("\n--- superlink.log ---\n" + superlink_log.read_text()[-4000:]
                               if superlink_log.exists() else "")
        assert rc == 0, tail
        assert "Starting local SuperLink" in text, tail  # the CLI started its own SuperLink
        assert "(2 simulated SuperNodes)" in text, tail
        assert (run_dir / "summary.json").is_file(), tail
        s = json.loads((run_dir / "summary.json").read_text())
        assert 0.0 <= s["system_accuracy"] <= 1.0
        assert s["num_rounds"] == 2 and s["num_clients"] == 4
        rounds = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        assert [r["round"] for r in rounds] == [1, 2]
        print(f"flwr run . took {elapsed:.1f}s")
    finally:
        roots = _superlinks(flwr_home) | ({proc.pid} if proc is not None else set())
        ours = _descendants(roots) | _marked(token)  # the whole tree, before anything is re-parented
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the CLI's own process group
            except (ProcessLookupError, PermissionError):
                pass
        _kill(ours)
        _kill(_marked(token))  # anything re-parented while the tree was being ended
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert not _marked(token), "processes of the flwr run are still alive"
