"""The index's table of videos: what `open_store` reads instead of walking every group, when it
may (the index is the file its last rebuild wrote), and the checks it keeps on what it reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.store.scan
from fusion.data import DataError, load_store, select_videos
from pipeline.store import (
    GRID,
    INDEX_RECORD,
    INDEX_STAMP,
    VIDEO_ATTRS,
    StoreError,
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
from pipeline.store.read import _walk_videos
from pipeline.store.record import _read_index_record, _write_stamp
from pipeline.store.scan import _scan_one
from pipeline.store.shards import _plain

FRAMES = 6
REPO = Path(__file__).resolve().parents[1]


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
    tmp_path.mkdir(parents=True, exist_ok=True)
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

    monkeypatch.setattr("pipeline.store.read._walk_videos", refuse)


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

    monkeypatch.setattr("pipeline.store.scan._scan_one", opened)
    assert stage_counts(store) == expected and expected["audio"].done == ["a", "a/b", "c"]
    assert [v.present for v in summarize(store)] == [{"audio": 1.0, "faces": 1.0}] * 3
    add_video(store, "d", stages=())  # the next rebuild opens only the new shard, writes columns
    monkeypatch.undo()
    assert rebuild_index(store) == 4
    assert "shard_columns" in json.loads(path.read_text())
    monkeypatch.setattr("pipeline.store.scan._scan_one", opened)
    assert stage_counts(store)["audio"].missing == ["d"]


# How a rebuild writes the index: an update, a new file with unchanged groups copied, a first
# index that scans every shard; each must give the very same index.

LONG = "x" * 200  # a name cut and hashed (`id_file`)


def contents(store):
    """Every group's attrs (with their HDF5 types) and every link of the index, and its table."""
    out = {}
    with h5py.File(store, "r") as f:

        def visit(name, link):
            if isinstance(link, h5py.ExternalLink):
                out[name] = (link.filename, link.path)
            elif isinstance(f[name], h5py.Group):
                attrs = f[name].attrs
                out[name] = sorted((k, repr(v), str(attrs.get_id(k).dtype)) for k, v in attrs.items())
            else:
                out[name] = f[name][()].tolist()

        f.visititems_links(visit)
    return out


def change(store, step):
    """Every kind of change a refresh must see: videos added and removed, shards gone, a grid
    remade (its old shards no longer linked), a shard rewritten as it was, nested and long ids;
    then a stage's config changed."""
    if step == 0:
        for video_id in ("a", "a/b", "c", "d/e", LONG, f"f/{LONG}", "h", "i"):
            add_video(store, video_id)
    elif step == 1:
        add_video(store, "g")
        add_video(store, "a/b/c", stages=("faces",))
        shard_path(store, GRID, "c").unlink()
        shard_path(store, "faces", "d/e").unlink()
        shard_path(store, "audio", LONG).unlink()
        grid = {"source": "a2.mp4", "n_frames": 4, "fps": 25.0, "duration": 0.16, "grid_hash": "remade"}
        write_shard(store, GRID, "a", {"timestamps": np.arange(4) / 25.0}, grid)
        os.utime(shard_path(store, "faces", "h"), ns=(1, 1))
    else:
        (shard_root(store) / "audio" / "config.json").write_text(json.dumps({"config_hash": "audio-2"}))
        with h5py.File(shard_path(store, "audio", "i"), "r+") as f:
            f.attrs["config_hash"] = "audio-2"


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_an_update_a_new_file_and_a_first_index_hold_the_same(tmp_path, monkeypatch, share):
    monkeypatch.setattr("pipeline.store.index.REWRITE_SHARE", share)  # 0: written anew, 1: updated
    stores = [tmp_path / name / "store.h5" for name in ("refreshed", "anew", "first")]
    for store in stores:
        store.parent.mkdir()
        change(store, 0)
        rebuild_index(store)
    copied = []
    monkeypatch.setattr("h5py.h5o.copy", lambda *args: copied.append(args[1]) or h5py_copy(*args))
    for step in (1, 2):
        for store in stores:
            change(store, step)
        assert rebuild_index(stores[0]) == rebuild_index(stores[1], fresh=True) == 9
        for path in (stores[2], shard_root(stores[2]) / INDEX_RECORD, shard_root(stores[2]) / INDEX_STAMP):
            path.unlink()
        assert rebuild_index(stores[2]) == 9
        expected = contents(stores[2])
        assert contents(stores[0]) == contents(stores[1]) == expected
        assert [timeless_record(store) for store in stores[:2]] == [timeless_record(stores[2])] * 2
        if step == 1:  # the others changed, or hold a nested id
            assert copied == [b"h", b"i"] * (1 if share else 2)
            assert ("fps", "np.float64(25.0)", "float64") in expected["videos/a"]  # the grid remade
            assert "videos/a/faces" not in expected and "videos/c" not in expected  # its old grid, none
            assert "videos/d/e/faces" not in expected and f"videos/{LONG}/audio" not in expected
    audio = [name for name in expected if name.startswith("videos/") and name.endswith("/audio")]
    assert audio == ["videos/i/audio"]  # the one shard of the stage's new config


