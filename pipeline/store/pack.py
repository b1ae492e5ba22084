"""`rcma pack`: every video copied, links followed, into one self-contained file."""

from __future__ import annotations

from pathlib import Path

import h5py

from pipeline.files import atomic_file, remove_stale_temps, temps_in
from pipeline.store.read import damaged_members, open_store, video_ids
from pipeline.store.shards import StoreError, check_store_path, set_attrs


def pack_store(store: Path, out: Path) -> None:
    """Copies every video, following the external links, into one self-contained file."""
    check_store_path(out, packed=True)
    remove_stale_temps(out.parent, [temps_in(out.parent, of=out.name)])  # of killed packs
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
