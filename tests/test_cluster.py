"""Extraction at scale: a real `dask scheduler` and `dask worker` processes with several threads
each, a worker killed mid-run, and `--workers 2` on this machine, each compared array by array
with a one-worker run of the same real clips."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CREMA_MP4, JFK, SINGLE_FACE

from pipeline.store import open_store, shard_root, video_ids

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # workers import this checkout's code
ALL = ["--stage", "all", "--visual-model", "none", "--device", "cpu", "--quiet"]


def rcma(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of every stage of every video, read through the index, by `video/stage/name`."""
    out: dict[str, np.ndarray] = {}
    with open_store(store) as f:
        for video_id in video_ids(f):
            group = f[f"videos/{video_id}"]
            for stage in group:
                member = group[stage]
                if isinstance(member, h5py.Dataset):
                    out[f"{video_id}/{stage}"] = member[()]
                    continue
                member.visititems(
                    lambda name, obj, where=f"{video_id}/{stage}": (
                        out.__setitem__(f"{where}/{name}", obj[()]) if isinstance(obj, h5py.Dataset) else None
                    )
                )
    return out


# Whisper's token probabilities come out of a softmax over CPU matrix products whose last bits
# depend on the process's memory layout (the BLAS kernel chosen for an alignment): two processes
# agree to about 1e-6. Every other array, the words and their times included, must be identical.
CLOSE_ONLY = {"text/word_prob": 1e-5}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        tolerance = next((t for suffix, t in CLOSE_ONLY.items() if key.endswith(suffix)), None)
        if tolerance is None:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=tolerance, atol=0, err_msg=key)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    for path in [*CREMA_MP4, SINGLE_FACE, JFK]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def one_worker(clips: Path, tmp_path_factory) -> dict[str, np.ndarray]:
    """The reference: every stage of every clip in one process, one file after another.

    With one intra-op thread, as each `dask worker` process has (Dask's nanny sets
    OMP_NUM_THREADS=1) and as `--workers 2` gives each of its processes on this 2-core machine:
    Whisper's word probabilities differ in the 7th digit between thread counts (a float sum split
    differently), whatever the layout."""
    store = tmp_path_factory.mktemp("one") / "store.h5"
    one_thread = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = rcma("extract", str(clips), "--store", str(store), *ALL, "--workers", "1", env=one_thread)
    assert result.returncode == 0, result.stderr
    return arrays(store)


class Cluster:
    """A `dask scheduler` and two `dask worker` processes (two threads each) on 127.0.0.1."""

    def __init__(self, folder: Path, env: dict[str, str] = ENV, protocol: str = "tcp"):
        self.scheduler_file = folder / "scheduler.json"
        self.env = env
        self.processes: list[subprocess.Popen] = []
        self.client = None
        try:
            self._start_all(protocol)
        except BaseException:
            self.close()  # no scheduler or worker outlives a cluster that failed to come up
            raise

    def _start_all(self, protocol: str) -> None:
        env = self.env
        self._start(
            "distributed.cli.dask_scheduler",
            "--protocol",
            protocol,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(self.scheduler_file),
        )
        deadline = time.monotonic() + 120
        while not self.scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            self._start(
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nthreads",
                "2",
                "--no-dashboard",
            )
        from distributed import Client
        from distributed.security import Security

        tls = env.get("DASK_DISTRIBUTED__COMM__TLS__CA_FILE")
        security = Security(
            tls_ca_file=tls,
            tls_client_cert=env.get("DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"),
            tls_client_key=env.get("DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"),
            require_encryption=bool(tls),
        )
        self.client = Client(scheduler_file=str(self.scheduler_file), timeout=60, security=security)
        self.client.wait_for_workers(2, timeout=180)

    def _start(self, module: str, *args: str) -> None:
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def worker_pids(self) -> dict[str, int]:
        """The worker processes themselves (each started under a nanny), by address."""
        return self.client.run(os.getpid)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.close()


