"""The Extractor: runs the stages of one video, in turn, into its shards.

A (video, stage) is done when its shard exists, opens, passes its checksums (every array is read),
and carries the current config hash and frame-grid hash. The frame grid (and decoded audio) is
shared by a file's stages. One stage computes at a time in a process (`MODEL_LOCK`), so no model
is used by two threads at once, none is loaded twice at once, and no thread changes torch's thread
count under another: a worker with several threads gives the same arrays as one thread.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.errors import ModelUnavailable
from pipeline.media import (
    DEFAULT_FPS,
    GridMismatch,
    Media,
    MediaError,
    MediaInfo,
    frame_grid,
    probe,
    read_audio,
    shared_grid,
)
from pipeline.runner.jobs import ANOTHER_STORE, FatalError, Job, Outcome, Progress, _one_line, check_fps
from pipeline.stages import Extra, Rows, Stage, config_hash, library_versions, shared_config, video_settings
from pipeline.store import (
    GRID,
    ShardWriter,
    StoreError,
    claim_stage_config,
    clear_failure,
    grid_hash,
    read_rows,
    read_shard_attrs,
    record_failure,
    set_attrs,
    shard_path,
    shard_problem,
    shard_root,
    write_shard,
)

# Held while a stage loads its models or computes, so that in one process (a Dask worker with
# several threads) no model is used by two threads at once or loaded twice at once. Reentrant:
# a stage may call another's model (the audio stage's Whisper encoder) under it.
MODEL_LOCK = threading.RLock()

RUNNER_LIBRARIES = library_versions("rcma", "torch", "numpy", "av", "h5py")


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
        # What setting up the stages has cost so far (`--workers auto` sizes its pool from it): CPU
        # seconds resolving them and loading their models, the wall seconds of the finished loads,
        # and when the load under way began.
        self.setup_cpu_seconds = 0.0
        self.load_seconds = 0.0
        self.loading_since: float | None = None

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
            cpu = time.process_time()
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
            self.setup_cpu_seconds += time.process_time() - cpu
        return self._configs

    def _fail(self, job: Job, stage: str, error: str) -> Outcome:
        record_failure(self.store, stage, job.video_id, str(job.path), error)
        return Outcome(job.video_id, str(job.path), stage, "failed", error=error)

    def _load(self, stage: Stage) -> None:
        if stage.name in self._loaded:
            return
        if stage.name in self._unloadable:  # tried once: every later job fails the same way
            raise FatalError(self._unloadable[stage.name])
        started, cpu = time.perf_counter(), time.process_time()
        self.loading_since = started
        try:
            stage.load()
        except (ModelUnavailable, ValueError) as e:  # an option out of range for the model loaded
            self._unloadable[stage.name] = f"{stage.name}: {_one_line(e)}"
            raise FatalError(self._unloadable[stage.name]) from None
        finally:
            self.loading_since = None
            self.load_seconds += time.perf_counter() - started
            self.setup_cpu_seconds += time.process_time() - cpu
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

        The grid hash is recorded at the end: a pending grid is complete only then. The stage's
        config is claimed for the store just before the shard is committed (a run error if another
        run claimed another config meanwhile)."""
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
            try:  # the stage's settings are claimed by its first shard written, never before
                shared = shared_config(stage.name, config)  # the per-video subject stays in the shard
                claim_stage_config(self.store, stage.name, config_digest, shared, self.force)
            except StoreError as e:
                raise FatalError(str(e)) from None
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
