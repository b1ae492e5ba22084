"""The store's lock (one index writer at a time) and the cleaning of killed writers' temporary files."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from pipeline.files import remove_stale_temps, temps_in
from pipeline.store.shards import shard_root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clean_store_temps(store: Path) -> int | None:
    """Removes the temporary files killed writers left in a store (shards, failure records, the
    index); None, removing nothing, while any writer is writing one (a running extract)."""
    root = shard_root(store)
    with _locked(root / ".index.lock"):
        found = [temps_in(root, recursive=True), temps_in(store.parent, of=store.name)]
        return remove_stale_temps(root, found)
