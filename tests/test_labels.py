"""Label import: Aff-Wild2 .txt, CSV by frame, by time and per clip; mismatches; splits."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CREMA_MP4
from synthetic import FPS, add_video
from test_store import extract
from typer.testing import CliRunner

from cli import app
from pipeline.labels import LabelError, import_labels, tolerance
from pipeline.store import (
    GRID,
    read_shard_attrs,
    rebuild_index,
    shard_path,
    shard_root,
    stage_counts,
    write_shard,
)


def make_store(store: Path, lengths: dict[str, int]) -> Path:
    for vid, n in lengths.items():
        add_video(
            store, vid, n, {"audio": {"present": np.ones(n, bool), "embedding": np.zeros((n, 4), np.float16)}}
        )
    rebuild_index(store)
    return store


def read_labels(store: Path, vid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    with h5py.File(store, "r") as f:
        g = f[f"videos/{vid}/labels"]
        split = g.attrs["split"]
        return g["valence"][:], g["arousal"][:], g["present"][:], split


def affwild2(path: Path, rows: list[tuple[float, float]]) -> Path:
    path.write_text("valence,arousal\n" + "".join(f"{v},{a}\n" for v, a in rows))
    return path


def test_affwild2_folder_with_unannotated_frames_and_small_mismatches(store, tmp_path):
    make_store(store, {"a": 10, "b": 600, "c": 20})
    folder = tmp_path / "VA_Set"
    folder.mkdir()
    affwild2(
        folder / "a.txt", [(0.1 * i, -0.05 * i) for i in range(10)][:4] + [(-5, -5)] * 2 + [(0.2, 0.3)] * 4
    )
    affwild2(folder / "b.txt", [(0.5, 0.5)] * 604)  # 4 rows too many: trimmed
    affwild2(folder / "c.txt", [(-0.5, 0.25)] * 17)  # 3 short: padded
    result = import_labels(store, [folder], split="train")
    warnings = {r.video_id: r.warning for r in result}
    assert warnings["a"] == "" and "dropped" in warnings["b"] and "no label" in warnings["c"]
    v, a, present, split = read_labels(store, "a")
    assert split == "train" and len(v) == 10
    np.testing.assert_array_equal(present, [1, 1, 1, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(v[:4], [0, 0.1, 0.2, 0.3], atol=1e-6)
    np.testing.assert_allclose(a[6:], 0.3)
    _, _, present_b, _ = read_labels(store, "b")
    assert len(present_b) == 600 and present_b.all()
    _, _, present_c, _ = read_labels(store, "c")
    assert present_c[:17].all() and not present_c[17:].any()


def test_large_mismatch_or_unknown_video_writes_nothing(store, tmp_path):
    make_store(store, {"a": 100, "b": 100})
    good = affwild2(tmp_path / "a.txt", [(0.1, 0.1)] * 100)
    long = affwild2(tmp_path / "b.txt", [(0.1, 0.1)] * (100 + tolerance(100) + 1))
    with pytest.raises(LabelError, match=r"b\.txt: 106 label rows for video b with 100 frames"):
        import_labels(store, [good, long])
    unknown = affwild2(tmp_path / "zzz.txt", [(0.1, 0.1)] * 100)
    with pytest.raises(LabelError, match="'zzz' is not in the store"):
        import_labels(store, [good, unknown])
    assert not (shard_root(store) / "labels").exists()
    with h5py.File(store, "r") as f:
        assert "labels" not in f["videos/a"]
    (tmp_path / "x").mkdir()
    bad = affwild2(tmp_path / "x" / "a.txt", [(2.0, 0.0)] * 100)
    with pytest.raises(LabelError, match=r"outside \[-1, 1\]"):
        import_labels(store, [bad])


def test_csv_by_frame_by_time_and_per_clip(store, tmp_path):
    make_store(store, {"v1": 30, "v2": 30, "clip": 45})
    by_frame = tmp_path / "frames.csv"
    by_frame.write_text("video_id,frame,valence,arousal\nv1,0,0.1,0.2\nv1,5,0.3,0.4\nv1,31,0.0,0.0\n")
    result = import_labels(store, [by_frame], split="val")
    assert "1 label rows outside" in result[0].warning
    v, a, present, split = read_labels(store, "v1")
    assert split == "val" and present.sum() == 2 and present[0] and present[5]
    assert v[5] == pytest.approx(0.3) and a[0] == pytest.approx(0.2)

    by_time = tmp_path / "times.csv"
    t = 10 / FPS  # frame 10; two rows landing on it are averaged
    by_time.write_text(
        f"video_id,time,valence,arousal\nv2,{t},0.2,0.0\nv2,{t + 0.004},0.4,0.2\nv2,0.0,-0.5,0.5\n"
    )
    import_labels(store, [by_time])
    v, a, present, split = read_labels(store, "v2")
    assert split == "" and present.sum() == 2
    assert v[10] == pytest.approx(0.3) and a[10] == pytest.approx(0.1) and v[0] == pytest.approx(-0.5)

    per_clip = tmp_path / "clips.csv"
    per_clip.write_text("file,valence,arousal\nsome/dir/clip.wav,-0.7,0.6\n")
    split_file = tmp_path / "splits.csv"
    split_file.write_text("video_id,split\nclip,test\n")
    import_labels(store, [per_clip], split_file=split_file)
    v, a, present, split = read_labels(store, "clip")
    assert split == "test" and present.all() and len(v) == 45
    np.testing.assert_allclose(v, -0.7)
    np.testing.assert_allclose(a, 0.6)
    # re-importing without a split keeps the one already stored
    import_labels(store, [by_frame])
    assert read_labels(store, "v1")[3] == "val"


def test_csv_errors(store, tmp_path):
    make_store(store, {"v1": 30})
    cases = {
        "video_id,valence,arousal\nv1,0.1,0.1\nv1,0.2,0.2\n": "2 rows but no frame or time column",
        "video_id,time,valence,arousal\nv1,5.0,0.1,0.1\n": "frames outside its 30 frames",
        "id,valence,arousal\nv1,0.1,0.1\n": "needs video_id",
        "video_id,frame,valence,arousal\nv1,1.5,0.1,0.1\n": "whole numbers",
        "video_id,valence,arousal\nnope,0.1,0.1\n": "'nope' is not in the store",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.csv"
        path.write_text(text)
        with pytest.raises(LabelError, match=message):
            import_labels(store, [path])
    assert not (shard_root(store) / "labels").exists()
    with pytest.raises(LabelError, match="unknown split"):
        import_labels(store, [tmp_path / "bad0.csv"], split="holdout")


def test_files_saved_by_excel_are_read_and_a_file_without_rows_is_one_line(store, tmp_path):
    """Excel writes UTF-8 with a byte-order mark and CRLF line ends; the mark was read as part of
    the first column's name."""
    make_store(store, {"v1": 30, "v2": 30})
    excel = tmp_path / "excel.csv"
    excel.write_bytes("video_id,valence,arousal\r\nv1,0.1,0.2\r\n".encode("utf-8-sig"))
    splits = tmp_path / "splits.csv"
    splits.write_bytes("video_id,split\r\nv1,train\r\nv2,val\r\n".encode("utf-8-sig"))
    affwild = tmp_path / "v2.txt"
    affwild.write_bytes(("valence,arousal\r\n" + "0.3,-0.4\r\n" * 30).encode("utf-8-sig"))
    import_labels(store, [excel, affwild], split_file=splits)
    v, a, present, split = read_labels(store, "v1")
    assert split == "train" and present.all() and v[0] == pytest.approx(0.1) and a[29] == pytest.approx(0.2)
    v, a, present, split = read_labels(store, "v2")
    assert split == "val" and present.all() and v[0] == pytest.approx(0.3) and a[29] == pytest.approx(-0.4)

    for name, text in (("header.csv", "video_id,valence,arousal\r\n"), ("v1.txt", "valence,arousal\n\n")):
        path = tmp_path / "empty" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        result = CliRunner().invoke(app, ["labels", "import", str(path), "--store", str(store)])
        assert result.exit_code == 2 and result.output == f"error: no labels in {path}\n", result.output
    assert read_labels(store, "v1")[2].all()  # the refused files changed nothing


