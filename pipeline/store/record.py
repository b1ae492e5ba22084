"""The index's record and stamp, beside it in the shard folder.

The record (`INDEX_RECORD`) says what the index links and what each shard held when it was
scanned; the stamp (`INDEX_STAMP`) says which index file (size, time, inode) its table describes,
signed with this user's key so that a rebuild keeps only an index this user's rcma wrote.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from pipeline.files import atomic_file, cache_dir
from pipeline.store.scan import _ShardCache
from pipeline.store.shards import shard_root

INDEX_RECORD = ".index-record.json"  # in the shard folder: what the index links, what each shard held


def read_scan_cache(store: Path) -> _ShardCache | None:
    """What each shard held when the index last read it (None when there is no sound record)."""
    return _read_index_record(store).get("shards")


def _read_index_record(store: Path) -> dict[str, Any]:
    """The record the index was written with; {} when the index is missing or is not the file the
    record describes (replaced, damaged, renamed with its folder, or written by an older rcma).
    Its "shards" are a `_ShardCache` (made from one entry a shard in a record of an older rcma).
    """
    try:
        record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
        fields = _stamp_fields(store)
        same = {name: record.get(name) for name in fields} == fields
        if same and "shard_columns" in record:
            record["shards"] = _ShardCache(record.pop("shard_columns"))
        elif same and "shards" in record:
            record["shards"] = _ShardCache.of_entries(record["shards"])
        return record if same else {}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def _write_record(store: Path, record: dict[str, Any]) -> None:
    """Writes the record, its shards as columns (`_ShardCache`): JSON of 400,000 small lists and
    dicts costs seconds to write and read, of a few long lists a fraction of that."""
    root = shard_root(store)
    with atomic_file(root / INDEX_RECORD, root) as tmp:
        tmp.write_text(json.dumps(record))


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


INDEX_KEY = "index.key"  # in rcma's cache folder: signs the stamps of the indexes this user wrote
INDEX_KEY_BYTES = 32
INDEX_STAMP = ".index-stamp.json"  # in the shard folder: the index file (size, time) its table describes


def _stamp_fields(store: Path) -> dict[str, Any]:
    """What identifies the index file a stamp or a record describes: its size and modification
    time, and the name of its shard folder."""
    return {"index": list(_stat(store)), "folder": shard_root(store).name}


def _write_stamp(store: Path) -> None:
    root = shard_root(store)
    stamp = _stamp_fields(store)
    key = _index_key()
    if key is not None:
        stamp["signature"] = _signature(store, stamp, key)
    with atomic_file(root / INDEX_STAMP, root) as tmp:
        tmp.write_text(json.dumps(stamp))


def _stamped(store: Path, signed: bool = False) -> bool:
    """Whether the index is the very file its last rebuild wrote (same size and modification
    time, same shard folder): only then is its table taken for the list of its videos. An index
    changed by anything else (an older rcma, h5py, a crafted edit) is walked instead.

    A stamp is easy to forge, so a rebuild takes an index as it stands (keeps it, or copies its
    groups) only when `signed`: the stamp carries this user's signature of the file's identity
    (`_index_key`), which a store made elsewhere, crafted or not, does not."""
    try:
        stamp = json.loads((shard_root(store) / INDEX_STAMP).read_text())
        fields = _stamp_fields(store)
        if not isinstance(stamp, dict) or {name: stamp.get(name) for name in fields} != fields:
            return False
        if not signed:
            return True
        key = _index_key()
        signature = stamp.get("signature")
        return (
            key is not None
            and isinstance(signature, str)
            and hmac.compare_digest(signature, _signature(store, fields, key))
        )
    except (OSError, ValueError):
        return False


def _index_key() -> bytes | None:
    """This user's key for signing index stamps (`INDEX_KEY` in rcma's cache folder), made on
    first use; None where it cannot be kept (the indexes are then written whole every time)."""
    path = cache_dir() / INDEX_KEY
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_bytes(os.urandom(INDEX_KEY_BYTES))
                tmp.chmod(0o600)
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == INDEX_KEY_BYTES else None


def _signature(store: Path, fields: dict[str, Any], key: bytes) -> str:
    """The stamp's fields and the index file's inode, signed: a file put in its place with the same
    size and time is another file."""
    identity = json.dumps({**fields, "inode": store.stat().st_ino}, sort_keys=True)
    return hmac.new(key, identity.encode(), hashlib.sha256).hexdigest()
