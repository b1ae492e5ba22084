"""Stage configs: a stage's shards in one store all come from one configuration.

`check_stage_configs` refuses, before any job, a run with another config than the one the
stage's shards have (unless forced); `claim_stage_config` records it
(`store.h5.d/<stage>/config.json`) with the stage's first shard, so a failed run claims nothing.
The index links only shards of the recorded configuration.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from pipeline.files import atomic_file
from pipeline.store.locks import _locked
from pipeline.store.shards import CONFIG_FILE, StoreError, _ids_under, read_shard_attrs, shard_root


def stage_config_path(store: Path, stage: str) -> Path:
    return shard_root(store) / stage / CONFIG_FILE


def stage_config(store: Path, stage: str) -> dict[str, Any] | None:
    """{"config_hash", "config"} of the stage's shards in this store, or None before its first run
    (and in stores made before configs were recorded)."""
    try:
        record = json.loads(stage_config_path(store, stage).read_text())
        return record if isinstance(record, dict) and "config_hash" in record else None
    except (OSError, ValueError):
        return None


FORCE_REMEDY = "use --force to recompute them with these settings, or another --store"


def check_stage_configs(
    store: Path, configs: dict[str, tuple[str, dict[str, Any]]], force: bool, remedy: str = FORCE_REMEDY
) -> None:
    """Before any job: refuses, unless `force`, a stage the store holds with another config, in
    one line naming the differing settings and the ways out. Writes nothing but a record of a
    config whose shards are here (a store made before records, or one a failed run mis-recorded).

    The store holds a config only when a shard of it exists (`held_config`): a run that failed
    before writing a shard (a missing model, every file bad) claims nothing, so a rerun with other
    settings is accepted. The record itself is written with a stage's first shard
    (`claim_stage_config`).
    """
    root = shard_root(store)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".index.lock"):
        for stage, (config_digest, config) in configs.items():
            held = held_config(store, stage, config_digest)
            if held and held["config_hash"] != config_digest and not force:
                raise StoreError(
                    f"{store}: its {stage} features were made with other settings "
                    f"({config_difference(held.get('config', {}), config)}); {remedy}"
                )
            if held and held["config_hash"] == config_digest:
                _record(store, stage, config_digest, config)


def claim_stage_config(
    store: Path, stage: str, config_digest: str, config: dict[str, Any], force: bool
) -> None:
    """Records (config hash, config) as the stage's, just before its shard of that config is
    committed (in whichever process writes it: a Dask worker too). Re-checked under the store's
    lock, so of two runs with different settings only one claims; the other gets a StoreError.
    With `force` the record is replaced, and the old config's shards are no longer indexed (each
    is recomputed when its video is extracted again)."""
    if (stage_config(store, stage) or {}).get("config_hash") == config_digest:
        return  # claimed already: no lock, no scan (every shard after a stage's first)
    with _locked(shard_root(store) / ".index.lock"):
        held = None if force else held_config(store, stage, config_digest)
        if held and held["config_hash"] != config_digest:
            raise StoreError(
                f"{store}: another run claimed its {stage} features with other settings "
                f"({config_difference(held.get('config', {}), config)}) while this one ran"
            )
        _record(store, stage, config_digest, config)


def held_config(store: Path, stage: str, wanted: str) -> dict[str, Any] | None:
    """The config the store's `stage` holds: its record when that is `wanted` or a shard of it
    exists (found by a scan that stops at the first), else the config of the stage's shards;
    None when the stage has no shards."""
    record = stage_config(store, stage)
    if record and (record["config_hash"] == wanted or _has_shard_of(store, stage, record["config_hash"])):
        return record
    return _config_of_shards(store, stage, wanted)


def _has_shard_of(store: Path, stage: str, config_digest: str) -> bool:
    return any(
        (read_shard_attrs(path) or {}).get("config_hash") == config_digest
        for _, path in _ids_under(shard_root(store) / stage, ".h5")
    )


def _record(store: Path, stage: str, config_digest: str, config: dict[str, Any]) -> None:
    """Writes the stage's config record (called under the store's lock), if it is not that already."""
    if (stage_config(store, stage) or {}).get("config_hash") == config_digest:
        return
    path = stage_config_path(store, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "config_hash": config_digest, "config": config}
    with atomic_file(path, shard_root(store)) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")


def restamp_stage(
    store: Path, stage: str, rehash: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
) -> int:
    """Brings a stage hashed by an earlier rule up to date; returns how many shards it re-stamped.

    `rehash` gives a config's (hash, the store's config) by today's rule. When it gives the
    stage's recorded config another hash than the record's (a store written before per-video
    settings left the hash), each shard whose own config it gives that hash is written again with
    the new hash in its attrs (copied to a temporary name, then renamed: its arrays untouched, no
    feature recomputed), and the record takes the new hash. A store already up to date costs one
    read of its record.
    """
    root = shard_root(store)
    held = stage_config(store, stage)
    if held is None or rehash(held.get("config", {}))[0] == held["config_hash"]:
        return 0
    with _locked(root / ".index.lock"):
        held = stage_config(store, stage) or {}
        config_digest, config = rehash(held.get("config", {}))
        if config_digest == held.get("config_hash"):
            return 0  # another process did it first
        count = 0
        for _, path in _ids_under(root / stage, ".h5"):
            attrs = {} if path.is_symlink() else read_shard_attrs(path) or {}
            try:
                made = json.loads(attrs.get("config") or "null")
            except ValueError:
                continue
            if attrs.get("config_hash") == config_digest or not isinstance(made, dict):
                continue
            if rehash(made)[0] == config_digest:
                with atomic_file(path, root) as tmp:
                    shutil.copyfile(path, tmp)
                    with h5py.File(tmp, "r+") as f:
                        f.attrs["config_hash"] = config_digest
                count += 1
        _record(store, stage, config_digest, config)
    return count


def _config_of_shards(store: Path, stage: str, wanted: str) -> dict[str, Any] | None:
    """The config of the stage's shards, for a store whose record is missing or backed by none:
    `wanted` if any shard has it, else the most common one; None when the stage has no shards."""
    found: dict[str, dict[str, Any]] = {}
    counts: Counter = Counter()
    for _, path in _ids_under(shard_root(store) / stage, ".h5"):
        attrs = read_shard_attrs(path)
        if attrs and attrs.get("config_hash"):
            counts[attrs["config_hash"]] += 1
            found.setdefault(attrs["config_hash"], json.loads(attrs.get("config") or "{}"))
    if not counts:
        return None
    chosen = wanted if wanted in counts else counts.most_common(1)[0][0]
    return {"config_hash": chosen, "config": found[chosen]}


def config_difference(
    held: dict[str, Any], wanted: dict[str, Any], held_name: str = "in the store", wanted_name: str = "now"
) -> str:
    """`name: <held value> <held_name>, <wanted value> <wanted_name>` for each differing setting."""
    changed = [
        f"{key}: {held.get(key, '(unset)')} {held_name}, {wanted.get(key, '(unset)')} {wanted_name}"
        for key in sorted(held.keys() | wanted.keys())
        if held.get(key) != wanted.get(key)
    ]
    return "; ".join(changed) or "a setting not recorded in the config"


def config_summary(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(config.items()))
