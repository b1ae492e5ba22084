"""`rcma extract` as one call: settings in, stages built, jobs run (here or on Dask), a line per
problem and a summary out. The CLI only declares the options; `ExtractSettings` is them as data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import runner
from pipeline.runner import FatalError, Job, Outcome
from pipeline.stages import expand
from pipeline.store import (
    StoreError,
    check_store_path,
    clean_store_temps,
    rebuild_index,
    set_aside_foreign_index,
    shard_root,
)


@dataclass
class ExtractSettings:
    """The extract command's options as plain data (their defaults are the CLI's)."""

    paths: list[Path]  # media files, or folders searched recursively
    store: Path
    stages: list[str]  # names, "all", or comma-separated lists of them
    visual_model: str | None  # None: the faces stage's default (pipeline.visual.DEFAULT)
    crops: bool
    subject: str
    faces_from: Path | None  # Aff-Wild2-style folder of aligned crops: no detection
    audio_model: str | None  # None: the audio stage's default (pipeline.audio.DEFAULT_AUDIO_MODEL)
    audio_layer: int | None
    audio_weights: str | None
    logmel_pool: str
    audio_window: str | None  # None: whisper-encoder's default (pipeline.audio)
    asr_model: str | None
    asr_backend: str | None
    asr_compute_type: str | None
    text_model: str | None
    text_unit: str | None  # None: the text stage's default (pipeline.text.DEFAULT_TEXT_UNIT)
    fps: float  # frame rate of the grid given to audio-only files
    device: str
    force: bool
    workers: str
    scheduler: str | None
    shard: str | None  # "i/N"
    quiet: bool

    def stage_options(self) -> dict[str, Any]:
        """The options stages are built from (each stage takes the ones it accepts)."""
        run = {"paths", "store", "stages", "fps", "force", "workers", "scheduler", "shard", "quiet"}
        return {k: v for k, v in asdict(self).items() if k not in run}


def extract(settings: ExtractSettings, console: Any) -> bool:
    """Runs the extraction `settings` describe, printing to the rich `console` a line per bad path,
    skipped file, warning and failure, and a summary; True when every file and stage succeeded.
    A problem with the run itself (a bad option, a missing model, an unusable store) is a
    FatalError, raised before any job where it can be known then."""
    try:
        check_store_path(settings.store)
        names = expand([n.strip() for item in settings.stages for n in item.split(",") if n.strip()])
    except (StoreError, ValueError) as e:
        raise FatalError(str(e)) from None
    jobs, report = runner.discover(settings.paths)
    if report.missing:  # a typo'd path is caught before an hour of extracting the others
        raise FatalError(
            f"{', '.join(map(str, report.missing))}: {runner.NO_SUCH_PATH}; nothing was extracted"
        )
    for path, problem in report.bad_paths:
        _say(console, f"[red]error:[/red] {path}: {problem}")
    for path, problem in report.not_media:
        _say(console, f"[yellow]skipped:[/yellow] {path}: {problem}")
    if not jobs:
        raise FatalError("no media files found in " + ", ".join(map(str, settings.paths)))
    try:
        if settings.shard:
            jobs = runner.shard_of(jobs, settings.shard)
        with runner.progress_bars(console, settings.quiet) as bars:
            files = bars.add_task("files", total=len(jobs))
            frames = bars.add_task("frames", total=None)

            def on_frames(label: str, done: int, total: int) -> None:
                bars.update(frames, description=label, completed=done, total=total)

            def on_job(job: Job, outcomes: list[Outcome]) -> None:
                _show_outcomes(console, outcomes)
                bars.advance(files)

            specs = [(name, settings.stage_options()) for name in names]
            report.outcomes = runner.extract(
                jobs,
                settings.store,
                specs,
                settings.fps,
                settings.force,
                settings.workers,
                settings.scheduler,
                on_frames,
                on_job,
                lambda line: _say(console, f"[yellow]note:[/yellow] {line}"),
            )
    except ValueError as e:  # an option out of range: --shard, --workers, --fps
        raise FatalError(str(e)) from None
    counts = report.counts()
    console.print(
        f"{settings.store}: {counts['done']} done, {counts['skipped']} already done, "
        f"{counts['failed']} failed ({len(jobs)} files, stages: {', '.join(names)})",
        highlight=False,
    )
    return report.ok


def _show_outcomes(console: Any, outcomes: list[Outcome]) -> None:
    for o in outcomes:
        if o.warning:
            console.print(f"[yellow]warning:[/yellow] {o.source}: {o.stage}: {o.warning}", highlight=False)
        if o.status == "failed":
            _say(console, f"[red]failed:[/red] {o.source}: {o.stage}: {o.error}")


def _say(console: Any, line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def reindex(store: Path, console: Any) -> None:
    """Rebuilds the index from the shards after a crash (or a damaged index), first removing the
    temporary files of killed writers, never those of a running extract. A file put in the index's
    place (not an rcma index) beside the shard folder is kept under another name. StoreError or
    OSError."""
    aside = set_aside_foreign_index(store)
    if aside:
        console.print(f"{store}: not an rcma index; kept as {aside.name}", highlight=False)
    check_store_path(store)
    if not shard_root(store).is_dir():
        raise StoreError(f"{store}: no {shard_root(store).name}/ folder of shards to index")
    removed = clean_store_temps(store)
    count = rebuild_index(store)
    if removed is None:
        console.print(f"{store}: an extract is writing; its temporary files were left alone", highlight=False)
    console.print(f"{store}: {count} videos indexed")
