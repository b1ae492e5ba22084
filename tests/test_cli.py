"""`rcma extract`, `status`, `index` end to end with the real faces stage (crops only, offline)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from conftest import CREMA_MP4, JFK, SINGLE_FACE
from typer.testing import CliRunner

from cli import app
from pipeline import runner
from pipeline.stages import build_stage
from pipeline.store import open_store, shard_root, video_ids

REPO = Path(__file__).resolve().parents[1]
FACES = ["--stage", "faces", "--visual-model", "none", "--quiet"]


def rcma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True)


def read_all(store: Path) -> dict[str, np.ndarray]:
    arrays = {}
    with open_store(store) as f:
        for video_id in video_ids(f):
            faces = f[f"videos/{video_id}/faces"]
            for name in faces:
                arrays[f"{video_id}/{name}"] = faces[name][:]
    return arrays


def test_extract_reports_bad_files_and_exits_nonzero(store, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(SINGLE_FACE, folder / "good.mp4")
    (folder / "broken.mp4").write_bytes(SINGLE_FACE.read_bytes()[:20000])
    (folder / "readme.txt").write_text("notes")
    result = CliRunner().invoke(app, ["extract", str(folder), "--store", str(store), *FACES])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(
        line.startswith("failed:")
        and "broken.mp4: faces: not a readable media file: corrupt, truncated" in line
        for line in lines
    )
    assert any(line.startswith("skipped:") and "readme.txt" in line for line in lines)
    assert "1 done, 0 already done, 1 failed" in result.output
    status = CliRunner().invoke(app, ["status", "--store", str(store)])
    assert status.exit_code == 0
    assert "faces broken: not a readable media file: corrupt, truncated" in status.output
    with open_store(store) as f:
        assert video_ids(f) == ["good"]


def test_store_in_a_missing_folder_and_missing_input_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(
        app, ["extract", str(SINGLE_FACE), "--store", str(tmp_path / "no" / "s.h5"), *FACES]
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(
        app, ["extract", str(tmp_path / "nope.mp4"), "--store", str(tmp_path / "s.h5"), *FACES]
    )
    assert result.exit_code == 2
    assert "nope.mp4: no such file or folder" in result.output


def test_a_wrong_path_among_good_ones_stops_the_run_before_anything_is_extracted(tmp_path):
    store = tmp_path / "s.h5"
    missing = tmp_path / "typo.mp4"
    args = ["extract", str(SINGLE_FACE), str(missing), "--store", str(store), "--workers", "1", *FACES]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"{missing}: no such file or folder" in lines[0], result.output
    assert not store.exists() and not list(tmp_path.rglob("*.h5")), "nothing may run"


def test_unknown_stage_is_a_clear_error(store):
    result = CliRunner().invoke(app, ["extract", str(SINGLE_FACE), "--store", str(store), "--stage", "pose"])
    assert result.exit_code == 2 and "unknown stage 'pose'" in result.output


@pytest.mark.parametrize(
    "option, value",
    [("--asr-model", "no-such-whisper"), ("--text-model", "./no-such-text-model")],
)
def test_a_bad_asr_or_text_model_is_one_line_before_any_job(option, value, tmp_path, monkeypatch):
    monkeypatch.delenv("RCMA_ASR_MODEL", raising=False)
    monkeypatch.delenv("RCMA_TEXT_MODEL", raising=False)
    store = tmp_path / "s.h5"
    args = ["extract", str(JFK), "--store", str(store), "--stage", "text", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, [*args, option, value])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: text: ") and len(result.output.strip().splitlines()) == 1
    assert option in result.output and value in result.output
    assert not store.exists() and not shard_root(store).exists()  # no job ran: no grid, no shard


def _config_refused(result) -> bool:
    return result.exit_code == 2 and "made with other settings" in result.output


@pytest.mark.parametrize("failure", ["vggface2 download", "every file fails"])
def test_a_run_that_fails_before_a_shard_claims_no_settings(failure, tmp_path, monkeypatch):
    """A missing vggface2 download, a run whose every file fails: the rerun with other settings is
    accepted, and a stage's settings are the store's once a shard of them exists."""
    monkeypatch.setenv("RCMA_CACHE", str(tmp_path / "cache"))  # no vggface2 weights, none to download
    monkeypatch.delenv("RCMA_VGGFACE2_WEIGHTS", raising=False)
    store = tmp_path / "s.h5"
    run = ["extract", "--store", str(store), "--stage", "faces", "--workers", "1", "--quiet"]
    if failure == "vggface2 download":
        first = CliRunner().invoke(app, [*run, str(SINGLE_FACE), "--visual-model", "vggface2"])
        assert first.exit_code == 2 and "vggface2" in first.output, first.output
    else:
        empty = tmp_path / "empty.mp4"
        empty.write_bytes(b"")
        first = CliRunner().invoke(app, [*run, str(empty), "--visual-model", "none"])  # crops=True
        assert first.exit_code == 1 and "failed" in first.output, first.output
    rerun = CliRunner().invoke(app, [*run, str(SINGLE_FACE), "--visual-model", "none", "--no-crops"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((shard_root(store) / "faces" / "config.json").read_text())["config"]["crops"] is False
    refused = CliRunner().invoke(app, [*run, str(SINGLE_FACE), "--visual-model", "none"])
    assert _config_refused(refused) and "crops: False in the store, True now" in refused.output


def test_a_missing_asr_model_claims_no_text_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("RCMA_ASR_MODEL", raising=False)
    monkeypatch.delenv("RCMA_TEXT_MODEL", raising=False)
    store = tmp_path / "s.h5"
    run = ["extract", str(JFK), "--store", str(store), "--stage", "text", "--device", "cpu", "--workers", "1"]
    missing = CliRunner().invoke(app, [*run, "--quiet", "--asr-model", "/nonexistent"])
    assert missing.exit_code == 2 and "/nonexistent" in missing.output, missing.output
    rerun = CliRunner().invoke(app, [*run, "--quiet"])
    assert rerun.exit_code == 0, rerun.output
    with open_store(store) as f:
        assert f[f"videos/{JFK.stem}/text"].attrs["asr_model"] == "tiny.en"


@pytest.mark.slow
def test_kill_9_loses_no_finished_video_and_the_rerun_completes_identically(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in CREMA_MP4:
        shutil.copy(path, videos / path.name)
    killed = tmp_path / "killed" / "store.h5"
    killed.parent.mkdir()
    command = [sys.executable, "-m", "cli", "extract", str(videos), "--store", str(killed), *FACES]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = shard_root(killed) / "faces"
    deadline = time.monotonic() + 300
    # Two finished shards and an index: the run refreshes the index after a job ends, so two
    # workers can finish their shards before the first index exists.
    while time.monotonic() < deadline and (len(list(shards.glob("*.h5"))) < 2 or not killed.exists()):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.stem for p in shards.glob("*.h5"))
    assert 2 <= len(finished) < len(CREMA_MP4), "kill landed outside the run; test proves nothing"
    with h5py.File(killed, "r") as f:  # the index written before the kill still opens
        assert set(video_ids(f)) <= set(finished) | {p.stem for p in CREMA_MP4}
    rerun = rcma("extract", str(videos), "--store", str(killed), *FACES)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(CREMA_MP4) - len(finished)} done, {len(finished)} already done, 0 failed" in rerun.stderr

    clean = tmp_path / "clean" / "store.h5"
    clean.parent.mkdir()
    assert rcma("extract", str(videos), "--store", str(clean), *FACES).returncode == 0
    after_kill, uninterrupted = read_all(killed), read_all(clean)
    assert after_kill.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(after_kill[key], value, err_msg=key)


@pytest.mark.slow
def test_dask_cluster_writes_the_same_store(tmp_path):
    from distributed import LocalCluster

    videos = [CREMA_MP4[0], SINGLE_FACE]
    local = tmp_path / "local" / "store.h5"
    local.parent.mkdir()
    jobs, _ = runner.discover(videos)
    options = {"visual_model": "none", "crops": True, "device": "cpu"}
    runner.run_local(jobs, runner.Extractor(local, [build_stage("faces", options)]))

    distributed = tmp_path / "dask" / "store.h5"
    distributed.parent.mkdir()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        scheduler_file = tmp_path / "scheduler.json"
        scheduler_file.write_text(json.dumps(cluster.scheduler.identity()))
        outcomes = runner.run_dask(
            jobs, cluster.scheduler_address, distributed, [("faces", options)], 30.0, False
        )
        assert sorted(o.status for o in outcomes) == ["done", "done"]
        again = runner.run_dask(jobs, str(scheduler_file), distributed, [("faces", options)], 30.0, False)
        assert sorted(o.status for o in again) == ["skipped", "skipped"]
    a, b = read_all(local), read_all(distributed)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_index_command_repairs_a_damaged_index(store):
    jobs, _ = runner.discover([SINGLE_FACE])
    runner.run_local(jobs, runner.Extractor(store, []))
    store.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(100))
    result = CliRunner().invoke(app, ["index", "--store", str(store)])
    assert result.exit_code == 0 and "1 videos indexed" in result.output
    with open_store(store) as f:
        assert video_ids(f) == ["single_face"]


def test_show_summarises_each_video(store, monkeypatch):
    jobs, _ = runner.discover([SINGLE_FACE, CREMA_MP4[0]])
    options = {"visual_model": "none", "crops": False, "device": "cpu"}
    runner.run_local(jobs, runner.Extractor(store, [build_stage("faces", options)]))
    result = CliRunner().invoke(app, ["show", "--store", str(store)])
    assert result.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "72" in rows["single_face"] and "30.000" in rows["single_face"]
    assert "100%" in rows["1001_DFA_ANG_XX"]  # a face on every CREMA-D frame

    monkeypatch.setattr("pipeline.tables.SHOW_TABLE_MAX", 1)  # a big store: plain columns, the same cells
    plain = CliRunner().invoke(app, ["show", "--store", str(store)])
    assert plain.exit_code == 0
    lines = {line.split()[0]: line.split() for line in plain.output.splitlines() if line.strip()}
    assert lines["single_face"][1:3] == ["72", "30.000"] and lines["1001_DFA_ANG_XX"][-1] == "100%"


def test_a_file_without_video_or_face_is_a_warning_not_a_failure(store, tmp_path):
    from conftest import JFK
    from test_store import make_audio_only

    sound_only = tmp_path / "sound_only.mp4"  # a video file without its video stream
    make_audio_only(CREMA_MP4[0], sound_only)

    wall = tmp_path / "wall.mp4"  # real frames averaged to one flat colour: no face
    with av.open(str(SINGLE_FACE)) as src, av.open(str(wall), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for frame in list(src.decode(video=0))[:10]:
            image = frame.to_ndarray(format="rgb24")[::2, ::2]
            flat = np.full_like(image, image.mean(axis=(0, 1), keepdims=True).astype(np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(flat, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    inputs = [str(JFK), str(sound_only), str(wall)]
    result = CliRunner().invoke(app, ["extract", *inputs, "--store", str(store), *FACES])
    assert result.exit_code == 0, result.output
    assert f"warning: {sound_only}: faces: no video stream: every frame marked absent" in result.output
    assert f"warning: {wall}: faces: no face found: every frame marked absent" in result.output
    assert str(JFK) not in result.output  # an audio file is not expected to have faces
    assert "3 done, 0 already done, 0 failed" in result.output


def test_index_pack_and_scheduler_errors_are_one_line(tmp_path):
    odd = tmp_path / "folder.h5"
    odd.mkdir()
    for args in (
        ["index", "--store", str(odd)],
        ["index", "--store", str(tmp_path / "missing" / "s.h5")],
        ["index", "--store", str(tmp_path / "never.h5")],
        ["pack", "--store", str(tmp_path / "never.h5"), "--out", str(tmp_path / "p.h5")],
        [
            "extract",
            str(SINGLE_FACE),
            "--store",
            str(tmp_path / "s.h5"),
            *FACES,
            "--scheduler",
            "tcp://127.0.0.1:9",
        ],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:"), (
            result.output
        )
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
