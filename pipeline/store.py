"""The feature store: one small HDF5 shard per (video, stage), and an index file that links them.

Layout (see README "Store layout"):
    store.h5                       index: /videos/<video_id>/{attrs, timestamps, <stage>/...}
    store.h5.d/grid/<id>.h5        frame grid: timestamps and the video's attrs
    store.h5.d/<stage>/<id>.h5     one stage's arrays for one video, with provenance attrs
    store.h5.d/failed/<stage>/<id>.json   the last error of a failed (video, stage)
    store.h5.d/<stage>/config.json the one configuration of that stage's shards in this store

Every file is written by `atomic_file` (a temporary name, then a rename), so a killed process
leaves either a whole file or none. The index holds only relative external links and attrs, and
is rebuilt from the shards, so it can always be recreated. A stage's shards in one store all come
from one configuration: `claim_stage_configs` refuses a run with another (unless forced), and the
index links only shards of the stage's recorded configuration. A name longer than MAX_NAME_BYTES is
cut and hashed; the whole id stays in the shard's attrs.

The index also holds its videos as a table (`/table/video_id`, `/table/links/<member>`: one
dataset a column), which `open_store` reads instead of walking 100,000 groups when the index is
the very file its last rebuild wrote (`INDEX_STAMP`); see docs/store.md.

Damage and hostility (docs/reliability.md): every array of a shard carries a fletcher32 checksum
(`shard_problem` reads them back); `open_store` refuses ids that are not relative paths of plain
names, links that lead out of the store's own shard folder, groups linked into themselves, and an
index whose links name another folder; `check_store_path` never lets an index replace a file that
is not one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISLNK
from typing import Any, NamedTuple

import h5py
import numpy as np

GRID = "grid"
FAILED = "failed"
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


def failure_path(store: Path, stage: str, video_id: str) -> Path:
    return id_file(shard_root(store) / FAILED / stage, video_id, ".json")


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_failure(store: Path, stage: str, video_id: str, source: str, error: str) -> None:
    path = failure_path(store, stage, video_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"video_id": video_id, "stage": stage, "source": source, "error": error, "time": time.time()}
    with atomic_file(path, shard_root(store)) as tmp:
        tmp.write_text(json.dumps(record))


def clear_failure(store: Path, stage: str, video_id: str) -> None:
    failure_path(store, stage, video_id).unlink(missing_ok=True)


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
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in (GRID, FAILED))


def failures(store: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{stage: {video_id: record}} for every recorded failure."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    root = shard_root(store) / FAILED
    if root.is_dir():
        for stage_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for video_id, path in _ids_under(stage_dir, ".json"):
                out.setdefault(stage_dir.name, {})[video_id] = json.loads(path.read_text())
    return out


def stage_config_path(store: Path, stage: str) -> Path:
    return shard_root(store) / stage / CONFIG_FILE


def stage_config(store: Path, stage: str) -> dict[str, Any] | None:
    """{"config_hash", "config"} of the stage's shards in this store, or None before its first run
    (and in stores made before configs were recorded)."""
    try:
        record = json.loads(stage_config_path(store, stage).read_text())
        return record if isinstance(record, dict) and "config_hash" in record else None
    except (OSError, ValueError):
        return None


FORCE_REMEDY = "use --force to recompute them with these settings, or another --store"


def claim_stage_configs(
    store: Path, configs: dict[str, tuple[str, dict[str, Any]]], force: bool, remedy: str = FORCE_REMEDY
) -> None:
    """Records each stage's (config hash, config) as the store's, refusing, unless `force`, a stage
    the store holds with another config: one line naming the differing settings and `remedy`.

    A store made before configs were recorded is read once: its shards' most common config is
    taken as the store's. With `force`, the new config replaces the old, and the old config's
    shards are no longer indexed (each is recomputed when its video is extracted again).
    """
    root = shard_root(store)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".index.lock"):
        for stage, (config_digest, config) in configs.items():
            held = stage_config(store, stage) or _config_of_shards(store, stage, config_digest)
            if held and held["config_hash"] != config_digest and not force:
                raise StoreError(
                    f"{store}: its {stage} features were made with other settings "
                    f"({config_difference(held.get('config', {}), config)}); {remedy}"
                )
        for stage, (config_digest, config) in configs.items():
            if (stage_config(store, stage) or {}).get("config_hash") != config_digest:
                _write_stage_config(store, stage, config_digest, config)


def _write_stage_config(store: Path, stage: str, config_digest: str, config: dict[str, Any]) -> None:
    path = stage_config_path(store, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "config_hash": config_digest, "config": config}
    with atomic_file(path, shard_root(store)) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")


def restamp_stage(
    store: Path, stage: str, rehash: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
) -> int:
    """Brings a stage hashed by an earlier rule up to date; returns how many shards it re-stamped.

    `rehash` gives a config's (hash, the store's config) by today's rule. When it gives the
    stage's recorded config another hash than the record's (a store written before per-video
    settings left the hash), each shard whose own config it gives that hash is written again with
    the new hash in its attrs (copied to a temporary name, then renamed: its arrays untouched, no
    feature recomputed), and the record takes the new hash. A store already up to date costs one
    read of its record.
    """
    root = shard_root(store)
    held = stage_config(store, stage)
    if held is None or rehash(held.get("config", {}))[0] == held["config_hash"]:
        return 0
    with _locked(root / ".index.lock"):
        held = stage_config(store, stage) or {}
        config_digest, config = rehash(held.get("config", {}))
        if config_digest == held.get("config_hash"):
            return 0  # another process did it first
        count = 0
        for _, path in _ids_under(root / stage, ".h5"):
            attrs = {} if path.is_symlink() else read_shard_attrs(path) or {}
            try:
                made = json.loads(attrs.get("config") or "null")
            except ValueError:
                continue
            if attrs.get("config_hash") == config_digest or not isinstance(made, dict):
                continue
            if rehash(made)[0] == config_digest:
                with atomic_file(path, root) as tmp:
                    shutil.copyfile(path, tmp)
                    with h5py.File(tmp, "r+") as f:
                        f.attrs["config_hash"] = config_digest
                count += 1
        _write_stage_config(store, stage, config_digest, config)
    return count


def _config_of_shards(store: Path, stage: str, wanted: str) -> dict[str, Any] | None:
    """The config record of a store made before records: `wanted` if any shard has it, else the
    most common one; None when the stage has no shards."""
    found: dict[str, dict[str, Any]] = {}
    counts: Counter = Counter()
    for _, path in _ids_under(shard_root(store) / stage, ".h5"):
        attrs = read_shard_attrs(path)
        if attrs and attrs.get("config_hash"):
            counts[attrs["config_hash"]] += 1
            found.setdefault(attrs["config_hash"], json.loads(attrs.get("config") or "{}"))
    if not counts:
        return None
    chosen = wanted if wanted in counts else counts.most_common(1)[0][0]
    return {"config_hash": chosen, "config": found[chosen]}


def config_difference(
    held: dict[str, Any], wanted: dict[str, Any], held_name: str = "in the store", wanted_name: str = "now"
) -> str:
    """`name: <held value> <held_name>, <wanted value> <wanted_name>` for each differing setting."""
    changed = [
        f"{key}: {held.get(key, '(unset)')} {held_name}, {wanted.get(key, '(unset)')} {wanted_name}"
        for key in sorted(held.keys() | wanted.keys())
        if held.get(key) != wanted.get(key)
    ]
    return "; ".join(changed) or "a setting not recorded in the config"


def config_summary(config: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(config.items()))


INDEX_LAYOUT = "rcma-sharded-v1"
INDEX_RECORD = ".index-record.json"  # in the shard folder: what the index links, what each shard held
# An update rewrites each changed video's group in a copy of the index (~0.28 ms a video: the old
# group removed, the new one written); writing anew copies each unchanged group (~0.05 ms) and
# writes each changed one (~0.16 ms). Updating costs less up to ~30% of the videos changed, but
# grows the file: above this share, the index is written anew.
REWRITE_SHARE = 0.2
REWRITE_GROWTH = 2.0  # ...as is one grown this many times its fresh size by updates


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


def read_scan_cache(store: Path) -> _ShardCache | None:
    """What each shard held when the index last read it (None when there is no sound record)."""
    return _read_index_record(store).get("shards")


def rebuild_index(store: Path, fresh: bool = False) -> int:
    """Writes store.h5 from the finished shards; returns the number of videos in it.

    Only shards made on a video's current frame grid, and of their stage's recorded config, are
    linked, so a shard left from before the file changed is never read against the new grid and
    a stage never mixes configs. The index records what it linked and what each shard held
    (`INDEX_RECORD`): a rebuild opens only shards that changed since, works out the links of only
    the videos whose shards changed, came or went, and rewrites only the videos whose links
    changed, in a copy of the index that replaces it atomically. `fresh` (or many changes) writes
    a new file, in which the groups of unchanged videos are copied from the index (`_write_new`).
    Without a sound record (no index, a damaged one), every shard is opened.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a scanning process of `_scan_many` re-running a script without a main guard: it must not
        # wait for the lock its parent holds (the parent then scans the shards itself)
        raise StoreError(
            f"{store}: rebuild_index called while a new process imports the main script; put the "
            "script's work under `if __name__ == '__main__':`"
        )
    check_store_path(store)
    root = shard_root(store)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".index.lock"):  # two writers must not interleave scan and rename
        previous = _read_index_record(store)
        cache = previous.get("shards", _ShardCache({}))
        listed = {folder: _walk_files(root / folder, ".h5") for folder in (GRID, *stage_names(store))}
        configs = {
            stage: (stage_config(store, stage) or {}).get("config_hash") for stage in listed if stage != GRID
        }
        old = previous.get("videos")
        known = previous.get("configs") == configs and old is not None and "links" in previous
        ours = _stamped(store, signed=True)  # the index as this user's rcma wrote it
        if not fresh and known and cache.lists(listed) and ours:
            return len(old)  # every shard as the record has it, and the same configs: all is linked
        parts, touched = _scan_folders(root, listed, cache)
        linker = _Linker(root.name, parts, configs)
        # With the same configs, only videos whose shards changed can link anything else: the rest
        # keep the record's links, for the videos the grid shards back (the record names no other).
        grid_ids = set(linker.ids())
        kept = (grid_ids - touched) & old.keys() & previous["links"].keys() if known else set()
        entries = {
            video_id: entry
            for video_id in sorted(grid_ids - kept)
            if (entry := linker.entry(video_id)) is not None
        }
        links = {vid: previous["links"][vid] for vid in kept}
        digests = {vid: old[vid] for vid in kept}
        for video_id, (attrs, video_links) in entries.items():
            links[video_id] = {member: link for member, (link, _) in video_links.items()}
            digests[video_id] = _digest((attrs, video_links))
        record = {"shard_columns": parts, "videos": digests, "links": links, "configs": configs}
        changed = sorted(v for v in entries if old is None or old.get(v) != digests[v])
        removed = sorted(v for v in old or {} if v not in digests)
        fresh_size = previous.get("fresh_size", 0)
        update = (  # an index made elsewhere is written anew from the shards, never edited
            not fresh
            and ours
            and old is not None
            and len(changed) + len(removed) <= REWRITE_SHARE * max(1, len(digests))
            and store.stat().st_size <= REWRITE_GROWTH * fresh_size
        )
        if update and not changed and not removed:  # all linked, table current
            record.update({"fresh_size": fresh_size, **_stamp_fields(store)})  # the index as it was
            _write_record(store, record)
            return len(digests)
        with atomic_file(store, root) as tmp:
            if update:
                shutil.copyfile(store, tmp)
                with h5py.File(tmp, "r+") as index:
                    writer = _GroupWriter(index["videos"])
                    for video_id in removed:
                        _unlink_video(index["videos"], video_id)
                    for video_id in changed:
                        _unlink_video(index["videos"], video_id)
                        writer.link_video(video_id, *entries[video_id])
                    _write_table(index, links)
            else:
                copied = _copyable(old, digests) if old is not None and ours else set()
                _write_new(tmp, root.name, links, linker, store, copied)
                fresh_size = tmp.stat().st_size
        record.update({"fresh_size": fresh_size, **_stamp_fields(store)})
        _write_record(store, record)
        _write_stamp(store)
    return len(digests)


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


