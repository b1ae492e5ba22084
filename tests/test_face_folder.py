"""`--faces-from DIR`: Aff-Wild2's cropped-aligned frames as the faces stage's input, on a real video."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import SINGLE_FACE
from typer.testing import CliRunner

from cli import app
from pipeline import face_folder
from pipeline.align import CROP_SIZE
from pipeline.media import iter_video_frames
from pipeline.store import open_store

MISSING = [0, 3, 4, 17, 30, 31, 32, 50, 60, 70]  # rows whose image is removed: 10 frames


def write_crops(folder: Path, frames: np.ndarray) -> None:
    """Each frame shrunk to 112x112, as Aff-Wild2 names its crops (1-based, zero padded)."""
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        crop = cv2.resize(frame, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"{i + 1:05d}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def video_frames() -> np.ndarray:
    return np.concatenate([frames for _, frames in iter_video_frames(SINGLE_FACE, 32)])


def extract(store: Path, video: Path, *options: str) -> tuple[int, str]:
    args = ["extract", str(video), "--store", str(store), "--stage", "faces", "--workers", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, *options])
    return result.exit_code, result.output


def faces_of(store: Path, video_id: str) -> dict[str, np.ndarray]:
    with open_store(store) as f:
        group = f[f"videos/{video_id}/faces"]
        return {name: group[name][:] for name in group}


def test_faces_from_folder_marks_missing_frames_absent_and_keeps_the_images(tmp_path, video_frames):
    video = tmp_path / "clip.mp4"
    video.symlink_to(SINGLE_FACE)
    crops_dir = tmp_path / "cropped_aligned"
    write_crops(crops_dir / "clip", video_frames)
    for row in MISSING:
        (crops_dir / "clip" / f"{row + 1:05d}.png").unlink()
    store = tmp_path / "store.h5"

    code, output = extract(store, video, "--faces-from", str(crops_dir), "--visual-model", "none")
    assert code == 0, output
    faces = faces_of(store, "clip")
    n = len(video_frames)
    assert len(faces["present"]) == n
    assert np.flatnonzero(~faces["present"]).tolist() == MISSING
    present = np.flatnonzero(faces["present"])
    for row in present:
        expected = cv2.cvtColor(cv2.imread(str(crops_dir / "clip" / f"{row + 1:05d}.png")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(faces["crops"][row], expected)
    assert not faces["crops"][MISSING].any()
    assert np.isnan(faces["boxes"][present]).all()  # no detector ran
    with open_store(store) as f:
        config = f["videos/clip/faces"].attrs["config"]
    assert "folder" in config and "detector" not in config


def test_faces_from_folder_embeds_the_images_and_warns_of_damaged_ones(tmp_path, video_frames):
    video = tmp_path / "clip.mp4"
    video.symlink_to(SINGLE_FACE)
    crops_dir = tmp_path / "crops"
    folder = crops_dir / "clip"
    folder.mkdir(parents=True)
    for i in range(20):  # JPEG, another size (resized to 112), 1-based names without padding
        big = cv2.resize(video_frames[i], (224, 224))
        cv2.imwrite(str(folder / f"{i + 1}.jpg"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    (folder / "6.jpg").write_bytes(b"not a jpeg at all")
    (folder / "7.jpg").unlink()
    os.symlink(folder / "1.jpg", folder / "7.jpg")  # a link: never read
    (folder / "999.jpg").write_bytes((folder / "1.jpg").read_bytes())  # past the last frame
    model = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()))
    model_path = tmp_path / "pool.pt"
    model.save(str(model_path))
    store = tmp_path / "store.h5"

    code, output = extract(store, video, "--faces-from", str(crops_dir), "--visual-model", str(model_path))
    assert code == 0, output
    warning = " ".join(output.split())
    assert "1 image(s) did not decode (6.jpg)" in warning, output
    assert "7.jpg (not a plain file)" in warning and "999.jpg (past the last frame)" in warning
    faces = faces_of(store, "clip")
    assert np.flatnonzero(faces["present"]).tolist() == [r for r in range(20) if r not in (5, 6)]
    row = 2
    image = cv2.cvtColor(cv2.imread(str(folder / "3.jpg")), cv2.COLOR_BGR2RGB)
    crop = cv2.resize(image, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    assert np.array_equal(faces["crops"][row], crop)
    pixels = torch.from_numpy((crop.astype(np.float32) - 127.5) / 127.5).permute(2, 0, 1)[None]
    expected = model(pixels).numpy()[0]
    assert faces["embedding"].shape == (len(faces["present"]), 12)
    np.testing.assert_allclose(faces["embedding"][row].astype(np.float32), expected, atol=2e-3)


def test_faces_from_a_missing_folder_is_one_line_and_writes_nothing(tmp_path):
    store = tmp_path / "store.h5"
    code, output = extract(store, SINGLE_FACE, "--faces-from", str(tmp_path / "nowhere"))
    assert code == 2
    assert output.strip().count("\n") == 0 and "nowhere: no such folder" in output
    assert not store.exists()


def test_a_video_without_a_folder_has_no_faces_and_says_so(tmp_path):
    (tmp_path / "crops").mkdir()
    store = tmp_path / "store.h5"
    code, output = extract(
        store, SINGLE_FACE, "--faces-from", str(tmp_path / "crops"), "--visual-model", "none"
    )
    assert code == 0
    assert "no folder single_face in" in " ".join(output.split())
    assert not faces_of(store, "single_face")["present"].any()


def test_find_folder_takes_the_subject_folder_and_never_leaves_the_root(tmp_path):
    root = tmp_path / "crops"
    (root / "video10_left").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "linked").symlink_to(outside)
    assert face_folder.find_folder(root, "video10", "left") == root / "video10_left"
    assert face_folder.find_folder(root, "video10", "right") is None
    assert face_folder.find_folder(root, "video10", "largest") is None
    assert face_folder.find_folder(root, "linked", "largest") is None  # a link: not followed
    assert face_folder.find_folder(root, "../elsewhere", "largest") is None  # out of the root
