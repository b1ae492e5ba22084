"""Where jobs run: in this process (one worker), in this process with workers added when they pay
(`--workers auto`, pool.py), on a Dask LocalCluster of N worker processes, or on an existing Dask
cluster (`scheduler`); `extract` chooses, and `run_local` is the in-process run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.media import DEFAULT_FPS
from pipeline.runner.cluster import gpu_count, run_dask, run_local_cluster
from pipeline.runner.extractor import Extractor
from pipeline.runner.jobs import IndexRefresher, Job, Outcome, Progress, check_configs
from pipeline.runner.pool import run_pool
from pipeline.stages import build_stage
from pipeline.store import clean_store_temps, shard_root
from pipeline.store.scan import cpu_count

WORKERS_PER_GPU = 2  # one decodes while the other computes on the GPU


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
    """Runs `jobs`: on the Dask cluster at `scheduler`, else here with `workers` processes; one
    worker runs in this process, as rcma always did. "auto" starts in this process and adds worker
    processes, up to `auto_workers`, only when they finish the rest sooner (`pool.run_pool`).
    `on_note` is given a line about the run that is worth a user's attention (a slow worker
    setting). `on_job_done` is called for one job at a time, not always from this thread."""
    if scheduler:
        outcomes = run_dask(jobs, scheduler, store, stage_specs, fps, force, on_job_done, progress, on_note)
    else:
        count = resolve_workers(workers, len(jobs), stage_specs)
        if count == 1 or workers == "auto":
            stages = [build_stage(name, options) for name, options in stage_specs]
            extractor = Extractor(store, stages, fps, force)
            if count == 1:
                outcomes = run_local(jobs, extractor, progress, on_job_done)
            else:
                gpus = gpu_count(stage_specs)
                outcomes, _ = run_pool(
                    jobs, extractor, count, cpu_count(), gpus, stage_specs, progress, on_job_done
                )
        else:
            outcomes = run_local_cluster(jobs, count, store, stage_specs, fps, force, progress, on_job_done)
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


def auto_workers(n_jobs: int, cores: int, gpus: int) -> int:
    """The most workers `--workers auto` runs (this process counting as one): one per core; with
    GPUs, WORKERS_PER_GPU per GPU (at most one per core), so that each GPU has one worker decoding
    while another computes. Never more workers than jobs."""
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
    check_configs(extractor.store, extractor.prepare(), extractor.force, extractor.forceable)
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
