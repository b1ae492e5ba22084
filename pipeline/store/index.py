"""The index, store.h5: rebuilt from the finished shards, one group of external links a video.

`rebuild_index` opens only shards that changed since the last rebuild (see scan.py), rewrites
only the videos whose links changed, in a copy that replaces the index atomically, and writes the
videos as a table too (`TABLE`), which `open_store` reads instead of walking every group.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.files import atomic_file
from pipeline.store.configs import stage_config
from pipeline.store.locks import _locked
from pipeline.store.record import _read_index_record, _stamp_fields, _stamped, _write_record, _write_stamp
from pipeline.store.scan import _scan_folders, _ShardCache, _walk_files
from pipeline.store.shards import (
    CHUNK_BYTES,
    GRID,
    VIDEO_ATTRS,
    StoreError,
    check_store_path,
    set_attrs,
    shard_root,
    stage_names,
)

INDEX_LAYOUT = "rcma-sharded-v1"

# An update rewrites each changed video's group in a copy of the index (~0.28 ms a video: the old
# group removed, the new one written); writing anew copies each unchanged group (~0.05 ms) and
# writes each changed one (~0.16 ms). Updating costs less up to ~30% of the videos changed, but
# grows the file: above this share, the index is written anew.
REWRITE_SHARE = 0.2
REWRITE_GROWTH = 2.0  # ...as is one grown this many times its fresh size by updates


def rebuild_index(store: Path, fresh: bool = False) -> int:
    """Writes store.h5 from the finished shards; returns the number of videos in it.

    Only shards made on a video's current frame grid, and of their stage's recorded config, are
    linked, so a shard left from before the file changed is never read against the new grid and
    a stage never mixes configs. The index records what it linked and what each shard held
    (`INDEX_RECORD`): a rebuild opens only shards that changed since, works out the links of only
    the videos whose shards changed, came or went, and rewrites only the videos whose links
    changed, in a copy of the index that replaces it atomically. `fresh` (or many changes) writes
    a new file, in which the groups of unchanged videos are copied from the index (`_write_new`).
    Without a sound record (no index, a damaged one), every shard is opened.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a scanning process of `_scan_many` re-running a script without a main guard: it must not
        # wait for the lock its parent holds (the parent then scans the shards itself)
        raise StoreError(
            f"{store}: rebuild_index called while a new process imports the main script; put the "
            "script's work under `if __name__ == '__main__':`"
        )
    check_store_path(store)
    root = shard_root(store)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".index.lock"):  # two writers must not interleave scan and rename
        previous = _read_index_record(store)
        cache = previous.get("shards", _ShardCache({}))
        listed = {folder: _walk_files(root / folder, ".h5") for folder in (GRID, *stage_names(store))}
        configs = {
            stage: (stage_config(store, stage) or {}).get("config_hash") for stage in listed if stage != GRID
        }
        old = previous.get("videos")
        known = previous.get("configs") == configs and old is not None and "links" in previous
        ours = _stamped(store, signed=True)  # the index as this user's rcma wrote it
        if not fresh and known and cache.lists(listed) and ours:
            return len(old)  # every shard as the record has it, and the same configs: all is linked
        parts, touched = _scan_folders(root, listed, cache)
        linker = _Linker(root.name, parts, configs)
        # With the same configs, only videos whose shards changed can link anything else: the rest
        # keep the record's links, for the videos the grid shards back (the record names no other).
        grid_ids = set(linker.ids())
        kept = (grid_ids - touched) & old.keys() & previous["links"].keys() if known else set()
        entries = {
            video_id: entry
            for video_id in sorted(grid_ids - kept)
            if (entry := linker.entry(video_id)) is not None
        }
        links = {vid: previous["links"][vid] for vid in kept}
        digests = {vid: old[vid] for vid in kept}
        for video_id, (attrs, video_links) in entries.items():
            links[video_id] = {member: link for member, (link, _) in video_links.items()}
            digests[video_id] = _digest((attrs, video_links))
        record = {"shard_columns": parts, "videos": digests, "links": links, "configs": configs}
        changed = sorted(v for v in entries if old is None or old.get(v) != digests[v])
        removed = sorted(v for v in old or {} if v not in digests)
        fresh_size = previous.get("fresh_size", 0)
        update = (  # an index made elsewhere is written anew from the shards, never edited
            not fresh
            and ours
            and old is not None
            and len(changed) + len(removed) <= REWRITE_SHARE * max(1, len(digests))
            and store.stat().st_size <= REWRITE_GROWTH * fresh_size
        )
        if update and not changed and not removed:  # all linked, table current
            record.update({"fresh_size": fresh_size, **_stamp_fields(store)})  # the index as it was
            _write_record(store, record)
            return len(digests)
        with atomic_file(store, root) as tmp:
            if update:
                shutil.copyfile(store, tmp)
                with h5py.File(tmp, "r+") as index:
                    writer = _GroupWriter(index["videos"])
                    for video_id in removed:
                        _unlink_video(index["videos"], video_id)
                    for video_id in changed:
                        _unlink_video(index["videos"], video_id)
                        writer.link_video(video_id, *entries[video_id])
                    _write_table(index, links)
            else:
                copied = _copyable(old, digests) if old is not None and ours else set()
                _write_new(tmp, root.name, links, linker, store, copied)
                fresh_size = tmp.stat().st_size
        record.update({"fresh_size": fresh_size, **_stamp_fields(store)})
        _write_record(store, record)
        _write_stamp(store)
    return len(digests)


