"""What a store holds: per-stage counts (`rcma status`) and per-video coverage (`rcma show`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK
from typing import Any

import h5py

from pipeline.store import scan  # `scan._scan_one`: one name to patch for every shard opened
from pipeline.store.configs import stage_config
from pipeline.store.failures import failures
from pipeline.store.read import _LinkCheck, _linked_file, damaged_members, open_store, video_ids
from pipeline.store.record import _read_index_record, read_scan_cache
from pipeline.store.scan import SCANNED_ATTRS, ShardInfo, scan_shards
from pipeline.store.shards import GRID, VIDEO_ATTRS, shard_problem, shard_root, stage_names


@dataclass(frozen=True)
class StageCount:
    done: list[str]
    failed: dict[str, str]
    missing: list[str]
    damaged: dict[str, str]  # video id -> "<shard file>: <problem>"
    other_config: list[str]  # sound shards of another config than the stage's (not indexed)
    config: dict[str, Any] | None  # the stage's recorded {"config_hash", "config"}
    other_grid: list[str] = field(default_factory=list)  # sound shards of an older frame grid (not indexed)


def stage_counts(store: Path, verify: bool = False) -> dict[str, StageCount]:
    """Per stage: sound finished videos, damaged shards, failed videos with their errors, shards of
    another config, and known videos with none of these. A video whose frame-grid shard is
    damaged is damaged in every stage. Shards unchanged since the index last read them are not
    opened again; `verify` reads every array of every shard to check its checksums (see
    `shard_problem`)."""
    root = shard_root(store)
    failed = failures(store)
    cache = None if verify else read_scan_cache(store)
    grids = scan_shards(store, GRID, cache)
    known = set(grids)
    for records in failed.values():
        known |= set(records)
    bad_grids = {
        vid: f"{info.path}: {problem}" for vid, info in grids.items() if (problem := _problem(info, verify))
    }
    out = {}
    for stage in sorted(set(stage_names(store)) | set(failed)):
        shards = scan_shards(store, stage, cache) if (root / stage).is_dir() else {}
        damaged = {
            vid: f"{info.path}: {problem}"
            for vid, info in shards.items()
            if (problem := _problem(info, verify))
        }
        damaged.update({vid: bad_grids[vid] for vid in shards.keys() & bad_grids.keys()})
        config = stage_config(store, stage)
        other = sorted(
            vid
            for vid, info in shards.items()
            if vid not in damaged and config and info.attrs.get("config_hash") != config["config_hash"]
        )
        stale = _other_grid(grids, shards, {*damaged, *other})
        done = set(shards) - set(damaged) - set(other) - set(stale)
        errors = {vid: r["error"] for vid, r in failed.get(stage, {}).items() if vid not in shards}
        missing = sorted(known - set(shards) - set(errors))
        out[stage] = StageCount(
            sorted(done), errors, missing, dict(sorted(damaged.items())), other, config, stale
        )
    return out


def _other_grid(grids: dict[str, ShardInfo], shards: dict[str, ShardInfo], skip: set[str]) -> list[str]:
    """Videos whose shard was made on another frame grid than the video's grid shard holds (its file
    was replaced and extracted again): the index does not link them (see `_Linker`)."""
    return sorted(
        vid
        for vid, info in shards.items()
        if vid in grids
        and vid not in skip
        and info.attrs.get("grid_hash") != grids[vid].attrs.get("grid_hash")
    )


def _problem(info: ShardInfo, verify: bool) -> str:
    return shard_problem(info.path, full=True) if verify else info.problem


@dataclass(frozen=True)
class VideoSummary:
    video_id: str
    n_frames: int
    fps: float
    duration: float
    present: dict[str, float]  # stage -> share of frames present
    damaged: dict[str, str]  # stage -> "<shard file>: <problem>"


def summarize(store: Path) -> list[VideoSummary]:
    """Per video in the index: length, for each stage the share of frames with data, and the
    stages whose shard is missing or damaged.

    With the index's record (see `rebuild_index`), a shard unchanged since it was indexed is not
    opened again (its share of frames present is in the record); otherwise every shard is read.
    """
    record = _read_index_record(store)
    if "links" in record and store.exists():
        return _summarize_from_record(store, record)
    out = []
    with open_store(store) as f:
        for video_id in video_ids(f):
            group = f[f"videos/{video_id}"]
            damaged = damaged_members(store, group)
            present = {}
            for stage in group:
                if stage in damaged:
                    continue
                try:
                    member = group[stage]  # opened once: an external link
                    if isinstance(member, h5py.Group) and "present" in member:
                        mask = member["present"][:]
                        present[stage] = float(mask.mean()) if mask.size else 0.0
                except OSError:  # a chunk whose checksum fails
                    damaged[stage] = f"{_linked_file(store, group, stage)}: damaged (checksum mismatch)"
            n, fps = int(group.attrs["n_frames"]), float(group.attrs["fps"])
            out.append(VideoSummary(video_id, n, fps, n / fps, present, damaged))
    return out


def _summarize_from_record(store: Path, record: dict[str, Any]) -> list[VideoSummary]:
    """`summarize` from the index's record: one `lstat` a shard, each link checked like the
    index's own (the record lies beside the index, and names the files to read)."""
    shards = record["shards"]
    out = []
    check = _LinkCheck(store)
    for video_id, links in sorted(record["links"].items()):
        present: dict[str, float] = {}
        damaged: dict[str, str] = {}
        video: dict[str, Any] = {}
        for member, link in links.items():
            key = link.split("/", 1)[1]
            real = check.resolve(link)
            if real is None:
                check.refuse(video_id, member, link)
            entry = shards.get(key)
            try:
                stat = os.lstat(real)
                if S_ISLNK(stat.st_mode):
                    if not check.inside_link(real):
                        check.refuse(video_id, member, link)
                    stat = os.stat(real)
                same = entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns
                exists = True
            except OSError:
                same = exists = False
            if same:
                problem, attrs = entry[3], entry[4]
            else:
                names = (*SCANNED_ATTRS, *(VIDEO_ATTRS if member == "timestamps" else ()))
                problem, attrs = scan._scan_one(store.parent / link, names) if exists else ("missing", {})
            if problem:
                damaged[member] = f"{store.parent / link}: {problem}"
            elif member == "timestamps":
                video = attrs
            elif "present_share" in attrs:
                present[member] = attrs["present_share"]
        if not video:  # the grid shard changed or is damaged: the length the index was made with
            grid = shards.get(links["timestamps"].split("/", 1)[1])
            video = grid[4] if grid else {"n_frames": 0, "fps": 1.0}
        n, fps = int(video.get("n_frames", 0)), float(video.get("fps", 1.0))
        out.append(VideoSummary(video_id, n, fps, n / fps, present, damaged))
    return out
