"""On-disk caches: content keys, atomic directory writes, integrity checks.

A cache entry is a directory holding data files plus ``manifest.json`` that records each
file's size and SHA-256. An entry is written into a temporary sibling directory and renamed
into place, so a reader never sees a half-written entry and two writers of the same entry
(parallel Hydra jobs) cannot corrupt it: the second rename finds the entry present and its
own copy is discarded. An entry whose files do not match the manifest is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from sim.core.errors import ConfigError
from sim.core.storage import guard

MANIFEST = "manifest.json"
CACHE_FIX = "free space on that disk, or set sim.cache_dir (or L2H_SIM_CACHE) to a directory on a disk with room"
"""How to go on when a cache entry does not fit (:class:`sim.core.storage.OutOfSpace`)."""


def content_key(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 prefix of ``obj``'s canonical JSON: the key of everything that determines an entry."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(entry: Path, meta: dict[str, Any]) -> None:
    """Record size and SHA-256 of every file in ``entry`` (except the manifest) plus ``meta``."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(entry.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (entry / MANIFEST).write_text(json.dumps({"files": files, "meta": meta}, indent=1, sort_keys=True))


def read_verified(entry: Path, deep: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete, intact entry, or ``None`` if missing, partial or corrupt.

    Args:
        entry: the entry directory.
        deep: also check SHA-256 (else sizes only).
    """
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name, info in manifest["files"].items():
            p = entry / name
            if p.stat().st_size != info["size"]:
                return None
            if deep and file_sha256(p) != info["sha256"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_entry(entry: Path, build: Callable[[Path], dict[str, Any]], what: str,
                check: Callable[[Path, dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """Return the verified manifest of ``entry``, building it with ``build(tmpdir) -> meta`` if needed.

    A corrupt or partial entry -- files that do not match its manifest, a manifest whose files are not
    what ``check(entry, manifest)`` expects (it returns what is wrong, or None), or a regular file
    where the entry's directory should be -- is removed and rebuilt with a warning; never used.

    Raises:
        ConfigError: the cache cannot be written (one line); OutOfSpace when its disk is full (the
            partial entry is removed first).
    """
    manifest = read_verified(entry)
    problem = check(entry, manifest) if manifest is not None and check is not None else None
    if manifest is not None and problem is None:
        return manifest
    if entry.exists() or entry.is_symlink():
        why = f" ({problem})" if problem else ""
        warnings.warn(f"{what} cache entry {entry} is corrupt or incomplete{why}; rebuilding it", stacklevel=2)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    try:
        with guard(entry, f"the {what} cache entry", CACHE_FIX):
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        raise ConfigError(f"the {what} cache entry {entry.name} is not in the cache {entry.parent.parent} and cannot "
                          f"be written there ({exc.strerror or type(exc).__name__}): set sim.cache_dir (or "
                          "L2H_SIM_CACHE) to a writable directory") from None
    try:
        with guard(entry, f"the {what} cache entry", CACHE_FIX):  # judged before the partial entry is removed
            meta = build(tmp)
            write_manifest(tmp, meta)
        os.chmod(tmp, dir_mode())  # mkdtemp makes it 0700; an entry is readable like any other directory
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process published the same entry first: use theirs if it is intact.
            if read_verified(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = read_verified(entry)
    problem = "its files do not match its manifest" if manifest is None else check(entry, manifest) if check else None
    if problem:
        raise RuntimeError(f"{what} cache entry {entry} failed verification right after it was written ({problem})")
    return manifest


def umask() -> int:
    """The process's file-creation mask (read from /proc where it can be; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file as ``open()`` makes it (0666 less the umask: 0644 by default)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode of a new directory as ``mkdir`` makes it (0777 less the umask: 0755 by default)."""
    return 0o777 & ~umask()


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False, what: str = "a result file") -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename, so readers
    never see a partial file; the file gets the usual mode (:func:`file_mode`, not mkstemp's 0600).

    Raises:
        OutOfSpace: the disk is full (``what``: the file, for the message); the temporary file is
            removed and ``path`` is as it was.
    """
    path = Path(path)
    with guard(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with guard(path, what):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, fsync: bool = False, what: str = "a result file") -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write_bytes`; raises OutOfSpace as it does)."""
    atomic_write_bytes(path, text.encode(), fsync=fsync, what=what)
