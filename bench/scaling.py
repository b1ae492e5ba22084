"""Extraction on every core: `rcma extract --stage all` with --workers 1 against --workers auto,
on a small job and a large one.

Copies of the real clips in data/ (six CREMA-D clips, a Pexels clip, JFK; --visual-model none,
CPU), taken in that order until there are N files: 6 files (the six CREMA-D clips) and 32 (four
copies of all eight), by default. For each size, each run in a fresh store:

1. `--workers 1` (the baseline: one process, one file after another),
2. `--workers auto` (jobs start in this process; worker processes are added only when the work
   left pays for their start-up: pipeline/runner/pool.py),
3. on the largest size only, `--scheduler` on a `dask scheduler` + one `dask worker --nthreads 1`
   started beforehand (the cluster path with one worker, against run 1: Dask's overhead).

For each: wall time, ratio to the baseline measured in the same run (targets: auto >= 1.0x on 6
files, >= 1.2x on 32 on 2 cores), and CPU utilisation = busy core-seconds (user + system time of
the command and every process it started) / (wall x cores), and the ceiling for auto: --workers
1's busy core-seconds spread over all cores. Run 3's worker is not a child of the command, so
only its wall time is compared. From the largest size's run 1 per-stage seconds (recorded in
every shard) the hours for Aff-Wild2 (2.9 M frames, 30 h of audio) are projected. The load
average is printed with the figures: on a shared machine they are noisy.
Usage: python bench/scaling.py [--sizes 6,32] [--skip-cluster]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import CREMA_MP4, JFK, SINGLE_FACE  # noqa: E402

from pipeline.runner import cpu_count  # noqa: E402
from pipeline.store import GRID, read_shard_attrs, shard_root  # noqa: E402

AFFWILD2_FRAMES = 2.9e6
AFFWILD2_AUDIO_S = 30 * 3600
OPTIONS = ["--stage", "all", "--visual-model", "none", "--device", "cpu", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def extract(clips: Path, store: Path, *extra: str, options: list[str] = OPTIONS) -> tuple[float, float]:
    """(wall seconds, busy core-seconds) of one `rcma extract`."""
    store.parent.mkdir(parents=True)
    cpu, started = children_cpu(), time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "extract", str(clips), "--store", str(store), *options, *extra],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"extract {' '.join(extra)} failed:\n{result.stderr}")
    return wall, children_cpu() - cpu


def stage_seconds(store: Path) -> dict[str, float]:
    """Seconds each stage took over all files, from the shards' own records."""
    out: dict[str, float] = {}
    for stage in ("faces", "audio", "text"):
        for path in (shard_root(store) / stage).glob("*.h5"):
            with h5py.File(path, "r") as f:
                out[stage] = out.get(stage, 0.0) + float(f.attrs["seconds"])
    return out


def media_totals(store: Path) -> tuple[int, float]:
    """(video frames, seconds of audio) of the clips: what the faces and the audio/text stages scale with."""
    frames, audio = 0, 0.0
    for path in (shard_root(store) / GRID).glob("*.h5"):
        attrs = read_shard_attrs(path) or {}
        if attrs.get("has_video"):
            frames += int(attrs["n_frames"])
        if attrs.get("has_audio"):
            audio += float(attrs["duration"])
    return frames, audio


SOURCES = [*CREMA_MP4, SINGLE_FACE, JFK]
WORKER_CONFIG = "distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: null\n"