h5py_copy = h5py.h5o.copy


def timeless_record(store):
    """The index's record, less what differs between copies of a store (times, sizes)."""
    record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
    for part in record["shard_columns"].values():
        del part["mtime"], part["size"]
    return {key: record[key] for key in ("shard_columns", "videos", "links", "configs")}


def unsigned_stamp(store):
    """The stamp a store made elsewhere comes with: right size, time and folder, no signature of
    this user's."""
    stamp = {"index": [store.stat().st_size, store.stat().st_mtime_ns], "folder": shard_root(store).name}
    (shard_root(store) / INDEX_STAMP).write_text(json.dumps(stamp))
    record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
    record["index"] = stamp["index"]
    (shard_root(store) / INDEX_RECORD).write_text(json.dumps(record))


def from_scratch(store, folder):
    """The index a rebuild with no earlier index, record or stamp makes of a copy of the store."""
    shutil.copytree(store.parent, folder)
    copy = folder / store.name
    for path in (copy, shard_root(copy) / INDEX_RECORD, shard_root(copy) / INDEX_STAMP):
        path.unlink()
    rebuild_index(copy)
    return contents(copy)


@pytest.mark.parametrize("change", ["none", "most"])
def test_a_crafted_index_stamped_elsewhere_is_written_again_from_the_shards(tmp_path, change):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["x"] = np.arange(3)
    store = small_store(tmp_path / "s", ids=("a", "b", "c"))
    with h5py.File(store, "r+") as f:  # c keeps its links and attrs' digest, and gains more
        f["videos/c/evil"] = h5py.ExternalLink(str(outside), "/x")
        f["videos/c"].create_group("..").attrs["n_frames"] = 3
        f["videos/c"].attrs["n_frames"] = 999
    unsigned_stamp(store)
    if change == "most":  # written anew: unchanged groups would be copied from a signed index
        add_video(store, "d")
        add_video(store, "e")
    rebuild_index(store)
    assert contents(store) == from_scratch(store, tmp_path / "scratch")
    with open_store(store) as f:
        assert sorted(f["videos/c"]) == ["audio", "faces", "timestamps"]
        assert f["videos/c"].attrs["n_frames"] == FRAMES


