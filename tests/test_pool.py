"""`--workers auto`: the pool starts in this process and adds worker processes only when they
finish the rest sooner, start-up included (pipeline/runner/pool.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CREMA_MP4, SINGLE_FACE
from typer.testing import CliRunner

from cli import app
from pipeline import runner
from pipeline.runner import pool
from pipeline.stages import build_stage
from pipeline.store import open_store, video_ids

FACES = ["--stage", "faces", "--visual-model", "none", "--device", "cpu", "--quiet"]
FACES_OPTIONS = {"visual_model": "none", "crops": True, "device": "cpu"}


def faces_arrays(store: Path) -> dict[str, np.ndarray]:
    out = {}
    with open_store(store) as f:
        for video_id in video_ids(f):
            group = f[f"videos/{video_id}/faces"]
            for name in group:
                out[f"{video_id}/{name}"] = group[name][()]
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_workers_are_added_only_when_they_finish_the_rest_sooner():
    # The clips in data/ on the 2-core machine: a job takes ~3 s on one lane that keeps one core
    # busy; a worker spends ~15 core-s before its first job (imports, Whisper and MiniLM loaded).
    few = [3.0] * 5
    assert pool.extra_workers(few, 0.0, 1.0, 15.0, cores=2, most=1) == 0  # 6 files: not worth it
    many = [3.0] * 31
    assert pool.extra_workers(many, 0.0, 1.0, 15.0, cores=2, most=1) == 1  # 32 files: worth it
    # the same jobs with a worker that starts in no time: one lane a core
    assert pool.extra_workers(few, 0.0, 1.0, 0.0, cores=2, most=1) == 1
    # a lane that already keeps both cores busy gains nothing from a second
    assert pool.extra_workers(many, 0.0, 2.0, 15.0, cores=2, most=1) == 0
    # long videos on 16 cores: a worker for each one left, up to the most allowed
    assert pool.extra_workers([300.0] * 15, 100.0, 1.0, 20.0, cores=16, most=15) == 15
    assert pool.extra_workers([300.0] * 40, 100.0, 1.0, 20.0, cores=16, most=3) == 3
    # never more workers than jobs not started, none for none, none when none is allowed
    assert pool.extra_workers([300.0] * 2, 100.0, 1.0, 20.0, cores=16, most=15) == 2
    assert pool.extra_workers([300.0] * 2, 0.0, 1.0, 20.0, cores=16, most=15) == 1  # one for this lane
    assert pool.extra_workers([], 300.0, 1.0, 20.0, cores=16, most=15) == 0
    assert pool.extra_workers(many, 0.0, 1.0, 15.0, cores=2, most=0) == 0


def test_finish_time_counts_start_up_and_shared_cores():
    # alone: what is left of the job under way, then every job
    assert pool.finish_time([3.0, 2.0], 1.0, 0, 1.0, 10.0, cores=2) == 6.0
    # a worker ready after 4 s (its start-up, one core of two, this lane on the other), then one
    # lane a core: this lane ends its 1 s and the 3 s job, the worker the 2 s one at 4 + 2 s
    assert pool.finish_time([3.0, 2.0], 1.0, 1, 1.0, 4.0, cores=2) == 6.0
    # on one core the start-up and the lanes share it: slower than alone
    assert pool.finish_time([3.0, 2.0], 1.0, 1, 1.0, 4.0, cores=1) > 6.0


def test_the_lane_measures_first_the_commonest_kind_and_estimates_per_kind_and_byte(tmp_path):
    def file(name: str, size: int) -> runner.Job:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        return runner.Job(path, path.stem)

    speech, small, large = file("speech.flac", 900), file("small.mp4", 100), file("large.mp4", 300)
    extractor = SimpleNamespace(load_seconds=0.0, loading_since=None, setup_cpu_seconds=2.0)
    lane = pool.Lane([small, speech, large], extractor, cores=2)
    # largest first, but the first job is the largest of the commonest kind (a video, not the flac)
    assert [job.video_id for job in lane.queue] == ["large", "speech", "small"]
    assert lane.take() == large
    lane.done.append((large, 3.0))  # 3 s for 300 bytes of video
    lane.wall_s, lane.cpu_s = 3.0, 4.5
    pending, busy, lane_cores, start = lane.estimate()
    # the flac: no audio file measured yet, so the mean job; the small video: 0.01 s a byte
    assert pending == pytest.approx([3.0, 1.0]) and busy == 0.0 and lane_cores == pytest.approx(1.5)
    constants = pool.WORKER_IMPORT_CORE_S + pool.DASK_WORKER_START_CORE_S + pool.DASK_CLIENT_START_CORE_S
    assert start == pytest.approx(constants + 2.0)  # a worker resolves the stages too
    extractor.setup_cpu_seconds = 9.0  # a model loaded since: a worker will load it too
    assert lane.estimate()[3] == pytest.approx(constants + 9.0)


@pytest.fixture
def two_cores(monkeypatch):
    """`--workers auto` sized for two cores (this project's machine), whatever this one has."""
    monkeypatch.setattr("pipeline.runner.run.cpu_count", lambda: 2)
    monkeypatch.setattr("pipeline.runner.cluster.cpu_count", lambda: 2)


def test_a_few_files_through_workers_auto_start_no_worker_and_give_the_store_of_one(
    tmp_path, monkeypatch, two_cores
):
    added = []
    run_pool = pool.run_pool

    def counted(*args, **kwargs):
        outcomes, workers = run_pool(*args, **kwargs)
        added.append(workers)
        return outcomes, workers

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker process was started for three short files")

    monkeypatch.setattr("pipeline.runner.run.run_pool", counted)
    monkeypatch.setattr("pipeline.runner.pool.local_cluster", no_worker)
    clips = [str(path) for path in CREMA_MP4[:3]]
    stores = {}
    for workers in ("auto", "1"):
        stores[workers] = tmp_path / workers / "store.h5"
        stores[workers].parent.mkdir()
        result = CliRunner().invoke(
            app, ["extract", *clips, "--store", str(stores[workers]), *FACES, "--workers", workers]
        )
        assert result.exit_code == 0, result.output
        assert f"{stores[workers]}: 3 done, 0 already done, 0 failed (3 files, stages: faces)" in (
            " ".join(result.output.split())
        )
    assert added == [0]  # the pool ran (auto), and added no worker
    assert_same(faces_arrays(stores["1"]), faces_arrays(stores["auto"]))


@pytest.mark.slow
def test_workers_the_pool_adds_take_jobs_and_write_the_store_of_one(
    tmp_path, monkeypatch, two_cores, one_torch_thread
):
    """Workers forced on (the decision is the test above's); this process's lane waits after its
    first job until a worker has finished one, so both lanes run jobs."""
    videos = [*CREMA_MP4[:4], SINGLE_FACE]
    jobs, _ = runner.discover(videos)
    reference = tmp_path / "one" / "store.h5"
    runner.run_local(jobs, runner.Extractor(reference, [build_stage("faces", FACES_OPTIONS)]))

    monkeypatch.setattr("pipeline.runner.pool.extra_workers", lambda *args: 1)
    worker_done = threading.Event()
    run_job = runner.Extractor.run_job
    here = []

    def waits_for_a_worker(self, job, progress=None):
        if here:
            assert worker_done.wait(timeout=300), "no worker finished a job"
        here.append(job.video_id)
        return run_job(self, job, progress)

    monkeypatch.setattr(runner.Extractor, "run_job", waits_for_a_worker)
    reported: list[tuple[str, str]] = []

    def on_job(job, outcomes):
        reported.append((job.video_id, threading.current_thread().name))
        if threading.current_thread().name == "rcma-pool":
            worker_done.set()

    store = tmp_path / "auto" / "store.h5"
    outcomes = runner.extract(
        jobs, store, [("faces", FACES_OPTIONS)], workers="auto", on_job_done=on_job, progress=lambda *a: None
    )
    assert sorted(o.status for o in outcomes) == ["done"] * len(videos)
    assert sorted(video for video, _ in reported) == sorted(job.video_id for job in jobs)
    by_workers = {video for video, thread in reported if thread == "rcma-pool"}
    assert by_workers and set(here).isdisjoint(by_workers) and len(here) + len(by_workers) == len(videos)
    assert_same(faces_arrays(reference), faces_arrays(store))
    with open_store(store) as f:  # the index was refreshed with every video
        assert sorted(video_ids(f)) == sorted(job.video_id for job in jobs)
