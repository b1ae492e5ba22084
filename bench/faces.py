"""Speed, accuracy and memory of the faces stage, against a naive full-resolution MTCNN loop.

Per clip set, in the same run and with the same torch thread count:
- decode: PyAV decoding to RGB alone (iter_video_frames, swscale's conversion), the floor for a
  stage that reads frames as PyAV gives them; *dec cv*: the same with the OpenCV conversion the
  faces stage uses (pipeline.faces.RGB_CONVERSION), the floor for this stage;
- naive: decode, then facenet-pytorch `MTCNN()` with default settings, `detect` on one
  full-resolution frame at a time, timed with 1 and with 2 torch threads, keeping the faster;
- stage: FacesStage(visual_model="none") as the runner drives it: tracking, alignment, 112x112 crops
  (the runner builds the frame grid in the same decoding pass; here the grid is decoded beforehand,
  untimed, so *stage* is the stage's own time, decoding included).
Clip sets: the 360p clips of data/, the HD talking heads of data/liveportrait/ (1280x720 and a
720x1280 phone video), and a 1920x1080 clip made in the run by upscaling the 1280x720 one
(make_hd_video: a re-encode of a real clip, written to a temporary folder), each row with its own
decode fps and ratios. `--repeat` rounds run every workload once per clip set; each keeps its
best time. The stage runs its detector on one thread (DETECTOR_CPU_THREADS) and decodes on another.

Accuracy is against the naive loop's detections (the full-resolution default detector): per frame
where both found a face, the IoU of the stage's box with the best-matching default box, and the
mean landmark distance divided by that default face's inter-ocular distance.

Memory: peak RSS of a fresh process that runs the stage over a short clip, and over a video of at
least ten minutes made by re-encoding and looping the real clips (written to a temporary folder,
deleted after).

    .venv/bin/python bench/faces.py [--repeat 2] [--threads 2] [--skip-long] [--long-minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import torch  # noqa: E402

from pipeline.faces import RGB_CONVERSION, FacesStage, iou  # noqa: E402
from pipeline.media import Media, frame_grid, iter_video_frames, probe  # noqa: E402

DATA = ROOT / "data"
HD_SOURCE = DATA / "liveportrait" / "s18.mp4"
HD_SIZE = (1920, 1080)
HD_LABEL = "s18 re-encoded (1920x1080)"
SETS = {
    "crema-d (6 clips, 480x360)": sorted((DATA / "crema-d" / "mp4").glob("*.mp4")),
    "pexels woman (640x360)": [DATA / "pexels" / "WolfgangLanger_Pexels.mp4"],
    "pexels man (640x360)": [DATA / "pexels" / "single_face.mp4"],
    "hamilton (640x360, cuts)": [DATA / "hamilton" / "short_hamilton_clip.mp4"],
    "liveportrait s18 (1280x720)": [DATA / "liveportrait" / "s18.mp4"],
    "liveportrait d13 (720x1280)": [DATA / "liveportrait" / "d13.mp4"],
}  # and HD_LABEL, made in the run (make_hd_video)
LONG_SOURCES = [DATA / "pexels" / "WolfgangLanger_Pexels.mp4", DATA / "hamilton" / "short_hamilton_clip.mp4"]
LONG_SIZE = (640, 360)
NAIVE_THREADS = sorted({1, min(2, os.cpu_count() or 1)})


def media_for(path: Path) -> Media:
    info = probe(path)
    return Media(path, path.stem, info, frame_grid(path, info))


def decode_only(paths: list[Path], conversion: str = "swscale") -> int:
    return sum(len(times) for path in paths for times, _ in iter_video_frames(path, conversion=conversion))


def naive(paths: list[Path], mtcnn) -> list[list]:
    out = []
    for path in paths:
        clip = []
        for _, frames in iter_video_frames(path):
            for frame in frames:
                boxes, _, points = mtcnn.detect(frame, landmarks=True)
                clip.append((boxes, points))
        out.append(clip)
    return out


def stage_run(paths: list[Path], stage: FacesStage) -> list[dict[str, np.ndarray]]:
    out = []
    for path in paths:
        blocks = list(stage.run(media_for(path)))
        out.append(
            {k: np.concatenate([b.arrays[k] for b in blocks]) for k in ("present", "boxes", "landmarks")}
        )
    return out


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def accuracy(reference: list[list], ours: list[dict[str, np.ndarray]]) -> dict[str, float]:
    ious, errors = [], []
    both = ref_only = ours_only = 0
    for clip_ref, clip in zip(reference, ours, strict=True):
        for i, (boxes, points) in enumerate(clip_ref):
            found = boxes is not None and len(boxes) > 0
            present = bool(clip["present"][i])
            ref_only += found and not present
            ours_only += present and not found
            if not (found and present):
                continue
            both += 1
            overlaps = [iou(clip["boxes"][i], b) for b in boxes]
            k = int(np.argmax(overlaps))
            ious.append(overlaps[k])
            ref_points = np.asarray(points[k], dtype=np.float64)
            eye = np.linalg.norm(ref_points[0] - ref_points[1])
            errors.append(np.linalg.norm(clip["landmarks"][i] - ref_points, axis=1).mean() / eye)
    return {
        "frames_both": both,
        "frames_default_only": ref_only,
        "frames_stage_only": ours_only,
        "iou_mean": float(np.mean(ious)) if ious else float("nan"),
        "iou_p5": float(np.percentile(ious, 5)) if ious else float("nan"),
        "landmark_err_mean": float(np.mean(errors)) if errors else float("nan"),
        "landmark_err_p95": float(np.percentile(errors, 95)) if errors else float("nan"),
    }


def speed_and_accuracy(repeat: int, stage_threads: int) -> list[dict]:
    from facenet_pytorch import MTCNN

    mtcnn = MTCNN()
    stage = FacesStage(visual_model="none", crops=True, device="cpu")
    stage.load()
    warm = SETS["pexels man (640x360)"][:1]
    naive(warm, mtcnn), stage_run(warm, stage), decode_only(warm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {**SETS, HD_LABEL: [make_hd_video(Path(tmp) / "hd.mp4")]}
        for label, paths in sets.items():
            rows.append(speed_and_accuracy_row(label, paths, repeat, stage_threads, mtcnn, stage))
    return rows


def speed_and_accuracy_row(
    label: str, paths: list[Path], repeat: int, stage_threads: int, mtcnn, stage: FacesStage
) -> dict:
    """One clip set's speeds (each workload's best of `repeat` rounds, in the same run) and accuracy."""
    best = {"decode": np.inf, "decode_cv": np.inf, "naive": np.inf, "stage": np.inf}
    reference = ours = None
    n = 0
    for _ in range(repeat):
        seconds, n = timed(decode_only, paths)
        best["decode"] = min(best["decode"], seconds)
        seconds, _ = timed(decode_only, paths, RGB_CONVERSION)
        best["decode_cv"] = min(best["decode_cv"], seconds)
        for threads in NAIVE_THREADS:  # the naive loop gets whichever thread count suits it best
            torch.set_num_threads(threads)
            seconds, reference = timed(naive, paths, mtcnn)
            best["naive"] = min(best["naive"], seconds)
        torch.set_num_threads(stage_threads)
        seconds, ours = timed(stage_run, paths, stage)
        best["stage"] = min(best["stage"], seconds)
    fps = {k: n / v for k, v in best.items()}
    row = {"set": label, "frames": n, "fps": fps, **accuracy(reference, ours)}
    print_row(row)
    return row


def print_row(row: dict) -> None:
    fps = row["fps"]
    print(
        f"{row['set']:<27} {row['frames']:>6} {fps['decode']:>7.0f} {fps['decode_cv']:>7.0f} "
        f"{fps['naive']:>6.1f} {fps['stage']:>6.1f} {fps['stage'] / fps['naive']:>7.2f}x "
        f"{fps['stage'] / fps['decode']:>5.2f} {fps['stage'] / fps['decode_cv']:>5.2f} "
        f"{row['iou_mean']:>6.3f} {row['iou_p5']:>6.3f} {row['landmark_err_mean']:>6.3f} "
        f"{row['landmark_err_p95']:>6.3f} {row['frames_default_only']:>4} {row['frames_stage_only']:>4}",
        flush=True,
    )


def make_hd_video(path: Path, source: Path = HD_SOURCE, size: tuple[int, int] = HD_SIZE) -> Path:
    """`source` upscaled (bicubic) to `size` and re-encoded as H.264: the same real face, at 1080p."""
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        video = src.streams.video[0]
        rate = video.average_rate
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for index, frame in enumerate(src.decode(video)):
            image = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
            image.pts = index
            image.time_base = 1 / Fraction(rate)
            out.mux(stream.encode(image))
        out.mux(stream.encode(None))
    return path


def make_long_video(path: Path, minutes: float, fps: int) -> int:
    """Loops the real clips, resized to one size, into an H.264 video of `minutes` at `fps`."""
    total = int(minutes * 60 * fps)
    written = 0
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = LONG_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        while written < total:
            for source in LONG_SOURCES:
                with av.open(str(source)) as src:
                    for frame in src.decode(video=0):
                        if written >= total:
                            break
                        image = frame.reformat(width=LONG_SIZE[0], height=LONG_SIZE[1], format="yuv420p")
                        image.pts = written
                        image.time_base = Fraction(1, fps)
                        out.mux(stream.encode(image))
                        written += 1
        out.mux(stream.encode(None))
    return written


def memory_child(path: str, threads: int) -> None:
    """Runs the stage over one video in this fresh process and prints its RSS figures as JSON."""
    torch.set_num_threads(threads)
    media = media_for(Path(path))
    stage = FacesStage(visual_model="none", crops=True, device="cpu")
    stage.load()
    loaded = _rss_mib()
    started = time.perf_counter()
    rows = 0
    quarters: list[float] = []  # peak RSS when each quarter of the video is done: flat if nothing grows
    for block in stage.run(media):
        rows += len(block)
        while rows >= (len(quarters) + 1) * media.n_frames / 4:
            quarters.append(_peak_mib())
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "frames": rows,
                "seconds": seconds,
                "rss_loaded_mib": loaded,
                "rss_peak_mib": _peak_mib(),
                "rss_peak_by_quarter_mib": quarters,
            }
        )
    )


def _peak_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: a child started by vfork and
    exec (as subprocess starts it) can inherit the parent's peak in ru_maxrss."""
    return _status_mib("VmHWM:")


