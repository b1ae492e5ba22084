"""Shards: the file of each (video, stage); its name, writing it, reading and checking it.

    store.h5.d/grid/<id>.h5        frame grid: timestamps and the video's attrs
    store.h5.d/<stage>/<id>.h5     one stage's arrays for one video, with provenance attrs

A shard is written by `ShardWriter` through `atomic_file`, so a killed writer leaves a whole file
or none; every array carries a fletcher32 checksum, which `shard_problem` reads back. A name
longer than MAX_NAME_BYTES is cut and hashed; the whole id stays in the shard's attrs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.files import atomic_file

GRID = "grid"
FAILED = "failed"
LABELS = "labels"  # the labels' shards (pipeline.labels writes them)
CONFIG_FILE = "config.json"
CHUNK_BYTES = 1 << 20
VIDEO_ATTRS = (
    "source",
    "fps",
    "n_frames",
    "duration",
    "width",
    "height",
    "has_video",
    "has_audio",
    "grid_hash",
)


class StoreError(Exception):
    """A store that cannot be opened or used; the message names the file and the problem."""


def shard_root(store: Path) -> Path:
    return store.with_name(store.name + ".d")


def check_id(video_id: str) -> str:
    """The id itself, once it is known to be a relative path of plain names (it names files)."""
    parts = video_id.split("/")
    if video_id.startswith("/") or any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise ValueError(f"video id {video_id!r} is not a relative path of plain names")
    return video_id


def id_file(folder: Path, video_id: str, suffix: str) -> Path:
    """The file for a video id under `folder`: always inside it, and every name short enough.

    A name longer than MAX_NAME_BYTES is cut and given a hash of itself (`<start>~<hash>`), so
    temporary names built on it stay under the filesystem's 255-byte limit; shards and failure
    records also keep the whole id in their attrs, which is where `_ids_under` reads it back.
    """
    names = check_id(video_id).split("/")
    names[-1] += suffix
    return folder.joinpath(*(_short_name(name) for name in names))


MAX_NAME_BYTES = 160
_HASHED = re.compile(r"~[0-9a-f]{16}(\.[^.]+)?$")


def _short_name(name: str) -> str:
    raw = name.encode()
    if len(raw) <= MAX_NAME_BYTES:
        return name
    suffix = Path(name).suffix if len(Path(name).suffix) <= 8 else ""
    start = raw[:96].decode(errors="ignore")
    return f"{start}~{hashlib.sha256(raw).hexdigest()[:16]}{suffix}"


def shard_path(store: Path, stage: str, video_id: str) -> Path:
    return id_file(shard_root(store) / stage, video_id, ".h5")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_store_path(store: Path, packed: bool = False) -> None:
    """Refuses a path whose folder is missing or read-only, or an existing file that an rcma index
    must not replace: anything but an rcma store (a damaged index beside its shard folder may be
    rebuilt; with `packed`, an earlier packed store may be replaced)."""
    if not store.parent.is_dir():
        raise StoreError(f"{store}: folder {store.parent} does not exist")
    for folder in (store.parent, shard_root(store)):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"{store}: the folder {folder} is not writable")
    if not store.exists():
        return
    if not store.is_file():
        raise StoreError(f"{store}: exists and is not a file")
    layout = _layout(store)
    expected = "rcma-packed-v1" if packed else "rcma-sharded-v1"
    damaged_index = layout == "" and not packed and shard_root(store).is_dir()
    if layout != expected and not damaged_index:
        kind = "an rcma store of another kind" if layout.startswith("rcma-") else "not an rcma store"
        raise StoreError(f"{store}: exists and is {kind}; refusing to replace it (choose another path)")


def set_aside_foreign_index(store: Path) -> Path | None:
    """Renames a file that is not an rcma index but sits in the index's place beside a shard
    folder (another HDF5 file, bytes over the header) to a free `<store>.not-an-index[.N]`, so
    `rcma index` can write the index again from the shards and nothing is lost; returns its new
    name, or None when there was nothing to set aside."""
    if not (store.is_file() and (shard_root(store) / GRID).is_dir()):
        return None
    if _layout(store) in ("rcma-sharded-v1", ""):  # an index, or a damaged one: rebuilt in place
        return None
    aside = store.with_name(f"{store.name}.not-an-index")
    n = 0
    while aside.exists():
        n += 1
        aside = store.with_name(f"{store.name}.not-an-index.{n}")
    os.rename(store, aside)
    return aside


def check_output_folder(out: Path, store: Path) -> None:
    """Refuses an output folder (`--out` of train or predict) that is an existing file, or that lies
    in the store's shard folder, where its files would be taken for a stage's."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder; give --out a folder")
    root = shard_root(store)
    if out.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{out}: inside the store's shard folder {root}; give --out a folder outside it")


