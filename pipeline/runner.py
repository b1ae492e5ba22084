"""Plans extraction jobs, skips what is done, runs stages here or on a Dask cluster, writes shards.

A job is one input file; it runs every requested stage of that file in turn, so the frame grid
(and decoded audio) is shared by its stages. A (video, stage) is done when its shard exists,
opens, passes its checksums (every array is read), and carries the current config hash and
frame-grid hash.

Where jobs run (`extract`): in this process (`workers=1`), on a Dask `LocalCluster` of worker
processes started here, or on an existing Dask cluster (`scheduler`); the last two are one code
path (`_run_on_client`). A worker process loads each stage's models once. Whatever the number of
threads a worker has, one stage computes at a time in a process (`MODEL_LOCK`), so no model is
used by two threads at once, none is loaded twice at once, and no thread changes torch's thread
count under another: a worker with several threads gives the same arrays as one thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ModelUnavailable, one_line
from pipeline.media import (
    DEFAULT_FPS,
    MEDIA_EXTENSIONS,
    NOT_MEDIA_EXTENSIONS,
    GridMismatch,
    Media,
    MediaError,
    MediaInfo,
    frame_grid,
    probe,
    read_audio,
    shared_grid,
)
from pipeline.stages import (
    Extra,
    Rows,
    Stage,
    build_stage,
    config_hash,
    hash_config,
    library_versions,
    shared_config,
    video_settings,
)
from pipeline.store import (
    FORCE_REMEDY,
    GRID,
    ShardWriter,
    StoreError,
    atomic_file,
    check_id,
    claim_stage_configs,
    clean_store_temps,
    clear_failure,
    config_difference,
    cpu_count,
    grid_hash,
    read_rows,
    read_shard_attrs,
    rebuild_index,
    record_failure,
    restamp_stage,
    set_attrs,
    shard_path,
    shard_problem,
    shard_root,
    write_shard,
)

INDEX_EVERY_S = 2.0
# Held while a stage loads its models or computes, so that in one process (a Dask worker with
# several threads) no model is used by two threads at once or loaded twice at once. Reentrant:
# a stage may call another's model (the audio stage's Whisper encoder) under it.
MODEL_LOCK = threading.RLock()
GPU_RESOURCE = "GPU"
WORKERS_PER_GPU = 2  # one decodes while the other computes on the GPU
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"  # set by Dask for its workers; see worker_environ
RUNNER_LIBRARIES = library_versions("rcma", "torch", "numpy", "av", "h5py")
Progress = Callable[[str, int, int], None]  # (label, frames done, frames total)
ANOTHER_STORE = "give another --store"  # the way out of a store conflict where there is no --force


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
            report.bad_paths.append((given, "no such file or folder"))
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


class Extractor:
    """Runs the given stages over jobs in this process, loading each stage's models once."""

    def __init__(
        self,
        store: Path,
        stages: list[Stage],
        fps: float = DEFAULT_FPS,
        force: bool = False,
        forceable: bool = True,
    ):
        """`forceable`: whether the command has --force (`rcma predict` has not), so that its
        one-line errors suggest only what the user can do."""
        check_fps(fps)
        self.store = store
        self.stages = stages
        self.fps = fps
        self.force = force
        self.forceable = forceable
        self._loaded: set[str] = set()
        self._unloadable: dict[str, str] = {}
        self._configs: dict[str, tuple[str, dict[str, Any]]] | None = None

    def run_job(self, job: Job, progress: Progress | None = None) -> list[Outcome]:
        configs = self.prepare()
        try:
            media, identity = self._media(job, share=True)
        except (MediaError, OSError) as e:
            return [self._fail(job, stage.name, _one_line(e)) for stage in self.stages]
        outcomes: dict[str, Outcome] = {}
        if media.grid_pending:  # one decoding pass gives the grid and the first video stage's frames
            stage = self._video_stage()
            try:
                outcomes[stage.name] = self._run_stage(job, stage, media, configs[stage.name], progress)
            except GridMismatch:  # the header undercounts: the grid gets its own pass, as unshared
                pass
            except MediaError as e:  # a damaged video fails whole, as its grid pass would have
                return [self._fail(job, stage.name, _one_line(e)) for stage in self.stages]
            if media.grid_pending:  # the stage stopped before the end: the grid gets its own pass
                try:
                    media, _ = self._media(job, share=False)
                except (MediaError, OSError) as e:
                    return [self._fail(job, stage.name, _one_line(e)) for stage in self.stages]
            else:
                self._write_grid(job, media, identity)
        for stage in self.stages:
            if stage.name not in outcomes:
                outcomes[stage.name] = self._run_stage(job, stage, media, configs[stage.name], progress)
        return [outcomes[stage.name] for stage in self.stages]

    def _run_stage(
        self,
        job: Job,
        stage: Stage,
        media: Media,
        resolved: tuple[str, dict[str, Any]],
        progress: Progress | None,
    ) -> Outcome:
        source = str(job.path)
        config_digest, config = resolved
        shard = shard_path(self.store, stage.name, job.video_id)
        if not media.grid_pending:
            grid_digest = grid_hash(media.timestamps)
            attrs = read_shard_attrs(shard) if not self.force else None
            current = (
                made_with(attrs, stage.name, config_digest, config) and attrs.get("grid_hash") == grid_digest
            )
            if current and not shard_problem(shard, full=True):  # a damaged shard is recomputed
                return Outcome(job.video_id, source, stage.name, "skipped")
        started = time.perf_counter()
        try:
            with MODEL_LOCK:
                self._load(stage)
                warning = self._write(stage, media, config, config_digest, progress)
        except FatalError:
            raise
        except MediaError as e:
            if media.grid_pending:  # the grid's own failure: the caller fails the whole file
                raise
            return self._fail(job, stage.name, _one_line(e))
        except Exception as e:  # one bad video must never stop the others
            # The shard already there is kept: a good one of this config and grid stays
            # linked (a failed --force recompute loses nothing); one of another config or
            # grid is never linked by the index.
            return self._fail(job, stage.name, _one_line(e))
        clear_failure(self.store, stage.name, job.video_id)
        seconds = time.perf_counter() - started
        return Outcome(job.video_id, source, stage.name, "done", "", warning, media.n_frames, seconds)

    def prepare(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Resolves every stage (models, device, weights' checksums) once, before the first job, so
        a bad option or a missing model is one run error, not one failure per video. Returns each
        stage's (config hash, config)."""
        if self._configs is None:
            configs = {}
            for stage in self.stages:
                try:
                    with MODEL_LOCK:
                        if not stage.resolved:  # predict resolves the stages it rebuilds
                            stage.resolve()
                except (ModelUnavailable, ValueError, OSError) as e:
                    raise FatalError(f"{stage.name}: {_one_line(e)}") from None
                configs[stage.name] = (config_hash(stage), stage.config())
            self._configs = configs
        return self._configs

    def _fail(self, job: Job, stage: str, error: str) -> Outcome:
        record_failure(self.store, stage, job.video_id, str(job.path), error)
        return Outcome(job.video_id, str(job.path), stage, "failed", error=error)

    def _load(self, stage: Stage) -> None:
        if stage.name in self._loaded:
            return
        if stage.name in self._unloadable:  # tried once: every later job fails the same way
            raise FatalError(self._unloadable[stage.name])
        try:
            stage.load()
        except (ModelUnavailable, ValueError) as e:  # an option out of range for the model loaded
            self._unloadable[stage.name] = f"{stage.name}: {_one_line(e)}"
            raise FatalError(self._unloadable[stage.name]) from None
        self._loaded.add(stage.name)

    def _media(self, job: Job, share: bool) -> tuple[Media, dict[str, Any]]:
        """The job's frame grid, from its grid shard when the file is unchanged, else decoded
        anew; and the file's identity (size, mtime) the grid shard records.

        With `share`, a grid that must be decoded is left to the decoding pass of the first stage
        that reads the frames (Media.grid_pending), when that stage has work to do here: one
        decode per file instead of two. The caller then writes the grid shard (_write_grid).
        """
        try:
            stat = job.path.stat()
        except FileNotFoundError:
            raise MediaError(
                "no such file (a dangling link?)" if job.path.is_symlink() else "no such file"
            ) from None
        except PermissionError:
            raise MediaError("permission denied") from None
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fps_for_audio": self.fps}
        grid = shard_path(self.store, GRID, job.video_id)
        attrs = read_shard_attrs(grid)
        source = str(job.path.absolute())
        same = attrs and attrs.get("identity") == json.dumps(identity, sort_keys=True)
        if same and not shard_problem(grid, full=True):
            timestamps = read_rows(grid, "timestamps")
            info = MediaInfo(**{k: attrs[k] for k in MediaInfo.__dataclass_fields__})
            return Media(job.path, job.video_id, info, timestamps), identity
        if attrs and attrs.get("source") != source and not self.force:
            way_out = (
                "extract both files in one run (their ids then include their folders), rename one, or use "
                "--force"
                if self.forceable
                else f"rename one, or {ANOTHER_STORE}"
            )
            raise MediaError(
                f"video id {job.video_id!r} already holds {attrs.get('source')} in this store; {way_out}"
            )
        info = probe(job.path)
        if not info.has_video:
            info = replace(info, fps=self.fps)
        if share and info.has_video and self._video_stage_to_run(job):
            media = shared_grid(job.path, job.video_id, info)
            if media is not None:
                return media, identity
        audio = read_audio(job.path) if not info.has_video else None  # the grid's and the stages'
        timestamps = frame_grid(job.path, info, self.fps, audio)
        media = Media(job.path, job.video_id, info, timestamps, {} if audio is None else {"audio": audio})
        self._write_grid(job, media, identity)
        return media, identity

    def _video_stage_to_run(self, job: Job) -> bool:
        """Whether the first stage that decodes frames has no shard of its current config here:
        it will run, whatever the grid (one that has such a shard needs the grid to tell)."""
        stage = self._video_stage()
        if stage is None:
            return False
        if self.force:
            return True
        attrs = read_shard_attrs(shard_path(self.store, stage.name, job.video_id))
        return not made_with(attrs, stage.name, *self.prepare()[stage.name])

    def _video_stage(self) -> Stage | None:
        """The first stage that decodes the frames: the one whose pass can also give the grid."""
        return next((s for s in self.stages if getattr(s, "decodes_video", False)), None)

    def _write_grid(self, job: Job, media: Media, identity: dict[str, Any]) -> None:
        fields = {k: getattr(media.info, k) for k in MediaInfo.__dataclass_fields__}
        write_shard(
            self.store,
            GRID,
            job.video_id,
            {"timestamps": media.timestamps},
            {
                "source": str(job.path.absolute()),
                "n_frames": media.n_frames,
                "identity": identity,
                "grid_hash": grid_hash(media.timestamps),
                **fields,
            },
        )

    def _write(
        self,
        stage: Stage,
        media: Media,
        config: dict[str, Any],
        config_digest: str,
        progress: Progress | None,
    ) -> str:
        """Runs the stage into its shard; returns the stage's warning, if it gave one.

        The grid hash is recorded at the end: a pending grid is complete only then."""
        provenance = dict(stage.provenance())
        versions = {**RUNNER_LIBRARIES, **provenance.pop("versions", {})}
        attrs: dict[str, Any] = {
            "stage": stage.name,
            "video_id": media.video_id,
            "source": str(media.path.absolute()),
            "config": config,
            "config_hash": config_digest,
            **provenance,
            "versions": versions,
        }
        started = time.perf_counter()
        path = shard_path(self.store, stage.name, media.video_id)
        label = f"{stage.name} {media.video_id}"
        warning = ""
        with ShardWriter(path, media.n_frames, attrs, shard_root(self.store)) as writer:
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
            if media.grid_pending:
                raise RuntimeError(f"stage {stage.name} did not decode the whole video")
            set_attrs(
                writer.file,
                {"grid_hash": grid_hash(media.timestamps), "seconds": time.perf_counter() - started},
            )
        return warning


def made_with(attrs: dict[str, Any] | None, stage: str, config_digest: str, config: dict[str, Any]) -> bool:
    """Whether a shard's attrs say it was made with `config`: the store's settings (the config hash)
    and this video's own (the subject of a two-person video), which that hash leaves out."""
    if not attrs or attrs.get("config_hash") != config_digest:
        return False
    try:
        made = json.loads(attrs.get("config") or "{}")
    except ValueError:
        return False
    return isinstance(made, dict) and video_settings(stage, made) == video_settings(stage, config)


def check_fps(fps: float) -> None:
    if not 0 < fps <= 1000:  # also refuses NaN
        raise ValueError(
            f"--fps {fps:g}: the frame rate for audio-only files must be above 0 and at most 1000"
        )


def _one_line(error: BaseException) -> str:
    """A job's error as one line; the type is named for an error no check raised (a library's)."""
    return one_line(error, with_type=not isinstance(error, MediaError | OSError | ValueError))


def extract(
    jobs: list[Job],
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float = DEFAULT_FPS,
    force: bool = False,
    workers: int | str = "auto",
    scheduler: str | None = None,
    progress: Progress | None = None,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Runs `jobs`: on the Dask cluster at `scheduler`, else here with `workers` processes
    ("auto": see `auto_workers`); one worker runs in this process, as rcma always did. `on_note`
    is given a line about the run that is worth a user's attention (a slow worker setting)."""
    if scheduler:
        outcomes = run_dask(jobs, scheduler, store, stage_specs, fps, force, on_job_done, progress, on_note)
    else:
        count = resolve_workers(workers, len(jobs), stage_specs)
        if count == 1:
            stages = [build_stage(name, options) for name, options in stage_specs]
            outcomes = run_local(jobs, Extractor(store, stages, fps, force), progress, on_job_done)
        else:
            outcomes = run_local_cluster(jobs, count, store, stage_specs, fps, force, on_job_done, progress)
    if shard_root(store).is_dir():  # temp files of writers killed in this run or before, never a live one
        clean_store_temps(store)
    return outcomes


def progress_bars(console: Any, quiet: bool) -> Any:
    """The rich bars an extraction shows: one for files, one for the frames of the current stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    columns = (
        TextColumn("{task.description:<32.32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    return Bars(*columns, console=console, disable=quiet)


def gpu_count(stage_specs: list[tuple[str, dict]]) -> int:
    """CUDA devices the stages will use: none when every stage is told --device cpu."""
    if all(options.get("device", "auto") == "cpu" for _, options in stage_specs):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def auto_workers(n_jobs: int, cores: int, gpus: int) -> int:
    """One worker per core; with GPUs, WORKERS_PER_GPU per GPU (at most one per core), so that
    each GPU has one worker decoding while another computes. Never more workers than jobs."""
    wanted = min(cores, WORKERS_PER_GPU * gpus) if gpus else cores
    return max(1, min(wanted, n_jobs))


def resolve_workers(workers: int | str, n_jobs: int, stage_specs: list[tuple[str, dict]]) -> int:
    if workers == "auto":
        return auto_workers(n_jobs, cpu_count(), gpu_count(stage_specs))
    try:
        count = int(workers)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"--workers {workers}: give a number of worker processes (1 or more) or auto")
    return min(count, max(1, n_jobs))


def run_local(
    jobs: list[Job],
    extractor: Extractor,
    progress: Progress | None = None,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    claim_configs(extractor.store, extractor.prepare(), extractor.force, extractor.forceable)
    index = IndexRefresher(extractor.store)
    try:
        for job in jobs:
            result = extractor.run_job(job, progress)
            outcomes += result
            if on_job_done:
                on_job_done(job, result)
            index.refresh()
    finally:
        index.refresh(now=True)
    return outcomes


def claim_configs(
    store: Path, configs: dict[str, tuple[str, dict[str, Any]]], force: bool, forceable: bool = True
) -> None:
    """The store's check that each stage keeps one configuration (see `store.claim_stage_configs`),
    as a run error. The store records a stage's config without its per-video settings; a stage an
    earlier rcma recorded with them (a store of `--subject left` videos) is first re-stamped to
    today's hash (`store.restamp_stage`), so its videos keep their features."""
    try:
        for name in configs:
            restamp_stage(
                store,
                name,
                lambda config, name=name: (hash_config(name, config), shared_config(name, config)),
            )
        shared = {name: (digest, shared_config(name, config)) for name, (digest, config) in configs.items()}
        claim_stage_configs(store, shared, force, FORCE_REMEDY if forceable else ANOTHER_STORE)
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


_worker_extractors: dict[str, Extractor] = {}
_worker_extractors_lock = threading.Lock()
CONNECT_TIMEOUT_S = 20.0
PROGRESS_TOPIC = "rcma-frames"
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class RunErrorOnWorker:
    """Returned, not raised, by a Dask task for a run error, so that Dask does not retry it."""

    error: str


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker process runs jobs: its share of CPU threads (None: leave torch's default, as on
    a cluster whose workers were started with their own settings) and its GPU (None: the default)."""

    threads: int | None = None
    gpus: int = 0


def _worker_extractor(
    store: str, stage_specs: list[tuple[str, dict]], fps: float, force: bool, setup: WorkerSetup
) -> Extractor:
    """Models are loaded once per worker process and reused across jobs (and across its threads)."""
    key = json.dumps([store, stage_specs, fps, force], sort_keys=True, default=str)
    with _worker_extractors_lock:
        if key not in _worker_extractors:
            _set_up_worker(setup)
            stages = [build_stage(name, options) for name, options in stage_specs]
            _worker_extractors[key] = Extractor(Path(store), stages, fps, force)
        return _worker_extractors[key]


def _set_up_worker(setup: WorkerSetup) -> None:
    """Gives this worker process its share of CPU threads and, with several GPUs, its GPU (workers
    of a LocalCluster are named 0, 1, ...: worker i uses GPU i mod the number of GPUs)."""
    import torch

    if setup.threads:
        torch.set_num_threads(setup.threads)
    if setup.gpus > 1:
        from distributed import get_worker

        try:
            index = int(get_worker().name)
        except (ValueError, TypeError):
            index = 0
        torch.cuda.set_device(index % setup.gpus)  # "cuda" then means this GPU, for every model


def _prepare_on_worker(
    store: str, stage_specs: list[tuple[str, dict]], fps: float, force: bool, setup: WorkerSetup
) -> dict[str, tuple[str, dict[str, Any]]] | RunErrorOnWorker:
    """Resolves the stages' models once, where they will run, before any job is sent; returns
    each stage's (config hash, config) for the store's one-config check."""
    try:
        return _worker_extractor(store, stage_specs, fps, force, setup).prepare()
    except (FatalError, ModelUnavailable, ValueError) as e:
        return RunErrorOnWorker(_one_line(e))


def _check_writable_on_worker(store: str) -> str:
    """ "" when this worker can write into the store's shard folder, else one line saying why."""
    import socket

    root = shard_root(Path(store))
    where = f"worker on {socket.gethostname()} (pid {os.getpid()})"
    shared = "the store folder must be on a filesystem every worker shares"
    if not root.is_dir():
        return f"{where}: cannot see the store's folder {root}; {shared}"
    check = root / f".write-check-{uuid.uuid4().hex}"
    try:
        with atomic_file(check, root) as tmp:
            tmp.write_bytes(b"")
        check.unlink()
    except OSError as e:
        return f"{where}: cannot write into {root} ({_one_line(e)}); {shared}"
    return ""


def _extract_on_worker(
    job: Job, store: str, stage_specs: list[tuple[str, dict]], fps: float, force: bool, setup: WorkerSetup
) -> list[Outcome] | RunErrorOnWorker:
    """The Dask task for one job; frame progress goes to the client as events."""
    try:
        extractor = _worker_extractor(store, stage_specs, fps, force, setup)
        return extractor.run_job(job, _progress_events())
    except FatalError as e:
        return RunErrorOnWorker(str(e))


def _progress_events() -> Progress:
    """Sends (label, done, total) to the client's progress bar, at most every PROGRESS_EVERY_S."""
    from distributed import get_worker

    worker = get_worker()
    last = [0.0]

    def send(label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, total) or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            worker.log_event(PROGRESS_TOPIC, (label, done, total))

    return send


def security():
    """Dask's own TLS settings (`distributed.comm.tls.*` in its config or environment), for a
    `tls://` scheduler."""
    from distributed.security import Security

    return Security()


def connect(scheduler: str, timeout: float = CONNECT_TIMEOUT_S):
    """A Dask client for `tcp://host:port`, `tls://host:port` or a scheduler file, or one line
    naming the address.

    Dask's own connect waits for the scheduler's handshake without a time limit, so an address
    that accepts connections but never speaks Dask (a silent listener, a web server) is first
    tried here under `timeout`.
    """
    import asyncio

    from distributed import Client
    from distributed.comm import connect as dask_connect

    address = scheduler
    if os.path.isfile(scheduler):
        try:
            address = json.loads(Path(scheduler).read_text())["address"]
        except (OSError, ValueError, KeyError, TypeError):
            raise FatalError(f"{scheduler}: not a Dask scheduler file (no address in it)") from None
    tls = security()

    async def handshake() -> None:
        args = tls.get_connection_args("client")
        comm = await asyncio.wait_for(dask_connect(address, timeout=timeout, **args), timeout)
        await comm.close()

    not_dask = "(is that address a Dask scheduler?)"
    try:
        asyncio.run(handshake())
        return Client(address, timeout=timeout, security=tls)
    except TimeoutError:
        raise FatalError(
            f"the Dask scheduler at {address} did not answer within {timeout:g} s {not_dask}"
        ) from None
    except MemoryError:  # a web server's reply, read as the length of a Dask message
        raise FatalError(f"{address} answers, but not as a Dask scheduler {not_dask}") from None
    except Exception as e:  # whatever a foreign server makes Dask's decoder raise
        raise FatalError(f"cannot reach the Dask scheduler at {address}: {_one_line(e)} {not_dask}") from None


def run_dask(
    jobs: list[Job],
    scheduler: str,
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
    progress: Progress | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Runs jobs on an existing cluster (`tcp://host:port`, `tls://...` or a scheduler file).

    Workers write their own shards (the store's folder must be on a filesystem they share);
    this process only rebuilds the index. A task lost with its worker is retried by Dask, and a
    retried job rewrites only its own shards. A lost scheduler is a run error: the videos it
    did not finish are not recorded as failed, and the next run does them.
    """
    check_fps(fps)
    client = connect(scheduler)
    try:
        note = _lost_cluster_is_a_run_error(scheduler, lambda: malloc_trim_note(client))
        if note and on_note:
            on_note(note)
        return _run_on_client(
            client, scheduler, jobs, store, stage_specs, fps, force, WorkerSetup(), on_job_done, progress
        )
    finally:
        _quietly(client.close)


def malloc_trim_note(client) -> str:
    """A line when workers run with MALLOC_TRIM_THRESHOLD_ set (Dask's default for the workers a
    nanny starts): see `worker_environ`."""
    settings = client.run(_environment_variable, MALLOC_TRIM)
    slowed = sorted(address for address, value in settings.items() if value is not None)
    if not slowed:
        return ""
    value = settings[slowed[0]]
    return (
        f"{len(slowed)} of {len(settings)} Dask workers run with {MALLOC_TRIM}={value} (Dask's "
        "default), which costs rcma about 40% more CPU per job; docs/cluster.md shows the Dask "
        "config that turns it off"
    )


def _environment_variable(name: str) -> str | None:
    return os.environ.get(name)  # run on a worker: its own environment


def worker_environ(threads: int) -> dict[str, str]:
    """The environment a LocalCluster worker process starts with: its share of the CPU threads for
    OpenMP and BLAS, and glibc's own malloc settings. Dask's default sets MALLOC_TRIM_THRESHOLD_,
    which also turns off glibc's adaptive mmap threshold, so every decoded frame and tensor is
    mapped and unmapped afresh: about 40% more CPU per job here (docs/scaling.md)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def run_local_cluster(
    jobs: list[Job],
    workers: int,
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Runs jobs on a Dask LocalCluster of `workers` processes with one thread each; every worker
    gets its share of the CPU threads for torch, and with GPUs, a GPU (declared as a resource)."""
    from distributed import Client

    check_fps(fps)
    setup = WorkerSetup(threads=max(1, cpu_count() // workers), gpus=gpu_count(stage_specs))
    cluster = local_cluster(workers, setup)
    try:
        with Client(cluster) as client:
            return _run_on_client(
                client, "this machine", jobs, store, stage_specs, fps, force, setup, on_job_done, progress
            )
    finally:
        _quietly(cluster.close)


def local_cluster(workers: int, setup: WorkerSetup):
    """A Dask LocalCluster of `workers` processes with one thread each, started with
    `worker_environ`, declaring a GPU each when `setup` has GPUs."""
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(setup.threads or 1)}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=0,  # models are large and shared by all jobs: no spilling or pausing
            silence_logs=logging.ERROR,
            resources={GPU_RESOURCE: 1} if setup.gpus else None,
        )


def _run_on_client(
    client,
    scheduler: str,
    jobs: list[Job],
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    setup: WorkerSetup,
    on_job_done: Callable[[Job, list[Outcome]], None] | None,
    progress: Progress | None,
) -> list[Outcome]:
    from distributed import as_completed

    # Workers may run in other folders: give them absolute paths, for media and for model files.
    specs = [(name, {k: _absolute_if_path(v) for k, v in options.items()}) for name, options in stage_specs]
    where = str(store.resolve())
    shard_root(store).mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    index = IndexRefresher(store)
    resources = _gpu_resources(client, specs)
    if progress:
        client.subscribe_topic(PROGRESS_TOPIC, lambda event: progress(*event[1]))
    try:
        check = lambda: client.run(_check_writable_on_worker, where)  # noqa: E731 (every worker)
        problems = _lost_cluster_is_a_run_error(scheduler, check)
        problem = next((p for p in problems.values() if p), "")
        if problem:
            raise FatalError(problem)
        prepared = _lost_cluster_is_a_run_error(
            scheduler, lambda: _prepare_every_worker(client, where, specs, fps, force, setup, resources)
        )
        claim_configs(store, prepared, force)
        futures = {
            client.submit(
                _extract_on_worker,
                Job(job.path.absolute(), job.video_id),
                where,
                specs,
                fps,
                force,
                setup,
                pure=False,
                retries=2,
                resources=resources,
                priority=_size(job.path),  # the largest files first, so none is left to run alone at the end
            ): job
            for job in jobs
        }
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = _lost_cluster_is_a_run_error(scheduler, future.result)
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
                    record_failure(store, outcome.stage, job.video_id, str(job.path), outcome.error)
            if isinstance(result, RunErrorOnWorker):
                for other in futures:
                    other.cancel()
                raise FatalError(result.error)
            outcomes += result
            if on_job_done:
                on_job_done(job, result)
            index.refresh()
    finally:
        if progress:
            _quietly(lambda: client.unsubscribe_topic(PROGRESS_TOPIC))
        index.refresh(now=True)
    return outcomes


def _prepare_every_worker(
    client,
    store: str,
    specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    setup: WorkerSetup,
    resources: dict[str, int] | None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Resolves the stages on every worker at once (models found, weights checksummed) and
    checks that all resolve the same stage configs: a worker with other weights on its disk would
    otherwise write a store of mixed features. Workers that join later prepare on their first job."""
    workers = list(client.scheduler_info(n_workers=-1).get("workers", {}))
    futures = [
        client.submit(
            _prepare_on_worker,
            store,
            specs,
            fps,
            force,
            setup,
            pure=False,
            resources=resources,
            workers=[address],
            allow_other_workers=False,
        )
        for address in workers
    ] or [client.submit(_prepare_on_worker, store, specs, fps, force, setup, pure=False, resources=resources)]
    results = client.gather(futures)
    for result in results:
        if isinstance(result, RunErrorOnWorker):
            raise FatalError(result.error)
    first = results[0]
    for address, result in zip(workers[1:], results[1:], strict=True):
        for stage, (digest, config) in result.items():
            if digest != first[stage][0]:
                difference = config_difference(first[stage][1], config, f"on {workers[0]}", f"on {address}")
                raise FatalError(
                    f"the workers resolve stage {stage} differently ({difference}): give every worker "
                    "the same models and library versions"
                )
    return first


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _gpu_resources(client, specs: list[tuple[str, dict]]) -> dict[str, int] | None:
    """{"GPU": 1} when the cluster's workers declare GPUs (`dask worker --resources GPU=1`) and the
    stages may use one: a job then runs only where a GPU is free. None otherwise, so that a
    cluster without GPUs (or `--device cpu`) runs every job on any worker."""
    if all(options.get("device", "auto") == "cpu" for _, options in specs):
        return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    if any(worker.get("resources", {}).get(GPU_RESOURCE) for worker in workers):
        return {GPU_RESOURCE: 1}
    return None


def _lost_cluster_is_a_run_error(scheduler: str, wait: Callable[[], Any]) -> Any:
    """`wait()`, with the scheduler's loss (the future cancelled by it, the connection closed)
    turned into a FatalError: it says nothing about the video."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    try:
        return wait()
    except (CancelledError, CommClosedError) as e:
        raise FatalError(
            f"lost the Dask scheduler at {scheduler} ({_one_line(e)}); finished videos are kept, "
            "run the same command again to do the rest"
        ) from None


def _quietly(close: Callable[[], Any]) -> None:
    """Closes a client whose scheduler may be gone, without Dask's tracebacks."""
    import contextlib
    import logging

    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.suppress(Exception):
            close()
    finally:
        logger.setLevel(level)


def _absolute_if_path(value: Any) -> Any:
    if isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


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
