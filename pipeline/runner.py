"""Plans extraction jobs, skips what is done, runs stages here or on a Dask cluster, writes shards.

A job is one input file; it runs every requested stage of that file in turn, so the frame grid
(and decoded audio) is shared by its stages. A (video, stage) is done when its shard exists,
opens, and carries the current config hash and frame-grid hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store as st
from pipeline.media import DEFAULT_FPS, MEDIA_EXTENSIONS, Media, MediaError, MediaInfo, frame_grid, probe
from pipeline.models import ModelUnavailable
from pipeline.stages import Extra, Rows, Stage, build_stage, config_hash, library_versions

INDEX_EVERY_S = 2.0
RUNNER_LIBRARIES = library_versions("rcma", "torch", "numpy", "av", "h5py")
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
    A file named on the command line is always a job.
    """
    report = Report()
    found: list[tuple[Path, Path]] = []  # (file, the folder it was found under)
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            for path in sorted(p for p in given.rglob("*") if p.is_file() or p.is_symlink()):
                if any(part.startswith(".") for part in path.relative_to(given).parts):
                    continue
                if path.suffix.lower() not in MEDIA_EXTENSIONS:
                    try:
                        probe(path)
                    except MediaError:
                        report.not_media.append((path, "not a media file"))
                        continue
                found.append((path, given))
        elif given.exists() or given.is_symlink():
            found.append((given, given.parent if given.is_absolute() else Path(".")))
        else:
            report.bad_paths.append((given, "no such file or folder"))
    unique: dict[Path, tuple[Path, Path]] = {}
    for path, root in found:
        unique.setdefault(path.absolute(), (path, root))  # the same file named twice runs once
    files = dict(unique.values())
    return [Job(path, vid) for path, vid in _assign_ids(files).items()], report


def _assign_ids(files: dict[Path, Path]) -> dict[Path, str]:
    """File name without extension; the path below its folder where two names collide."""
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)
    ids: dict[Path, str] = {}
    for stem, paths in by_stem.items():
        if len(paths) == 1:
            ids[paths[0]] = stem
            continue
        for path in paths:
            relative = Path(os.path.relpath(path, files[path]))
            ids[path] = relative.with_suffix("").as_posix()
    counts = Counter(ids.values())
    for path, vid in ids.items():
        if counts[vid] > 1:  # clip.mp4 beside clip.wav
            ids[path] = f"{vid}{path.suffix}"
    return ids


class Extractor:
    """Runs the given stages over jobs in this process, loading each stage's models once."""

    def __init__(self, store: Path, stages: list[Stage], fps: float = DEFAULT_FPS, force: bool = False):
        self.store = store
        self.stages = stages
        self.fps = fps
        self.force = force
        self._loaded: set[str] = set()

    def run_job(self, job: Job, progress: Progress | None = None) -> list[Outcome]:
        source = str(job.path)
        try:
            media = self._media(job)
        except (MediaError, OSError) as e:
            return [self._fail(job, stage.name, _one_line(e)) for stage in self.stages]
        outcomes = []
        for stage in self.stages:
            chash = config_hash(stage)
            ghash = _grid_hash(media.timestamps)
            shard = st.shard_path(self.store, stage.name, job.video_id)
            attrs = st.read_shard_attrs(shard) if not self.force else None
            if attrs and attrs.get("config_hash") == chash and attrs.get("grid_hash") == ghash:
                outcomes.append(Outcome(job.video_id, source, stage.name, "skipped"))
                continue
            started = time.perf_counter()
            try:
                self._load(stage)
                warning = self._write(stage, media, chash, ghash, progress)
            except FatalError:
                raise
            except Exception as e:  # one bad video must never stop the others
                outcomes.append(self._fail(job, stage.name, _one_line(e)))
                continue
            st.clear_failure(self.store, stage.name, job.video_id)
            seconds = time.perf_counter() - started
            outcomes.append(
                Outcome(job.video_id, source, stage.name, "done", "", warning, media.n_frames, seconds)
            )
        return outcomes

    def _fail(self, job: Job, stage: str, error: str) -> Outcome:
        st.record_failure(self.store, stage, job.video_id, str(job.path), error)
        return Outcome(job.video_id, str(job.path), stage, "failed", error=error)

    def _load(self, stage: Stage) -> None:
        if stage.name in self._loaded:
            return
        try:
            stage.load()
        except ModelUnavailable as e:
            raise FatalError(str(e)) from None
        self._loaded.add(stage.name)

    def _media(self, job: Job) -> Media:
        """The job's frame grid, from its grid shard when the file is unchanged, else decoded anew."""
        try:
            stat = job.path.stat()
        except FileNotFoundError:
            raise MediaError(
                "no such file (a dangling link?)" if job.path.is_symlink() else "no such file"
            ) from None
        except PermissionError:
            raise MediaError("permission denied") from None
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fps_for_audio": self.fps}
        grid = st.shard_path(self.store, st.GRID, job.video_id)
        attrs = st.read_shard_attrs(grid)
        if attrs and attrs.get("identity") == json.dumps(identity, sort_keys=True):
            timestamps = st.read_rows(grid, "timestamps")
            info = MediaInfo(**{k: attrs[k] for k in MediaInfo.__dataclass_fields__})
            return Media(job.path, job.video_id, info, timestamps)
        info = probe(job.path)
        timestamps = frame_grid(job.path, info, self.fps)
        fields = {k: getattr(info, k) for k in MediaInfo.__dataclass_fields__}
        rows = {"timestamps": timestamps}
        st.write_shard(
            self.store,
            st.GRID,
            job.video_id,
            rows,
            {"source": str(job.path.absolute()), "n_frames": len(timestamps), "identity": identity, **fields},
        )
        return Media(job.path, job.video_id, info, timestamps)

    def _write(self, stage: Stage, media: Media, chash: str, ghash: str, progress: Progress | None) -> str:
        """Runs the stage into its shard; returns the stage's warning, if it gave one."""
        provenance = dict(stage.provenance())
        versions = {**RUNNER_LIBRARIES, **provenance.pop("versions", {})}
        attrs: dict[str, Any] = {
            "stage": stage.name,
            "video_id": media.video_id,
            "source": str(media.path.absolute()),
            "config": stage.config(),
            "config_hash": chash,
            "grid_hash": ghash,
            **provenance,
            "versions": versions,
        }
        started = time.perf_counter()
        path = st.shard_path(self.store, stage.name, media.video_id)
        label = f"{stage.name} {media.video_id}"
        warning = ""
        with st.ShardWriter(path, media.n_frames, attrs) as writer:
            next_row = 0
            if progress:
                progress(label, 0, media.n_frames)
            for item in stage.run(media):
                if isinstance(item, Rows):
                    if item.start != next_row:
                        raise RuntimeError(
                            f"stage {stage.name} yielded rows from {item.start}, expected {next_row}"
                        )
                    writer.write_rows(item.start, item.arrays)
                    next_row += len(item)
                    if progress:
                        progress(label, next_row, media.n_frames)
                elif isinstance(item, Extra):
                    writer.write_extra(item.arrays, item.attrs)
                    warning = item.attrs.get("warning", warning)
            st.set_attrs(writer.file, {"seconds": time.perf_counter() - started})
        return warning


