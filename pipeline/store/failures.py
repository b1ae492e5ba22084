"""Failure records: the last error of each failed (video, stage), beside its shards.

    store.h5.d/failed/<stage>/<id>.json

Written by the runner when a stage fails on a video, removed when it next succeeds; read by
`rcma status` (status.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.files import atomic_file
from pipeline.store.shards import FAILED, _ids_under, id_file, shard_root


def failure_path(store: Path, stage: str, video_id: str) -> Path:
    return id_file(shard_root(store) / FAILED / stage, video_id, ".json")


def record_failure(store: Path, stage: str, video_id: str, source: str, error: str) -> None:
    path = failure_path(store, stage, video_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"video_id": video_id, "stage": stage, "source": source, "error": error, "time": time.time()}
    with atomic_file(path, shard_root(store)) as tmp:
        tmp.write_text(json.dumps(record))


def clear_failure(store: Path, stage: str, video_id: str) -> None:
    failure_path(store, stage, video_id).unlink(missing_ok=True)


def failures(store: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{stage: {video_id: record}} for every recorded failure."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    root = shard_root(store) / FAILED
    if root.is_dir():
        for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for video_id, path in _ids_under(stage_dir, ".json"):
                out.setdefault(stage_dir.name, {})[video_id] = json.loads(path.read_text())
    return out