class _Linker:
    """What the index holds for each video (its attrs and links), from the shard folders' columns:
    the video attrs of its grid shard, a link to that shard, and a link to each stage's shard
    that is sound and was made on that grid with the stage's recorded config."""

    def __init__(self, folder: str, parts: dict[str, dict[str, Any]], configs: dict[str, str | None]):
        self.folder = folder  # the shard folder's name, with which every link starts
        self.parts = parts
        self.configs = configs
        self.rows = {name: {vid: i for i, vid in enumerate(part["video_id"])} for name, part in parts.items()}
        self.entries: dict[str, Any] = {}

    def ids(self) -> Iterable[str]:
        return self.rows[GRID]

    def entry(self, video_id: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]] | None:
        """(attrs, {member: (shard, path in it)}); None when the video has no sound grid shard."""
        if video_id not in self.entries:
            self.entries[video_id] = self._entry(video_id)
        return self.entries[video_id]

    def _entry(self, video_id: str) -> tuple[dict[str, Any], dict[str, tuple[str, str]]] | None:
        grid, g = self.parts[GRID], self.rows[GRID].get(video_id)
        if g is None or grid["problem"][g]:
            return None
        attrs = {name: value for name in VIDEO_ATTRS if (value := _cell(grid, name, g)) is not None}
        links = {"timestamps": (f"{self.folder}/{grid['key'][g]}", "/timestamps")}
        for stage, config in self.configs.items():
            part, i = self.parts[stage], self.rows[stage].get(video_id)
            if (
                i is not None
                and not part["problem"][i]
                and _cell(part, "grid_hash", i) == _cell(grid, "grid_hash", g)
                and config in (None, _cell(part, "config_hash", i))
            ):
                links[stage] = (f"{self.folder}/{part['key'][i]}", "/")
        return attrs, links


