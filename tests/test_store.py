"""The runner and the store: discovery, the frame grid, resumption, config changes, bad input.

These use a light stage (each frame's mean colour, computed from the decoded frames) so that the
mechanics are tested in seconds; the real stages have their own tests.
"""

import os
import shutil
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
from conftest import CREMA_FLV, CREMA_MP4, HAMILTON, JFK, PEXELS, SINGLE_FACE

from pipeline import runner
from pipeline.media import Media, iter_video_frames, probe
from pipeline.stages import Extra, Rows, Stage
from pipeline.store import (
    StoreError,
    check_store_path,
    claim_stage_config,
    damaged_members,
    open_store,
    pack_store,
    read_rows,
    rebuild_index,
    shard_path,
    shard_root,
    stage_config,
    stage_counts,
    video_ids,
)


class FrameMean(Stage):
    name = "meancolour"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def config(self) -> dict:
        return {"scale": self.scale}

    def run(self, media: Media):
        done = 0
        for times, frames in iter_video_frames(media.path, batch_size=16):
            assert np.allclose(times, media.timestamps[done : done + len(times)])
            means = frames.reshape(len(frames), -1, 3).mean(axis=1) * self.scale
            yield Rows(done, {"present": np.ones(len(frames), bool), "mean": means.astype(np.float32)})
            done += len(frames)
        yield Extra(attrs={"frames_seen": done})


def decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def extract(store: Path, paths: list[Path], stage: Stage | None = None, **kwargs) -> runner.Report:
    jobs, report = runner.discover(paths)
    extractor = runner.Extractor(store, [stage or FrameMean()], **kwargs)
    report.outcomes = runner.run_local(jobs, extractor)
    return report


def test_discover_takes_media_by_content_and_makes_unique_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(CREMA_MP4[0], tmp_path / "a" / "clip.mp4")
    shutil.copy(CREMA_FLV[0], tmp_path / "b" / "clip.flv")
    shutil.copy(SINGLE_FACE, tmp_path / "b" / "renamed.bin")  # media by content, not by name
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / ".hidden.mp4").write_bytes(b"ignored")
    jobs, report = runner.discover([tmp_path, tmp_path / "missing.mp4"])
    assert sorted(j.video_id for j in jobs) == ["a/clip", "b/clip", "renamed"]
    assert [p.name for p, _ in report.not_media] == ["notes.txt"]
    assert [p.name for p, _ in report.bad_paths] == ["missing.mp4"]


def test_store_has_one_row_per_decoded_frame_and_opens_with_plain_h5py(store, monkeypatch):
    videos = [CREMA_MP4[0], CREMA_FLV[1], PEXELS, SINGLE_FACE]
    report = extract(store, videos)
    assert report.ok and report.counts()["done"] == 4
    monkeypatch.chdir("/")  # external links resolve next to store.h5, not the working directory
    with h5py.File(store, "r") as f:
        for path in videos:
            video = f[f"videos/{path.stem}"]
            n = decoded_frame_count(path)
            assert video.attrs["n_frames"] == n
            assert video["timestamps"].shape == (n,)
            assert np.all(np.diff(video["timestamps"][:]) > 0)
            assert video["meancolour/mean"].shape == (n, 3)
            assert video["meancolour/present"][:].all()
            assert video.attrs["source"] == str(path)
            attrs = video["meancolour"].attrs
            assert attrs["config_hash"] and attrs["grid_hash"] and attrs["seconds"] > 0
            assert "torch" in attrs["versions"] and attrs["frames_seen"] == n
        assert f["videos/WolfgangLanger_Pexels"].attrs["fps"] == pytest.approx(23.976, abs=1e-3)
        assert f["videos/single_face"].attrs["fps"] == pytest.approx(30.0)


def test_rerun_skips_done_work_and_gives_identical_arrays(store):
    extract(store, [CREMA_MP4[0], SINGLE_FACE])
    first = read_rows(shard_path(store, "meancolour", "single_face"), "mean")
    mtime = shard_path(store, "meancolour", "single_face").stat().st_mtime_ns
    report = extract(store, [CREMA_MP4[0], SINGLE_FACE])
    assert report.counts() == {"skipped": 2}
    assert shard_path(store, "meancolour", "single_face").stat().st_mtime_ns == mtime
    report = extract(store, [CREMA_MP4[0], SINGLE_FACE], force=True)
    assert report.counts() == {"done": 2}
    assert np.array_equal(read_rows(shard_path(store, "meancolour", "single_face"), "mean"), first)