def _rss_mib() -> float:
    return _status_mib("VmRSS:")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(threads: int, skip_long: bool, minutes: float, long_fps: int) -> list[dict]:
    videos = [("short: pexels woman, 19.7 s", DATA / "pexels" / "WolfgangLanger_Pexels.mp4")]
    with tempfile.TemporaryDirectory() as tmp:
        if not skip_long:
            long_path = Path(tmp) / "long.mp4"
            frames = make_long_video(long_path, minutes, long_fps)
            videos.append(
                (f"long: looped clips, {minutes:g} min ({frames} frames at {long_fps} fps)", long_path)
            )
        results = []
        for label, path in videos:
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(path), "--threads", str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = {"video": label, **json.loads(child.stdout.strip().splitlines()[-1])}
            results.append(result)
            quarters = " ".join(f"{q:.0f}" for q in result["rss_peak_by_quarter_mib"])
            print(
                f"{label:<52} {result['frames']:>6} {result['rss_loaded_mib']:>8.0f} "
                f"{result['rss_peak_mib']:>8.0f} {result['rss_peak_mib'] - result['rss_loaded_mib']:>8.0f} "
                f"{result['frames'] / result['seconds']:>6.1f}  {quarters}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-long", action="store_true", help="memory on the short clip only")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--long-fps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "faces.json")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} torch threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes skew timings)"
    )
    report: dict = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "load_before": os.getloadavg(),
    }
    if not args.skip_speed:
        print(
            f"\n{'set':<27} {'frames':>6} {'decode':>7} {'dec cv':>7} {'naive':>6} {'stage':>6} "
            f"{'vs naive':>8} {'/dec':>5} {'/cv':>5} {'IoU':>6} {'IoU p5':>6} {'lm err':>6} {'lm p95':>6} "
            f"{'ref+':>4} {'ours+':>4}"
        )
        print(f"{'':<27} {'':>6} {'fps':>7} {'fps':>7} {'fps':>6} {'fps':>6}")
        report["speed"] = speed_and_accuracy(args.repeat, args.threads)
        report["load_after_speed"] = os.getloadavg()
        print(f"load average after the speed runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_memory:
        print(
            f"\n{'memory (fresh process per video)':<52} {'frames':>6} {'loaded':>8} {'peak':>8} "
            f"{'growth':>8} {'fps':>6}  peak after each quarter (MiB)"
        )
        print(f"{'':<52} {'':>6} {'MiB':>8} {'MiB':>8} {'MiB':>8}")
        report["memory"] = memory(args.threads, args.skip_long, args.long_minutes, args.long_fps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