def _layout(path: Path) -> str:
    """An existing file's rcma layout ("" for a damaged HDF5 file, "other" for anything else)."""
    with open(path, "rb") as f:
        if f.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
            return "other"
    try:
        with h5py.File(path, "r") as f:
            return _text(f.attrs.get("layout", "other"))
    except OSError:
        return ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ShardWriter:
    """Writes one shard: rows on the frame grid in blocks, then extra arrays and attrs.

    Nothing is visible under the shard's name until `commit` (it is an `atomic_file`, guarded by
    the store's shard folder); an exception removes the temporary file, a kill leaves it for
    `remove_stale_temps`.
    """

    def __init__(self, path: Path, n_rows: int, attrs: dict[str, Any], guard: Path):
        self.path = path
        self.n_rows = n_rows
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writing = contextlib.ExitStack()
        self.tmp = self._writing.enter_context(atomic_file(path, guard))
        try:
            self.file = h5py.File(self.tmp, "w")
        except BaseException as e:
            self._writing.__exit__(type(e), e, e.__traceback__)
            raise
        self.rows_written: dict[str, int] = {}
        set_attrs(self.file, attrs)

    def write_rows(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        for name, block in arrays.items():
            block = np.asarray(block)
            if name not in self.file:
                row_bytes = max(1, block[0].nbytes if len(block) else block.itemsize)
                chunk_rows = int(np.clip(CHUNK_BYTES // row_bytes, 1, max(1, self.n_rows)))
                self.file.create_dataset(
                    name,
                    shape=(self.n_rows, *block.shape[1:]),
                    dtype=block.dtype,
                    chunks=(chunk_rows, *block.shape[1:]),
                    compression="lzf",
                    fletcher32=True,
                )
                self.rows_written[name] = 0
            if start + len(block) > self.n_rows:
                raise ValueError(f"{name}: rows {start}..{start + len(block)} past {self.n_rows}")
            self.file[name][start : start + len(block)] = block
            self.rows_written[name] += len(block)

    def write_extra(self, arrays: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> None:
        for name, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind == "U":
                value = value.astype(object)
                self.file.create_dataset(name, data=value, dtype=h5py.string_dtype())
            else:  # HDF5 filters need chunks, which scalars and empty arrays cannot have
                checksum = value.ndim > 0 and value.size > 0
                self.file.create_dataset(name, data=value, fletcher32=checksum)
        set_attrs(self.file, attrs or {})

    def commit(self) -> None:
        short = {k: v for k, v in self.rows_written.items() if v != self.n_rows}
        if short:
            raise ValueError(f"rows written do not cover the {self.n_rows} frames: {short}")
        self.file.close()
        self._writing.close()

    def abort(self) -> None:
        self.file.close()
        aborted = RuntimeError("shard write aborted")
        self._writing.__exit__(type(aborted), aborted, None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shard(
    store: Path, stage: str, video_id: str, rows: dict[str, np.ndarray], attrs: dict[str, Any]
) -> Path:
    """Writes a whole shard at once (rows all on the frame grid)."""
    n_rows = len(next(iter(rows.values())))
    path = shard_path(store, stage, video_id)
    with ShardWriter(path, n_rows, {**attrs, "video_id": video_id}, shard_root(store)) as writer:
        writer.write_rows(0, rows)
    return path


def grid_hash(timestamps: np.ndarray) -> str:
    """Names a frame grid; every shard records the one it was made on."""
    return hashlib.sha256(np.ascontiguousarray(timestamps, dtype=np.float64).tobytes()).hexdigest()[:16]


def set_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, dict | list | tuple) and not isinstance(value, np.ndarray):
            value = json.dumps(value, sort_keys=True)
        elif value is None:
            value = ""
        obj.attrs[key] = value


def read_shard_attrs(path: Path) -> dict[str, Any] | None:
    """A finished shard's attrs, or None when it is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        return None


def shard_problem(path: Path, full: bool = False) -> str:
    """What is wrong with a shard, in a few words; "" when it is sound.

    The quick check opens the file and reads its attrs and the list of its arrays: this finds a
    missing, truncated or header-damaged file. `full` also reads every array, so HDF5 checks the
    fletcher32 checksum of every chunk (shards written before checksums were added are read
    without one); its cost grows with the data, so `rcma status` does it only with --verify.
    """
    if not path.exists():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            dict(f.attrs)
            arrays: list[h5py.Dataset] = []
            f.visititems(lambda _, obj: arrays.append(obj) if isinstance(obj, h5py.Dataset) else None)
            if full:
                for dataset in arrays:
                    if dataset.chunks is None or dataset.ndim == 0:
                        dataset[()]
                    else:
                        for chunk in dataset.iter_chunks():
                            dataset[chunk]
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        return "damaged (checksum mismatch)" if "filter returned failure" in str(e) else "damaged"
    return ""


def read_rows(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][:]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _ids_under(folder: Path, suffix: str) -> Iterator[tuple[str, Path]]:
    """(video id, file) of every finished file under `folder`; a hashed long name's id is read
    back from the file itself (attrs of a shard, the record of a failure)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(f"*{suffix}")):  # temporary files end in .tmp, not `suffix`
        video_id = path.relative_to(folder).as_posix()[: -len(suffix)]
        if any(_HASHED.search(part) for part in path.relative_to(folder).parts):
            video_id = _stored_id(path) or video_id
        yield video_id, path


def _stored_id(path: Path) -> str | None:
    try:
        if path.suffix == ".json":
            return str(json.loads(path.read_text())["video_id"])
        with h5py.File(path, "r") as f:
            return _text(f.attrs["video_id"])
    except (OSError, KeyError, ValueError):
        return None


def stage_names(store: Path) -> list[str]:
    root = shard_root(store)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name not in (GRID, FAILED) and _is_stage_folder(p)
    )


def _is_stage_folder(folder: Path) -> bool:
    """A folder of the shard folder that holds a stage's shards: a registered stage's, the labels',
    or one with a stage config record (a stage added outside the registry); never a stray folder
    (plots/, tb/ of an `--out` pointed there)."""
    from pipeline.stages import STAGES  # the registry of stage names; it imports no store module

    return folder.name in (*STAGES, LABELS) or (folder / CONFIG_FILE).is_file()