def _cell(part: dict[str, Any], name: str, row: int) -> Any:
    column = part["attrs"].get(name)
    return None if column is None else column[row]


def _write_new(
    path: Path,
    folder: str,
    links: dict[str, dict[str, str]],
    linker: _Linker,
    source: Path | None,
    copied: set[str],
) -> None:
    """Writes an index file anew: the groups of the videos `copied` are copied from `source`, the
    index the record describes, one HDF5 call a group (creating a group's five to nine attributes
    costs ~10 us each, 3x what copying them does); every other video's group is written as the
    `linker` has it."""
    with contextlib.ExitStack() as files:
        index = files.enter_context(h5py.File(path, "w", libver="latest"))
        set_attrs(index, {"layout": INDEX_LAYOUT, "shards": folder})
        videos = index.create_group("videos")
        old = files.enter_context(h5py.File(source, "r"))["videos"].id if source and copied else None
        writer = _GroupWriter(videos)
        for video_id in sorted(links):  # "a" before "a/b"
            name = video_id.encode()
            if video_id in copied and _hard_link(old, name):  # a copy follows any other kind
                h5py.h5o.copy(old, name, videos.id, name)
            else:
                writer.link_video(video_id, *linker.entry(video_id))
        _write_table(index, links)


def _copyable(old: dict[str, str], digests: dict[str, str]) -> set[str]:
    """The videos whose group the index holds as it must be (same digest) and can be copied from
    it: not a group another video's group is nested in, now or in the index ("a" of "a/b"), since
    a copy takes everything in it."""
    nested = {video_id.split("/", 1)[0] for video_id in (*digests, *old) if "/" in video_id}
    return {vid for vid, digest in digests.items() if old.get(vid) == digest and "/" not in vid} - nested


