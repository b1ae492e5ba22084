"""File helpers every part of rcma writes and reads files with: the atomic write, rcma's cache
folder, and a file's SHA-256.

`atomic_file` is the one way rcma writes a file (a temporary name beside it, synced, then
renamed), so a killed process leaves a whole file or none; `remove_stale_temps` removes what
killed writers left, never a live writer's file. `temp_name` and `temps_in` are the one place the
temporary names are made and recognised, so a cleaner removes only those, never a user's file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

CACHE_ENV = "RCMA_CACHE"
_TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}\.tmp")  # what temp_name makes, and nothing else


def temp_name(path: Path) -> Path:
    """The temporary name `atomic_file` writes `path` under: `.<name>.<32 hex digits>.tmp`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def temps_in(folder: Path, of: str | None = None, recursive: bool = False) -> Iterator[Path]:
    """The temporary files of `atomic_file` in `folder` (and below, if `recursive`), of the file
    named `of` only when given; any other name (a user's `.store.h5.notes.tmp`) is not one."""
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        match = _TEMP.fullmatch(path.name)
        if match and (of is None or match["name"] == of):
            yield path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rcma"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path, guard: Path | None = None) -> Iterator[Path]:
    """The one way rcma writes a file: to a temporary name beside `path`, synced, then renamed.

    Yields the temporary name. An exception removes it; a kill leaves it behind, for
    `remove_stale_temps`. While writing, a shared lock is held on the folder `guard` (default:
    the file's own folder), so a cleaner that takes the exclusive lock knows no writer is live.
    """
    tmp = temp_name(path)
    with _folder_lock(guard or path.parent, fcntl.LOCK_SH):
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temps(guard: Path, found: list[Iterable[Path]]) -> int | None:
    """Removes the temporary files in `found` if no `atomic_file` guarded by `guard` is being
    written; returns how many, or None when a writer is live (then nothing is removed)."""
    try:
        with _folder_lock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
            if not locked:  # no locks on this filesystem: a writer may be live
                return None
            stale = [path for paths in found for path in paths]
            for path in stale:
                path.unlink(missing_ok=True)
            return len(stale)
    except BlockingIOError:
        return None


@contextlib.contextmanager
def _folder_lock(folder: Path, how: int) -> Iterator[bool]:
    """Holds a flock on a folder; yields False, holding none, where the filesystem has no locks
    (some network filesystems), so writing still works there."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, how)
            locked = True
        except BlockingIOError:
            raise
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing releases the lock


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
