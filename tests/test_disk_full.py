"""A full disk is one line naming the path and the fix, never a traceback; nothing already written is
lost and no temporary file is left (sim/core/storage.py).

The disk is made "full" by making the write fail as it does on a full filesystem -- ``OSError`` with
errno ENOSPC from Python's writes, numpy's short write without an errno, torch's ``RuntimeError`` --
with the free space the check reads set to nothing. (Checked by hand on a 200 KB-3 MB tmpfs too:
docs/reliability.md.)"""
from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim import checkpoint
from sim.core import storage
from sim.core.storage import OutOfSpace
from tests.conftest import small_cfg

ROOT = Path(__file__).resolve().parent.parent


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"a": np.arange(10.0)}, {"round": 1})
    before = files(tmp_path)
    monkeypatch.setattr(checkpoint.np, "savez", enospc)
    with pytest.raises(OutOfSpace) as err:
        checkpoint.save(tmp_path, {"a": np.arange(20.0)}, {"round": 2})
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / checkpoint.CHECKPOINT) in msg and "free space" in msg
    assert "round 2" in msg
    assert files(tmp_path) == before  # the round-1 checkpoint, and nothing else


@pytest.mark.parametrize("failure", ["enospc", "short write", "torch"])
def test_a_cache_entry_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure):
    """The three shapes a full disk takes: errno ENOSPC; numpy's short write (no errno); torch.save's
    RuntimeError. The last two are taken as a full disk only when the filesystem has < 1 MiB left."""
    from sim.core.cache import build_entry

    raised = {"enospc": OSError(errno.ENOSPC, "No space left on device"),
              "short write": OSError("100000 requested and 25584 written"),
              "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 662")}[failure]

    def build(tmp: Path) -> dict:
        (tmp / "part.npy").write_bytes(b"x" * 100)  # a partial file the failure leaves
        raise raised

    monkeypatch.setattr(storage, "free_bytes", lambda path: 0)
    with pytest.raises(OutOfSpace) as err:
        build_entry(tmp_path / "data" / "entry", build, "dataset")
    msg = str(err.value)
    assert "\n" not in msg and "dataset cache entry" in msg and "sim.cache_dir" in msg
    assert list((tmp_path / "data").iterdir()) == []  # the temporary entry is removed
    # with room on the disk the same errors are not called a full disk
    monkeypatch.setattr(storage, "free_bytes", lambda path: 10 << 30)
    if failure != "enospc":
        with pytest.raises(type(raised)):
            build_entry(tmp_path / "data" / "entry", build, "dataset")


def test_a_result_file_that_does_not_fit_leaves_the_old_one(tmp_path, monkeypatch):
    from sim.core import cache

    path = tmp_path / "summary.json"
    cache.atomic_write_text(path, "old\n")
    real_fdopen = os.fdopen

    def full_fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        f.write = enospc
        return f

    monkeypatch.setattr(cache.os, "fdopen", full_fdopen)
    with pytest.raises(OutOfSpace, match="summary.json"):
        cache.atomic_write_text(path, "new\n")
    assert files(tmp_path) == {"summary.json": b"old\n"}


def test_a_round_record_that_does_not_fit_is_cut_back_to_the_finished_rounds(tmp_path, monkeypatch):
    from sim import results

    rec = results.Recorder(tmp_path)
    rec.round({"round": 1, "x": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # half the line gets in, then the disk is full
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.os, "write", half_then_full)
    with pytest.raises(OutOfSpace, match="round 2's record"):
        rec.round({"round": 2, "x": 2.0})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and len(rec.rounds) == 1


DISK_FULL_AT_ROUND_2 = '''
import errno, sys
import numpy as np
from sim import checkpoint, run

savez = np.savez


def full_at_round_2(f, **arrays):
    meta = bytes(arrays[checkpoint.META]).decode()
    if '"round": 2' in meta:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return savez(f, **arrays)


checkpoint.np.savez = full_at_round_2
sys.argv[0] = "sim.run"
run.main()
'''


@pytest.mark.slow
def test_a_disk_full_at_a_checkpoint_is_one_line_then_the_printed_command_finishes_the_run(tmp_path, shared_cache):
    """``python -m sim.run`` whose disk fills at round 2's checkpoint: exit 2, one ``error:`` line
    naming checkpoint.npz, what is saved and the resume command (before: an OSError traceback, exit 1);
    that command, once there is room, ends with the uninterrupted run's summary.json."""
    from sim.pipeline import simulate

    args = ["fleet.num_clients=4", "sim.num_rounds=3", "sim.backend=inprocess", "sim.plots=false",
            "sim.progress=false"]
    (tmp_path / "disk_full_at_round_2.py").write_text(DISK_FULL_AT_ROUND_2)
    env = {**os.environ, "L2H_SIM_CACHE": str(shared_cache),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "disk_full_at_round_2", *args, f"hydra.run.dir={run_dir}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on the device for {run_dir / checkpoint.CHECKPOINT}")
    assert "after round 1" in lines[0] and "resume with: " in lines[0]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint-")] == []
    assert checkpoint.finished_round(run_dir) == 1
    argv = shlex.split(lines[0].split("resume with: ", 1)[1])
    r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    simulate(small_cfg(**{"sim.backend": "inprocess", "sim.cache_dir": str(shared_cache), "sim.num_rounds": 3}),
             tmp_path / "whole")
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((tmp_path / "whole" / "summary.json").read_text())