def _hard_link(group: h5py.h5g.GroupID, name: bytes) -> bool:
    """Whether `name` in the group is a hard link (not an external or soft one, not missing)."""
    return group.links.exists(name) and group.links.get_info(name).type == h5py.h5l.TYPE_HARD


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _digest(value: tuple[dict[str, Any], dict[str, tuple[str, str]]]) -> str:
    """Names what a video's group holds (its attrs and links), to find the groups to rewrite."""
    attrs, links = value
    text = repr((sorted(attrs.items()), sorted(links.items())))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _read_index_record(store: Path) -> dict[str, Any]:
    """The record the index was written with; {} when the index is missing or is not the file the
    record describes (replaced, damaged, renamed with its folder, or written by an older rcma).
    Its "shards" are a `_ShardCache` (made from one entry a shard in a record of an older rcma).
    """
    try:
        record = json.loads((shard_root(store) / INDEX_RECORD).read_text())
        fields = _stamp_fields(store)
        same = {name: record.get(name) for name in fields} == fields
        if same and "shard_columns" in record:
            record["shards"] = _ShardCache(record.pop("shard_columns"))
        elif same and "shards" in record:
            record["shards"] = _ShardCache.of_entries(record["shards"])
        return record if same else {}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def _write_record(store: Path, record: dict[str, Any]) -> None:
    """Writes the record, its shards as columns (`_ShardCache`): JSON of 400,000 small lists and
    dicts costs seconds to write and read, of a few long lists a fraction of that."""
    root = shard_root(store)
    with atomic_file(root / INDEX_RECORD, root) as tmp:
        tmp.write_text(json.dumps(record))


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


class _GroupWriter:
    """Writes videos' groups (their attrs and one external link per shard) through HDF5's
    low-level calls: h5py's `attrs[...] = ` costs ~25 us an attribute, nine per video, which is
    most of writing an index of 100,000 videos. The groups keep their attributes compact (in the
    group's header, up to 16) rather than in a separate heap. Attrs read back exactly as
    `set_attrs` writes them (the same HDF5 types)."""

    def __init__(self, videos: h5py.Group):
        self.videos = videos
        self.gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
        self.gcpl.set_attr_phase_change(16, 14)
        self.space = h5py.h5s.create_simple(())
        self.types: dict[np.dtype, tuple[h5py.h5t.TypeID, h5py.h5t.TypeID]] = {}

    def link_video(self, video_id: str, attrs: dict[str, Any], links: dict[str, tuple[str, str]]) -> None:
        name = video_id.encode()
        new = "/" not in video_id and not self.videos.id.links.exists(name)
        if new:
            gid = h5py.h5g.create(self.videos.id, name, gcpl=self.gcpl)
        else:  # nested ids ("a/b"), and a group an update keeps for the groups nested in it
            gid = self.videos.require_group(video_id).id
        for key, value in attrs.items():
            self.set_attr(gid, key, value, new)
        for member, (filename, target) in links.items():
            gid.links.create_external(member.encode(), filename.encode(), target.encode())

    def set_attr(self, gid: h5py.h5g.GroupID, key: str, value: Any, new: bool = False) -> None:
        if not isinstance(value, str | bool | int | float | np.bool_ | np.integer | np.floating):
            set_attrs(h5py.Group(gid), {key: value})  # anything else: the high-level call
            return
        data = np.asarray(value, dtype=h5py.string_dtype() if isinstance(value, str) else None)
        types = self.types.get(data.dtype)
        if types is None:
            logical, memory = h5py.h5t.py_create(data.dtype, logical=True), h5py.h5t.py_create(data.dtype)
            types = self.types[data.dtype] = (logical, memory)
        name = key.encode()
        if not new and h5py.h5a.exists(gid, name):
            h5py.h5a.delete(gid, name)
        h5py.h5a.create(gid, name, types[0], self.space).write(data, mtype=types[1])


TABLE = "table"  # in the index: one dataset per column, the rows sorted by video id


