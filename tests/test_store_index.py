"""The index's table of videos: what `open_store` reads instead of walking every group, when it
may (the index is the file its last rebuild wrote), and the checks it keeps on what it reads."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from fusion.data import DataError, load_store, select_videos
from pipeline.store import (
    GRID,
    INDEX_RECORD,
    INDEX_STAMP,
    VIDEO_ATTRS,
    StoreError,
    _read_index_record,
    _walk_videos,
    _write_stamp,
    grid_hash,
    open_store,
    pack_store,
    rebuild_index,
    set_attrs,
    shard_path,
    shard_root,
    stage_counts,
    summarize,
    video_ids,
    write_shard,
)

FRAMES = 6


def add_video(store, video_id, stages=("audio", "faces")):
    timestamps = np.arange(FRAMES) / 30.0
    ghash = grid_hash(timestamps)
    grid = {"source": f"{video_id}.mp4", "n_frames": FRAMES, "fps": 30.0, "duration": FRAMES / 30}
    grid |= {"width": 64, "height": 48, "has_video": True, "has_audio": False, "grid_hash": ghash}
    write_shard(store, GRID, video_id, {"timestamps": timestamps}, grid)
    for stage in stages:
        rows = {"present": np.ones(FRAMES, bool), "embedding": np.full((FRAMES, 4), 0.5, np.float16)}
        write_shard(store, stage, video_id, rows, {"config_hash": f"{stage}-1", "grid_hash": ghash})


def small_store(tmp_path, ids=("a", "a/b", "c")):
    store = tmp_path / "store.h5"
    for video_id in ids:
        add_video(store, video_id)
    rebuild_index(store)
    return store


def walked(store):
    with h5py.File(store, "r") as f:
        return _walk_videos(f, store)


def no_walk(monkeypatch):
    def refuse(*_):
        raise AssertionError("the index was walked")

    monkeypatch.setattr("pipeline.store._walk_videos", refuse)


def test_the_table_lists_what_a_walk_finds_without_walking(tmp_path, monkeypatch):
    store = small_store(tmp_path)
    expected = walked(store)
    assert expected == ["a", "a/b", "c"]
    no_walk(monkeypatch)
    with open_store(store) as f:
        assert video_ids(f) == expected
        assert f["videos/a/b/audio/embedding"].shape == (FRAMES, 4)
        assert [x.decode() for x in f["table/video_id"][()]] == expected
        assert f["table/links/faces"][0].decode() == "store.h5.d/faces/a.h5"
    assert select_videos(store, None, need_labels=False) == expected


def test_video_attrs_read_back_as_h5py_writes_them(tmp_path):
    store = small_store(tmp_path, ids=("a",))
    with h5py.File(tmp_path / "plain.h5", "w") as plain, open_store(store) as f:
        group = plain.create_group("a")
        attrs = dict(f["videos/a"].attrs)
        set_attrs(group, attrs)
        assert set(attrs) == set(VIDEO_ATTRS)
        for key, value in attrs.items():
            assert type(value) is type(group.attrs[key]) and value == group.attrs[key], key
            assert f["videos/a"].attrs.get_id(key).dtype == group.attrs.get_id(key).dtype, key
    assert attrs["source"] == "a.mp4" and attrs["n_frames"] == FRAMES and attrs["has_video"]


def test_an_index_without_a_table_is_walked_and_the_next_rebuild_adds_one(tmp_path, monkeypatch):
    store = small_store(tmp_path)
    with h5py.File(store, "r+") as f:  # an index written before tables, as an older rcma left it
        del f["table"]
    (shard_root(store) / INDEX_STAMP).unlink()
    with open_store(store) as f:
        assert video_ids(f) == ["a", "a/b", "c"]
    assert rebuild_index(store) == 3  # nothing changed, yet the table is written
    no_walk(monkeypatch)
    with open_store(store) as f:
        assert "table" in f and video_ids(f) == ["a", "a/b", "c"]


def test_an_index_changed_after_its_rebuild_is_walked(tmp_path):
    store = small_store(tmp_path)
    with h5py.File(store, "r+") as f:  # an id the table does not list, added by hand
        f["videos"].create_group("..").attrs["n_frames"] = 3
    with pytest.raises(StoreError, match=r"'\.\.' is not a relative path"):
        open_store(store)


def test_a_refresh_with_nothing_changed_leaves_the_index_alone_and_sees_a_change(tmp_path):
    store = small_store(tmp_path)
    before = store.stat().st_mtime_ns, (shard_root(store) / INDEX_RECORD).stat().st_mtime_ns
    assert rebuild_index(store) == 3
    assert (store.stat().st_mtime_ns, (shard_root(store) / INDEX_RECORD).stat().st_mtime_ns) == before
    add_video(store, "d")
    shard_path(store, "faces", "a").unlink()
    assert rebuild_index(store) == 4
    with open_store(store) as f:
        assert video_ids(f) == ["a", "a/b", "c", "d"]
        assert "faces" not in f["videos/a"] and "faces" in f["videos/d"]


# A crafted store can come with a stamp that matches it: the table itself is then checked.


def forge(store, edit):
    with h5py.File(store, "r+") as f:
        edit(f)
    _write_stamp(store)


def test_a_crafted_table_id_is_refused(tmp_path):
    store = small_store(tmp_path)

    def climb(f):
        ids = [b"../../ESCAPED", b"a/b", b"c"]
        del f["table/video_id"]
        f["table/video_id"] = np.array(ids, dtype=h5py.string_dtype("utf-8", 16))

    forge(store, climb)
    with pytest.raises(StoreError, match="ESCAPED' is not a relative path"):
        open_store(store)
    with pytest.raises(DataError, match="ESCAPED"):
        select_videos(store, None, need_labels=False)


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../outside.h5", "store.h5.d/../../outside.h5", "other/x.h5"]
)
def test_a_crafted_table_link_is_refused(tmp_path, target):
    store = small_store(tmp_path)

    def relink(f):
        column = [target.encode(), b"store.h5.d/audio/a/b.h5", b"store.h5.d/audio/c.h5"]
        del f["table/links/audio"]
        f["table/links/audio"] = np.array(column, dtype=h5py.string_dtype("utf-8", 40))

    forge(store, relink)
    with pytest.raises(StoreError, match=f"video a: link audio leads outside.*{target}"):
        open_store(store)


def test_a_group_linking_outside_behind_a_sound_table_is_refused_before_reading(tmp_path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["present"] = np.ones(FRAMES, bool)
        f["embedding"] = np.full((FRAMES, 4), 7, np.float16)  # a secret that must not be read
    store = small_store(tmp_path)

    def relink(f):
        del f["videos/a/audio"]
        f["videos/a/audio"] = h5py.ExternalLink(str(outside), "/")

    forge(store, relink)
    with open_store(store) as f:  # the table is sound: listing reads no group
        assert video_ids(f) == ["a", "a/b", "c"]
    with pytest.raises(DataError, match="video a: link audio leads outside"):
        load_store(store, ["audio"], ["a", "c"])
    with pytest.raises(StoreError, match="leads outside"):
        pack_store(store, tmp_path / "packed.h5")
    assert not (tmp_path / "packed.h5").exists()


def test_a_shard_that_is_a_symlink_out_of_the_store_is_refused(tmp_path):
    store = small_store(tmp_path)
    outside = tmp_path / "outside.h5"
    shard = shard_path(store, "audio", "c")
    os.replace(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(StoreError, match="video c: link audio leads outside"):
        open_store(store)
    inside = shard_path(store, "audio", "copy")
    os.replace(outside, inside)
    shard.unlink()
    shard.symlink_to(inside)
    with open_store(store) as f:  # a symlink within the shard folder is followed
        assert video_ids(f) == ["a", "a/b", "c"]
        assert f["videos/c/audio/embedding"].shape == (FRAMES, 4)


def test_show_refuses_a_record_that_links_outside(tmp_path):
    store = small_store(tmp_path)
    path = shard_root(store) / INDEX_RECORD
    record = path.read_text().replace('"store.h5.d/audio/c.h5"', '"store.h5.d/../../x.h5"')
    path.write_text(record)
    os.utime(path)
    with pytest.raises(StoreError, match="video c: link audio leads outside"):
        summarize(store)


def test_a_record_of_an_older_rcma_is_read_without_opening_any_shard(tmp_path, monkeypatch):
    store = small_store(tmp_path)
    path = shard_root(store) / INDEX_RECORD
    record = json.loads(path.read_text())
    del record["shard_columns"]  # the record as it was: one entry a shard
    record["shards"] = dict(_read_index_record(store)["shards"].items())
    path.write_text(json.dumps(record))
    expected = stage_counts(store)

    def opened(*_):
        raise AssertionError("a shard was opened")

    monkeypatch.setattr("pipeline.store._scan_one", opened)
    assert stage_counts(store) == expected and expected["audio"].done == ["a", "a/b", "c"]
    assert [v.present for v in summarize(store)] == [{"audio": 1.0, "faces": 1.0}] * 3
    add_video(store, "d", stages=())  # the next rebuild opens only the new shard, writes columns
    monkeypatch.undo()
    assert rebuild_index(store) == 4
    assert "shard_columns" in json.loads(path.read_text())
    monkeypatch.setattr("pipeline.store._scan_one", opened)
    assert stage_counts(store)["audio"].missing == ["d"]
