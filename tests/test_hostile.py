"""Hostile and damaged stores, odd names: each refused or reported in one line, nothing else lost.

Each test here reproduces a fault found by trying to break rcma (issue 12); see docs/reliability.md.
"""

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CREMA_MP4, SINGLE_FACE
from synthetic import add_video
from test_store import extract
from typer.testing import CliRunner

from cli import app
from fusion.data import DataError, load_store, select_videos
from pipeline.files import temp_name
from pipeline.store import (
    GRID,
    ShardWriter,
    StoreError,
    failures,
    id_file,
    open_store,
    pack_store,
    rebuild_index,
    shard_path,
    shard_root,
    stage_counts,
    video_ids,
)


def one_line_error(result, *needles: str) -> str:
    """The command failed with exit 2 and exactly one error line containing every needle."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def small_store(store: Path, ids: tuple[str, ...] = ("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for vid in ids:
        rows = {"present": np.ones(20, bool), "embedding": rng.normal(size=(20, 4)).astype(np.float16)}
        split = "val" if vid == "b" else "train"
        add_video(store, vid, 20, {"audio": rows}, (np.zeros(20), np.zeros(20)), split=split)
    rebuild_index(store)
    return store


@pytest.mark.parametrize("kind", ["csv", "mp4", "hdf5"])
def test_an_existing_file_that_is_not_a_store_is_never_replaced(tmp_path, kind):
    victim = tmp_path / f"victim.{kind}"
    if kind == "csv":
        victim.write_text("a,b\n1,2\n")
    elif kind == "mp4":
        shutil.copy(SINGLE_FACE, victim)
    else:
        with h5py.File(victim, "w") as f:
            f["data"] = np.arange(3)
    before = victim.read_bytes()
    small = small_store(tmp_path / "store.h5")
    runner = CliRunner()
    for args in (
        ["extract", str(SINGLE_FACE), "--store", str(victim), "--quiet"],
        ["index", "--store", str(victim)],
        ["pack", "--store", str(small), "--out", str(victim)],
        ["labels", "import", str(tmp_path / "x.csv"), "--store", str(victim)],
    ):
        one_line_error(runner.invoke(app, args), str(victim))
    with pytest.raises(StoreError, match="not an rcma store"):
        rebuild_index(victim)
    assert victim.read_bytes() == before
    assert not shard_root(victim).exists()


@pytest.mark.parametrize("damage", ["header", "group", "foreign"])
def test_a_damaged_or_replaced_index_is_one_line_in_every_command_and_rcma_index_repairs_it(tmp_path, damage):
    """Random bytes over the index's header or over a group's metadata, or another HDF5 file in
    its place: show, train, pack and predict --features each say in one line that `rcma index`
    repairs it (they gave 67-115-line tracebacks), and `rcma index` does, keeping a foreign file."""
    store = small_store(tmp_path / "store.h5")
    runner = CliRunner()
    small = ["--window", "8", "--hop", "4", "--width", "8", "--epochs", "1", "--device", "cpu", "-q"]
    train = ["train", "--features", str(store), "--modalities", "audio", *small]
    assert runner.invoke(app, [*train, "--out", str(tmp_path / "model")]).exit_code == 0
    with h5py.File(store, "r") as f:
        at = 0 if damage == "header" else h5py.h5o.get_info(f["videos"].id).addr
    if damage == "foreign":
        store.unlink()
        with h5py.File(store, "w") as f:
            f["data"] = np.arange(3)
    else:
        with open(store, "r+b") as f:
            f.seek(at)
            f.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    model = str(tmp_path / "model" / "best.pt")
    for args in (
        ["show", "--store", str(store)],
        [*train, "--out", str(tmp_path / "run")],
        ["pack", "--store", str(store), "--out", str(tmp_path / "packed.h5")],
        ["predict", "--model", model, "--features", str(store), "--out", str(tmp_path / "predictions")],
    ):
        one_line_error(runner.invoke(app, args), str(store), f"rcma index --store {store}")
    before = store.read_bytes()
    result = runner.invoke(app, ["index", "--store", str(store)])
    assert result.exit_code == 0 and "2 videos indexed" in result.output, result.output
    with open_store(store) as f:
        assert video_ids(f) == ["a", "b"]
    if damage == "foreign":  # the file found in the index's place is kept
        assert (tmp_path / "store.h5.not-an-index").read_bytes() == before


def test_a_packed_store_may_be_packed_over_but_an_index_is_not_a_pack(tmp_path):
    store = small_store(tmp_path / "store.h5")
    out = tmp_path / "packed.h5"
    pack_store(store, out)
    pack_store(store, out)  # replacing an earlier pack is fine
    with pytest.raises(StoreError, match="another kind"):
        pack_store(out, store)


def crafted(store: Path, build) -> Path:
    """A store whose index has been edited by hand with `build(videos_group)`."""
    small_store(store)
    with h5py.File(store, "a") as f:
        build(f["videos"])
    return store


def test_a_video_id_that_climbs_out_of_a_folder_is_refused(tmp_path):
    def escape(videos):
        g = videos.create_group("..").create_group("..").create_group("..").create_group("ESCAPED")
        g.attrs.update(n_frames=20, fps=30.0)
        g["timestamps"] = np.arange(20) / 30

    (tmp_path / "run").mkdir()
    store = crafted(tmp_path / "run" / "store.h5", escape)
    with pytest.raises(StoreError, match=r"'\.\./\.\./\.\./ESCAPED' is not a relative path"):
        open_store(store)
    with pytest.raises(DataError, match="ESCAPED"):
        select_videos(store, None, need_labels=False)
    one_line_error(CliRunner().invoke(app, ["show", "--store", str(store)]), "ESCAPED")
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_every_path_built_from_an_id_stays_in_its_folder(tmp_path):
    for bad in ("..", "../x", "/etc/passwd", "a/../../b", "a//b", "."):
        with pytest.raises(ValueError, match="not a relative path"):
            id_file(tmp_path, bad, ".csv")
    long_id = "sub/" + "é" * 200
    path = id_file(tmp_path, long_id, ".csv")
    assert path.parent == tmp_path / "sub" and len(path.name.encode()) < 200 and path.suffix == ".csv"


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "ABSOLUTE", "../outside.h5", "store.h5.d/../../outside.h5"]
)
def test_links_out_of_the_shard_folder_are_not_followed(tmp_path, target):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["present"] = np.ones(20, bool)
        f["embedding"] = np.full((20, 4), 7, np.float16)  # a secret that must not be copied
    target = str(outside) if target == "ABSOLUTE" else target
    (tmp_path / "run").mkdir()

    def link(videos):
        del videos["a/audio"]
        videos["a/audio"] = h5py.ExternalLink(target, "/")

    store = crafted(tmp_path / "run" / "store.h5", link)
    packed = tmp_path / "run" / "packed.h5"
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["show", "--store", str(store)]), "video a", "link audio", target)
    one_line_error(runner.invoke(app, ["pack", "--store", str(store), "--out", str(packed)]), target)
    assert not packed.exists()
    with pytest.raises(DataError, match="leads outside"):
        select_videos(store, ["train"], need_labels=True)


def test_a_hard_link_cycle_is_refused_in_one_line(tmp_path):
    store = crafted(tmp_path / "store.h5", lambda videos: videos["a"].__setitem__("loop", videos["a"]))
    runner = CliRunner()
    packed = tmp_path / "p.h5"
    for args in (["show", "--store", str(store)], ["pack", "--store", str(store), "--out", str(packed)]):
        one_line_error(runner.invoke(app, args), "reached twice (a hard-link cycle)")
    with pytest.raises(DataError, match="cycle"):
        select_videos(store, None, need_labels=False)


def test_a_renamed_store_says_run_rcma_index(tmp_path):
    store = small_store(tmp_path / "old.h5")
    new = tmp_path / "new.h5"
    store.rename(new)
    shard_root(store).rename(shard_root(new))
    one_line_error(CliRunner().invoke(app, ["show", "--store", str(new)]), "old.h5.d", "rcma index")
    assert rebuild_index(new) == 2
    with open_store(new) as f:
        assert f["videos/a/audio/embedding"].shape == (20, 4)


def test_names_of_any_legal_length_work(store, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    long_name = "x" * 240 + ".mp4"  # 244 bytes: a legal name, too long for any name built on it
    shutil.copy(CREMA_MP4[0], folder / long_name)
    shutil.copy(CREMA_MP4[1], folder / "short.mp4")
    report = extract(store, [folder])
    assert report.ok and report.counts()["done"] == 2
    assert sorted(stage_counts(store)["meancolour"].done) == ["short", "x" * 240]
    with open_store(store) as f:
        assert f[f"videos/{'x' * 240}/meancolour/mean"].shape[0] > 0
    again = extract(store, [folder])
    assert again.counts()["skipped"] == 2
    broken = folder / ("y" * 240 + ".mp4")
    broken.write_bytes(CREMA_MP4[0].read_bytes()[:3000])
    report = extract(store, [broken])
    assert report.failed and stage_counts(store)["meancolour"].failed.keys() == {"y" * 240}


def damage(path: Path, how: str) -> None:
    """Silent corruption in the first chunk of the first array, a cut, a broken header, or removal."""
    data = bytearray(path.read_bytes())
    if how == "bytes":
        with h5py.File(path, "r") as f:
            name = next(k for k in f if isinstance(f[k], h5py.Dataset) and f[k].chunks and f[k].size > 4)
            chunk = f[name].id.get_chunk_info(0)
        offset = chunk.byte_offset + min(8, chunk.size // 2)
        data[offset : offset + 4] = bytes(255 - b for b in data[offset : offset + 4])
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "header":
        path.write_bytes(bytes(512) + bytes(data[512:]))
    else:
        path.unlink()


def test_silently_corrupted_data_is_caught_by_its_checksum_and_recomputed(store):
    extract(store, [CREMA_MP4[0], CREMA_MP4[1]])
    vid = CREMA_MP4[0].stem
    shard = shard_path(store, "meancolour", vid)
    with h5py.File(shard, "r") as f:
        original = f["mean"][:]
        assert f["mean"].fletcher32
    damage(shard, "bytes")
    assert stage_counts(store)["meancolour"].damaged == {}  # the quick check opens files only
    counts = stage_counts(store, verify=True)["meancolour"]
    assert list(counts.damaged) == [vid] and "checksum" in counts.damaged[vid] and len(counts.done) == 1
    status = CliRunner().invoke(app, ["status", "--store", str(store), "--verify"])
    assert status.exit_code == 1
    assert f"meancolour {vid}: {shard}: damaged (checksum mismatch) (the next extract recomputes it)" in (
        status.output
    )
    assert "│ meancolour │ 1    │ 1       │ 0      │ 0       │" in status.output
    again = extract(store, [CREMA_MP4[0], CREMA_MP4[1]])
    assert again.counts() == {"done": 1, "skipped": 1}
    with h5py.File(shard, "r") as f:
        np.testing.assert_array_equal(f["mean"][:], original)
    assert stage_counts(store, verify=True)["meancolour"].damaged == {}


@pytest.mark.parametrize("how", ["bytes", "truncated", "header", "missing"])
def test_a_damaged_shard_is_counted_and_training_names_video_and_file(tmp_path, how):
    store = small_store(tmp_path / "store.h5")
    shard = shard_path(store, "audio", "a")
    damage(shard, how)
    counts = stage_counts(store, verify=True)["audio"]
    if how == "missing":
        assert counts.missing == ["a"] and counts.done == ["b"]
    else:
        assert list(counts.damaged) == ["a"] and str(shard) in counts.damaged["a"] and counts.done == ["b"]
        assert how == "bytes" or list(stage_counts(store)["audio"].damaged) == ["a"]
    with pytest.raises(DataError) as error:
        load_store(store, ["audio"], ["a", "b"])
    assert "video a" in str(error.value) and str(shard) in str(error.value)
    args = ["train", "--features", str(store), "--out", str(tmp_path / "run"), "--modalities", "audio"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--epochs", "1", "--device", "cpu", "-q"])
    one_line_error(result, "video a", str(shard))
    packed = tmp_path / "packed.h5"
    one_line_error(
        runner.invoke(app, ["pack", "--store", str(store), "--out", str(packed)]), "video a", str(shard)
    )
    assert not packed.exists()  # a damaged shard is never shipped
    if how != "bytes":  # show reads only the presence masks
        shown = runner.invoke(app, ["show", "--store", str(store)])
        assert shown.exit_code == 0 and f"damaged: a audio: {shard}" in shown.output
    grid = shard_path(store, GRID, "b")
    damage(grid, how)
    labels = tmp_path / "b.txt"
    labels.write_text("valence,arousal\n" + "0,0\n" * 20)
    result = runner.invoke(app, ["labels", "import", str(labels), "--store", str(store)])
    one_line_error(result, "video b", f"frame grid shard {grid}")


def test_status_exits_one_on_damage_and_names_what_repairs_each_kind(tmp_path):
    """status --verify exited 0 on damage, and told damaged labels that the next extract recomputes
    them: only `rcma labels import` writes labels."""
    store = small_store(tmp_path / "store.h5")
    runner = CliRunner()
    assert runner.invoke(app, ["status", "--store", str(store), "--verify"]).exit_code == 0
    labels, grid = shard_path(store, "labels", "a"), shard_path(store, GRID, "b")
    damage(labels, "bytes")
    damage(grid, "truncated")
    result = runner.invoke(app, ["status", "--store", str(store), "--verify"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert f"labels a: {labels}: damaged (checksum mismatch) (`rcma labels import` writes it again)" in lines
    for stage in ("audio", "labels"):  # a damaged frame grid: the next extract recomputes it
        line = next(line for line in lines if line.startswith(f"{stage} b: {grid}: "))
        assert line.endswith("(the next extract recomputes it)"), line


def test_out_at_a_file_or_in_the_shard_folder_is_one_line_and_stray_folders_are_no_stages(tmp_path):
    """--out at a file was a FileExistsError traceback; --out inside store.h5.d/ was accepted, and
    status then showed its plots/, submission/ and tb/ as stages."""
    store = small_store(tmp_path / "store.h5")
    runner = CliRunner()
    run = tmp_path / "run"
    small = ["--window", "8", "--hop", "4", "--width", "8", "--epochs", "1", "--device", "cpu", "-q"]
    train_args = ["train", "--features", str(store), "--modalities", "audio", *small]
    assert runner.invoke(app, [*train_args, "--out", str(run)]).exit_code == 0
    model = str(run / "best.pt")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    inside = shard_root(store) / "plots"
    for args in (
        [*train_args, "--out", str(a_file)],
        ["predict", "--model", model, "--features", str(store), "--out", str(a_file)],
        ["predict", str(SINGLE_FACE), "--model", model, "--store", str(store), "--out", str(a_file)],
    ):
        one_line_error(runner.invoke(app, args), f"{a_file}: exists and is not a folder")
    for args in (
        [*train_args, "--out", str(inside)],
        ["predict", "--model", model, "--features", str(store), "--out", str(inside)],
        ["predict", str(SINGLE_FACE), "--model", model, "--store", str(store), "--out", str(inside)],
    ):
        one_line_error(runner.invoke(app, args), f"{inside}: inside the store's shard folder")
    assert a_file.read_text() == "keep me" and not inside.exists()
    for stray in ("plots", "submission", "tb"):  # as an older rcma let predict and train leave them
        (shard_root(store) / stray).mkdir()
        (shard_root(store) / stray / "a.h5").write_bytes(b"not a shard")
    result = runner.invoke(app, ["status", "--store", str(store)])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")]
    assert rows == ["audio", "labels"]
    rebuild_index(store)
    with open_store(store) as f:
        assert set(f["videos/a"]) == {"audio", "labels", "timestamps"}


def test_temporary_files_of_killed_writers_are_removed_but_never_a_live_one(tmp_path):
    store = small_store(tmp_path / "store.h5")
    root = shard_root(store)
    stale_index = temp_name(store)  # as a kill during an index rebuild leaves it
    stale_shard = temp_name(root / "audio" / "a.h5")
    for path in (stale_index, stale_shard):
        path.write_bytes(b"partial")
    live = ShardWriter(shard_path(store, "audio", "c"), 3, {"video_id": "c"}, root)  # an extract
    result = CliRunner().invoke(app, ["index", "--store", str(store)])
    assert result.exit_code == 0 and "temporary files were left alone" in result.output
    assert stale_index.exists() and live.tmp.exists()
    live.write_rows(0, {"present": np.ones(3, bool)})
    live.commit()  # the running extract's shard is finished, not lost
    assert shard_path(store, "audio", "c").exists()
    result = CliRunner().invoke(app, ["index", "--store", str(store)])
    assert result.exit_code == 0 and "left alone" not in result.output
    assert not stale_index.exists() and not stale_shard.exists()
    stale_pack = temp_name(tmp_path / "packed.h5")  # a 1 GB leftover of a killed pack
    stale_pack.write_bytes(b"partial")
    pack_store(store, tmp_path / "packed.h5")
    assert not stale_pack.exists() and (tmp_path / "packed.h5").exists()


def test_the_temp_cleaner_removes_only_names_the_writers_make(tmp_path):
    store = small_store(tmp_path / "store.h5")
    root = shard_root(store)
    stale = [temp_name(store), temp_name(root / "audio" / "a.h5"), temp_name(tmp_path / "packed.h5")]
    users = [
        tmp_path / ".store.h5.notes.tmp",
        tmp_path / ".store.h5.0123abcd.tmp",
        root / "audio" / ".my draft.tmp",
        tmp_path / ".packed.h5.backup.tmp",
        tmp_path / f".other.h5.{'0' * 32}.tmp",  # another file's temp: not this store's
    ]
    for path in stale + users:
        path.write_bytes(b"mine")
    assert CliRunner().invoke(app, ["index", "--store", str(store)]).exit_code == 0
    pack_store(store, tmp_path / "packed.h5")
    assert [path.exists() for path in stale] == [False, False, False]
    assert all(path.read_bytes() == b"mine" for path in users)


def test_a_link_inside_a_shard_is_not_copied_by_pack(tmp_path):
    store = small_store(tmp_path / "store.h5")
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["x"] = np.arange(5)
    with h5py.File(shard_path(store, "audio", "a"), "a") as f:
        f["stolen"] = h5py.ExternalLink(str(secret), "/x")
    with pytest.raises(StoreError, match="holds a link"):
        pack_store(store, tmp_path / "packed.h5")
    assert not (tmp_path / "packed.h5").exists()


def test_a_file_whose_name_makes_no_id_fails_alone_and_one_file_runs_once(store, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(CREMA_MP4[0], folder / "..mp4")
    shutil.copy(CREMA_MP4[1], folder / "good.mp4")
    named = [folder / "..mp4", folder / ".." / "videos" / "good.mp4", Path(f"{folder}/./good.mp4")]
    report = extract(store, [folder, *named])  # a name starting with "." is skipped in a folder
    assert [(p.name, problem) for p, problem in report.bad_paths] == [
        ("..mp4", "video id '.' is not a relative path of plain names")
    ]
    assert report.counts() == {"done": 1}
    assert stage_counts(store)["meancolour"].done == ["good"]
    shutil.copy(CREMA_MP4[2], folder / ".hidden.mp4")  # named on the command line: a job like any other
    assert extract(store, [folder / ".hidden.mp4"]).counts() == {"done": 1}
    assert stage_counts(store)["meancolour"].done == [".hidden", "good"]
    with open_store(store) as f:
        assert video_ids(f) == [".hidden", "good"]


def test_a_store_in_a_read_only_folder_is_one_line(tmp_path):
    """Run as an unprivileged user (root may write anywhere), the way a user meets a read-only folder."""
    import subprocess
    import sys
    import tempfile

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs a non-root user or setpriv")
    with tempfile.TemporaryDirectory() as public:
        folder = Path(public) / "ro"
        folder.mkdir()
        shutil.copy(SINGLE_FACE, folder / "clip.mp4")
        os.chmod(public, 0o755)
        os.chmod(folder, 0o555)
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        store = folder / "store.h5"
        result = subprocess.run(
            [*user, sys.executable, "-m", "cli", "extract", str(folder / "clip.mp4"), "--store", str(store)],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": public},
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [f"error: {store}: the folder {folder} is not writable"]


@pytest.mark.parametrize(
    "options, needle",
    [
        (["--stage", "text", "--asr-model", "nope"], "Whisper model 'nope'"),
        (["--stage", "audio", "--audio-model", "logmel", "--audio-layer", "5"], "--audio-layer is for"),
        (["--stage", "audio", "--audio-layer", "5"], "--audio-layer 5: Whisper tiny.en has blocks 0..4"),
        (["--stage", "audio", "--audio-window", "30s"], "unknown --audio-window '30s'"),
        (["--stage", "audio", "--audio-model", "wav2vec2", "--audio-layer", "13"], "has layers 1..12"),
        (["--stage", "audio", "--fps", "0"], "--fps 0:"),
        (["--stage", "audio", "--fps", "-5"], "--fps -5:"),
    ],
)
def test_bad_stage_options_are_one_run_error_before_any_job(store, options, needle):
    result = CliRunner().invoke(
        app, ["extract", str(CREMA_MP4[0]), str(CREMA_MP4[1]), "--store", str(store), "-q", *options]
    )
    one_line_error(result, needle)
    assert failures(store) == {}


def serve(kind: str):
    """A listener on 127.0.0.1 that accepts and never answers, or a tiny web server; its address."""
    import http.server
    import socket
    import threading

    if kind == "silent":
        server = socket.create_server(("127.0.0.1", 0))
        held = []
        threading.Thread(target=lambda: held.extend(server.accept() for _ in range(10)), daemon=True).start()
        return f"tcp://127.0.0.1:{server.getsockname()[1]}", server.close
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    return f"tcp://127.0.0.1:{web.server_address[1]}", web.shutdown


@pytest.mark.parametrize("kind", ["silent", "web"])
def test_a_scheduler_address_that_never_speaks_dask_is_one_line(kind, tmp_path):
    import time

    from pipeline import runner

    address, stop = serve(kind)
    try:
        started = time.monotonic()
        with pytest.raises(runner.FatalError, match=f"{address}.*is that address a Dask scheduler") as error:
            runner.connect(address, timeout=2)
        assert time.monotonic() - started < 15 and "\n" not in str(error.value)
        scheduler_file = tmp_path / "scheduler.json"
        scheduler_file.write_text(f'{{"address": "{address}"}}')
        with pytest.raises(runner.FatalError, match=address):
            runner.connect(str(scheduler_file), timeout=2)
    finally:
        stop()


def test_a_missing_model_on_a_dask_worker_is_one_run_error_not_retried_per_video(tmp_path, monkeypatch):
    from distributed import LocalCluster

    from pipeline import audio, runner

    monkeypatch.setenv("RCMA_AUDIO_WEIGHTS", str(tmp_path / "no-such-weights.pth"))
    tries = []
    load = audio.SelfSupervised.load
    counted = lambda self, device: tries.append(1) or load(self, device)  # noqa: E731
    monkeypatch.setattr(audio.SelfSupervised, "load", counted)
    store = tmp_path / "store.h5"
    jobs, _ = runner.discover(CREMA_MP4[:3])
    specs = [("audio", {"audio_model": "wav2vec2", "device": "cpu"})]
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, pytest.raises(runner.FatalError, match="no-such-weights"):
        runner.run_dask(jobs, cluster.scheduler_address, store, specs, 30.0, False)
    assert failures(store) == {} and len(tries) == 1


@pytest.mark.slow
def test_a_scheduler_lost_mid_run_is_a_run_error_and_the_next_run_finishes(tmp_path, capfd):
    import signal
    import subprocess
    import sys
    import time

    from conftest import CREMA_FLV

    from pipeline import runner

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [
            *dask,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            "--scheduler-file",
            str(scheduler_file),
            "--nthreads",
            "1",
            "--no-dashboard",
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if scheduler_file.exists():
                break
            time.sleep(0.1)
        store = tmp_path / "store.h5"
        videos = [*CREMA_MP4, *CREMA_FLV]
        jobs, _ = runner.discover(videos)
        finished = []

        def kill_after_first(job, outcomes):
            finished.append(job.video_id)
            if len(finished) == 1:
                scheduler.send_signal(signal.SIGKILL)

        specs = [("audio", {"audio_model": "logmel", "device": "cpu"})]
        with pytest.raises(runner.FatalError, match="lost the Dask scheduler") as error:
            runner.run_dask(jobs, str(scheduler_file), store, specs, 30.0, False, kill_after_first)
        assert "\n" not in str(error.value)
        assert "Traceback" not in capfd.readouterr().err
    finally:
        for process in (worker, scheduler):
            process.kill()
            process.wait()
    assert failures(store) == {}  # no video is blamed for the cluster
    done = stage_counts(store)["audio"].done
    assert 1 <= len(done) < len(jobs)
    extractor = runner.Extractor(store, [runner.build_stage("audio", specs[0][1])])
    rest = runner.run_local(jobs, extractor)
    assert sorted(o.status for o in rest) == sorted(
        ["skipped"] * len(done) + ["done"] * (len(jobs) - len(done))
    )


def test_shards_written_before_checksums_are_still_read(tmp_path):
    store = small_store(tmp_path / "store.h5")
    shard = shard_path(store, "audio", "a")
    with h5py.File(shard, "r") as f:
        arrays, attrs = {k: f[k][:] for k in f}, dict(f.attrs)
    with h5py.File(shard, "w") as f:  # as rcma wrote shards before fletcher32
        f.attrs.update(attrs)
        for name, value in arrays.items():
            f.create_dataset(name, data=value, chunks=True, compression="lzf")
    with h5py.File(shard, "r") as f:
        assert not f["embedding"].fletcher32
    assert stage_counts(store, verify=True)["audio"].damaged == {}
    data = load_store(store, ["audio"], ["a", "b"])
    np.testing.assert_array_equal(data.features["audio"][:20].numpy(), arrays["embedding"])
