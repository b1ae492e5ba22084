"""Extraction on every core: `rcma extract --stage all` with --workers 1 against --workers auto.

On the same real clips (data/: six CREMA-D clips, a Pexels clip, JFK; --visual-model none, CPU),
each run in a fresh store:

1. `--workers 1` (the baseline: one process, one file after another),
2. `--workers auto` (a Dask LocalCluster: one worker process per core),
3. `--scheduler` on a `dask scheduler` + one `dask worker --nthreads 1` started beforehand (the
   cluster path with one worker, against run 1: Dask's overhead).

For each: wall time, ratio to the baseline, and CPU utilisation = busy core-seconds (user + system
time of the command and every process it started) / (wall x cores). Run 3's worker is not a child
of the command, so only its wall time is compared. From run 1's per-stage seconds (recorded in
every shard) the hours for Aff-Wild2 (2.9 M frames, 30 h of audio) are projected, on one worker
and per worker added. The load average is printed with the figures: on a shared machine they
are noisy. Usage: python bench/scaling.py [--skip-cluster] [--copies N]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cluster", action="store_true", help="Leave out the dask scheduler run.")
    parser.add_argument(
        "--copies", type=int, default=1, help="Copies of the clips (more files: fixed costs amortised)."
    )
    args = parser.parse_args()
    cores = cpu_count()
    folder = Path(tempfile.mkdtemp(prefix="rcma-scaling-"))
    clips = folder / "clips"
    clips.mkdir()
    sources = [*CREMA_MP4, SINGLE_FACE, JFK]
    for k in range(args.copies):
        for path in sources:
            shutil.copy(path, clips / f"{path.stem}-{k}{path.suffix}")
    load_before = os.getloadavg()
    runs: dict[str, tuple[float, float]] = {}
    try:
        runs["--workers 1"] = extract(clips, folder / "one" / "store.h5", "--workers", "1")
        runs["--workers auto"] = extract(clips, folder / "auto" / "store.h5", "--workers", "auto")
        if not args.skip_cluster:
            cluster = OneWorkerCluster(folder)
            try:
                runs["--scheduler (1 worker)"] = extract(
                    clips, folder / "dask" / "store.h5", "--scheduler", str(cluster.file)
                )
            finally:
                cluster.close()
        seconds = stage_seconds(folder / "one" / "store.h5")
        frames, audio = media_totals(folder / "one" / "store.h5")
    finally:
        load_after = os.getloadavg()
        shutil.rmtree(folder, ignore_errors=True)

    n_files = len(sources) * args.copies
    print(f"machine: {cores} cores; {n_files} files ({frames} video frames, {audio:.1f} s of audio)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min; a shared machine)")
    base_wall = runs["--workers 1"][0]
    print(f"\n{'run':<24}{'wall s':>9}{'vs --workers 1':>16}{'CPU utilisation':>18}")
    for name, (wall, busy) in runs.items():
        utilisation = f"{busy / (wall * cores):.0%}" if "scheduler" not in name else "(worker not a child)"
        print(f"{name:<24}{wall:>9.1f}{base_wall / wall:>15.2f}x{utilisation:>18}")

    print("\nper-stage seconds (--workers 1):", json.dumps({k: round(v, 1) for k, v in seconds.items()}))
    faces_per_frame = seconds.get("faces", 0.0) / max(frames, 1)
    audio_text_per_s = (seconds.get("audio", 0.0) + seconds.get("text", 0.0)) / max(audio, 1e-9)
    hours = (faces_per_frame * AFFWILD2_FRAMES + audio_text_per_s * AFFWILD2_AUDIO_S) / 3600
    speedup = base_wall / runs["--workers auto"][0]
    print(
        f"Aff-Wild2 projection (2.9 M frames, 30 h audio): faces {faces_per_frame * 1000:.1f} ms/frame, "
        f"audio+text {audio_text_per_s:.3f} s per s of audio"
    )
    print(
        f"  one worker: {hours:.1f} h; --workers auto here ({speedup:.2f}x measured): {hours / speedup:.1f} h"
    )
    busy_one = runs["--workers 1"][1] / (runs["--workers 1"][0] * cores)
    ceiling = runs["--workers 1"][0] / (runs["--workers 1"][1] / cores)
    print(
        f"  ceiling for --workers auto here: {ceiling:.2f}x (--workers 1's busy core-seconds spread "
        f"over all {cores} cores, no start-up paid twice); measured {speedup:.2f}x, "
        f"{speedup / ceiling:.0%} of it"
    )
    print(
        f"  --workers 1 kept {busy_one:.0%} of the {cores} cores busy (its stages are multi-threaded); "
        f"projected on more cores (ideal: files long enough for start-up not to matter): "
        + ", ".join(f"{n} cores {hours * cores / n:.1f} h" for n in (4, 8, 16, 32, 64))
    )


if __name__ == "__main__":
    main()