def _write_table(index: h5py.File, links: dict[str, dict[str, str]]) -> None:
    """The index's videos as columns, for `open_store` to read in one call each: `video_id`, and
    one `links/<member>` per member ("" where a video has none). UTF-8 in fixed-length strings,
    compressed, with checksums; written afresh on every rebuild (it is small)."""
    if TABLE in index:
        del index[TABLE]
    table = index.create_group(TABLE)
    ids = sorted(links)
    members = sorted({member for video in links.values() for member in video})
    columns = {"video_id": ids, **{f"links/{m}": [links[v].get(m, "") for v in ids] for m in members}}
    for name, values in columns.items():
        encoded = [value.encode() for value in values]
        data = np.array(encoded, dtype=h5py.string_dtype("utf-8", max(1, *map(len, encoded), 1)))
        filters = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
        chunk = (max(1, min(len(data), CHUNK_BYTES // data.dtype.itemsize)),)
        table.create_dataset(name, data=data, **({"chunks": chunk, **filters} if len(data) else {}))
    table.attrs["rows"] = len(ids)


INDEX_KEY = "index.key"  # in rcma's cache folder: signs the stamps of the indexes this user wrote
INDEX_KEY_BYTES = 32
INDEX_STAMP = ".index-stamp.json"  # in the shard folder: the index file (size, time) its table describes


def _stamp_fields(store: Path) -> dict[str, Any]:
    """What identifies the index file a stamp or a record describes: its size and modification
    time, and the name of its shard folder."""
    return {"index": list(_stat(store)), "folder": shard_root(store).name}


def _write_stamp(store: Path) -> None:
    root = shard_root(store)
    stamp = _stamp_fields(store)
    key = _index_key()
    if key is not None:
        stamp["signature"] = _signature(store, stamp, key)
    with atomic_file(root / INDEX_STAMP, root) as tmp:
        tmp.write_text(json.dumps(stamp))


def _stamped(store: Path, signed: bool = False) -> bool:
    """Whether the index is the very file its last rebuild wrote (same size and modification
    time, same shard folder): only then is its table taken for the list of its videos. An index
    changed by anything else (an older rcma, h5py, a crafted edit) is walked instead.

    A stamp is easy to forge, so a rebuild takes an index as it stands (keeps it, or copies its
    groups) only when `signed`: the stamp carries this user's signature of the file's identity
    (`_index_key`), which a store made elsewhere, crafted or not, does not."""
    try:
        stamp = json.loads((shard_root(store) / INDEX_STAMP).read_text())
        fields = _stamp_fields(store)
        if not isinstance(stamp, dict) or {name: stamp.get(name) for name in fields} != fields:
            return False
        if not signed:
            return True
        key = _index_key()
        signature = stamp.get("signature")
        return (
            key is not None
            and isinstance(signature, str)
            and hmac.compare_digest(signature, _signature(store, fields, key))
        )
    except (OSError, ValueError):
        return False


def _index_key() -> bytes | None:
    """This user's key for signing index stamps (`INDEX_KEY` in rcma's cache folder), made on
    first use; None where it cannot be kept (the indexes are then written whole every time)."""
    from pipeline.weights import cache_dir  # weights imports this module

    path = cache_dir() / INDEX_KEY
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                tmp.write_bytes(os.urandom(INDEX_KEY_BYTES))
                tmp.chmod(0o600)
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == INDEX_KEY_BYTES else None


def _signature(store: Path, fields: dict[str, Any], key: bytes) -> str:
    """The stamp's fields and the index file's inode, signed: a file put in its place with the same
    size and time is another file."""
    identity = json.dumps({**fields, "inode": store.stat().st_ino}, sort_keys=True)
    return hmac.new(key, identity.encode(), hashlib.sha256).hexdigest()


def _unlink_video(videos: h5py.Group, video_id: str) -> None:
    """Removes a video's group, and each parent group (of a nested id) left empty; a group that
    other videos' groups are nested in loses only its attrs and links."""
    if video_id not in videos:
        return
    group = videos[video_id]
    nested = [name for name in group if isinstance(group.get(name, getlink=True), h5py.HardLink)]
    if nested:
        for name in list(group.attrs):
            del group.attrs[name]
        for name in list(group):
            if name not in nested:
                del group[name]
        return
    del videos[video_id]
    parents = video_id.split("/")[:-1]
    while parents:
        name = "/".join(parents)
        if len(videos[name]) or len(videos[name].attrs):
            break
        del videos[name]
        parents.pop()


def clean_store_temps(store: Path) -> int | None:
    """Removes the temporary files killed writers left in a store (shards, failure records, the
    index); None, removing nothing, while any writer is writing one (a running extract)."""
    root = shard_root(store)
    with _locked(root / ".index.lock"):
        return remove_stale_temps(root, [root.rglob(".*.tmp"), store.parent.glob(f".{store.name}.*.tmp")])


@contextlib.contextmanager
def atomic_file(path: Path, guard: Path | None = None) -> Iterator[Path]:
    """The one way rcma writes a file: to a temporary name beside `path`, synced, then renamed.

    Yields the temporary name. An exception removes it; a kill leaves it behind, for
    `remove_stale_temps`. While writing, a shared lock is held on the folder `guard` (default:
    the file's own folder), so a cleaner that takes the exclusive lock knows no writer is live.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with _folder_lock(guard or path.parent, fcntl.LOCK_SH):
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temps(guard: Path, found: list[Iterable[Path]]) -> int | None:
    """Removes the temporary files in `found` if no `atomic_file` guarded by `guard` is being
    written; returns how many, or None when a writer is live (then nothing is removed)."""
    try:
        with _folder_lock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
            if not locked:  # no locks on this filesystem: a writer may be live
                return None
            stale = [path for paths in found for path in paths]
            for path in stale:
                path.unlink(missing_ok=True)
            return len(stale)
    except BlockingIOError:
        return None


@contextlib.contextmanager
def _folder_lock(folder: Path, how: int) -> Iterator[bool]:
    """Holds a flock on a folder; yields False, holding none, where the filesystem has no locks
    (some network filesystems), so writing still works there."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, how)
            locked = True
        except BlockingIOError:
            raise
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _relative(path: Path, store: Path) -> str:
    return path.relative_to(store.parent).as_posix()


def open_store(store: Path) -> h5py.File:
    """Opens a store index for reading, with a one-line error when it is missing, damaged or hostile.

    Every video id is checked like an id from the file system, every link must lead into the
    store's own shard folder, and a group that contains itself is refused, so nothing read from
    a crafted store can name a file outside it or recurse forever.
    """
    store = Path(store)
    if not store.exists():
        raise StoreError(f"{store}: no such store (run `rcma extract ... --store {store}` first)")
    try:
        f = h5py.File(store, "r")
    except OSError:
        if _layout(store) == "other":
            raise StoreError(f"{store}: not an rcma store (not an HDF5 file)") from None
        raise StoreError(
            f"{store}: not a readable HDF5 store (truncated or corrupt); "
            f"`rcma index --store {store}` rebuilds it from {shard_root(store).name}/"
        ) from None
    try:
        if "videos" not in f:
            raise StoreError(f"{store}: not an rcma store (no /videos group)")
        shards = _text(f.attrs.get("shards", ""))
        if shards and shards != shard_root(store).name:
            raise StoreError(
                f"{store}: its links lead into {shards}/, not {shard_root(store).name}/ (renamed or "
                f"moved?); run `rcma index --store {store}` to relink it"
            )
        _opened_ids[f] = _table_ids(f, store) if TABLE in f and _stamped(store) else _walk_videos(f, store)
    except StoreError:
        f.close()
        raise
    return f


_opened_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # open_store's walk, by file


def video_ids(f: h5py.File) -> list[str]:
    """Ids of the videos in a store opened with `open_store` (the walk it did, not another).
    Ids may contain '/', so nested groups are walked."""
    known = _opened_ids.get(f) if f.id.valid else None
    if known is not None and f.mode == "r":
        return list(known)
    return _walk_videos(f, Path(f.filename))


def _walk_videos(f: h5py.File, store: Path) -> list[str]:
    """Every video id under /videos, checking each link on the way (HDF5's low-level calls: a
    store of 100,000 videos is walked in seconds)."""
    found: list[str] = []
    seen: set[tuple[Any, int]] = set()
    links = _LinkCheck(store)

    def walk(gid: h5py.h5g.GroupID, prefix: str) -> None:
        names: list[bytes] = []
        gid.links.iterate(names.append)
        for raw in names:
            key = raw.decode()
            kind = gid.links.get_info(raw).type
            if kind == h5py.h5l.TYPE_EXTERNAL:
                filename, _ = gid.links.get_val(raw)
                links.check(prefix.rstrip("/"), key, filename.decode())
                continue
            if kind != h5py.h5l.TYPE_HARD:
                continue
            child = h5py.h5o.open(gid, raw)
            if isinstance(child, h5py.h5g.GroupID):
                where = (child.fileno, h5py.h5o.get_info(child).addr)
                if where in seen:
                    name = h5py.h5i.get_name(child).decode()
                    raise StoreError(f"{store}: group {name} is reached twice (a hard-link cycle), refused")
                seen.add(where)
                if h5py.h5a.exists(child, b"n_frames"):
                    try:
                        found.append(check_id(prefix + key))
                    except ValueError as e:
                        raise StoreError(f"{store}: {e}; refusing it") from None
                walk(child, f"{prefix}{key}/")  # ids "a" and "a/b" can both exist

    walk(f["videos"].id, "")
    return sorted(found)


def _table_ids(f: h5py.File, store: Path) -> list[str]:
    """The video ids of an index's table (see `_write_table`), with the checks of `_walk_videos`
    on every id and every link it names: one read per column instead of a walk of every group."""
    try:
        table = f[TABLE]
        ids = [_decode(raw) for raw in table["video_id"][()].tolist()]
        columns = {name: table[f"links/{name}"][()].tolist() for name in table.get("links", {})}
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError, AttributeError):
        raise _damaged_table(store) from None
    if any(len(column) != len(ids) for column in columns.values()):
        raise _damaged_table(store)
    for video_id in ids:
        try:
            check_id(video_id)
        except ValueError as e:
            raise StoreError(f"{store}: {e}; refusing it") from None
    links = _LinkCheck(store, symlinks=True)
    for name, column in columns.items():
        for i, raw in enumerate(column):
            if raw and not links.inside(target := _decode(raw)):
                links.refuse(ids[i], name, target)
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise _damaged_table(store)
    return ids


def _damaged_table(store: Path) -> StoreError:
    return StoreError(f"{store}: its table of videos is damaged; `rcma index --store {store}` rebuilds it")


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _LinkCheck:
    """An external link is followed only into the store's own shard folder (symlinks resolved;
    each folder is resolved once, each file only when it is itself a link). With `symlinks`, the
    shard folder is listed once to find the files that are symlinks, instead of one `lstat` a file.
    """

    def __init__(self, store: Path, symlinks: bool = False):
        self.store = store
        self.name = shard_root(store).name
        self.prefix = self.name + "/"
        self.root = os.path.realpath(shard_root(store)) + os.sep
        self.folders: dict[str, str | None] = {}
        self.symlinks = _symlinked_files(shard_root(store)) if symlinks else None

    def check(self, video_id: str, name: str, target: str) -> None:
        if not self.inside(target):
            self.refuse(video_id, name, target)

    def inside(self, target: str) -> bool:
        path = self.resolve(target)
        if path is None:
            return False
        linked = path in self.symlinks if self.symlinks is not None else os.path.islink(path)
        return not linked or self.inside_link(path)

    def resolve(self, target: str) -> str | None:
        """The link's file, its folder resolved, when the folder is inside the shard folder."""
        # relative, first part the shard folder, no ".." part: startswith(prefix) makes the first two
        if not target.startswith(self.prefix) or "/../" in target or target.endswith("/.."):
            return None
        folder, _, base = target.rpartition("/")
        real = self.folders.get(folder, "")
        if real == "":
            real = os.path.realpath(self.store.parent / folder) + os.sep
            real = self.folders[folder] = real if real.startswith(self.root) else None
        return None if real is None else real + base

    def inside_link(self, path: str) -> bool:
        """Whether a file that is a symlink leads into the shard folder."""
        return os.path.realpath(path).startswith(self.root)

    def refuse(self, video_id: str, name: str, target: str) -> None:
        raise StoreError(
            f"{self.store}: video {video_id}: link {name} leads outside {self.name}/ "
            f"({target}); a damaged or crafted index, refusing it (`rcma index` rebuilds it)"
        )


def _symlinked_files(root: Path) -> set[str]:
    """Real paths (folders resolved) of the entries under `root` that are symlinks to files."""
    found: set[str] = set()
    stack = [os.path.realpath(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                found.add(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return found


@dataclass(frozen=True)
class StageCount:
    done: list[str]
    failed: dict[str, str]
    missing: list[str]
    damaged: dict[str, str]  # video id -> "<shard file>: <problem>"
    other_config: list[str]  # sound shards of another config than the stage's (not indexed)
    config: dict[str, Any] | None  # the stage's recorded {"config_hash", "config"}


def stage_counts(store: Path, verify: bool = False) -> dict[str, StageCount]:
    """Per stage: sound finished videos, damaged shards, failed videos with their errors, shards of
    another config, and known videos with none of these. A video whose frame-grid shard is
    damaged is damaged in every stage. Shards unchanged since the index last read them are not
    opened again; `verify` reads every array of every shard to check its checksums (see
    `shard_problem`)."""
    root = shard_root(store)
    failed = failures(store)
    cache = None if verify else read_scan_cache(store)
    grids = scan_shards(store, GRID, cache)
    known = set(grids)
    for records in failed.values():
        known |= set(records)
    bad_grids = {
        vid: f"{info.path}: {problem}" for vid, info in grids.items() if (problem := _problem(info, verify))
    }
    out = {}
    for stage in sorted(set(stage_names(store)) | set(failed)):
        shards = scan_shards(store, stage, cache) if (root / stage).is_dir() else {}
        damaged = {
            vid: f"{info.path}: {problem}"
            for vid, info in shards.items()
            if (problem := _problem(info, verify))
        }
        damaged.update({vid: bad_grids[vid] for vid in shards.keys() & bad_grids.keys()})
        config = stage_config(store, stage)
        other = sorted(
            vid
            for vid, info in shards.items()
            if vid not in damaged and config and info.attrs.get("config_hash") != config["config_hash"]
        )
        done = set(shards) - set(damaged) - set(other)
        errors = {vid: r["error"] for vid, r in failed.get(stage, {}).items() if vid not in shards}
        missing = sorted(known - set(shards) - set(errors))
        out[stage] = StageCount(sorted(done), errors, missing, dict(sorted(damaged.items())), other, config)
    return out


def _problem(info: ShardInfo, verify: bool) -> str:
    return shard_problem(info.path, full=True) if verify else info.problem


def pack_store(store: Path, out: Path) -> None:
    """Copies every video, following the external links, into one self-contained file."""
    check_store_path(out, packed=True)
    remove_stale_temps(out.parent, [out.parent.glob(f".{out.name}.*.tmp")])  # of killed packs
    with open_store(store) as src, atomic_file(out) as tmp, h5py.File(tmp, "w") as dst:
        set_attrs(dst, {"layout": "rcma-packed-v1"})
        for video_id in video_ids(src):
            group = src[f"videos/{video_id}"]
            packed = dst.require_group(f"videos/{video_id}")
            packed.attrs.update(group.attrs)
            damaged = damaged_members(store, group, full=True)  # never ship a damaged shard
            if damaged:
                name, problem = next(iter(damaged.items()))
                raise StoreError(
                    f"{store}: video {video_id}: {name} shard {problem}; `rcma extract` recomputes it"
                )
            for name in group:  # nested ids ("a" and "a/b") are copied as videos of their own
                if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                    _check_no_links(store, video_id, name, group[name])
                    group.copy(name, packed, name=name, expand_external=True)


def _check_no_links(store: Path, video_id: str, name: str, obj: h5py.HLObject) -> None:
    """A shard holds arrays only: a link inside one (which a copy would follow) is refused."""
    if isinstance(obj, h5py.Group):
        links: list[str] = []
        obj.visititems_links(
            lambda key, link: links.append(key) if not isinstance(link, h5py.HardLink) else None
        )
        if links:
            raise StoreError(
                f"{store}: video {video_id}: {name} shard {obj.file.filename} holds a link ({links[0]}); "
                "a damaged or crafted shard, refusing it"
            )


@dataclass(frozen=True)
class VideoSummary:
    video_id: str
    n_frames: int
    fps: float
    duration: float
    present: dict[str, float]  # stage -> share of frames present
    damaged: dict[str, str]  # stage -> "<shard file>: <problem>"


def summarize(store: Path) -> list[VideoSummary]:
    """Per video in the index: length, for each stage the share of frames with data, and the
    stages whose shard is missing or damaged.

    With the index's record (see `rebuild_index`), a shard unchanged since it was indexed is not
    opened again (its share of frames present is in the record); otherwise every shard is read.
    """
    record = _read_index_record(store)
    if "links" in record and store.exists():
        return _summarize_from_record(store, record)
    out = []
    with open_store(store) as f:
        for video_id in video_ids(f):
            group = f[f"videos/{video_id}"]
            damaged = damaged_members(store, group)
            present = {}
            for stage in group:
                if stage in damaged:
                    continue
                try:
                    member = group[stage]  # opened once: an external link
                    if isinstance(member, h5py.Group) and "present" in member:
                        mask = member["present"][:]
                        present[stage] = float(mask.mean()) if mask.size else 0.0
                except OSError:  # a chunk whose checksum fails
                    damaged[stage] = f"{_linked_file(store, group, stage)}: damaged (checksum mismatch)"
            n, fps = int(group.attrs["n_frames"]), float(group.attrs["fps"])
            out.append(VideoSummary(video_id, n, fps, n / fps, present, damaged))
    return out


def _summarize_from_record(store: Path, record: dict[str, Any]) -> list[VideoSummary]:
    """`summarize` from the index's record: one `lstat` a shard, each link checked like the
    index's own (the record lies beside the index, and names the files to read)."""
    shards = record["shards"]
    out = []
    check = _LinkCheck(store)
    for video_id, links in sorted(record["links"].items()):
        present: dict[str, float] = {}
        damaged: dict[str, str] = {}
        video: dict[str, Any] = {}
        for member, link in links.items():
            key = link.split("/", 1)[1]
            real = check.resolve(link)
            if real is None:
                check.refuse(video_id, member, link)
            entry = shards.get(key)
            try:
                stat = os.lstat(real)
                if S_ISLNK(stat.st_mode):
                    if not check.inside_link(real):
                        check.refuse(video_id, member, link)
                    stat = os.stat(real)
                same = entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns
                exists = True
            except OSError:
                same = exists = False
            if same:
                problem, attrs = entry[3], entry[4]
            else:
                names = (*SCANNED_ATTRS, *(VIDEO_ATTRS if member == "timestamps" else ()))
                problem, attrs = _scan_one(store.parent / link, names) if exists else ("missing", {})
            if problem:
                damaged[member] = f"{store.parent / link}: {problem}"
            elif member == "timestamps":
                video = attrs
            elif "present_share" in attrs:
                present[member] = attrs["present_share"]
        if not video:  # the grid shard changed or is damaged: the length the index was made with
            grid = shards.get(links["timestamps"].split("/", 1)[1])
            video = grid[4] if grid else {"n_frames": 0, "fps": 1.0}
        n, fps = int(video.get("n_frames", 0)), float(video.get("fps", 1.0))
        out.append(VideoSummary(video_id, n, fps, n / fps, present, damaged))
    return out


def damaged_members(
    store: Path, group: h5py.Group, full: bool = False, only: str | Iterable[str] | None = None
) -> dict[str, str]:
    """{member: "<shard file>: <problem>"} for each shard a video group links to (or only the
    member, or members, `only`) that is missing or damaged (see `shard_problem`; `full` reads all
    data).

    Each link is checked again before its shard is opened (a StoreError for one leading out of
    the shard folder): an index listed from its table (`open_store`) had its table's links
    checked, and this checks the links the groups actually hold."""
    out = {}
    links = _LinkCheck(Path(store))
    wanted = {only} if isinstance(only, str) else None if only is None else set(only)
    for name in group:
        if wanted is not None and name not in wanted:
            continue
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            links.check(group.name.removeprefix("/videos/"), name, link.filename)
        path = _linked_file(store, group, name)
        if path is not None and (problem := shard_problem(path, full)):
            out[name] = f"{path}: {problem}"
    return out


def _linked_file(store: Path, group: h5py.Group, name: str) -> Path | None:
    link = group.get(name, getlink=True)
    return Path(store).parent / link.filename if isinstance(link, h5py.ExternalLink) else None