class _Linker:
    """What the index holds for each video (its attrs and links), from the shard folders' columns:
    the video attrs of its grid shard, a link to that shard, and a link to each stage's shard
    that is sound and was made on that grid with the stage's recorded config."""

    def __init__(self, folder: str, parts: dict[str, dict[str, Any]], configs: dict[str, str | None]):
        self.folder = folder  # the shard folder's name, with which every link starts
        self.parts = parts
        self.configs = configs
        self.rows = {name: {vid: i for i, vid in enumerate(part["video_id"])} for name, part in parts.items()}
        self.entries: dict[str, Any] = {}

    def ids(self) -> Iterable[str]:
        return self.rows[GRID]

    def entry(self, video_id: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]] | None:
        """(attrs, {member: (shard, path in it)}); None when the video has no sound grid shard."""
        if video_id not in self.entries:
            self.entries[video_id] = self._entry(video_id)
        return self.entries[video_id]

    def _entry(self, video_id: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]] | None:
        grid, g = self.parts[GRID], self.rows[GRID].get(video_id)
        if g is None or grid["problem"][g]:
            return None
        attrs = {name: value for name in VIDEO_ATTRS if (value := _cell(grid, name, g)) is not None}
        links = {"timestamps": (f"{self.folder}/{grid['key'][g]}", "/timestamps")}
        for stage, config in self.configs.items():
            part, i = self.parts[stage], self.rows[stage].get(video_id)
            if (
                i is not None
                and not part["problem"][i]
                and _cell(part, "grid_hash", i) == _cell(grid, "grid_hash", g)
                and config in (None, _cell(part, "config_hash", i))
            ):
                links[stage] = (f"{self.folder}/{part['key'][i]}", "/")
        return attrs, links


def _cell(part: dict[str, Any], name: str, row: int) -> Any:
    column = part["attrs"].get(name)
    return None if column is None else column[row]


def _write_new(
    path: Path,
    folder: str,
    links: dict[str, dict[str, str]],
    linker: _Linker,
    source: Path | None,
    copied: set[str],
) -> None:
    """Writes an index file anew: the groups of the videos `copied` are copied from `source`, the
    index the record describes, one HDF5 call a group (creating a group's five to nine attributes
    costs ~10 us each, 3x what copying them does); every other video's group is written as the
    `linker` has it."""
    with contextlib.ExitStack() as files:
        index = files.enter_context(h5py.File(path, "w", libver="latest"))
        set_attrs(index, {"layout": INDEX_LAYOUT, "shards": folder})
        videos = index.create_group("videos")
        old = files.enter_context(h5py.File(source, "r"))["videos"].id if source and copied else None
        writer = _GroupWriter(videos)
        for video_id in sorted(links):  # "a" before "a/b"
            name = video_id.encode()
            if video_id in copied and _hard_link(old, name):  # a copy follows any other kind
                h5py.h5o.copy(old, name, videos.id, name)
            else:
                writer.link_video(video_id, *linker.entry(video_id))
        _write_table(index, links)


def _copyable(old: dict[str, str], digests: dict[str, str]) -> set[str]:
    """The videos whose group the index holds as it must be (same digest) and can be copied from
    it: not a group another video's group is nested in, now or in the index ("a" of "a/b"), since
    a copy takes everything in it."""
    nested = {video_id.split("/", 1)[0] for video_id in (*digests, *old) if "/" in video_id}
    return {vid for vid, digest in digests.items() if old.get(vid) == digest and "/" not in vid} - nested


