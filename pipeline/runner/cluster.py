"""Running jobs on Dask: a LocalCluster started here, or an existing cluster's scheduler.

Both are one code path (`_run_on_client`): every worker is checked (it can write the store, it
resolves the same stage configs), then one task a job is submitted, largest file first. Workers
write their own shards; this process records failures and rebuilds the index. Its pieces
(`ready_workers`, `submit`, `job_result`) also run the workers `--workers auto` adds (pool.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.runner.jobs import (
    FatalError,
    IndexRefresher,
    Job,
    Outcome,
    Progress,
    _one_line,
    check_configs,
    check_fps,
)
from pipeline.runner.worker import (
    GPU_RESOURCE,
    MALLOC_TRIM,
    PROGRESS_TOPIC,
    RunErrorOnWorker,
    WorkerSetup,
    _check_writable_on_worker,
    _environment_variable,
    _extract_on_worker,
    _prepare_on_worker,
    local_cluster,
)
from pipeline.store import config_difference, record_failure, shard_root
from pipeline.store.scan import cpu_count

CONNECT_TIMEOUT_S = 20.0


def gpu_count(stage_specs: list[tuple[str, dict]]) -> int:
    """CUDA devices the stages will use: none when every stage is told --device cpu."""
    if all(options.get("device", "auto") == "cpu" for _, options in stage_specs):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def run_local_cluster(
    jobs: list[Job],
    workers: int,
    store: Path,
    stage_specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    progress: Progress | None = None,
    on_job_done: Callable[[Job, list[Outcome]], None] | None = None,
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

    specs = worker_specs(stage_specs)
    shard_root(store).mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    index = IndexRefresher(store)
    resources = gpu_resources(client, specs)
    if progress:
        client.subscribe_topic(PROGRESS_TOPIC, lambda event: progress(*event[1]))
    try:
        prepared = ready_workers(client, scheduler, store, specs, fps, force, setup, resources)
        check_configs(store, prepared, force)
        futures = {submit(client, job, store, specs, fps, force, setup, resources): job for job in jobs}
        for future in as_completed(futures):
            try:
                result = job_result(future, futures[future], scheduler, store, stage_specs)
            except FatalError:
                for other in futures:
                    other.cancel()
                raise
            outcomes += result
            if on_job_done:
                on_job_done(futures[future], result)
            index.refresh()
    finally:
        if progress:
            _quietly(lambda: client.unsubscribe_topic(PROGRESS_TOPIC))
        index.refresh(now=True)
    return outcomes


def worker_specs(stage_specs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The stage specs as workers get them: paths absolute, since workers may run in other folders
    (for media and for model files)."""
    return [(name, {k: _absolute_if_path(v) for k, v in options.items()}) for name, options in stage_specs]


def ready_workers(
    client,
    scheduler: str,
    store: Path,
    specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    setup: WorkerSetup,
    resources: dict[str, int] | None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Checks that every worker can write the store and resolves the same stage configs; returns
    them (a run error otherwise)."""
    where = str(store.resolve())
    check = lambda: client.run(_check_writable_on_worker, where)  # noqa: E731 (every worker)
    problems = _lost_cluster_is_a_run_error(scheduler, check)
    problem = next((p for p in problems.values() if p), "")
    if problem:
        raise FatalError(problem)
    return _lost_cluster_is_a_run_error(
        scheduler, lambda: _prepare_every_worker(client, where, specs, fps, force, setup, resources)
    )


def submit(
    client,
    job: Job,
    store: Path,
    specs: list[tuple[str, dict]],
    fps: float,
    force: bool,
    setup: WorkerSetup,
    resources: dict[str, int] | None,
):
    """The Dask task of one job (`specs` from `worker_specs`), retried where its worker is lost."""
    return client.submit(
        _extract_on_worker,
        Job(job.path.absolute(), job.video_id),
        str(store.resolve()),
        specs,
        fps,
        force,
        setup,
        pure=False,
        retries=2,
        resources=resources,
        priority=file_size(job.path),  # the largest files first, so none is left to run alone at the end
    )


def job_result(
    future, job: Job, scheduler: str, store: Path, stage_specs: list[tuple[str, dict]]
) -> list[Outcome]:
    """A finished task's outcomes; the job's failure when the task raised (recorded in the store).
    FatalError for a run error (the caller cancels the other tasks) or a lost scheduler."""
    try:
        result = _lost_cluster_is_a_run_error(scheduler, future.result)
    except FatalError:
        raise
    except Exception as e:
        result = [
            Outcome(job.video_id, str(job.path), name, "failed", error=_one_line(e))
            for name, _ in stage_specs
        ]
        for outcome in result:
            record_failure(store, outcome.stage, job.video_id, str(job.path), outcome.error)
    if isinstance(result, RunErrorOnWorker):
        raise FatalError(result.error)
    return result


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


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def gpu_resources(client, specs: list[tuple[str, dict]]) -> dict[str, int] | None:
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