def test_another_config_is_refused_unless_forced_and_never_mixed(store):
    extract(store, [SINGLE_FACE, CREMA_MP4[0]])
    shard = shard_path(store, "meancolour", "single_face")
    before = shard.read_bytes()
    with pytest.raises(runner.FatalError) as refused:
        extract(store, [SINGLE_FACE], stage=FrameMean(scale=2.0))
    message = str(refused.value)
    assert "\n" not in message and "meancolour" in message and "scale: 1.0 in the store, 2.0 now" in message
    assert "--force" in message and "another --store" in message
    assert shard.read_bytes() == before  # nothing was written

    report = extract(store, [SINGLE_FACE], stage=FrameMean(scale=2.0), force=True)
    assert report.counts() == {"done": 1}
    assert stage_config(store, "meancolour")["config"] == {"scale": 2.0}
    with open_store(store) as f:  # the video not recomputed keeps no link to its old-config shard
        assert f["videos/single_face/meancolour"].attrs["config"] == '{"scale": 2.0}'
        assert "meancolour" not in f[f"videos/{CREMA_MP4[0].stem}"]
    counts = stage_counts(store)["meancolour"]
    assert counts.done == ["single_face"] and counts.other_config == [CREMA_MP4[0].stem]
    again = extract(store, [CREMA_MP4[0]], stage=FrameMean(scale=2.0))  # recomputed, not skipped
    assert again.counts() == {"done": 1}


def test_a_failed_forced_recompute_keeps_the_previous_good_shard(store, tmp_path):
    video = tmp_path / "clip.mp4"
    shutil.copy(CREMA_MP4[0], video)
    extract(store, [video])
    shard = shard_path(store, "meancolour", "clip")
    before = shard.read_bytes()

    class Failing(FrameMean):
        def run(self, media: Media):
            yield from super().run(media)
            raise RuntimeError("out of memory")

    report = extract(store, [video], stage=Failing(), force=True)
    assert [o.error for o in report.failed] == ["RuntimeError: out of memory"]
    assert shard.read_bytes() == before
    with open_store(store) as f:
        assert "meancolour" in f["videos/clip"] and not damaged_members(store, f["videos/clip"], full=True)


def test_settings_are_claimed_by_a_written_shard_and_by_one_run_only(store, tmp_path):
    video = tmp_path / "clip.mp4"
    shutil.copy(CREMA_MP4[0], video)
    extract(store, [video])

    class Failing(FrameMean):
        def run(self, media: Media):
            raise RuntimeError("out of memory")

    report = extract(store, [video], stage=Failing(scale=2.0), force=True)
    assert report.counts() == {"failed": 1}
    assert stage_config(store, "meancolour")["config"] == {"scale": 1.0}  # --force claims with a shard only
    with open_store(store) as f:
        assert "meancolour" in f["videos/clip"]
    # A second run with other settings, past the check before its jobs, meets the first's claim
    # when it commits its first shard: it stops, and the shard of the first run's config stays.
    with pytest.raises(StoreError, match="another run claimed its meancolour features"):
        claim_stage_config(store, "meancolour", "other", {"scale": 3.0}, force=False)
    assert stage_config(store, "meancolour")["config"] == {"scale": 1.0}
    claim_stage_config(store, "meancolour", "other", {"scale": 3.0}, force=True)
    assert stage_config(store, "meancolour")["config"] == {"scale": 3.0}


def test_changed_source_file_is_recomputed(store, tmp_path):
    video = tmp_path / "clip.mp4"
    shutil.copy(CREMA_MP4[0], video)
    extract(store, [video])
    shutil.copy(CREMA_MP4[1], video)
    report = extract(store, [video])
    assert report.counts() == {"done": 1}
    with open_store(store) as f:
        assert f["videos/clip"].attrs["n_frames"] == decoded_frame_count(CREMA_MP4[1])


