"""The feature store: one small HDF5 shard per (video, stage), and an index file that links them.

Layout (docs/store.md):
    store.h5                       index: /videos/<video_id>/{attrs, timestamps, <stage>/...}
    store.h5.d/grid/<id>.h5        frame grid: timestamps and the video's attrs
    store.h5.d/<stage>/<id>.h5     one stage's arrays for one video, with provenance attrs
    store.h5.d/failed/<stage>/<id>.json   the last error of a failed (video, stage)
    store.h5.d/<stage>/config.json the one configuration of that stage's shards in this store

One module a concern:
    shards.py    names and ids of shards, writing (ShardWriter), reading and checking them
    failures.py  the last error of each failed (video, stage)
    configs.py   the one configuration of each stage's shards in a store
    locks.py     the index lock; cleaning killed writers' temporary files
    scan.py      which shards exist and what they hold, scanned once and cached
    record.py    the index's record (what it links) and its signed stamp
    index.py     rebuild_index: store.h5 from the shards
    read.py      open_store: an index opened with every id and link checked
    status.py    per-stage counts (`rcma status`) and per-video coverage (`rcma show`)
    pack.py      `rcma pack`: one self-contained file

Every file is written by `pipeline.files.atomic_file` (a temporary name, then a rename), so a
killed process leaves either a whole file or none. The index holds only relative external links
and attrs, and is rebuilt from the shards, so it can always be recreated. Damage and hostility:
docs/reliability.md.
"""

from pipeline.store.configs import (
    FORCE_REMEDY,
    check_stage_configs,
    claim_stage_config,
    config_difference,
    config_summary,
    restamp_stage,
    stage_config,
    stage_config_path,
)
from pipeline.store.failures import clear_failure, failure_path, failures, record_failure
from pipeline.store.index import INDEX_LAYOUT, TABLE, rebuild_index
from pipeline.store.locks import clean_store_temps
from pipeline.store.pack import pack_store
from pipeline.store.read import damaged_members, open_store, video_ids
from pipeline.store.record import INDEX_RECORD, INDEX_STAMP, read_scan_cache
from pipeline.store.scan import ShardInfo, scan_shards
from pipeline.store.shards import (
    CHUNK_BYTES,
    CONFIG_FILE,
    FAILED,
    GRID,
    HDF5_SIGNATURE,
    LABELS,
    MAX_NAME_BYTES,
    VIDEO_ATTRS,
    ShardWriter,
    StoreError,
    check_id,
    check_output_folder,
    check_store_path,
    grid_hash,
    id_file,
    read_rows,
    read_shard_attrs,
    set_aside_foreign_index,
    set_attrs,
    shard_path,
    shard_problem,
    shard_root,
    stage_names,
    write_shard,
)
from pipeline.store.status import StageCount, VideoSummary, stage_counts, summarize

__all__ = [
    "CHUNK_BYTES",
    "CONFIG_FILE",
    "FAILED",
    "GRID",
    "LABELS",
    "HDF5_SIGNATURE",
    "INDEX_LAYOUT",
    "INDEX_RECORD",
    "INDEX_STAMP",
    "MAX_NAME_BYTES",
    "TABLE",
    "VIDEO_ATTRS",
    "ShardInfo",
    "ShardWriter",
    "StageCount",
    "StoreError",
    "VideoSummary",
    "check_id",
    "check_output_folder",
    "check_store_path",
    "FORCE_REMEDY",
    "check_stage_configs",
    "claim_stage_config",
    "restamp_stage",
    "clean_store_temps",
    "clear_failure",
    "config_difference",
    "config_summary",
    "damaged_members",
    "failure_path",
    "failures",
    "grid_hash",
    "id_file",
    "open_store",
    "pack_store",
    "read_rows",
    "read_scan_cache",
    "read_shard_attrs",
    "rebuild_index",
    "record_failure",
    "scan_shards",
    "set_aside_foreign_index",
    "set_attrs",
    "shard_path",
    "shard_problem",
    "shard_root",
    "stage_config",
    "stage_config_path",
    "stage_counts",
    "stage_names",
    "summarize",
    "video_ids",
    "write_shard",
]