def test_a_dask_cluster_with_two_threads_per_worker_gives_the_arrays_of_one_worker(
    clips, one_worker, cluster, tmp_path
):
    store = tmp_path / "dask" / "store.h5"
    store.parent.mkdir()
    result = rcma(
        "extract", str(clips), "--store", str(store), *ALL, "--scheduler", str(cluster.scheduler_file)
    )
    assert result.returncode == 0, result.stderr
    assert "24 done, 0 already done, 0 failed" in result.stderr
    assert_same_arrays(one_worker, arrays(store))
    # these workers were started the ordinary way: the user is told what Dask's default costs
    assert "2 of 2 Dask workers run with MALLOC_TRIM_THRESHOLD_=65536" in " ".join(result.stderr.split())


def test_a_worker_killed_mid_run_loses_nothing(clips, one_worker, cluster, tmp_path):
    store = tmp_path / "killed" / "store.h5"
    store.parent.mkdir()
    command = [sys.executable, "-m", "cli", "extract", str(clips), "--store", str(store), *ALL]
    run = subprocess.Popen(
        [*command, "--scheduler", str(cluster.scheduler_file)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shards = shard_root(store) / "faces"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(shards.glob("*.h5"))) < 1:
        time.sleep(0.05)
    finished_at_kill = len(list(shards.glob("*.h5")))
    busy = {w for w, tasks in cluster.client.processing().items() if tasks}
    assert busy, "no task running when the worker was to be killed; the test proves nothing"
    victim = cluster.worker_pids()[sorted(busy)[0]]
    os.kill(victim, signal.SIGKILL)
    _, stderr = run.communicate(timeout=900)
    assert run.returncode == 0, stderr
    assert finished_at_kill < 8
    status = rcma("status", "--store", str(store), "--verify")
    assert status.returncode == 0 and "damaged" in status.stdout
    for line in status.stdout.splitlines():
        if line.startswith("│ ") and line.split("│")[1].strip() in ("faces", "audio", "text"):
            cells = [c.strip() for c in line.split("│")[2:-1]]
            assert cells == ["8", "0", "0", "0", "0", "0"], line
    assert_same_arrays(one_worker, arrays(store))
    assert [p.name for p in shard_root(store).rglob(".*.tmp")] == []


def test_two_local_workers_give_the_arrays_of_one(clips, one_worker, tmp_path):
    store = tmp_path / "two" / "store.h5"
    store.parent.mkdir()
    result = rcma("extract", str(clips), "--store", str(store), *ALL, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "24 done, 0 already done, 0 failed" in result.stderr
    assert_same_arrays(one_worker, arrays(store))
    status = rcma("status", "--store", str(store))
    assert "text config" in status.stdout and "faces config" in status.stdout


def test_shards_of_an_array_job_split_the_files_without_overlap(clips, tmp_path):
    from pipeline import runner

    jobs, _ = runner.discover([clips])
    parts = [runner.shard_of(jobs, f"{i}/3") for i in (1, 2, 3)]
    ids = [job.video_id for part in parts for job in part]
    assert sorted(ids) == sorted(job.video_id for job in jobs) and len(set(ids)) == len(ids)
    for bad in ("0/3", "4/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            runner.shard_of(jobs, bad)


def test_a_worker_that_cannot_write_the_store_folder_is_one_line(tmp_path):
    from pipeline.runner import worker as runner

    missing = tmp_path / "elsewhere" / "store.h5"
    assert "cannot see the store's folder" in runner._check_writable_on_worker(str(missing))
    (tmp_path / "store.h5.d").mkdir()
    assert runner._check_writable_on_worker(str(tmp_path / "store.h5")) == ""
    assert [p.name for p in (tmp_path / "store.h5.d").iterdir()] == []
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "store.h5.d").chmod(0o500)
        problem = runner._check_writable_on_worker(str(tmp_path / "store.h5"))
        assert "cannot write into" in problem and "filesystem every worker shares" in problem


def _environ() -> dict[str, str | None]:
    names = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {name: os.environ.get(name) for name in names}


def test_local_workers_start_with_their_thread_share_and_glibc_malloc(monkeypatch):
    """Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_, which makes glibc map and
    unmap every frame-sized buffer (about 40% more CPU per job): the local workers go without it,
    with their share of the threads for OpenMP and BLAS."""
    from distributed import Client

    from pipeline.runner import WorkerSetup, local_cluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    before = dict(os.environ)  # Dask's nanny writes the workers' variables into this process's too
    cluster = local_cluster(2, WorkerSetup(threads=1))
    try:
        with Client(cluster) as client:
            environs = client.run(_environ)
    finally:
        cluster.close()
        os.environ.clear()
        os.environ.update(before)
    assert len(environs) == 2
    for environ in environs.values():
        assert environ == {
            "MALLOC_TRIM_THRESHOLD_": None,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
        }


def test_auto_workers_follow_cores_and_gpus():
    from pipeline.runner import auto_workers

    assert auto_workers(n_jobs=100, cores=16, gpus=0) == 16
    assert auto_workers(n_jobs=3, cores=16, gpus=0) == 3
    assert auto_workers(n_jobs=100, cores=16, gpus=2) == 4  # two per GPU
    assert auto_workers(n_jobs=100, cores=1, gpus=2) == 1
    assert auto_workers(n_jobs=0, cores=2, gpus=0) == 1


class Resolved:
    """What a Dask client needs to give `_prepare_every_worker`: each worker's resolved configs."""

    def __init__(self, per_worker: dict[str, dict]):
        self.per_worker = per_worker

    def scheduler_info(self, n_workers: int = -1) -> dict:
        return {"workers": {address: {} for address in self.per_worker}}

    def submit(self, fn, *args, workers=None, **kwargs):
        return self.per_worker[workers[0]]

    def gather(self, futures):
        return list(futures)


def test_workers_that_resolve_other_models_are_refused_before_any_job():
    from pipeline.runner import cluster as runner

    text = {"model": "all-MiniLM-L6-v2", "weights_sha256": "aa"}
    other = {**text, "weights_sha256": "bb"}
    same = Resolved({"tcp://a:1": {"text": ("h1", text)}, "tcp://b:1": {"text": ("h1", text)}})
    args = ("store.h5", [], 30.0, False, runner.WorkerSetup(), None)
    assert runner._prepare_every_worker(same, *args) == {"text": ("h1", text)}
    mixed = Resolved({"tcp://a:1": {"text": ("h1", text)}, "tcp://b:1": {"text": ("h2", other)}})
    with pytest.raises(runner.FatalError) as error:
        runner._prepare_every_worker(mixed, *args)
    line = str(error.value)
    assert "\n" not in line and "stage text" in line
    assert "weights_sha256: aa on tcp://a:1, bb on tcp://b:1" in line


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, which also serves as its own certificate authority."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a certificate")
def test_a_tls_cluster_configured_through_dask_gives_the_arrays_of_one_worker(tmp_path):
    audio = ["--stage", "audio", "--audio-model", "logmel", "--device", "cpu", "--quiet"]
    local = rcma(
        "extract",
        str(JFK),
        str(CREMA_MP4[0]),
        "--store",
        str(tmp_path / "local.h5"),
        *audio,
        "--workers",
        "1",
    )
    assert local.returncode == 0, local.stderr
    cert, key = self_signed(tmp_path)
    tls = {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(cert),
    }
    for who in ("SCHEDULER", "WORKER", "CLIENT"):
        tls[f"DASK_DISTRIBUTED__COMM__TLS__{who}__CERT"] = str(cert)
        tls[f"DASK_DISTRIBUTED__COMM__TLS__{who}__KEY"] = str(key)
    running = Cluster(tmp_path, env={**ENV, **tls}, protocol="tls")
    try:
        address = running.client.scheduler.address
        assert address.startswith("tls://")
        store = tmp_path / "tls.h5"
        plain = rcma("extract", str(JFK), "--store", str(store), *audio, "--scheduler", address)
        assert plain.returncode != 0 and not store.exists()
        assert len(plain.stderr.strip().splitlines()) == 1 and address in plain.stderr, plain.stderr
        result = rcma(
            "extract",
            str(JFK),
            str(CREMA_MP4[0]),
            "--store",
            str(store),
            *audio,
            "--scheduler",
            address,
            env={**ENV, **tls},
        )
        assert result.returncode == 0, result.stderr
    finally:
        running.close()
    assert_same_arrays(arrays(tmp_path / "local.h5"), arrays(store))