def make_audio_only(src: Path, dst: Path) -> None:
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream_from_template(inp.streams.audio[0])
        for packet in inp.demux(inp.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def make_truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def make_empty_video(dst: Path) -> None:
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height = 64, 64
        out.start_encoding()


BAD_INPUTS = {
    "truncated.mp4": (make_truncated, "corrupt or truncated video"),
    "notes.mp4": (lambda src, dst: dst.write_text("hello, not a video\n" * 50), "not a readable media file"),
    "empty.mp4": (lambda src, dst: make_empty_video(dst), "no video or audio stream"),
    "dangling.mp4": (lambda src, dst: dst.symlink_to(dst.parent / "gone.mp4"), "no such file"),
}


def test_each_bad_input_fails_alone_with_a_clear_line(store, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (make, _) in BAD_INPUTS.items():
        make(CREMA_MP4[0], folder / name)
    shutil.copy(SINGLE_FACE, folder / "good.mp4")
    report = extract(store, [folder])
    errors = {Path(o.source).name: o.error for o in report.failed}
    assert set(errors) == set(BAD_INPUTS)
    for name, (_, message) in BAD_INPUTS.items():
        assert message in errors[name], errors[name]
        assert "\n" not in errors[name]
    assert [o.video_id for o in report.outcomes if o.status == "done"] == ["good"]
    counts = stage_counts(store)["meancolour"]
    assert counts.done == ["good"] and set(counts.failed) == {"truncated", "notes", "empty", "dangling"}
    with open_store(store) as f:
        assert video_ids(f) == ["good"]


def test_audio_only_media_gets_a_grid_at_the_given_fps(store, tmp_path):
    audio = tmp_path / "speech.m4a"
    make_audio_only(CREMA_MP4[0], audio)
    jobs, _ = runner.discover([audio, JFK])
    extractor = runner.Extractor(store, [], fps=25.0)
    runner.run_local(jobs, extractor)
    with open_store(store) as f:
        jfk = f["videos/jfk"]
        assert not jfk.attrs["has_video"] and jfk.attrs["has_audio"]
        assert jfk.attrs["n_frames"] == int(11.0 * 25)
        assert np.allclose(np.diff(jfk["timestamps"][:]), 1 / 25)
        assert f["videos/speech"].attrs["n_frames"] == pytest.approx(2.27 * 25, abs=2)


def test_failure_is_cleared_once_the_video_succeeds(store, tmp_path):
    video = tmp_path / "clip.mp4"
    make_truncated(CREMA_MP4[0], video)
    assert not extract(store, [video]).ok
    assert stage_counts(store)["meancolour"].failed
    shutil.copy(CREMA_MP4[0], video)
    assert extract(store, [video]).ok
    counts = stage_counts(store)["meancolour"]
    assert counts.done == ["clip"] and not counts.failed


def test_truncated_index_is_a_clear_error_and_rebuilds_from_shards(store):
    extract(store, [SINGLE_FACE, CREMA_MP4[0]])
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="truncated or corrupt.*rcma index"):
        open_store(store)
    assert rebuild_index(store) == 2
    with open_store(store) as f:
        assert video_ids(f) == ["1001_DFA_ANG_XX", "single_face"]


def test_not_a_store_and_missing_store_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nope.h5")
    with pytest.raises(StoreError, match="folder .* does not exist"):
        check_store_path(tmp_path / "missing" / "store.h5")


def test_interrupted_shard_write_leaves_nothing_visible(store):
    class Crashes(FrameMean):
        def run(self, media):
            yield from list(super().run(media))[:1]
            raise RuntimeError("worker died")

    report = extract(store, [CREMA_MP4[0]], stage=Crashes())
    assert report.failed[0].error == "RuntimeError: worker died"
    assert not shard_path(store, "meancolour", "1001_DFA_ANG_XX").exists()
    leftovers = [p for p in shard_root(store).rglob("*") if p.suffix == ".tmp"]
    assert leftovers == []


def test_pack_copies_everything_into_one_file(store, tmp_path):
    extract(store, [SINGLE_FACE, HAMILTON])
    packed = tmp_path / "elsewhere" / "packed.h5"
    packed.parent.mkdir()
    pack_store(store, packed)
    shutil.rmtree(shard_root(store))
    with h5py.File(packed, "r") as f:
        assert f["videos/short_hamilton_clip/meancolour/mean"].shape == (decoded_frame_count(HAMILTON), 3)
        assert f["videos/single_face"].attrs["n_frames"] == 72
        assert os.path.getsize(packed) > 0


def test_display_rotation_is_applied_to_frames_and_size(tmp_path):
    rotated = tmp_path / "portrait.mp4"
    with av.open(str(SINGLE_FACE)) as inp, av.open(str(rotated), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        stream.set_display_rotation(90)
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    info = probe(rotated)
    assert (info.width, info.height) == (360, 640)
    _, upright = next(iter_video_frames(SINGLE_FACE, batch_size=2))
    _, turned = next(iter_video_frames(rotated, batch_size=2))
    assert turned.shape == (2, 640, 360, 3)
    np.testing.assert_array_equal(turned, np.rot90(upright, 1, axes=(1, 2)))


def test_ids_from_files_outside_the_working_folder_never_escape_the_store(store, tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / "in" / name).mkdir(parents=True)
        shutil.copy(SINGLE_FACE, tmp_path / "in" / name / "clip.mp4")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    jobs, _ = runner.discover([Path("../in/a/clip.mp4"), Path("../in/b/clip.mp4")])
    assert sorted(j.video_id for j in jobs) == ["a/clip", "b/clip"]
    with pytest.raises(ValueError, match="not a relative path"):
        shard_path(store, "faces", "../clip")


def test_nested_ids_are_all_listed(store, tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "c").mkdir()
    shutil.copy(SINGLE_FACE, root / "a.mp4")
    shutil.copy(SINGLE_FACE, root / "a" / "b.mp4")
    shutil.copy(CREMA_MP4[0], root / "c" / "b.mp4")
    report = extract(store, [root])
    assert sorted(o.video_id for o in report.outcomes) == ["a", "a/b", "c/b"]
    with open_store(store) as f:
        assert video_ids(f) == ["a", "a/b", "c/b"]
    packed = tmp_path / "packed.h5"
    pack_store(store, packed)
    with h5py.File(packed, "r") as f:
        assert video_ids(f) == ["a", "a/b", "c/b"]
        assert f["videos/a/b/meancolour/mean"].shape == (72, 3)


def test_an_id_already_holding_another_file_is_refused(store, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(CREMA_MP4[0] if name == "a" else CREMA_MP4[1], tmp_path / name / "clip.mp4")
    assert extract(store, [tmp_path / "a" / "clip.mp4"]).ok
    report = extract(store, [tmp_path / "b" / "clip.mp4"])
    assert "video id 'clip' already holds" in report.failed[0].error
    with open_store(store) as f:
        assert f["videos/clip"].attrs["source"] == str(tmp_path / "a" / "clip.mp4")


def test_shards_of_an_older_grid_are_not_linked(store, tmp_path):
    video = tmp_path / "clip.mp4"
    shutil.copy(CREMA_MP4[0], video)
    extract(store, [video])
    shutil.copy(CREMA_MP4[2], video)  # re-encoded footage: a new frame grid
    jobs, _ = runner.discover([video])
    runner.run_local(jobs, runner.Extractor(store, []))  # grid only; the old stage shard remains
    assert shard_path(store, "meancolour", "clip").exists()
    with open_store(store) as f:
        assert "meancolour" not in f["videos/clip"]
        assert f["videos/clip"].attrs["n_frames"] == decoded_frame_count(CREMA_MP4[2])


def test_audio_only_files_record_the_grid_fps(store):
    jobs, _ = runner.discover([JFK])
    runner.run_local(jobs, runner.Extractor(store, [], fps=25.0))
    with open_store(store) as f:
        assert f["videos/jfk"].attrs["fps"] == 25.0


def test_text_files_are_not_taken_for_video(tmp_path):
    (tmp_path / "README.nfo").write_text("release notes\n" * 40)
    (tmp_path / "notes").write_text("no extension\n" * 40)
    (tmp_path / "frame_0001.jpg").write_bytes(b"\xff\xd8\xff")
    jobs, report = runner.discover([tmp_path])
    assert jobs == []
    assert sorted(p.name for p, _ in report.not_media) == ["README.nfo", "frame_0001.jpg", "notes"]


def test_weights_swapped_behind_a_path_or_variable_are_a_config_change(tmp_path, monkeypatch):
    from pipeline.audio import AUDIO_WEIGHTS_ENV, AudioStage
    from pipeline.stages import config_hash, resolved
    from pipeline.text import TEXT_MODEL_ENV, TextStage

    weights = tmp_path / "wav2vec2.pt"
    weights.write_bytes(b"first weights")
    monkeypatch.setenv(AUDIO_WEIGHTS_ENV, str(weights))
    first = config_hash(resolved(AudioStage(audio_model="wav2vec2", device="cpu")))
    assert config_hash(resolved(AudioStage(audio_model="wav2vec2", device="cpu"))) == first
    weights.write_bytes(b"other weights, same path")
    assert config_hash(resolved(AudioStage(audio_model="wav2vec2", device="cpu"))) != first
    given = config_hash(
        resolved(AudioStage(audio_model="wav2vec2", audio_weights=str(weights), device="cpu"))
    )
    assert given != first

    folder = tmp_path / "my-text-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a")
    (folder / "modules.json").write_text("[]")  # what makes a folder a sentence-transformers model
    monkeypatch.setenv(TEXT_MODEL_ENV, str(folder))
    before = resolved(TextStage(device="cpu")).config()
    (folder / "model.safetensors").write_bytes(b"b")
    after = resolved(TextStage(device="cpu")).config()
    assert before["text_model"] == after["text_model"] == "my-text-model"
    assert before["text_weights_sha256"] != after["text_weights_sha256"]
