"""Valence/arousal label import: annotation files -> one "labels" shard per video, on its frame grid.

Formats:
- Aff-Wild2 VA files `<video_id>.txt`: a `valence,arousal` header, then one line per frame;
  -5 marks an unannotated frame (stored with present=False). Two-person videos have
  `<video>_left.txt` and `<video>_right.txt`: each goes to the store id of that name, or to
  `<video>` when its faces were extracted with `--subject left` (or right); a file for the
  subject that `<video>` did not track is skipped with a warning.
- CSV with a `video_id` column (or `file`, a path whose name without extension is the id),
  `valence` and `arousal`, and either `frame` (0-based index), `time` (seconds, matched to the
  nearest frame of the video's timestamps; several rows on one frame are averaged), or neither
  (one row per clip, given to all of its frames). Rows for the same frame number, or the very
  same time, must agree: different values are an error.

Labels that run a few frames past the video or stop a few frames short (at most
max(TOLERANCE_FRAMES, TOLERANCE_SHARE * n)) are trimmed or padded with a warning; anything
larger, an unknown video id or a malformed file is an error. Everything is read and checked
before the first shard is written, so an error changes nothing.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import one_line
from pipeline.media import nearest_rows
from pipeline.store import (
    LABELS,
    StoreError,
    damaged_members,
    open_store,
    read_shard_attrs,
    rebuild_index,
    shard_path,
    video_ids,
    write_shard,
)

STAGE = LABELS
UNANNOTATED = -5.0
TWO_SUBJECTS = ("left", "right")  # Aff-Wild2 labels two-person videos as <video>_left / _right
TOLERANCE_FRAMES = 5
TOLERANCE_SHARE = 0.01
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"valid": "val", "validation": "val", "training": "train", "dev": "val"}
ENCODING = "utf-8-sig"  # UTF-8, without the byte-order mark Excel writes first


class LabelError(Exception):
    """Labels that cannot be imported; the message names the file or video and the problem."""


@dataclass
class VideoLabels:
    video_id: str
    source: str
    format: str
    valence: np.ndarray  # (n,) float32
    arousal: np.ndarray
    present: np.ndarray  # (n,) bool
    split: str = ""
    warning: str = ""


def tolerance(n_frames: int) -> int:
    return max(TOLERANCE_FRAMES, math.ceil(TOLERANCE_SHARE * n_frames))


def import_labels(
    store: Path,
    paths: list[Path],
    split: str | None = None,
    split_file: Path | None = None,
    skipped: Callable[[str], None] | None = None,
) -> list[VideoLabels]:
    """Reads, checks and writes labels for every video found in `paths`; returns what was written.

    `skipped` is told of each file passed over (a two-subject file for a subject not tracked)."""
    store = Path(store)
    if split is not None and split_file is not None:
        raise LabelError("give --split or --split-file, not both")
    if split is not None:
        split = _split_name(split, "--split")
    grid, grid_hashes, subjects = _store_grid(store)
    files = _label_files(paths)
    parsed: list[VideoLabels] = []
    for path in files:
        try:
            if path.suffix.lower() == ".txt":
                parsed += _read_affwild2(path, grid, subjects, skipped or _warn)
            else:
                parsed += _read_csv(path, grid)
        except (UnicodeDecodeError, csv.Error) as e:
            raise LabelError(f"{path}: not a text label file ({one_line(e)})") from None
    for item in parsed:
        if not item.present.any():
            note = f"{item.video_id}: every label in {item.source} is unannotated; it replaces the old labels"
            item.warning = f"{item.warning}; {note}" if item.warning else note
    seen: dict[str, str] = {}
    for item in parsed:
        if item.video_id in seen:
            raise LabelError(
                f"video {item.video_id} is labelled twice: {seen[item.video_id]} and {item.source}"
            )
        seen[item.video_id] = item.source
    mapping = read_split_file(split_file) if split_file is not None else {}
    for item in parsed:
        item.split = split or mapping.get(item.video_id) or _existing_split(store, item.video_id)
    for item in parsed:
        rows = {"valence": item.valence, "arousal": item.arousal, "present": item.present}
        attrs = {
            "split": item.split,
            "source": item.source,
            "format": item.format,
            "labelled_frames": int(item.present.sum()),
        }
        if item.video_id in grid_hashes:  # older stores have none
            attrs["grid_hash"] = grid_hashes[item.video_id]
        write_shard(store, STAGE, item.video_id, rows, attrs)
    rebuild_index(store)
    return parsed


def import_and_report(
    store: Path, paths: list[Path], split: str | None, split_file: Path | None, console: Any
) -> None:
    """`import_labels`, telling the rich `console` each warning and what was imported; LabelError."""

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)

    imported = import_labels(store, paths, split, split_file, skipped=warn)
    for item in imported:
        if item.warning:
            warn(item.warning)
    splits = sorted({item.split or "(no split)" for item in imported})
    frames = sum(int(item.present.sum()) for item in imported)
    console.print(
        f"{store}: labels for {len(imported)} videos, {frames} labelled frames; splits: {', '.join(splits)}",
        highlight=False,
        soft_wrap=True,
    )


def read_split_file(path: Path) -> dict[str, str]:
    """video id -> split from `id,split` (CSV, optional header), or whitespace-separated lines."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such split file")
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding=ENCODING).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in (line.split(",") if "," in line else line.split())]
        if len(parts) < 2:
            raise LabelError(f"{path}:{number}: expected `video_id,split`, got {line!r}")
        vid, name = parts[0], parts[-1]
        if number == 1 and name.lower() == "split":
            continue
        out[vid] = _split_name(name, f"{path}:{number}")
    return out


