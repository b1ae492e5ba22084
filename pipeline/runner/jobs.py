"""Jobs: the media files to extract and their video ids, what a job came to, and what every run
does around its jobs (checks the stages' configs, refreshes the index as jobs finish).

A job is one input file; it runs every requested stage of that file in turn (extractor.py).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import one_line
from pipeline.media import MEDIA_EXTENSIONS, NOT_MEDIA_EXTENSIONS, MediaError, probe
from pipeline.stages import hash_config, shared_config
from pipeline.store import (
    FORCE_REMEDY,
    StoreError,
    check_id,
    check_stage_configs,
    rebuild_index,
    restamp_stage,
)

INDEX_EVERY_S = 2.0
NO_SUCH_PATH = "no such file or folder"
ANOTHER_STORE = "give another --store"  # the way out of a store conflict where there is no --force
Progress = Callable[[str, int, int], None]  # (label, frames done, frames total)


@dataclass(frozen=True)
class Job:
    path: Path
    video_id: str


@dataclass(frozen=True)
class Outcome:
    video_id: str
    source: str
    stage: str
    status: str  # "done" | "skipped" | "failed"
    error: str = ""
    warning: str = ""  # a stage's note on a video it handled, e.g. "no video stream"
    frames: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    not_media: list[tuple[Path, str]] = field(default_factory=list)
    bad_paths: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def missing(self) -> list[Path]:
        """Inputs that do not exist (a typo'd path): extract refuses the run before any job."""
        return [path for path, problem in self.bad_paths if problem == NO_SUCH_PATH]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.bad_paths

    def counts(self) -> Counter:
        return Counter(o.status for o in self.outcomes)


class FatalError(Exception):
    """A problem with the run itself (missing model weights), not with one video: stop everything."""


def discover(inputs: Iterable[Path]) -> tuple[list[Job], Report]:
    """Jobs for the media files among `inputs` (folders searched recursively), with unique ids.

    Files in folders are taken by content: a file that does not open as media is skipped and
    reported, unless its extension says it is media, in which case it fails like any bad video.
    Common non-media extensions (images, text, tables) are skipped without opening them. A file
    named on the command line is always a job.
    """
    report = Report()
    found: list[tuple[Path, Path | None]] = []  # (file, the folder it was found under, if any)
    for given in inputs:
        given = Path(os.path.normpath(given))  # `a/../b.mp4` is `b.mp4`: one spelling, one id
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file() or p.is_symlink()):
                if any(part.startswith(".") for part in path.relative_to(given).parts):
                    continue
                suffix = path.suffix.lower()
                if suffix in NOT_MEDIA_EXTENSIONS:
                    report.not_media.append((path, "not a media file"))
                    continue
                if suffix not in MEDIA_EXTENSIONS:
                    try:
                        probe(path)
                    except MediaError:
                        report.not_media.append((path, "not a media file"))
                        continue
                found.append((path, given))
        elif given.exists() or given.is_symlink():
            found.append((given, None))
        else:
            report.bad_paths.append((given, NO_SUCH_PATH))
    unique: dict[Path, tuple[Path, Path | None]] = {}
    for path, root in found:
        unique.setdefault(path.absolute(), (path, root))  # the same file named twice runs once
    files = dict(unique.values())
    jobs = []
    for path, vid in _assign_ids(files).items():
        try:
            jobs.append(Job(path, check_id(vid)))
        except ValueError as e:  # a name such as `..mp4`: this file fails, the others run
            report.bad_paths.append((path, str(e)))
    return jobs, report


def _assign_ids(files: dict[Path, Path | None]) -> dict[Path, str]:
    """File name without extension; where two names collide, the path below the folder given
    (or, for files named on the command line, as many parent folders as tell them apart)."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    ids: dict[Path, str] = {}
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            ids[paths[0]] = stem
            continue
        for path in paths:
            root = files[path]
            if root is not None:
                ids[path] = path.relative_to(root).with_suffix("").as_posix()
            else:
                ids[path] = _shortest_unique_tail(path, paths)
    counts = Counter(ids.values())
    for path, vid in ids.items():
        if counts[vid] > 1:  # clip.mp4 beside clip.wav
            ids[path] = f"{vid}{path.suffix}"
    return ids


def _shortest_unique_tail(path: Path, others: list[Path]) -> str:
    parts = path.absolute().with_suffix("").parts
    tails = [p.absolute().with_suffix("").parts for p in others if p != path]
    for n in range(2, len(parts) + 1):
        if all(t[-n:] != parts[-n:] for t in tails):
            return "/".join(parts[-n:])
    return "/".join(parts[1:])


def check_fps(fps: float) -> None:
    if not 0 < fps <= 1000:  # also refuses NaN
        raise ValueError(
            f"--fps {fps:g}: the frame rate for audio-only files must be above 0 and at most 1000"
        )


def _one_line(error: BaseException) -> str:
    """A job's error as one line; the type is named for an error no check raised (a library's)."""
    return one_line(error, with_type=not isinstance(error, MediaError | OSError | ValueError))


def check_configs(
    store: Path, configs: dict[str, tuple[str, dict[str, Any]]], force: bool, forceable: bool = True
) -> None:
    """The store's check that each stage keeps one configuration (see `store.check_stage_configs`),
    as a run error. Nothing is claimed here: a stage's first shard claims its config. The store
    records a stage's config without its per-video settings; a stage an earlier rcma recorded with
    them (a store of `--subject left` videos) is first re-stamped to today's hash
    (`store.restamp_stage`), so its videos keep their features."""
    try:
        for name in configs:
            restamp_stage(
                store,
                name,
                lambda config, name=name: (hash_config(name, config), shared_config(name, config)),
            )
        shared = {name: (digest, shared_config(name, config)) for name, (digest, config) in configs.items()}
        check_stage_configs(store, shared, force, FORCE_REMEDY if forceable else ANOTHER_STORE)
    except StoreError as e:
        raise FatalError(str(e)) from None
    except OSError as e:  # a shard that cannot be re-stamped (a full disk)
        raise FatalError(f"{store}: {_one_line(e)}") from None


class IndexRefresher:
    """Rebuilds the index as jobs finish: at most every INDEX_EVERY_S, and in no more than a tenth
    of the time, since a rebuild grows with the number of videos."""

    def __init__(self, store: Path):
        self.store = store
        self.next_at = 0.0

    def refresh(self, now: bool = False) -> None:
        if now or time.monotonic() >= self.next_at:
            started = time.monotonic()
            rebuild_index(self.store)
            self.next_at = time.monotonic() + max(INDEX_EVERY_S, 10 * (time.monotonic() - started))


def shard_of(jobs: list[Job], shard: str) -> list[Job]:
    """The jobs of `--shard i/N` (i from 1 to N): every N-th job by video id, starting at the i-th,
    so N array jobs given the same files split them without overlap and without Dask."""
    try:
        i, n = (int(part) for part in shard.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ValueError(f"--shard {shard}: give i/N with 1 <= i <= N (e.g. 3/10 for the 3rd of 10 jobs)")
    ordered = sorted(jobs, key=lambda job: job.video_id)
    return ordered[i - 1 :: n]