class OneWorkerCluster:
    def __init__(self, folder: Path):
        self.file = folder / "scheduler.json"
        base = [sys.executable, "-m"]
        quiet = {"cwd": REPO, "env": ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.processes = [
            subprocess.Popen(
                [*base, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
                + ["--no-dashboard", "--scheduler-file", str(self.file)],
                **quiet,
            )
        ]
        while not self.file.exists():
            time.sleep(0.2)
        # started as docs/cluster.md recommends: without Dask's MALLOC_TRIM_THRESHOLD_
        config = folder / "dask-config"
        config.mkdir()
        (config / "rcma.yaml").write_text(WORKER_CONFIG)
        self.processes.append(
            subprocess.Popen(
                [*base, "distributed.cli.dask_worker", "--scheduler-file", str(self.file)]
                + ["--nthreads", "1", "--no-dashboard"],
                **{**quiet, "env": {**ENV, "DASK_CONFIG": str(config)}},
            )
        )
        from distributed import Client

        with Client(scheduler_file=str(self.file), timeout=60) as client:
            client.wait_for_workers(1, timeout=180)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            process.wait(timeout=60)


def copies(folder: Path, n_files: int) -> Path:
    """`n_files` copies of the real clips, in the order of SOURCES, under `folder`."""
    folder.mkdir()
    for k in range(n_files):
        path = SOURCES[k % len(SOURCES)]
        shutil.copy(path, folder / f"{path.stem}-{k // len(SOURCES)}{path.suffix}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cluster", action="store_true", help="Leave out the dask scheduler run.")
    parser.add_argument("--sizes", default="6,32", help="Numbers of files, comma-separated.")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    cores = cpu_count()
    folder = Path(tempfile.mkdtemp(prefix="rcma-scaling-"))
    load_before = os.getloadavg()
    runs: dict[int, dict[str, tuple[float, float]]] = {}
    media: dict[int, tuple[int, float]] = {}
    try:
        for n in sizes:
            clips = copies(folder / f"clips-{n}", n)
            one = folder / f"one-{n}" / "store.h5"
            runs[n] = {"--workers 1": extract(clips, one, "--workers", "1")}
            runs[n]["--workers auto"] = extract(clips, folder / f"auto-{n}" / "store.h5", "--workers", "auto")
            media[n] = media_totals(one)
        largest = max(sizes)
        if not args.skip_cluster:
            cluster = OneWorkerCluster(folder)
            try:
                store = folder / "dask" / "store.h5"
                runs[largest]["--scheduler (1 worker)"] = extract(
                    folder / f"clips-{largest}", store, "--scheduler", str(cluster.file)
                )
            finally:
                cluster.close()
        seconds = stage_seconds(folder / f"one-{largest}" / "store.h5")
    finally:
        load_after = os.getloadavg()
        shutil.rmtree(folder, ignore_errors=True)

    print(f"machine: {cores} cores")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; a shared machine)")
    for n in sizes:
        frames, audio = media[n]
        print(f"\n{n} files ({frames} video frames, {audio:.1f} s of audio)")
        print(f"{'run':<24}{'wall s':>9}{'vs --workers 1':>16}{'CPU utilisation':>18}")
        base_wall, base_busy = runs[n]["--workers 1"]
        for name, (wall, busy) in runs[n].items():
            utilisation = (
                f"{busy / (wall * cores):.0%}" if "scheduler" not in name else "(worker not a child)"
            )
            print(f"{name:<24}{wall:>9.1f}{base_wall / wall:>15.2f}x{utilisation:>18}")
        speedup = base_wall / runs[n]["--workers auto"][0]
        ceiling = base_wall / (base_busy / cores)
        print(
            f"ceiling for --workers auto: {ceiling:.2f}x (--workers 1's busy core-seconds spread over all "
            f"{cores} cores, no start-up paid twice); measured {speedup:.2f}x, {speedup / ceiling:.0%} of it"
        )

    frames, audio = media[largest]
    base_wall, base_busy = runs[largest]["--workers 1"]
    print(
        f"\nper-stage seconds (--workers 1, {largest} files):",
        json.dumps({k: round(v, 1) for k, v in seconds.items()}),
    )
    faces_per_frame = seconds.get("faces", 0.0) / max(frames, 1)
    audio_text_per_s = (seconds.get("audio", 0.0) + seconds.get("text", 0.0)) / max(audio, 1e-9)
    hours = (faces_per_frame * AFFWILD2_FRAMES + audio_text_per_s * AFFWILD2_AUDIO_S) / 3600
    speedup = base_wall / runs[largest]["--workers auto"][0]
    print(
        f"Aff-Wild2 projection (2.9 M frames, 30 h audio): faces {faces_per_frame * 1000:.1f} ms/frame, "
        f"audio+text {audio_text_per_s:.3f} s per s of audio"
    )
    print(
        f"  one worker: {hours:.1f} h; --workers auto here ({speedup:.2f}x measured): {hours / speedup:.1f} h"
    )
    busy_one = base_busy / (base_wall * cores)
    print(
        f"  --workers 1 kept {busy_one:.0%} of the {cores} cores busy (its stages are multi-threaded); "
        f"projected on more cores (ideal: files long enough for start-up not to matter): "
        + ", ".join(f"{n} cores {hours * cores / n:.1f} h" for n in (4, 8, 16, 32, 64))
    )


if __name__ == "__main__":
    main()