def _grid_hash(timestamps: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(timestamps, dtype=np.float64).tobytes()).hexdigest()[:16]


def _one_line(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if not isinstance(error, MediaError | OSError | ValueError):
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())


def run_local(
    jobs: list[Job],
    extractor: Extractor,
    progress: Progress | None = None,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    last_index = 0.0
    try:
        for job in jobs:
            result = extractor.run_job(job, progress)
            outcomes += result
            if on_job_done:
                on_job_done(job, result)
            if time.monotonic() - last_index > INDEX_EVERY_S:
                st.rebuild_index(extractor.store)
                last_index = time.monotonic()
    finally:
        st.rebuild_index(extractor.store)
    return outcomes


_worker_extractors: dict[str, Extractor] = {}


def _extract_on_worker(
    job: Job, store: str, stage_specs: list[tuple[str, dict]], fps: float, force: bool
) -> list[Outcome]:
    """The Dask task: models are loaded once per worker process and reused across jobs."""
    key = json.dumps([store, stage_specs, fps, force], sort_keys=True, default=str)
    if key not in _worker_extractors:
        stages = [build_stage(name, options) for name, options in stage_specs]
        _worker_extractors[key] = Extractor(Path(store), stages, fps, force)
    return _worker_extractors[key].run_job(job)


def run_dask(
    jobs: list[Job],
    scheduler: str,
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Runs jobs on an existing cluster (`tcp://host:port` or a scheduler file).

    Workers write their own shards (the store's folder must be on a filesystem they share);
    this process only rebuilds the index. A task lost with its worker is retried by Dask, and a
    retried job rewrites only its own shards.
    """
    from distributed import Client, as_completed

    if os.path.isfile(scheduler):
        client = Client(scheduler_file=scheduler, timeout="20s")
    else:
        client = Client(scheduler, timeout="20s")
    outcomes: list[Outcome] = []
    last_index = 0.0
    try:
        futures = {
            client.submit(
                _extract_on_worker, job, str(store.resolve()), stage_specs, fps, force, pure=False, retries=2
            ): job
            for job in jobs
        }
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except FatalError:
                for other in futures:
                    other.cancel()
                raise
            except Exception as e:
                result = [
                    Outcome(job.video_id, str(job.path), name, "failed", error=_one_line(e))
                    for name, _ in stage_specs
                ]
                for outcome in result:
                    st.record_failure(store, outcome.stage, job.video_id, str(job.path), outcome.error)
            outcomes += result
            if on_job_done:
                on_job_done(job, result)
            if time.monotonic() - last_index > INDEX_EVERY_S:
                st.rebuild_index(store)
                last_index = time.monotonic()
    finally:
        client.close()
        st.rebuild_index(store)
    return outcomes
