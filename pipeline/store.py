"""The feature store: one small HDF5 shard per (video, stage), and an index file that links them.

Layout (see README "Store layout"):
    store.h5                       index: /videos/<video_id>/{attrs, timestamps, <stage>/...}
    store.h5.d/grid/<id>.h5        frame grid: timestamps and the video's attrs
    store.h5.d/<stage>/<id>.h5     one stage's arrays for one video, with provenance attrs
    store.h5.d/failed/<stage>/<id>.json   the last error of a failed (video, stage)

Every file is written by `atomic_file` (a temporary name, then a rename), so a killed process
leaves either a whole file or none. The index holds only relative external links and attrs, and
is rebuilt from the shards, so it can always be recreated. A name longer than MAX_NAME_BYTES is
cut and hashed; the whole id stays in the shard's attrs.

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
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

GRID = "grid"
FAILED = "failed"
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


def rebuild_index(store: Path) -> int:
    """Writes store.h5 afresh from the finished shards; returns the number of videos in it.

    Only shards made on a video's current frame grid are linked, so a stage or labels shard left
    from before the file changed is never read against the new grid.
    """
    check_store_path(store)
    root = shard_root(store)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".index.lock"):  # two writers must not interleave scan and rename
        grids = dict(_ids_under(root / GRID, ".h5"))
        stages = {stage: dict(_ids_under(root / stage, ".h5")) for stage in stage_names(store)}
        count = 0
        with atomic_file(store, root) as tmp, h5py.File(tmp, "w") as index:
            set_attrs(index, {"layout": "rcma-sharded-v1", "shards": root.name})
            videos = index.create_group("videos")
            for video_id, grid in grids.items():
                attrs = read_shard_attrs(grid)
                if attrs is None:
                    continue
                group = videos.require_group(video_id)
                set_attrs(group, {k: attrs[k] for k in VIDEO_ATTRS if k in attrs})
                group["timestamps"] = h5py.ExternalLink(_relative(grid, store), "/timestamps")
                for stage, shards in stages.items():
                    shard = shards.get(video_id)
                    shard_attrs = read_shard_attrs(shard) if shard else None
                    if shard_attrs is not None and shard_attrs.get("grid_hash") == attrs.get("grid_hash"):
                        group[stage] = h5py.ExternalLink(_relative(shard, store), "/")
                count += 1
    return count


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
        _walk_videos(f, store)
    except StoreError:
        f.close()
        raise
    return f


def video_ids(f: h5py.File) -> list[str]:
    """Ids of the videos in a store opened with `open_store`. Ids may contain '/', so nested
    groups are walked."""
    return _walk_videos(f, Path(f.filename))


def _walk_videos(f: h5py.File, store: Path) -> list[str]:
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    root = os.path.realpath(shard_root(store))

    def walk(group: h5py.Group, prefix: str) -> None:
        for key in group:
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                _check_link(store, root, prefix.rstrip("/"), key, link.filename)
                continue
            if not isinstance(link, h5py.HardLink):
                continue
            child = group[key]
            if isinstance(child, h5py.Group):
                where = (child.id.fileno, h5py.h5o.get_info(child.id).addr)
                if where in seen:
                    raise StoreError(
                        f"{store}: group {child.name} is reached twice (a hard-link cycle), refused"
                    )
                seen.add(where)
                if "n_frames" in child.attrs:
                    try:
                        found.append(check_id(prefix + key))
                    except ValueError as e:
                        raise StoreError(f"{store}: {e}; refusing it") from None
                walk(child, f"{prefix}{key}/")  # ids "a" and "a/b" can both exist

    walk(f["videos"], "")
    return sorted(found)


def _check_link(store: Path, root: str, video_id: str, name: str, target: str) -> None:
    """An external link is followed only into the store's own shard folder."""
    parts = Path(target).parts
    inside = (
        not os.path.isabs(target)
        and ".." not in parts
        and len(parts) > 1
        and parts[0] == shard_root(store).name
        and os.path.realpath(store.parent / target).startswith(root + os.sep)
    )
    if not inside:
        raise StoreError(
            f"{store}: video {video_id}: link {name} leads outside {shard_root(store).name}/ "
            f"({target}); a damaged or crafted index, refusing it (`rcma index` rebuilds it)"
        )


@dataclass(frozen=True)
class StageCount:
    done: list[str]
    failed: dict[str, str]
    missing: list[str]
    damaged: dict[str, str]  # video id -> "<shard file>: <problem>"


def stage_counts(store: Path, verify: bool = False) -> dict[str, StageCount]:
    """Per stage: sound finished videos, damaged shards, failed videos with their errors, and
    known videos with none of these. A video whose frame-grid shard is damaged is damaged in
    every stage. `verify` reads every array to check its checksums (see `shard_problem`)."""
    root = shard_root(store)
    failed = failures(store)
    grids = dict(_ids_under(root / GRID, ".h5"))
    known = set(grids)
    for records in failed.values():
        known |= set(records)
    bad_grids = {
        vid: f"{path}: {problem}" for vid, path in grids.items() if (problem := shard_problem(path, verify))
    }
    out = {}
    for stage in sorted(set(stage_names(store)) | set(failed)):
        shards = dict(_ids_under(root / stage, ".h5"))
        damaged = {
            vid: f"{path}: {problem}"
            for vid, path in shards.items()
            if (problem := shard_problem(path, verify))
        }
        damaged.update({vid: bad_grids[vid] for vid in shards.keys() & bad_grids.keys()})
        done = set(shards) - set(damaged)
        errors = {vid: r["error"] for vid, r in failed.get(stage, {}).items() if vid not in shards}
        missing = sorted(known - set(shards) - set(errors))
        out[stage] = StageCount(sorted(done), errors, missing, dict(sorted(damaged.items())))
    return out


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
    stages whose shard is missing or damaged."""
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


def damaged_members(
    store: Path, group: h5py.Group, full: bool = False, only: str | None = None
) -> dict[str, str]:
    """{member: "<shard file>: <problem>"} for each shard a video group links to (or only the
    member `only`) that is missing or damaged (see `shard_problem`; `full` reads all data)."""
    out = {}
    for name in group:
        if only not in (None, name):
            continue
        path = _linked_file(store, group, name)
        if path is not None and (problem := shard_problem(path, full)):
            out[name] = f"{path}: {problem}"
    return out


def _linked_file(store: Path, group: h5py.Group, name: str) -> Path | None:
    link = group.get(name, getlink=True)
    return Path(store).parent / link.filename if isinstance(link, h5py.ExternalLink) else None
