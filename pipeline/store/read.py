"""Opening an index for reading: every id, link and group checked, so a crafted store is refused.

`open_store` lists the videos from the index's table when the index is the very file its last
rebuild wrote, else by walking its groups; a link must lead into the store's own shard folder.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py

from pipeline.errors import one_line
from pipeline.store.index import TABLE
from pipeline.store.record import _stamped
from pipeline.store.shards import GRID, StoreError, _layout, _text, check_id, shard_problem, shard_root


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
        if _layout(store) == "other" and not (shard_root(store) / GRID).is_dir():
            raise StoreError(f"{store}: not an rcma store (not an HDF5 file)") from None
        raise damaged_index(store, "truncated or corrupt") from None
    try:
        if "videos" not in f:
            if (shard_root(store) / GRID).is_dir():  # another HDF5 file put in the index's place
                raise damaged_index(store, "not an rcma index")
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
    except (KeyError, OSError, RuntimeError, ValueError) as e:  # HDF5's errors on damaged metadata
        f.close()
        raise damaged_index(store, one_line(e)) from None
    return f


def damaged_index(store: Path, problem: str) -> StoreError:
    """The one line for an index that cannot be read: the shards are the truth, `rcma index`
    writes it again from them."""
    return StoreError(
        f"{store}: the index is damaged ({problem}); `rcma index --store {store}` rebuilds it "
        f"from {shard_root(store).name}/"
    )


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
