"""Scanning shard folders: which shards exist, whether each opens, and the attrs the index needs.

A shard whose size and modification time match the index's record of the last scan
(`_ShardCache`) is not opened again; the others are opened, many at once in one process a core.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from pipeline.store.shards import _HASHED, GRID, VIDEO_ATTRS, _plain, shard_root


class ShardInfo(NamedTuple):
    """One finished shard as a scan found it: its id, whether it opens, and the attrs the index
    and `rcma status` need (grid and config hashes; a grid shard's video attrs). A named tuple:
    a scan of 100,000 videos makes 400,000 of them, and a frozen dataclass costs 4x to build."""

    video_id: str
    root: Path  # the store's shard folder
    key: str  # the shard's path under it, "<stage>/<id>.h5"
    problem: str
    attrs: dict[str, Any]
    size: int
    mtime_ns: int

    @property
    def path(self) -> Path:
        return self.root / self.key


def scan_shards(store: Path, folder: str, cache: _ShardCache | None = None) -> dict[str, ShardInfo]:
    """{video id: ShardInfo} of every finished shard under `store.h5.d/<folder>/`.

    A shard whose size and modification time match its entry in `cache` (the index's record of
    the last scan) is not opened again: this is what keeps `rcma status` fast on a store of
    100,000 videos. Every other shard is opened and checked (`_scan_folders`).
    """
    root = shard_root(store)
    parts, _ = _scan_folders(root, {folder: _walk_files(root / folder, ".h5")}, cache or _ShardCache({}))
    part = parts[folder]
    infos = {}
    for i, (video_id, key) in enumerate(zip(part["video_id"], part["key"], strict=True)):
        attrs = {name: column[i] for name, column in part["attrs"].items() if column[i] is not None}
        infos[video_id] = ShardInfo(
            video_id, root, key, part["problem"][i], attrs, part["size"][i], part["mtime"][i]
        )
    return infos


SCANNED_ATTRS = ("grid_hash", "config_hash", "video_id")
SCAN_IN_PROCESSES = 2000  # shards: a scan of this many or more is spread over one process a core
SCAN_BATCH = 250  # shards a process scans in one go


def _scanned_names(folder: str) -> tuple[str, ...]:
    return (*SCANNED_ATTRS, *(VIDEO_ATTRS if folder == GRID else ()))


def _shard_id(rel: str, attrs: dict[str, Any]) -> str:
    """A shard's video id: its path under its stage folder, or the id a hashed long name's attrs hold."""
    video_id = rel[: -len(".h5")]
    if any(_HASHED.search(part) for part in rel.split("/")):
        video_id = str(attrs.get("video_id", video_id))
    return video_id


def _scan_many(jobs: list[tuple[Path, tuple[str, ...]]]) -> list[tuple[str, dict[str, Any]]]:
    """`_scan_one` of each (shard, attr names), in order.

    The first index of a store opens every shard, minutes of HDF5 reads for 100,000 videos; h5py
    holds one lock for all of them, so threads would only take turns, and many shards are scanned
    by one process a core (a plain process pool: Dask's process scheduler took 10-40% longer on
    40,000 shards). The processes are started afresh ("spawn"): a forked one could inherit a lock
    another thread holds (an extract's workers write shards while the index is refreshed). Where
    processes cannot start (a daemon process, a script without a main guard), the shards are
    scanned here.
    """
    processes = min(cpu_count(), len(jobs) // SCAN_BATCH)
    if len(jobs) < SCAN_IN_PROCESSES or processes < 2 or multiprocessing.current_process().daemon:
        return _scan_batch(jobs)
    batches = [jobs[i : i + SCAN_BATCH] for i in range(0, len(jobs), SCAN_BATCH)]
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [scan for batch in pool.map(_scan_batch, batches) for scan in batch]
    except (RuntimeError, OSError):  # a broken pool (BrokenProcessPool); _scan_one never raises
        return _scan_batch(jobs)


def _scan_batch(jobs: list[tuple[Path, tuple[str, ...]]]) -> list[tuple[str, dict[str, Any]]]:
    return [_scan_one(path, names) for path, names in jobs]


def cpu_count() -> int:
    """The cores this process may run on (a container's or a batch job's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _scan_one(path: Path, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(problem, the attrs `names`) of a shard, in one open: the quick check of `shard_problem`
    (the file opens, its attrs and its list of arrays read), plus the share of frames present.
    Through HDF5's low-level calls: h5py's File, attrs and Dataset objects cost 3x the reads."""
    try:
        fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)
        try:
            attrs = {name: _read_attr(fid, name) for name in names if h5py.h5a.exists(fid, name.encode())}
            members: list[bytes] = []
            h5py.h5o.visit(fid, members.append)
            if b"present" in members:
                present = h5py.h5o.open(fid, b"present")
                if isinstance(present, h5py.h5d.DatasetID) and present.dtype.kind in "biuf":
                    mask = np.empty(present.shape, present.dtype)
                    present.read(h5py.h5s.ALL, h5py.h5s.ALL, mask)
                    attrs["present_share"] = float(mask.mean()) if mask.size else 0.0
        finally:
            fid.close()
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
        return ("damaged (checksum mismatch)" if "filter returned failure" in str(e) else "damaged"), {}
    return "", attrs


def _read_attr(fid: h5py.h5f.FileID, name: str) -> Any:
    """A file's attr as `_plain(f.attrs[name])` reads it; a scalar, the common case, without h5py's
    high-level objects."""
    attr = h5py.h5a.open(fid, name.encode())
    dtype = attr.dtype  # each look-up converts the HDF5 type anew
    if attr.shape != () or dtype.subdtype is not None:  # arrays, empty attrs: as h5py has them
        return _plain(h5py.Group(h5py.h5g.open(fid, b"/")).attrs[name])
    value = np.zeros((), dtype)
    attr.read(value, mtype=h5py.h5t.py_create(dtype))
    string = h5py.check_string_dtype(dtype)
    if string is not None and string.length is None:  # variable-length: str, as h5py decodes it
        return value[()].decode("utf-8", "surrogateescape")
    return _plain(value[()])


def _walk_files(folder: Path, suffix: str) -> list[tuple[str, int, int]]:
    """(path relative to `folder`, size, mtime_ns) of its files ending in `suffix`, recursively,
    in sorted order; hidden files (temporary ones, `.index.lock`) are left out."""
    stack = [("", str(folder))]
    found = []
    while stack:
        prefix, where = stack.pop()
        try:
            entries = list(os.scandir(where))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((f"{prefix}{entry.name}/", entry.path))
            elif entry.name.endswith(suffix):
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                found.append((f"{prefix}{entry.name}", stat.st_size, stat.st_mtime_ns))
    found.sort()
    return found


def _scan_folders(
    root: Path, listed: dict[str, list[tuple[str, int, int]]], cache: _ShardCache
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The record's columns of each listed shard folder (see `_ShardCache`), and the ids of the
    videos whose shards changed, came or went. A file with the size and time the record has keeps
    its row; every other is opened, all in one `_scan_many`. A folder whose listing is the
    record's is not gone through row by row."""
    parts: dict[str, dict[str, Any]] = {}
    touched: set[str] = set()
    merges = []  # (folder, its files, picks: the row in the record, or -1 - the scan of the row)
    jobs: list[tuple[Path, tuple[str, ...]]] = []
    names: list[str] = []  # each scanned file's path under its folder
    for folder, files in listed.items():
        held = cache.parts.get(folder)
        if held is not None and _ShardCache.same_files(held, folder, files):
            parts[folder] = held
            continue
        held = held or _ShardCache.columns([])
        rows = {key: i for i, key in enumerate(held["key"])}
        picks = []
        for rel, size, mtime in files:
            i = rows.pop(f"{folder}/{rel}", None)
            if i is not None and held["size"][i] == size and held["mtime"][i] == mtime:
                picks.append(i)
                continue
            if i is not None:
                touched.add(held["video_id"][i])
            picks.append(-1 - len(jobs))
            jobs.append((root / folder / rel, _scanned_names(folder)))
            names.append(rel)
        touched.update(held["video_id"][i] for i in rows.values())  # files gone
        merges.append((folder, files, picks, held))
    scans = [
        (_shard_id(rel, attrs), problem, attrs)
        for rel, (problem, attrs) in zip(names, _scan_many(jobs), strict=True)
    ]
    touched.update(video_id for video_id, _, _ in scans)
    for folder, files, picks, held in merges:
        parts[folder] = _merged_columns(folder, files, picks, held, scans)
    return parts, touched


def _merged_columns(
    folder: str, files: list[tuple[str, int, int]], picks: list[int], held: dict[str, Any], scans: list[tuple]
) -> dict[str, Any]:
    """A shard folder's columns: row i as the record `held` has its row picks[i], or, where that
    is negative, as the scan scans[-1 - picks[i]] (video id, problem, attrs) found it."""
    found = [scans[-1 - p] if p < 0 else None for p in picks]
    out: dict[str, Any] = {"key": [f"{folder}/{rel}" for rel, _, _ in files]}
    out["size"] = [size for _, size, _ in files]
    out["mtime"] = [mtime for _, _, mtime in files]
    out["video_id"] = [
        held["video_id"][p] if p >= 0 else scan[0] for p, scan in zip(picks, found, strict=True)
    ]
    out["problem"] = [held["problem"][p] if p >= 0 else scan[1] for p, scan in zip(picks, found, strict=True)]
    out["attrs"] = {}
    unheld = [None] * len(held["key"])
    for name in sorted(held["attrs"].keys() | {name for scan in found if scan for name in scan[2]}):
        column = held["attrs"].get(name, unheld)
        values = [column[p] if p >= 0 else scan[2].get(name) for p, scan in zip(picks, found, strict=True)]
        if any(value is not None for value in values):
            out["attrs"][name] = values
    return out


class _ShardCache:
    """The record's shards as columns, one set a shard folder (`parts`: {"key", "size", "mtime",
    "video_id", "problem", "attrs": {name: column}}, one row a file, in the order `_walk_files`
    lists them). Read-only; `get` gives the entry of a shard ("<folder>/<file>"), [size, mtime_ns,
    video id, problem, attrs], made only when asked for (`rcma show`)."""

    FIELDS = ("key", "size", "mtime", "video_id", "problem")

    def __init__(self, parts: dict[str, dict[str, Any]]):
        for part in parts.values():
            columns = [*(part[name] for name in self.FIELDS), *part["attrs"].values()]
            if not all(isinstance(column, list) and len(column) == len(part["key"]) for column in columns):
                raise ValueError("columns of different lengths")
        self.parts = parts
        self._rows: dict[str, tuple[tuple, int]] | None = None

    @classmethod
    def columns(cls, rows: list[tuple]) -> dict[str, Any]:
        """A folder's columns from its rows (key, size, mtime, video id, problem, attrs)."""
        part: dict[str, Any] = {name: [row[i] for row in rows] for i, name in enumerate(cls.FIELDS)}
        names = sorted({name for row in rows for name in row[5]})
        part["attrs"] = {name: [row[5].get(name) for row in rows] for name in names}
        return part

    @classmethod
    def of_entries(cls, entries: dict[str, list]) -> _ShardCache:
        """From the record of an older rcma: {"<folder>/<file>": entry}."""
        rows: dict[str, list[tuple]] = {}
        for key in sorted(entries):
            rows.setdefault(key.split("/", 1)[0], []).append((key, *entries[key]))
        return cls({folder: cls.columns(folder_rows) for folder, folder_rows in rows.items()})

    @staticmethod
    def same_files(part: dict[str, Any], folder: str, files: list[tuple[str, int, int]]) -> bool:
        """Whether a folder's columns are of exactly these files, with these sizes and times."""
        return (
            len(part["key"]) == len(files)
            and part["mtime"] == [mtime for _, _, mtime in files]
            and part["size"] == [size for _, size, _ in files]
            and part["key"] == [f"{folder}/{rel}" for rel, _, _ in files]
        )

    def lists(self, listed: dict[str, list[tuple[str, int, int]]]) -> bool:
        """Whether the record has exactly the files of these folders' listings, each as it is now."""
        return self.parts.keys() == listed.keys() and all(
            self.same_files(self.parts[folder], folder, files) for folder, files in listed.items()
        )

    def _index(self) -> dict[str, tuple[tuple, int]]:
        """{key: (its folder's columns, its row)}, made on the first look-up."""
        if self._rows is None:
            self._rows = {}
            for part in self.parts.values():
                held = (*(part[name] for name in self.FIELDS[1:]), tuple(part["attrs"].items()))
                self._rows.update((key, (held, i)) for i, key in enumerate(part["key"]))
        return self._rows

    def get(self, key: str, default: Any = None) -> Any:
        row = self._index().get(key)
        if row is None:
            return default
        (size, mtime, video_id, problem, attrs), i = row
        return [size[i], mtime[i], video_id[i], problem[i], {n: c[i] for n, c in attrs if c[i] is not None}]

    def items(self) -> Iterator[tuple[str, list]]:
        return ((key, self.get(key)) for key in self._index())
