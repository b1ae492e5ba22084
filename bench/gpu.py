"""CUDA against CPU on the same clips, in one run: the faces stage, and `rcma extract` end to end.

1. Faces stage (`--visual-model none`, crops on) per clip set: PyAV decode-only frames/s (the
   floor), the stage on CPU (all cores), the stage on CUDA; ratios CUDA/CPU and stage/decode, and
   how closely the CUDA boxes and landmarks agree with the CPU ones (IoU, landmark error / eye
   distance).
2. `rcma extract --stage faces,audio --audio-model logmel` over COPIES copies of the clips:
   `--workers 1 --device cpu` (the baseline), `--workers auto --device cpu` (one process per core),
   `--workers auto` with CUDA (2 workers per GPU): wall time, video frames/s, ratio to the baseline.

Text and Whisper-based audio are left out: their weights cannot be carried to the GPU machine this
was written for (no network). Usage: python bench/gpu.py [--copies 4] [--json bench/out/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # so that bench/fusion.py is not `fusion`
sys.path.insert(1, str(REPO / "tests"))
sys.path.insert(2, str(REPO / "bench"))  # after the repository, so that `fusion` is the package

from conftest import CREMA_MP4, HAMILTON, PEXELS, SINGLE_FACE  # noqa: E402
from faces import decode_only, stage_run  # noqa: E402
from scaling import extract  # noqa: E402

from pipeline.faces import FacesStage, iou  # noqa: E402
from pipeline.runner import cpu_count  # noqa: E402

SETS = {
    "crema-d (6 clips, 480x360)": list(CREMA_MP4),
    "pexels woman (640x360)": [PEXELS],
    "pexels man (640x360)": [SINGLE_FACE],
    "hamilton (640x360, cuts)": [HAMILTON],
}
EXTRACT = ["--stage", "faces,audio", "--audio-model", "logmel", "--visual-model", "none", "--quiet"]


def best_of(repeat: int, fn, *args) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def agreement(a: list[dict], b: list[dict]) -> dict[str, float]:
    ious, errors, same = [], [], []
    for x, y in zip(a, b, strict=True):
        same.append(x["present"] == y["present"])
        for i in np.flatnonzero(x["present"] & y["present"]):
            ious.append(iou(x["boxes"][i], y["boxes"][i]))
            eye = np.linalg.norm(y["landmarks"][i, 0] - y["landmarks"][i, 1])
            errors.append(np.linalg.norm(x["landmarks"][i] - y["landmarks"][i], axis=1).mean() / eye)
    return {
        "same_presence": float(np.concatenate(same).mean()),
        "iou_mean": float(np.mean(ious)),
        "landmark_err_mean": float(np.mean(errors)),
    }


def faces_speed(repeat: int) -> list[dict]:
    stages = {
        device: FacesStage(visual_model="none", crops=True, device=device) for device in ("cpu", "cuda")
    }
    for stage in stages.values():
        stage.load()
        stage_run([SINGLE_FACE], stage)  # warm-up: kernels, cudnn autotuning
    rows = []
    for label, paths in SETS.items():
        decode_s, n = best_of(repeat, decode_only, paths)
        cpu_s, on_cpu = best_of(repeat, stage_run, paths, stages["cpu"])
        cuda_s, on_cuda = best_of(repeat, stage_run, paths, stages["cuda"])
        row = {
            "clips": label,
            "frames": n,
            "decode_fps": n / decode_s,
            "cpu_fps": n / cpu_s,
            "cuda_fps": n / cuda_s,
            "cuda_vs_cpu": cpu_s / cuda_s,
            "cuda_share_of_decode": decode_s / cuda_s,
            "cpu_share_of_decode": decode_s / cpu_s,
            **{f"cuda_vs_cpu_{k}": v for k, v in agreement(on_cuda, on_cpu).items()},
        }
        rows.append(row)
        print(
            f"faces {label:<28} decode {row['decode_fps']:7.0f} fps | CPU {row['cpu_fps']:6.0f} | CUDA "
            f"{row['cuda_fps']:6.0f} fps = {row['cuda_vs_cpu']:.2f}x CPU, "
            f"{row['cuda_share_of_decode']:.0%} of decode | "
            f"CUDA vs CPU IoU {row['cuda_vs_cpu_iou_mean']:.3f}, landmarks "
            f"{row['cuda_vs_cpu_landmark_err_mean']:.4f}",
            flush=True,
        )
    return rows


def extraction(copies: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="rcma-gpu-"))
    clips = folder / "clips"
    clips.mkdir()
    sources = [*CREMA_MP4, PEXELS, SINGLE_FACE, HAMILTON]
    for k in range(copies):
        for path in sources:
            shutil.copy(path, clips / f"{path.stem}-{k}{path.suffix}")
    frames = copies * decode_only(sources)
    runs = {}
    try:
        for name, extra in (
            ("--workers 1 --device cpu", ["--workers", "1", "--device", "cpu"]),
            ("--workers auto --device cpu", ["--workers", "auto", "--device", "cpu"]),
            ("--workers auto (CUDA)", ["--workers", "auto", "--device", "cuda"]),
        ):
            store = folder / name.split()[1] / name.split()[-1].strip("()").lower() / "store.h5"
            wall, _ = extract(clips, store, *extra, options=EXTRACT)
            run = runs[name] = {"wall_s": wall, "frames_per_s": frames / wall}
            run["vs_workers_1_cpu"] = runs["--workers 1 --device cpu"]["wall_s"] / wall
            print(
                f"extract {name:<30} {run['wall_s']:7.1f} s  {run['frames_per_s']:7.0f} video frames/s  "
                f"{run['vs_workers_1_cpu']:.2f}x --workers 1 on CPU",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"files": copies * len(sources), "video_frames": frames, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--copies", type=int, default=4, help="Copies of the 9 clips for the extract runs.")
    parser.add_argument("--skip-faces", action="store_true", help="Only the extract runs.")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: torch sees no CUDA device")
    results = {
        "machine": f"{platform.machine()}, {cpu_count()} cores, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}",
        "faces": [] if args.skip_faces else faces_speed(args.repeat),
    }
    results["extract"] = extraction(args.copies)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(results["machine"])


if __name__ == "__main__":
    main()
