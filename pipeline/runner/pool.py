"""`--workers auto`: a pool sized to the job while it runs.

Jobs start at once in this process, as with `--workers 1`: nothing waits for a worker to start.
A helper thread re-estimates, every DECIDE_EVERY_S until it adds workers, how long the jobs not
started will take here (from the seconds per byte this process has measured, model loading left
out) and what a worker process costs to start: its imports (WORKER_IMPORT_CORE_S), resolving the
stages and loading their models (what this process measured doing the same), and Dask's own
start. When `extra_workers` finds that some workers finish the rest sooner, start-up included, it
starts that many on a Dask LocalCluster, and they take jobs from the same queue as this process
until it is empty. A few short files never pay for a worker; a long first file starts them while
it runs.

The jobs this process runs are the `--workers 1` path (`Extractor.run_job`); the ones the workers
run are the LocalCluster path (cluster.py), so every guarantee of both holds: the configs checked
before any job (the workers' against this process's), the index refreshed as jobs finish, a
failure recorded per file, tasks of a lost worker retried, shards written atomically.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.runner.cluster import (
    _quietly,
    file_size,
    gpu_resources,
    job_result,
    ready_workers,
    submit,
    worker_specs,
)
from pipeline.runner.extractor import MODEL_LOCK, Extractor
from pipeline.runner.jobs import FatalError, IndexRefresher, Job, Outcome, Progress, check_configs
from pipeline.runner.worker import PROGRESS_TOPIC, WorkerSetup, local_cluster
from pipeline.store import config_difference

# Core-seconds a worker process spends importing rcma's stage modules (torch, torchaudio, OpenCV,
# PyAV, h5py), interpreter start included: 3.4-4.7 core-s measured in fresh interpreters on the
# 2-core machine (shared, so noisy); the most of them, so that noise cannot eat a gain that adds a
# worker. Resolving the stages and loading their models come on top:
# this process measures those (`Extractor.setup_cpu_seconds`).
WORKER_IMPORT_CORE_S = 4.7
# Core-seconds a LocalCluster worker spends starting before it imports rcma (its nanny and worker
# processes, `distributed` imported, registered with the scheduler): 1.05-1.08 core-s measured
# (children's CPU time of LocalCluster(n_workers=1) up to its first task, 2-core machine).
DASK_WORKER_START_CORE_S = 1.1
# Core-seconds this process spends once to start the cluster: importing `distributed` (0.82 s) and
# starting the scheduler and client (0.1 s), in the same measurement.
DASK_CLIENT_START_CORE_S = 0.9
# How often the helper re-estimates before it adds workers, and looks at its workers' tasks after.
# A poll costs microseconds; a job of the clips in data/ takes 1-3 s on one core.
DECIDE_EVERY_S = 0.25


def finish_time(
    pending_s: Sequence[float],
    busy_s: float,
    extra: int,
    lane_cores: float,
    start_core_s: float,
    cores: int,
) -> float:
    """Seconds until the jobs not started are done, with `extra` worker processes started now
    beside the lane in this process (its own CPU use and speed: the measured ones).

    `pending_s`: each job's seconds on one lane, largest first; `busy_s`: seconds until this lane
    is free; `lane_cores`: the cores a lane keeps busy (its CPU over its wall time: above 1 for
    multi-threaded stages); `start_core_s`: what one worker spends before its first job. While the
    workers start (each on one core) they share the cores with this lane; then every lane runs at
    min(1, cores / (lanes x lane_cores)) of its own speed. Jobs go to the lane free first."""
    if extra == 0:
        return busy_s + sum(pending_s)
    starting = min(1.0, cores / (lane_cores + extra))  # every process's speed while workers start
    ready = start_core_s / starting
    running = min(1.0, cores / ((1 + extra) * lane_cores))

    def here(at: float, work: float) -> float:  # when this lane, free at `at`, ends `work`
        before = max(0.0, ready - at) * starting
        if work <= before:
            return at + work / starting
        return max(at, ready) + (work - before) / running

    free = [here(0.0, busy_s)] + [ready] * extra
    for seconds in pending_s:
        lane = min(range(len(free)), key=free.__getitem__)
        free[lane] = here(free[lane], seconds) if lane == 0 else free[lane] + seconds / running
    return max(free)


def extra_workers(
    pending_s: Sequence[float],
    busy_s: float,
    lane_cores: float,
    start_core_s: float,
    cores: int,
    most: int,
) -> int:
    """How many worker processes to add to the lane in this process: of 0 to `most` (and no more
    than the jobs not started), the count `finish_time` says ends soonest; the fewest on a tie."""
    best, best_s = 0, finish_time(pending_s, busy_s, 0, lane_cores, start_core_s, cores)
    for extra in range(1, min(most, len(pending_s)) + 1):
        seconds = finish_time(pending_s, busy_s, extra, lane_cores, start_core_s, cores)
        if seconds < best_s:
            best, best_s = extra, seconds
    return best


class Lane:
    """The jobs' queue (largest file first, but see below) and what the lane in this process has
    measured."""

    def __init__(self, jobs: list[Job], extractor: Extractor, cores: int):
        self.cores = cores
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sizes = {job: max(1, file_size(job.path)) for job in jobs}
        self.queue = deque(sorted(jobs, key=self.sizes.__getitem__, reverse=True))
        # This lane starts with the largest file of the commonest kind, so that what it measures
        # first stands for most of the jobs (an audio file first says nothing of the videos' faces
        # stage, and measures only once its transcription's models are loaded).
        kinds = Counter(job.path.suffix.lower() for job in jobs)
        if kinds:
            commonest = kinds.most_common(1)[0][0]
            first = next(job for job in self.queue if job.path.suffix.lower() == commonest)
            self.queue.remove(first)
            self.queue.appendleft(first)
        self.extractor = extractor
        self.done: list[tuple[Job, float]] = []  # finished jobs and their seconds, loading left out
        self.wall_s = self.cpu_s = 0.0  # in jobs, finished ones
        self.setup_cpu_s = extractor.setup_cpu_seconds  # the stages resolved: loads come on top
        self.current: tuple[Job, float, float, float] | None = None  # job, wall, CPU, loads at start
        self.threads: int | None = None  # this lane's torch threads once workers are added

    def take(self) -> Job | None:
        with self.lock:
            if self.stop.is_set() or not self.queue:
                return None
            return self.queue.popleft()

    def run(self, job: Job, progress: Progress | None) -> list[Outcome]:
        with self.lock:
            self.current = (job, time.perf_counter(), time.process_time(), self._loaded_s())
        try:
            return self.extractor.run_job(job, progress)
        finally:
            with self.lock:
                self.done.append((job, self._current_s()))
                _, wall, cpu, _ = self.current
                self.wall_s += time.perf_counter() - wall
                self.cpu_s += time.process_time() - cpu
                self.current = None

    def _loaded_s(self) -> float:
        """Wall seconds spent loading models so far, the load under way included."""
        since = self.extractor.loading_since
        return self.extractor.load_seconds + (time.perf_counter() - since if since else 0.0)

    def _current_s(self) -> float:
        """Seconds the job under way has taken so far, loading left out."""
        job, started, _, loaded_at_start = self.current
        return max(0.0, time.perf_counter() - started - (self._loaded_s() - loaded_at_start))

    def estimate(self) -> tuple[list[float], float, float, float]:
        """(seconds of each job not started, seconds until this lane is free, cores it keeps busy,
        core-seconds a worker spends before its first job), from what this lane measured.

        A job's seconds are its kind's (its file extension: an audio file is cheaper by the byte
        than a video) seconds per byte measured here, times its size; for a kind not measured yet,
        the mean seconds of a job measured here. The job under way counts as what it has taken so
        far, which can only underestimate it. Model loading is left out: a worker pays it once,
        in its start-up."""
        with self.lock:
            measured = list(self.done)
            wall, cpu = self.wall_s, self.cpu_s
            if self.current:
                measured.append((self.current[0], self._current_s()))
                wall += time.perf_counter() - self.current[1]
                cpu += time.process_time() - self.current[2]
            per_byte: dict[str, list[float]] = {}
            for job, seconds in measured:
                kind = per_byte.setdefault(job.path.suffix.lower(), [0.0, 0.0])
                kind[0] += seconds
                kind[1] += self.sizes[job]
            mean = sum(seconds for _, seconds in measured) / len(measured) if measured else 0.0

            def seconds_of(job: Job) -> float:
                kind = per_byte.get(job.path.suffix.lower())
                return kind[0] / kind[1] * self.sizes[job] if kind else mean

            pending = [seconds_of(job) for job in self.queue]
            busy = max(0.0, seconds_of(self.current[0]) - measured[-1][1]) if self.current else 0.0
            # loading runs on one core: left out, as from the jobs' seconds
            cpu -= self.extractor.setup_cpu_seconds - self.setup_cpu_s
            wall -= self._loaded_s()
            lane_cores = min(float(self.cores), cpu / wall) if wall > 0 and cpu > 0 else 1.0
            start = WORKER_IMPORT_CORE_S + self.extractor.setup_cpu_seconds + DASK_WORKER_START_CORE_S
            return pending, busy, lane_cores, start + DASK_CLIENT_START_CORE_S


class Results:
    """Where both lanes hand their finished jobs, one at a time: outcomes, the caller's callback,
    the index refresh."""

    def __init__(self, store: Path, on_job_done: Callable[[Job, list[Outcome]], None] | None):
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.on_job_done = on_job_done
        self.index = IndexRefresher(store)

    def add(self, job: Job, result: list[Outcome]) -> None:
        with self.lock:
            self.outcomes += result
            if self.on_job_done:
                self.on_job_done(job, result)
            self.index.refresh()


class Helper:
    """The thread that adds workers when they pay and runs jobs on them (see the module's doc)."""

    def __init__(
        self,
        lane: Lane,
        results: Results,
        most: int,
        cores: int,
        gpus: int,
        stage_specs: list[tuple[str, dict]],
        progress: Progress | None,
    ):
        self.lane, self.results, self.most, self.cores, self.gpus = lane, results, most, cores, gpus
        self.stage_specs, self.progress = stage_specs, progress
        self.workers = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rcma-pool", daemon=False)

    def _run(self) -> None:
        try:
            extra = self._decide()
            if extra:
                self._run_workers(extra)
        except BaseException as e:  # raised in the main thread, which stops taking jobs
            self.error = e
            self.lane.stop.set()

    def _decide(self) -> int:
        while not self.lane.stop.is_set():
            with self.lane.lock:
                if not self.lane.queue:
                    return 0
            extra = extra_workers(*self.lane.estimate(), self.cores, self.most - 1)
            if extra:
                return extra
            self.lane.stop.wait(DECIDE_EVERY_S)
        return 0

    def _run_workers(self, extra: int) -> None:
        from distributed import Client

        lanes = 1 + extra
        self.lane.threads = max(1, self.cores // lanes)  # this lane's share, taken before its next job
        setup = WorkerSetup(threads=self.lane.threads, gpus=self.gpus, first_gpu=1 if self.gpus else 0)
        cluster = local_cluster(extra, setup)
        self.workers = extra
        try:
            with Client(cluster) as client:
                self._run_on(client, setup)
        finally:
            _quietly(cluster.close)

    def _run_on(self, client, setup: WorkerSetup) -> None:
        extractor = self.lane.extractor
        store, fps, force = extractor.store, extractor.fps, extractor.force
        specs = worker_specs(self.stage_specs)
        resources = gpu_resources(client, specs)
        if self.progress:
            progress = self.progress
            client.subscribe_topic(PROGRESS_TOPIC, lambda event: progress(*event[1]))
        running: dict[Any, Job] = {}
        try:
            with self.lane.lock:  # this lane ended the jobs while the workers started, or stopped
                if self.lane.stop.is_set() or not self.lane.queue:
                    return
            prepared = ready_workers(client, "this machine", store, specs, fps, force, setup, resources)
            _check_same_configs(extractor.prepare(), prepared)
            while True:
                while len(running) < self.workers and (job := self.lane.take()) is not None:
                    running[submit(client, job, store, specs, fps, force, setup, resources)] = job
                if not running or self.lane.stop.is_set():
                    return
                self.lane.stop.wait(DECIDE_EVERY_S)
                for future in [f for f in running if f.done()]:
                    job = running.pop(future)
                    self.results.add(job, job_result(future, job, "this machine", store, self.stage_specs))
        finally:
            for future in running:
                future.cancel()
            if self.progress:
                _quietly(lambda: client.unsubscribe_topic(PROGRESS_TOPIC))


def _check_same_configs(
    here: dict[str, tuple[str, dict[str, Any]]], workers: dict[str, tuple[str, dict[str, Any]]]
) -> None:
    for stage, (digest, config) in here.items():
        if workers[stage][0] != digest:
            difference = config_difference(config, workers[stage][1], "in this process", "on the workers")
            raise FatalError(
                f"the workers resolve stage {stage} differently from this process ({difference}): "
                "run with --workers 1"
            )


def run_pool(
    jobs: list[Job],
    extractor: Extractor,
    most: int,
    cores: int,
    gpus: int,
    stage_specs: list[tuple[str, dict]],
    progress: Progress | None = None,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
) -> tuple[list[Outcome], int]:
    """Runs `jobs` in this process, adding up to `most - 1` worker processes when they pay (see
    the module's doc). Returns the outcomes and the number of workers added. `on_job_done` is
    called for one job at a time, from this thread or the helper's."""
    check_configs(extractor.store, extractor.prepare(), extractor.force, extractor.forceable)
    lane = Lane(jobs, extractor, cores)
    results = Results(extractor.store, on_job_done)
    helper = Helper(lane, results, most, cores, gpus, stage_specs, progress)
    import torch

    threads = torch.get_num_threads()
    helper.thread.start()
    try:
        while (job := lane.take()) is not None:
            if lane.threads and torch.get_num_threads() != lane.threads:
                with MODEL_LOCK:  # no stage computes while the thread count changes
                    torch.set_num_threads(lane.threads)
            results.add(job, lane.run(job, progress))
        helper.thread.join()
    finally:
        lane.stop.set()
        helper.thread.join()
        results.index.refresh(now=True)
        torch.set_num_threads(threads)
    if helper.error:
        raise helper.error
    return results.outcomes, helper.workers