def test_cli_labels_import(store, tmp_path):
    make_store(store, {"v1": 30})
    path = tmp_path / "l.csv"
    path.write_text("video_id,valence,arousal\nv1,0.1,0.2\n")
    result = CliRunner().invoke(
        app, ["labels", "import", str(path), "--store", str(store), "--split", "train"]
    )
    assert result.exit_code == 0, result.output
    assert "labels for 1 videos, 30 labelled frames; splits: train" in result.output
    path.write_text("video_id,valence,arousal\nv9,0.1,0.2\n")
    result = CliRunner().invoke(app, ["labels", "import", str(path), "--store", str(store)])
    assert result.exit_code == 2 and "not in the store" in result.output


def test_labels_shard_records_the_grid_it_was_made_for(store, tmp_path):
    make_store(store, {"old": 30})  # a grid shard without grid_hash, as in older stores
    timestamps = np.arange(30) / FPS
    attrs = {"source": "v1.mp4", "n_frames": 30, "fps": FPS, "duration": 1.0}
    write_shard(store, GRID, "v1", {"timestamps": timestamps}, {**attrs, "grid_hash": "h1"})
    rebuild_index(store)
    path = tmp_path / "l.csv"
    path.write_text("video_id,valence,arousal\nv1,0.1,0.2\nold,0.1,0.2\n")
    import_labels(store, [path])
    assert read_shard_attrs(shard_path(store, "labels", "v1"))["grid_hash"] == "h1"
    assert "grid_hash" not in read_shard_attrs(shard_path(store, "labels", "old"))
    with h5py.File(store, "r") as f:
        assert "labels" in f["videos/v1"] and "labels" in f["videos/old"]
    # the video is re-encoded onto another grid: its old labels are no longer linked
    write_shard(store, GRID, "v1", {"timestamps": timestamps}, {**attrs, "grid_hash": "h2"})
    rebuild_index(store)
    with h5py.File(store, "r") as f:
        assert "labels" not in f["videos/v1"]


