"""A Dask worker process: how it is started (LocalCluster's environment), set up (its CPU threads
and GPU) and what it runs (the tasks the client submits: prepare the stages, run one job).

A worker process loads each stage's models once (`_worker_extractor`) and reuses them across jobs
and threads.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ModelUnavailable
from pipeline.files import atomic_file
from pipeline.runner.extractor import Extractor
from pipeline.runner.jobs import FatalError, Job, Outcome, Progress, _one_line
from pipeline.stages import build_stage
from pipeline.store import shard_root

GPU_RESOURCE = "GPU"
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"  # set by Dask for its workers; see worker_environ
_worker_extractors: dict[str, Extractor] = {}
_worker_extractors_lock = threading.Lock()
PROGRESS_TOPIC = "rcma-frames"
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class RunErrorOnWorker:
    """Returned, not raised, by a Dask task for a run error, so that Dask does not retry it."""

    error: str


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker process runs jobs: its share of CPU threads (None: leave torch's default, as on
    a cluster whose workers were started with their own settings) and its GPU (None: the default).
    `first_gpu`: the GPU of LocalCluster worker 0, 1 where this process already computes on GPU 0."""

    threads: int | None = None
    gpus: int = 0
    first_gpu: int = 0


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
    of a LocalCluster are named 0, 1, ...: worker i uses GPU (first_gpu + i) mod the number of GPUs)."""
    import torch

    if setup.threads:
        torch.set_num_threads(setup.threads)
    if setup.gpus > 1:
        from distributed import get_worker

        try:
            index = int(get_worker().name)
        except (ValueError, TypeError):
            index = 0
        torch.cuda.set_device(
            (setup.first_gpu + index) % setup.gpus
        )  # "cuda" then means this GPU, for every model


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


def _environment_variable(name: str) -> str | None:
    return os.environ.get(name)  # run on a worker: its own environment


def worker_environ(threads: int) -> dict[str, str]:
    """The environment a LocalCluster worker process starts with: its share of the CPU threads for
    OpenMP and BLAS, and glibc's own malloc settings. Dask's default sets MALLOC_TRIM_THRESHOLD_,
    which also turns off glibc's adaptive mmap threshold, so every decoded frame and tensor is
    mapped and unmapped afresh: about 40% more CPU per job here (docs/scaling.md)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


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