def test_without_a_writable_cache_folder_every_rebuild_writes_the_whole_index(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("RCMA_CACHE", str(blocked / "rcma"))  # no key can be kept: stamps unsigned
    store = small_store(tmp_path / "s", ids=("a", "b"))
    assert "signature" not in json.loads((shard_root(store) / INDEX_STAMP).read_text())
    add_video(store, "c")
    assert rebuild_index(store) == 3
    assert contents(store) == from_scratch(store, tmp_path / "scratch")


@pytest.mark.parametrize("new", [1, 5])
def test_a_record_naming_a_video_no_shard_backs_adds_nothing(tmp_path, new):
    store = small_store(tmp_path / "s", ids=tuple(f"v{i}" for i in range(10)))
    record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
    record["videos"]["ghost"] = record["videos"]["v0"]
    record["links"]["ghost"] = record["links"]["v0"]
    (shard_root(store) / INDEX_RECORD).write_text(json.dumps(record))
    for i in range(new):  # 1: the index is updated; 5: written anew
        add_video(store, f"new{i}")
    assert rebuild_index(store) == 10 + new
    with open_store(store) as f:
        listed = video_ids(f)
        assert "ghost" not in listed and "ghost" not in f["videos"]
    assert select_videos(store, None, need_labels=False) == listed


def test_a_script_without_a_main_guard_still_rebuilds_with_a_process_pool(tmp_path):
    """A spawned scanning process runs the script again; its rebuild_index must not wait for the
    lock the script holds: it stops, and the script scans the shards itself."""
    store = small_store(tmp_path / "s", ids=("a", "b", "c", "d"))
    (shard_root(store) / INDEX_RECORD).unlink()  # every shard is opened
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pathlib import Path\n"
        "from pipeline.store import rebuild_index, scan\n"
        "scan.SCAN_IN_PROCESSES, scan.SCAN_BATCH, scan.cpu_count = 2, 2, lambda: 2\n"
        f"print('videos', rebuild_index(Path({str(store)!r}), fresh=True))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "videos 4"
    assert "if __name__ == '__main__'" in result.stderr  # the spawned process says why it stopped


def test_a_new_index_copies_no_group_from_outside_the_index(tmp_path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f.create_group("c").attrs["n_frames"] = 6
        f["c/secret"] = np.arange(3)
    store = small_store(tmp_path)

    def relink(f):  # a group that is an external link, in an index whose record and stamp match
        del f["videos/c"]
        f["videos/c"] = h5py.ExternalLink(str(outside), "/c")

    forge(store, relink)
    record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
    record["index"] = [store.stat().st_size, store.stat().st_mtime_ns]
    (shard_root(store) / INDEX_RECORD).write_text(json.dumps(record))
    assert rebuild_index(store, fresh=True) == 3
    with open_store(store) as f:
        assert sorted(f["videos/c"]) == ["audio", "faces", "timestamps"]
        assert f["videos/c"].get("audio", getlink=True).filename == "store.h5.d/audio/c.h5"


def test_many_shards_are_scanned_in_processes_as_in_one(tmp_path, monkeypatch):
    stores = [tmp_path / name / "store.h5" for name in ("one", "many", "no-processes")]
    for store in stores:
        store.parent.mkdir()
        for video_id in ("a", "a/b", "c", LONG):
            add_video(store, video_id)
        shard_path(store, "faces", "c").write_bytes(b"\x89HDF\r\n\x1a\n damaged")
    assert rebuild_index(stores[0]) == 4
    monkeypatch.setattr("pipeline.store.scan.SCAN_IN_PROCESSES", 2)
    monkeypatch.setattr("pipeline.store.scan.SCAN_BATCH", 2)
    monkeypatch.setattr("pipeline.store.scan.cpu_count", lambda: 2)
    started = []
    pool = pipeline.store.scan.ProcessPoolExecutor
    monkeypatch.setattr(
        "pipeline.store.scan.ProcessPoolExecutor", lambda *a, **k: started.append(a) or pool(*a, **k)
    )
    assert rebuild_index(stores[1]) == 4
    assert started == [(2,)]

    def cannot_start(*args, **kwargs):  # a script without a main guard, under spawn
        raise RuntimeError("An attempt has been made to start a new process before ...")

    monkeypatch.setattr("pipeline.store.scan.ProcessPoolExecutor", cannot_start)
    assert rebuild_index(stores[2]) == 4  # scanned here instead
    records = [timeless_record(store) for store in stores]
    assert records[0] == records[1] == records[2]
    assert records[0]["shard_columns"]["faces"]["problem"] == ["", "", "damaged", ""]


def reference_scan(path, names):
    """What a shard scan must find, through h5py's high-level objects."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(f.attrs[k]) for k in names if k in f.attrs}
            f.visit(lambda _: None)
            if isinstance(f.get("present", getlink=True), h5py.HardLink) and "present" in f:
                mask = f["present"][()]
                attrs["present_share"] = float(mask.mean()) if mask.size else 0.0
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        return ("damaged (checksum mismatch)" if "filter returned failure" in str(e) else "damaged"), {}
    return "", attrs


def test_a_shard_scan_reads_attrs_as_h5py_does(tmp_path):
    shard = tmp_path / "shard.h5"
    with h5py.File(shard, "w") as f:
        f.attrs.update({"text": "é", "number": 3, "real": 0.5, "yes": True, "bytes": np.bytes_(b"raw")})
        f.attrs["array"] = np.arange(3)
        f.attrs["empty"] = h5py.Empty("f8")
        f.create_dataset("present", data=np.array([1, 0, 1, 1], bool), chunks=(2,), fletcher32=True)
    names = ("text", "number", "real", "yes", "bytes", "array", "missing")
    found = _scan_one(shard, names)
    assert repr(found) == repr(reference_scan(shard, names))  # arrays too
    assert found[1]["text"] == "é" and found[1]["bytes"] == b"raw" and found[1]["present_share"] == 0.75
    assert _scan_one(shard, ("empty",))[1]["empty"] == h5py.Empty("f8")
    with h5py.File(shard, "r") as f:
        offset = f["present"].id.get_chunk_info(0).byte_offset
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert _scan_one(shard, names) == ("damaged (checksum mismatch)", {}) == reference_scan(shard, names)
    shard.write_bytes(bytes(raw[:300]))
    assert _scan_one(shard, names) == ("damaged", {}) == reference_scan(shard, names)