def test_labels_of_a_replaced_video_are_not_done_and_train_says_why(store, tmp_path):
    """A source file replaced and extracted again gets a new frame grid; its labels, made for the old
    one, were counted as done by status, and train said only "splits present: none"."""
    video = tmp_path / "clip.mp4"
    shutil.copy(CREMA_MP4[0], video)
    extract(store, [video])
    labels = tmp_path / "labels.csv"
    labels.write_text("video_id,valence,arousal\nclip,0.5,0.2\n")
    import_labels(store, [labels], split="train")
    assert stage_counts(store)["labels"].done == ["clip"]
    shutil.copy(CREMA_MP4[2], video)  # other footage under the same name
    extract(store, [video])
    counts = stage_counts(store)["labels"]
    assert counts.done == [] and counts.other_grid == ["clip"]
    runner = CliRunner()
    status = runner.invoke(app, ["status", "--store", str(store)], env={"COLUMNS": "200"})
    assert status.exit_code == 0, status.output
    row = next(line for line in status.output.splitlines() if line.startswith("│ labels"))
    assert [c.strip() for c in row.split("│")[1:-1]] == ["labels", "0", "0", "0", "0", "0", "1"]  # older grid
    assert "labels: 1 shards made for an older frame grid" in status.output
    assert "import them again with `rcma labels import`), e.g. clip" in status.output
    args = ["train", "--features", str(store), "--out", str(tmp_path / "run"), "--modalities", "audio"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "the labels of 1 videos (e.g. clip) were made for another frame grid" in result.output
    assert "import them again with `rcma labels import`" in result.output
    import_labels(store, [labels])  # the way out: labels on the new grid, the split kept
    assert stage_counts(store)["labels"].done == ["clip"]
    assert read_labels(store, "clip")[3] == "train"


def test_malformed_rows_name_the_file_and_line(store, tmp_path):
    make_store(store, {"v1": 30})
    cases = {
        "bad0.csv": ("video_id,valence,arousal\nv1,0.1,0.2\n\ntone,0.1\n", r"bad0\.csv:4: 2 fields"),
        "bad1.csv": ("video_id,valence,arousal\nv1,0.1,0.2,0.3\n", r"bad1\.csv:2: 4 fields"),
        "bad2.csv": (
            "video_id,valence,arousal\nv1,high,0.2\n",
            r"bad2\.csv:2: valence 'high' is not a number",
        ),
        "bad3.csv": ("video_id,time,valence,arousal\nv1,0,0.1,0.2\nv1,x,0.1,0.2\n", r"bad3\.csv:3: time 'x'"),
        "v1.txt": ("valence,arousal\n0.1,0.2\n0.1,0.2,0.3,0.4\n", r"v1\.txt:3: expected two numbers"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(LabelError, match=message) as error:
            import_labels(store, [path])
        assert "None" not in str(error.value)
    assert not (shard_root(store) / "labels").exists()
    result = CliRunner().invoke(app, ["labels", "import", str(tmp_path / "bad0.csv"), "--store", str(store)])
    assert result.exit_code == 2 and "bad0.csv:4: 2 fields" in result.output
    assert "Traceback" not in result.output


def test_conflicting_rows_for_one_frame_are_refused_not_averaged(store, tmp_path):
    make_store(store, {"v": 30})
    agree = tmp_path / "agree.csv"
    agree.write_text("video_id,frame,valence,arousal\nv,3,0.5,0.5\nv,3,0.5,0.5\nv,4,0.1,0.1\n")
    import_labels(store, [agree])
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("video_id,frame,valence,arousal\nv,3,0.8,0.5\nv,3,-0.8,0.5\n")
    with pytest.raises(LabelError, match=r"conflict\.csv: video v: two rows for frame 3 disagree"):
        import_labels(store, [conflict])
    same_time = tmp_path / "times.csv"
    same_time.write_text("video_id,time,valence,arousal\nv,0.1,0.8,0.5\nv,0.1,-0.8,0.5\n")
    with pytest.raises(LabelError, match="two rows for time 0.1 disagree"):
        import_labels(store, [same_time])
    v, _, present, _ = read_labels(store, "v")
    assert present.sum() == 2 and v[3] == pytest.approx(0.5)  # the refused files changed nothing


def test_all_unannotated_labels_warn_and_a_binary_file_is_one_line(store, tmp_path):
    make_store(store, {"v": 5})
    unannotated = tmp_path / "v.txt"
    affwild2(unannotated, [(-5, -5)] * 5)
    result = CliRunner().invoke(app, ["labels", "import", str(unannotated), "--store", str(store)])
    assert result.exit_code == 0 and "warning: v: every label in" in result.output
    binary = tmp_path / "labels.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    result = CliRunner().invoke(app, ["labels", "import", str(binary), "--store", str(store)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {binary}: not a text label file")


def test_affwild2_two_subject_files_go_to_the_matching_ids(store, tmp_path):
    make_store(store, {"v": 5, "w_left": 5, "w_right": 5})
    faces = {"present": np.ones(5, bool), "boxes": np.zeros((5, 4), np.float32)}
    write_shard(store, "faces", "v", faces, {"config": {"subject": "left"}})  # `--subject left`
    rebuild_index(store)
    folder = tmp_path / "VA_Set"
    folder.mkdir()
    affwild2(folder / "v_left.txt", [(0.5, 0.5)] * 5)
    affwild2(folder / "v_right.txt", [(-0.5, -0.5)] * 5)
    affwild2(folder / "w_left.txt", [(0.1, 0.1)] * 5)
    affwild2(folder / "w_right.txt", [(0.2, 0.2)] * 5)
    result = CliRunner().invoke(app, ["labels", "import", str(folder), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "labels for 3 videos" in result.output
    assert f"warning: {folder / 'v_right.txt'}: skipped: video v was extracted tracking the left face" in (
        result.output
    )
    assert read_labels(store, "v")[0] == pytest.approx([0.5] * 5)
    assert read_labels(store, "w_left")[0] == pytest.approx([0.1] * 5)
    assert read_labels(store, "w_right")[0] == pytest.approx([0.2] * 5)