def _hard_link(group: h5py.h5g.GroupID, name: bytes) -> bool:
    """Whether `name` in the group is a hard link (not an external or soft one, not missing)."""
    return group.links.exists(name) and group.links.get_info(name).type == h5py.h5l.TYPE_HARD


def _digest(value: tuple[dict[str, Any], dict[str, tuple[str, str]]]) -> str:
    """Names what a video's group holds (its attrs and links), to find the groups to rewrite."""
    attrs, links = value
    text = repr((sorted(attrs.items()), sorted(links.items())))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class _GroupWriter:
    """Writes videos' groups (their attrs and one external link per shard) through HDF5's
    low-level calls: h5py's `attrs[...] = ` costs ~25 us an attribute, nine per video, which is
    most of writing an index of 100,000 videos. The groups keep their attributes compact (in the
    group's header, up to 16) rather than in a separate heap. Attrs read back exactly as
    `set_attrs` writes them (the same HDF5 types)."""

    def __init__(self, videos: h5py.Group):
        self.videos = videos
        self.gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
        self.gcpl.set_attr_phase_change(16, 14)
        self.space = h5py.h5s.create_simple(())
        self.types: dict[np.dtype, tuple[h5py.h5t.TypeID, h5py.h5t.TypeID]] = {}

    def link_video(self, video_id: str, attrs: dict[str, Any], links: dict[str, tuple[str, str]]) -> None:
        name = video_id.encode()
        new = "/" not in video_id and not self.videos.id.links.exists(name)
        if new:
            gid = h5py.h5g.create(self.videos.id, name, gcpl=self.gcpl)
        else:  # nested ids ("a/b"), and a group an update keeps for the groups nested in it
            gid = self.videos.require_group(video_id).id
        for key, value in attrs.items():
            self.set_attr(gid, key, value, new)
        for member, (filename, target) in links.items():
            gid.links.create_external(member.encode(), filename.encode(), target.encode())

    def set_attr(self, gid: h5py.h5g.GroupID, key: str, value: Any, new: bool = False) -> None:
        if not isinstance(value, str | bool | int | float | np.bool_ | np.integer | np.floating):
            set_attrs(h5py.Group(gid), {key: value})  # anything else: the high-level call
            return
        data = np.asarray(value, dtype=h5py.string_dtype() if isinstance(value, str) else None)
        types = self.types.get(data.dtype)
        if types is None:
            logical, memory = h5py.h5t.py_create(data.dtype, logical=True), h5py.h5t.py_create(data.dtype)
            types = self.types[data.dtype] = (logical, memory)
        name = key.encode()
        if not new and h5py.h5a.exists(gid, name):
            h5py.h5a.delete(gid, name)
        h5py.h5a.create(gid, name, types[0], self.space).write(data, mtype=types[1])


TABLE = "table"  # in the index: one dataset per column, the rows sorted by video id


def _write_table(index: h5py.File, links: dict[str, dict[str, str]]) -> None:
    """The index's videos as columns, for `open_store` to read in one call each: `video_id`, and
    one `links/<member>` per member ("" where a video has none). UTF-8 in fixed-length strings,
    compressed, with checksums; written afresh on every rebuild (it is small)."""
    if TABLE in index:
        del index[TABLE]
    table = index.create_group(TABLE)
    ids = sorted(links)
    members = sorted({member for video in links.values() for member in video})
    columns = {"video_id": ids, **{f"links/{m}": [links[v].get(m, "") for v in ids] for m in members}}
    for name, values in columns.items():
        encoded = [value.encode() for value in values]
        data = np.array(encoded, dtype=h5py.string_dtype("utf-8", max(1, *map(len, encoded), 1)))
        filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
        chunk = (max(1, min(len(data), CHUNK_BYTES // data.dtype.itemsize)),)
        table.create_dataset(name, data=data, **({"chunks": chunk, **filters} if len(data) else {}))
    table.attrs["rows"] = len(ids)


def _unlink_video(videos: h5py.Group, video_id: str) -> None:
    """Removes a video's group, and each parent group (of a nested id) left empty; a group that
    other videos' groups are nested in loses only its attrs and links."""
    if video_id not in videos:
        return
    group = videos[video_id]
    nested = [name for name in group if isinstance(group.get(name, getlink=True), h5py.HardLink)]
    if nested:
        for name in list(group.attrs):
            del group.attrs[name]
        for name in list(group):
            if name not in nested:
                del group[name]
        return
    del videos[video_id]
    parents = video_id.split("/")[:-1]
    while parents:
        name = "/".join(parents)
        if len(videos[name]) or len(videos[name].attrs):
            break
        del videos[name]
        parents.pop()
