"""Faces read from a folder of aligned crops instead of detected: Aff-Wild2's cropped-aligned layout.

`DIR/<video_id>/00001.jpg` is the aligned face of frame 1 (the first frame) of that video; JPEG or
PNG, any zero padding. A frame without an image has no face. Every ABAW team starts from these
crops rather than detecting faces in 2.9 M frames again.

For two-subject videos Aff-Wild2 names the folders `<video>_left` / `<video>_right`; a video
extracted with `--subject left` finds `DIR/<video>_left/` when there is no `DIR/<video>/`.

Only plain files and folders inside DIR are read: a link, or a name that leads out of DIR, is
never followed (it is counted as skipped).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.align import CROP_SIZE

IMAGE_NAME = re.compile(r"^(\d{1,9})\.(jpe?g|png)$", re.IGNORECASE)
READ_BATCH = 64  # images decoded per block handed to the embedder
SHOW_NAMES = 3  # names quoted in a warning line


@dataclass
class FaceFolder:
    """The images of one video: `frames[i]` (1-based frame number) is read from `paths[i]`."""

    folder: Path
    frames: np.ndarray  # (k,) int64, sorted
    paths: list[Path]
    skipped: list[str] = field(default_factory=list)  # links and names out of range

    def blocks(self, n_frames: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(grid rows (b,), RGB crops (b,112,112,3) uint8, names of images that did not decode) per
        block of READ_BATCH images, in frame order; rows whose image did not decode are left out."""
        on_grid = (self.frames >= 1) & (self.frames <= n_frames)
        self.skipped += [self.paths[i].name + " (past the last frame)" for i in np.flatnonzero(~on_grid)]
        keep = np.flatnonzero(on_grid)
        for start in range(0, len(keep), READ_BATCH):
            rows, crops, damaged = [], [], []
            for i in keep[start : start + READ_BATCH]:
                crop = read_crop(self.paths[i])
                if crop is None:
                    damaged.append(self.paths[i].name)
                    continue
                rows.append(int(self.frames[i]) - 1)
                crops.append(crop)
            empty = np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
            yield np.array(rows, dtype=np.int64), (np.stack(crops) if crops else empty), damaged


def find_folder(root: Path, video_id: str, subject: str) -> Path | None:
    """The folder of `video_id`'s crops under `root` (see the module's docstring), or None."""
    names = [video_id]
    if subject in ("left", "right") and not video_id.endswith(f"_{subject}"):
        names.append(f"{video_id}_{subject}")
    base = root.resolve()
    for name in names:
        folder = root / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        if not folder.resolve().is_relative_to(base):  # `..` in an id: never followed
            continue
        return folder
    return None


def list_images(folder: Path) -> FaceFolder:
    """The numbered images in `folder`, by frame number; links and other files are skipped."""
    frames, paths, skipped = [], [], []
    for entry in sorted(folder.iterdir()):
        match = IMAGE_NAME.match(entry.name)
        if match is None:
            continue
        if entry.is_symlink() or not entry.is_file():
            skipped.append(entry.name + " (not a plain file)")
            continue
        frames.append(int(match.group(1)))
        paths.append(entry)
    order = np.argsort(np.array(frames, dtype=np.int64), kind="stable")
    numbers = np.array(frames, dtype=np.int64)[order]
    paths = [paths[i] for i in order]
    repeated = np.flatnonzero(np.diff(numbers) == 0) + 1  # 1.jpg and 00001.png: the first one wins
    skipped += [paths[i].name + " (a second image of its frame)" for i in repeated]
    keep = np.setdiff1d(np.arange(len(numbers)), repeated)
    return FaceFolder(folder, numbers[keep], [paths[i] for i in keep], skipped)


def read_crop(path: Path) -> np.ndarray | None:
    """The image as RGB uint8 (112,112,3), resized if it is another size; None if it does not decode."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if len(data) else None
    if image is None:
        return None
    if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
        shrink = image.shape[0] > CROP_SIZE or image.shape[1] > CROP_SIZE
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image = cv2.resize(image, (CROP_SIZE, CROP_SIZE), interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def warning(folder: Path, damaged: list[str], skipped: list[str]) -> str:
    """One line on the images that were not used, or '' when every image was."""
    parts = []
    for what, names in (("did not decode", damaged), ("skipped", skipped)):
        if names:
            shown = ", ".join(names[:SHOW_NAMES]) + (", ..." if len(names) > SHOW_NAMES else "")
            parts.append(f"{len(names)} image(s) {what} ({shown})")
    return f"{folder}: " + "; ".join(parts) + ": those frames are absent" if parts else ""