def _split_name(name: str, where: str) -> str:
    name = SPLIT_ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in SPLITS:
        raise LabelError(f"{where}: unknown split {name!r}; use one of {', '.join(SPLITS)}")
    return name


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _store_grid(store: Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Each video's timestamps, the grid_hash of those that have one, and the face each video's
    faces stage tracked (see pipeline.faces: largest, left or right)."""
    try:
        f = open_store(store)
    except StoreError as e:
        raise LabelError(str(e)) from None
    with f:
        grid: dict[str, np.ndarray] = {}
        hashes: dict[str, str] = {}
        subjects: dict[str, str] = {}
        for vid in video_ids(f):
            group = f[f"videos/{vid}"]
            try:
                grid[vid] = group["timestamps"][:]
            except (OSError, KeyError):  # a missing, cut or corrupted grid shard
                problem = damaged_members(store, group, full=True).get("timestamps", "damaged")
                raise LabelError(
                    f"{store}: video {vid}: its frame grid shard {problem}; `rcma extract` recomputes it"
                ) from None
            if "grid_hash" in group.attrs:
                hashes[vid] = _text(group.attrs["grid_hash"])
            if "faces" in group:
                config = json.loads(_text(group["faces"].attrs.get("config", "{}")) or "{}")
                subjects[vid] = config.get("subject", "largest")
        return grid, hashes, subjects


def _existing_split(store: Path, video_id: str) -> str:
    """The split of a video's labels already imported, kept when a re-import names none; read from
    their shard, so that labels made for an older grid of a replaced video keep theirs too."""
    attrs = read_shard_attrs(shard_path(store, STAGE, video_id)) or {}
    return _text(attrs.get("split", ""))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _label_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in (".txt", ".csv") and not p.name.startswith(".")
            )
            if not found:
                raise LabelError(f"{path}: no .txt or .csv label files in this folder")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in (".txt", ".csv"):
                raise LabelError(f"{path}: not a label file (expected .txt or .csv)")
            files.append(path)
        else:
            raise LabelError(f"{path}: no such file or folder")
    return files


def _unknown(vid: str, source: Path | str, grid: dict[str, np.ndarray]) -> LabelError:
    return LabelError(f"{source}: video {vid!r} is not in the store ({len(grid)} videos there)")


def _fit(
    values: np.ndarray, present: np.ndarray, n: int, vid: str, source: Path
) -> tuple[str, np.ndarray, np.ndarray]:
    """Pads or trims per-frame labels to n frames within the tolerance, else raises."""
    m = len(values)
    if m == n:
        return "", values, present
    if abs(m - n) > tolerance(n):
        raise LabelError(
            f"{source}: {m} label rows for video {vid} with {n} frames "
            f"(more than {tolerance(n)} apart; wrong file or frame rate?)"
        )
    if m > n:
        return f"{vid}: {m - n} label rows past the last frame dropped", values[:n], present[:n]
    pad = n - m
    values = np.concatenate([values, np.zeros((pad, 2), values.dtype)])
    present = np.concatenate([present, np.zeros(pad, bool)])
    return f"{vid}: {pad} frames at the end have no label row (marked unlabelled)", values, present


def _check_range(values: np.ndarray, present: np.ndarray, source: Path | str, vid: str) -> None:
    v = values[present]
    if not np.isfinite(v).all():
        raise LabelError(f"{source}: video {vid}: labels contain NaN or inf")
    if len(v) and (v.min() < -1 or v.max() > 1):
        raise LabelError(f"{source}: video {vid}: labels outside [-1, 1] (min {v.min():g}, max {v.max():g})")


def _labels(
    vid: str, source: Path, fmt: str, values: np.ndarray, present: np.ndarray, warning: str = ""
) -> VideoLabels:
    _check_range(values, present, source, vid)
    values = np.where(present[:, None], values, 0).astype(np.float32)
    return VideoLabels(
        vid, str(source), fmt, values[:, 0].copy(), values[:, 1].copy(), present, warning=warning
    )


def _two_subject_id(
    path: Path, grid: dict[str, np.ndarray], subjects: dict[str, str], skipped: Callable[[str], None]
) -> str | None:
    """The store id for Aff-Wild2's `<video>_left.txt` / `_right.txt`: `<video>_left` itself when the
    store has it, else `<video>` when its faces stage tracked that subject (`--subject left`);
    None, after telling `skipped`, when `<video>` tracked another face."""
    vid = path.stem
    base, _, side = vid.rpartition("_")
    if vid in grid or side not in TWO_SUBJECTS or base not in grid:
        return vid
    if subjects.get(base) == side:
        return base
    skipped(
        f"{path}: skipped: video {base} was extracted tracking the {subjects.get(base, 'largest')} face, "
        f"not the {side} one (extract it with --subject {side}, or a link named {vid} to it)"
    )
    return None


def _read_affwild2(
    path: Path, grid: dict[str, np.ndarray], subjects: dict[str, str], skipped: Callable[[str], None]
) -> list[VideoLabels]:
    vid = _two_subject_id(path, grid, subjects, skipped)
    if vid is None:
        return []
    if vid not in grid:
        raise _unknown(vid, path, grid)
    lines = path.read_text(encoding=ENCODING).splitlines()
    if not any(line.strip() for line in lines[1:]):
        raise LabelError(f"no labels in {path}")
    if lines[0].replace(" ", "").lower() != "valence,arousal":
        raise LabelError(f"{path}: expected a `valence,arousal` header line (Aff-Wild2 VA format)")
    rows = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            valence, arousal = (float(x) for x in line.split(","))
        except ValueError:
            raise LabelError(
                f"{path}:{number}: expected two numbers `valence,arousal`, got {line!r}"
            ) from None
        rows.append((valence, arousal))
    values = np.array(rows, np.float64).reshape(-1, 2)
    present = ~((values == UNANNOTATED).any(axis=1))
    warning, values, present = _fit(values, present, len(grid[vid]), vid, path)
    return [_labels(vid, path, "affwild2", values, present, warning)]


def _read_csv(path: Path, grid: dict[str, np.ndarray]) -> list[VideoLabels]:
    rows: list[tuple[int, dict[str, str]]] = []  # (line number, row)
    with path.open(newline="", encoding=ENCODING) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise LabelError(
                    f"{path}:{reader.line_num}: {len(fields)} fields where the header has "
                    f"{len(header)} ({','.join(header)})"
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    if not rows:
        raise LabelError(f"no labels in {path}")
    columns = {c.strip().lower(): c for c in header}
    id_col = next((columns[c] for c in ("video_id", "video", "file") if c in columns), None)
    if id_col is None or "valence" not in columns or "arousal" not in columns:
        raise LabelError(
            f"{path}: a label CSV needs video_id (or file), valence and arousal columns; "
            f"has {', '.join(columns)}"
        )
    when = "frame" if "frame" in columns else "time" if "time" in columns else None
    by_video: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line, row in rows:
        by_video.setdefault(_video_id(row[id_col].strip(), grid, path), []).append((line, row))
    out = []
    for vid, group in by_video.items():
        values = np.array(
            [
                [_number(r, columns["valence"], path, i), _number(r, columns["arousal"], path, i)]
                for i, r in group
            ],
            np.float64,
        )
        keys = np.array([_number(r, columns[when], path, i) for i, r in group]) if when else None
        timestamps = grid[vid]
        n = len(timestamps)
        if when is None:
            if len(group) != 1:
                raise LabelError(
                    f"{path}: video {vid} has {len(group)} rows but no frame or time column to place them"
                )
            present = np.full(n, not (values == UNANNOTATED).any())
            out.append(_labels(vid, path, "csv-clip", np.repeat(values, n, 0), present))
            continue
        if when == "frame":
            if (keys != np.round(keys)).any() or (keys < 0).any():
                raise LabelError(f"{path}: video {vid}: frame numbers must be whole numbers from 0")
            frames = keys.astype(np.int64)
        else:
            frames = _nearest_frames(keys, timestamps)
        outside = (frames < 0) | (frames >= n)
        warning = ""
        if outside.any():
            beyond = np.maximum(-frames, frames - (n - 1)).max()
            if beyond > tolerance(n):
                raise LabelError(
                    f"{path}: video {vid}: labels reach {beyond} frames outside its {n} frames "
                    f"(more than {tolerance(n)}; wrong video or {when} unit?)"
                )
            warning = f"{vid}: {int(outside.sum())} label rows outside the video's {n} frames dropped"
            frames, values = frames[~outside], values[~outside]
        labelled = ~(values == UNANNOTATED).any(axis=1)
        frames, values = frames[labelled], values[labelled]
        _refuse_conflicts(path, vid, when, frames if when == "frame" else keys[~outside][labelled], values)
        total = np.zeros((n, 2))
        count = np.zeros(n)
        np.add.at(total, frames, values)
        np.add.at(count, frames, 1)
        present = count > 0
        per_frame = total / np.maximum(count, 1)[:, None]
        out.append(_labels(vid, path, f"csv-{when}", per_frame, present, warning))
    return out


def _refuse_conflicts(path: Path, vid: str, when: str, keys: np.ndarray, values: np.ndarray) -> None:
    """Rows for the same frame (or the very same time) must agree: different values are refused,
    not averaged. Rows at different times that fall on one frame are averaged, by design."""
    order = np.lexsort((values[:, 1], values[:, 0], keys))
    keys, values = keys[order], values[order]
    same = keys[1:] == keys[:-1]
    differ = same & (values[1:] != values[:-1]).any(axis=1)
    if differ.any():
        k = int(np.flatnonzero(differ)[0])
        raise LabelError(
            f"{path}: video {vid}: two rows for {when} {keys[k]:g} disagree "
            f"({values[k, 0]:g},{values[k, 1]:g} and {values[k + 1, 0]:g},{values[k + 1, 1]:g})"
        )


def _number(row: dict[str, str], column: str, path: Path, line: int) -> float:
    try:
        return float(row[column])
    except ValueError:
        raise LabelError(f"{path}:{line}: {column} {row[column]!r} is not a number") from None


def _video_id(value: str, grid: dict[str, np.ndarray], source: Path) -> str:
    """The store id for a CSV's id cell: itself, else the name of a file path without its extension."""
    for candidate in (value, Path(value).stem, str(Path(value).with_suffix(""))):
        if candidate in grid:
            return candidate
    raise _unknown(value, source, grid)


def _nearest_frames(times: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Index of the nearest timestamp; times before/after the grid extrapolate by its frame period."""
    n = len(timestamps)
    period = float(np.median(np.diff(timestamps))) if n > 1 else 1.0
    nearest = nearest_rows(times, timestamps)
    before = times < timestamps[0] - period / 2
    after = times > timestamps[-1] + period / 2
    nearest = np.where(before, -np.ceil((timestamps[0] - times) / period).astype(np.int64), nearest)
    nearest = np.where(after, n - 1 + np.ceil((times - timestamps[-1]) / period).astype(np.int64), nearest)
    return nearest.astype(np.int64)
