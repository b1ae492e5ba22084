"""The runner: plans extraction jobs, skips what is done, runs stages here or on a Dask cluster,
and writes shards.

One module a concern:
    jobs.py        discovery (files -> jobs with unique ids), outcomes, run errors, `--shard i/N`,
                   the configs check and the index refreshes every run does around its jobs
    extractor.py   the Extractor: one video's stages, in turn, into its shards
    run.py         where jobs run: `extract` chooses; `run_local` runs them in this process
    pool.py        `--workers auto`: jobs start in this process; workers are added when they pay
    cluster.py     on Dask: a LocalCluster started here, or an existing scheduler (`connect`)
    worker.py      a Dask worker process: its environment, its setup, the tasks it runs
"""

from pipeline.runner.cluster import connect, gpu_count, run_dask, run_local_cluster
from pipeline.runner.extractor import MODEL_LOCK, Extractor
from pipeline.runner.jobs import (
    NO_SUCH_PATH,
    FatalError,
    Job,
    Outcome,
    Progress,
    Report,
    check_fps,
    discover,
    shard_of,
)
from pipeline.runner.pool import extra_workers, finish_time, run_pool
from pipeline.runner.run import auto_workers, extract, progress_bars, resolve_workers, run_local
from pipeline.runner.worker import WorkerSetup, local_cluster
from pipeline.stages import build_stage
from pipeline.store.scan import cpu_count

__all__ = [
    "MODEL_LOCK",
    "NO_SUCH_PATH",
    "Extractor",
    "FatalError",
    "Job",
    "Outcome",
    "Progress",
    "Report",
    "WorkerSetup",
    "auto_workers",
    "build_stage",
    "check_fps",
    "connect",
    "cpu_count",
    "discover",
    "extra_workers",
    "extract",
    "finish_time",
    "gpu_count",
    "local_cluster",
    "progress_bars",
    "resolve_workers",
    "run_dask",
    "run_local",
    "run_local_cluster",
    "run_pool",
    "shard_of",
]
