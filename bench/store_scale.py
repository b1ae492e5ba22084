"""The store at 100,000 videos: index rebuild, `rcma status`, `rcma show`, opening the index for training.

Builds synthetic stores of 1,000, 10,000 and 100,000 small videos (a frame-grid shard and three
stage shards each, copied from one real shard written by the store's own writer), then times:

- the peer of every figure: listing the shard folders and `stat`-ing every shard, the least any
  tool must do to know that a store of this many files has not changed,
- the first `rebuild_index` (no earlier index: every shard is opened once),
- `rebuild_index(fresh=True)`: the whole index written anew from the record of the shards (the
  groups of unchanged videos copied from the index it replaces),
- `rebuild_index` again with nothing changed, and with 1% of the videos' shards rewritten
  (what `rcma index` and every index refresh of a running extract do),
- `rcma status` and `rcma show` (the commands themselves, each in a new process),
- `open_store` + `video_ids`, and `fusion.data.select_videos` (what training does first).

The first index of a store opens every shard once, so it grows linearly with the shards; it is
timed up to --open-all-up-to videos (default 10,000). Above that, the shards' record is seeded
by reading the one template each store is copied from (what the index refreshes of the extract
runs that build a real store leave behind), and everything after it is timed as above.

Each figure is printed against two baselines measured in the same run: its growth per 10x
videos (against the smallest size), and its ratio to the peer at the largest size. With --keep,
stores already built there are reused (their index and record removed first).
Usage: python bench/store_scale.py [--sizes 1000,10000,100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion.data import select_videos  # noqa: E402
from pipeline.store import (  # noqa: E402
    GRID,
    INDEX_RECORD,
    INDEX_STAMP,
    check_stage_configs,
    grid_hash,
    open_store,
    rebuild_index,
    shard_path,
    shard_root,
    video_ids,
    write_shard,
)

STAGES = ("faces", "audio", "text")
FRAMES = 8
TARGET_S = 10.0


def build(store: Path, n: int) -> None:
    """n videos: one real shard per kind, copied under each id (ids come from the file names)."""
    template = store.parent / "template.h5"
    timestamps = np.arange(FRAMES) / 30.0
    digest = grid_hash(timestamps)
    write_shard(
        template,
        GRID,
        "v",
        {"timestamps": timestamps},
        {
            "source": "v.mp4",
            "n_frames": FRAMES,
            "fps": 30.0,
            "duration": FRAMES / 30,
            "grid_hash": digest,
        },
    )
    configs = {}
    for stage in STAGES:
        rows = {"present": np.ones(FRAMES, bool), "embedding": np.zeros((FRAMES, 16), np.float16)}
        config = {"model": f"{stage}-model"}
        config_digest = f"{stage}-config"
        write_shard(
            template,
            stage,
            "v",
            rows,
            {"config": config, "config_hash": config_digest, "grid_hash": digest},
        )
        configs[stage] = (config_digest, config)
    root = shard_root(store)
    for kind in (GRID, *STAGES):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        source = shard_path(template, kind, "v")
        for i in range(n):
            shutil.copyfile(source, folder / f"video{i:06d}.h5")
    check_stage_configs(store, configs, force=False)


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def rcma(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"rcma {' '.join(args)} failed: {result.stderr.strip()}")


def list_videos(store: Path) -> int:
    with open_store(store) as f:
        return len(video_ids(f))


def touch_share(store: Path, n: int, share: float) -> None:
    """Rewrites the faces shard of `share` of the videos (a recompute), as a new file."""
    folder = shard_root(store) / "faces"
    for i in range(0, n, max(1, round(1 / share))):
        path = folder / f"video{i:06d}.h5"
        copy = path.with_name(".copy.tmp")
        shutil.copyfile(path, copy)
        os.replace(copy, path)


def stat_every_shard(store: Path) -> int:
    """The peer of each figure: listing the shard folders and `stat`-ing every shard (what any
    tool must do at least once to know a store of this many files has not changed)."""
    count = 0
    for folder in shard_root(store).iterdir():
        if folder.is_dir():
            for entry in os.scandir(folder):
                entry.stat()
                count += 1
    return count


def seed_record(store: Path) -> None:
    """The first index of a store whose shards are all copies of one: each kind read once."""
    import pipeline.store.scan

    scan_many = pipeline.store.scan._scan_many
    seen: dict[tuple[str, tuple[str, ...]], tuple[str, dict]] = {}

    def once(jobs: list[tuple[Path, tuple[str, ...]]]) -> list[tuple[str, dict]]:
        for path, names in jobs:
            if (path.parent.name, names) not in seen:
                seen[path.parent.name, names] = scan_many([(path, names)])[0]
        return [seen[path.parent.name, names] for path, names in jobs]

    pipeline.store.scan._scan_many = once  # rebuild_index looks it up in the module at each call
    try:
        rebuild_index(store)
    finally:
        pipeline.store.scan._scan_many = scan_many


def measure(folder: Path, n: int, open_all_up_to: int) -> dict[str, float]:
    store = folder / f"n{n}" / "store.h5"
    if store.parent.is_dir():  # --keep of an earlier run: the same shards, the index made again
        for path in (store, shard_root(store) / INDEX_RECORD, shard_root(store) / INDEX_STAMP):
            path.unlink(missing_ok=True)
    else:
        store.parent.mkdir(parents=True)
        build(store, n)
    out = {"peer: stat every shard": timed(lambda: stat_every_shard(store))}
    if n <= open_all_up_to:
        out["index, first (opens all)"] = timed(lambda: rebuild_index(store))
    else:  # every shard is a copy of one: read it once (what extract runs leave in the record)
        out["index, first (opens all)"] = float("nan")
        seed_record(store)
    out["index, written anew"] = timed(lambda: rebuild_index(store, fresh=True))
    out["index, nothing changed"] = timed(lambda: rebuild_index(store))
    touch_share(store, n, 0.01)
    out["index, 1% changed"] = timed(lambda: rebuild_index(store))
    out["rcma status"] = timed(lambda: rcma("status", "--store", str(store)))
    out["rcma show"] = timed(lambda: rcma("show", "--store", str(store)))
    out["open + list videos"] = timed(lambda: list_videos(store))
    out["training: select videos"] = timed(lambda: select_videos(store, None, need_labels=False))
    assert list_videos(store) == n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--keep", type=Path, help="Build the stores here and keep them (reused when there).")
    parser.add_argument(
        "--open-all-up-to",
        type=int,
        default=10000,
        help="Time the first index (every shard opened) up to this size; above it, the shards' "
        "record is seeded from the one template (the first index grows linearly: see the smaller sizes).",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    folder = args.keep or Path(tempfile.mkdtemp(prefix="rcma-store-scale-"))
    print(f"machine: {os.cpu_count()} cores; load average at start: {os.getloadavg()}", flush=True)
    results = {}
    try:
        for n in sizes:
            results[n] = measure(folder, n, args.open_all_up_to)
            print(f"{n} videos: " + ", ".join(f"{k} {v:.2f} s" for k, v in results[n].items()), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload average at end: {os.getloadavg()}")
    last = sizes[-1]
    peer = results[last]["peer: stat every shard"]
    print(
        f"{'operation':<26}"
        + "".join(f"{n:>11,}" for n in sizes)
        + f"   growth per 10x   vs peer at {last:,}   target at {last:,}"
    )
    for name in results[sizes[0]]:
        times = [results[n][name] for n in sizes]
        measured = [(n, t) for n, t in zip(sizes, times, strict=True) if t == t]  # not NaN
        (n0, t0), (n1, t1) = measured[0], measured[-1]
        growth = (t1 / t0) ** (1 / (np.log10(n1 / n0) or 1))
        verdict = "ok" if t1 < TARGET_S else f"over {TARGET_S:g} s"
        ratio = f"x{t1 / peer:.1f}" if n1 == last else "-"
        if n1 != last:
            verdict = f"{t1 / n1 * 1000:.2f} ms a video at {n1:,}; ~{t1 / n1 * last:.0f} s at {last:,}"
        print(
            f"{name:<26}"
            + "".join(f"{t:>10.2f}s" for t in times)
            + f"   x{growth:<4.1f} (vs {n0:,})  {ratio:>10}     {verdict}"
        )


if __name__ == "__main__":
    main()
