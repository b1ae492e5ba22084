"""Which audio embedder (and text unit) is the default: each scored on real labelled speech, with its cost.

Embedders: log-mel (stats and flat), the output of each block of the shipped Whisper encoder
(tiny.en) and its final states (after the last layer norm) on torch, the final states with each
window padded to 30 s (as Whisper transcribes) and on CTranslate2 int8 (the text stage's own
model, shared), and any local wav2vec2 / HuBERT / WavLM checkpoint given with --ssl KIND=PATH.
Then the text stage's `--text-unit` (word-context, word, segment) on the same speech (its own
Whisper transcripts, MiniLM embeddings), scored the same way with text as the only input.

Speech: the 47 speech-va clips and the 12 CREMA-D clips (bench/speech.py), 59 in all. Every row
is cross-validated over the same folds (K folds by speaker where it is known: fold k tests, fold
k + 1 early-stops, the rest train), repeated over seeds (the seed also deals the folds):
- RCMA, audio only (the trainer, settings for short clips from bench/speech.py);
- ridge regression on each clip's mean embedding (standardised; the penalty picked on the
  validation fold), a baseline that needs no training loop.
Test CCC of valence and of arousal is the mean of the K folds' (over the test clips' frames);
each row prints its mean and spread (std) over seeds.

Cost: core-seconds per media-second (CPU time of this process, all threads, over media time) of
the stage's `run` on every clip, decoding included, models loaded and warmed up beforehand,
measured in the same run; and its ratio to log-mel stats, the cheapest.

    .venv/bin/python bench/audio.py [--seeds 3] [--folds 4] [--threads 1] [--ssl wavlm=PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

# This folder holds a fusion.py: look for modules in the repository first, not in bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:1] = [str(ROOT), str(ROOT / "tests")]
sys.path.append(str(ROOT / "bench"))
from speech import SPEECH, crema_d, group_of, speech_va  # noqa: E402
from speech_media import media_of  # noqa: E402
from synthetic import add_video  # noqa: E402

from fusion.metrics import ccc  # noqa: E402
from fusion.train import TrainConfig, fold_of_videos, train  # noqa: E402
from pipeline.audio import DEFAULT_AUDIO_MODEL, DEFAULT_WHISPER_WINDOW, AudioStage  # noqa: E402
from pipeline.stages import Rows, build_stage  # noqa: E402
from pipeline.store import rebuild_index  # noqa: E402
from pipeline.text import DEFAULT_TEXT_UNIT, TEXT_UNITS  # noqa: E402

OUT = ROOT / "bench" / "out" / "audio"
RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
TORCH = {"audio_model": "whisper-encoder", "asr_backend": "openai-whisper"}


def embedders(ssl: list[str]) -> list[tuple[str, str, dict]]:
    """(row name, stage, options) of every row."""
    probe = AudioStage(**TORCH, device="cpu")
    probe.load()
    blocks = probe.embedder.model.dims.n_audio_layer
    rows = [
        ("logmel stats", {"audio_model": "logmel"}),
        ("logmel flat", {"audio_model": "logmel", "logmel_pool": "flat"}),
        *[(f"whisper-encoder block {k} (torch)", {**TORCH, "audio_layer": k}) for k in range(blocks + 1)],
        ("whisper-encoder final (torch)", TORCH),
        ("whisper-encoder final, padded to 30 s (torch)", {**TORCH, "audio_window": "padded"}),
        (
            "whisper-encoder final (CTranslate2 int8, the text stage's model)",
            {"audio_model": "whisper-encoder"},
        ),
    ]
    for given in ssl:
        kind, _, path = given.partition("=")
        rows.append((f"{kind} ({Path(path).name})", {"audio_model": kind, "audio_weights": path}))
    audio = [(name, "audio", options) for name, options in rows]
    return audio + [(f"text, --text-unit {unit}", "text", {"text_unit": unit}) for unit in TEXT_UNITS]


def extract(stage_name: str, options: dict, clips: dict[Path, tuple[float, float]], store: Path) -> dict:
    """The labelled store of one stage's features, and its cost on these clips."""
    stage = build_stage(stage_name, {**options, "device": "cpu"})
    stage.load()
    medias = [media_of(clip) for clip in clips]
    list(stage.run(medias[0]))  # warm-up
    shutil.rmtree(store.parent, ignore_errors=True)
    store.parent.mkdir(parents=True)
    cpu = wall = media_s = 0.0
    for media, (valence, arousal) in zip(medias, clips.values(), strict=True):
        media = media_of(media.path)  # decoding is part of the cost
        started_cpu, started = time.process_time(), time.perf_counter()
        blocks = [b for b in stage.run(media) if isinstance(b, Rows)]
        cpu += time.process_time() - started_cpu
        wall += time.perf_counter() - started
        media_s += media.info.duration
        rows = {k: np.concatenate([b.arrays[k] for b in blocks]) for k in ("present", "embedding")}
        n = media.n_frames
        labels = (np.full(n, valence, np.float32), np.full(n, arousal, np.float32))
        add_video(store, media.path.stem, n, {stage_name: rows}, labels=labels)
    rebuild_index(store)
    return {
        "config": stage.config(),
        "dim": int(rows["embedding"].shape[1]),
        "core_s_per_media_s": cpu / media_s,
        "wall_s_per_media_s": wall / media_s,
        "media_s": media_s,
    }


def clip_means(store: Path, stage: str, videos: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clip-mean embedding of the present frames (zeros where none is), clip labels, frames per
    clip) in the order of `videos`."""
    import h5py

    from pipeline.store import shard_root

    x, y, n = [], [], []
    root = shard_root(store)
    for vid in videos:
        with h5py.File(root / stage / f"{vid}.h5") as f:
            present = f["present"][:]
            embedding = f["embedding"][:].astype(np.float64)
            x.append(embedding[present].mean(0) if present.any() else np.zeros(embedding.shape[1]))
        with h5py.File(root / "labels" / f"{vid}.h5") as f:
            y.append([f["valence"][0], f["arousal"][0]])
            n.append(len(present))
    return np.array(x), np.array(y, np.float64), np.array(n)


def _ridge(z: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Weights of ridge regression of centred `y` on standardised `z`."""
    return np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ y)


def _frame_ccc(pred: np.ndarray, true: np.ndarray, frames: np.ndarray) -> list[float]:
    """CCC per dimension over frames: each clip's value repeated over its frames."""
    pred, true = np.repeat(pred, frames, axis=0), np.repeat(true, frames, axis=0)
    return [ccc(pred[:, d], true[:, d]) for d in range(2)]


def ridge_scores(
    store: Path, stage: str, videos: list[str], groups: dict[str, str], folds: int, seed: int
) -> list[float]:
    """[valence CCC, arousal CCC]: each the mean over folds, on the test clips' frames."""
    x, y, n = clip_means(store, stage, videos)
    fold = np.array(fold_of_videos(videos, groups, folds, seed))
    per_fold = []
    for k in range(folds):
        test, val = fold == k, fold == (k + 1) % folds
        fit = ~test & ~val
        z = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-8)
        centre = y[fit].mean(0)

        def val_ccc(penalty: float, z=z, centre=centre, fit=fit, val=val) -> float:
            w = _ridge(z[fit], y[fit] - centre, penalty)
            return float(np.nanmean(_frame_ccc(z[val] @ w + centre, y[val], n[val])))

        best = max(RIDGE_PENALTIES, key=val_ccc)
        w = _ridge(z[fit | val], y[fit | val] - centre, best)
        per_fold.append(_frame_ccc(z[test] @ w + centre, y[test], n[test]))
    return list(np.nanmean(per_fold, axis=0))


def rcma_scores(store: Path, stage: str, groups_csv: Path, out: Path, folds: int, seed: int) -> list[float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        features=str(store),
        out=str(out),
        modalities=[stage],
        folds=folds,
        groups=str(groups_csv),
        seed=seed,
        device="cpu",
        **SPEECH,
    )
    result = train(cfg, quiet=True)
    tests = [f["test"] for f in result["folds"]["folds"]]
    return [float(np.mean([t[f"ccc_{d}"] for t in tests])) for d in ("valence", "arousal")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ssl", action="append", default=[], help="KIND=PATH: a local wav2vec2/hubert/wavlm")
    parser.add_argument("--only", default="", help="comma-separated row numbers (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clips = {**speech_va(), **crema_d()}
    groups = {clip.stem: group_of(clip) for clip in clips}
    OUT.mkdir(parents=True, exist_ok=True)
    groups_csv = OUT / "groups.csv"
    with groups_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "group"])
        writer.writerows(sorted(groups.items()))
    videos = sorted(groups)
    rows = embedders(args.ssl)
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(rows))
    results = []
    load = os.getloadavg()[0]
    began = time.perf_counter()
    for i in chosen:
        name, stage, options = rows[i]
        store = OUT / f"row-{i:02d}" / "store.h5"
        row = {"row": name, "stage": stage, "options": options, **extract(stage, options, clips, store)}
        rcma = [
            rcma_scores(store, stage, groups_csv, OUT / f"row-{i:02d}" / f"run-{s}", args.folds, s)
            for s in range(args.seeds)
        ]
        ridge = [ridge_scores(store, stage, videos, groups, args.folds, s) for s in range(args.seeds)]
        for method, scores in (("rcma", np.array(rcma)), ("ridge", np.array(ridge))):
            row[method] = {
                "per_seed": scores.tolist(),
                "mean": scores.mean(0).tolist(),
                "std": scores.std(0).tolist(),
            }
        results.append(row)
        r, g = row["rcma"], row["ridge"]
        print(
            f"{i:2d} {name:66s} RCMA V {r['mean'][0]:.3f}±{r['std'][0]:.3f} "
            f"A {r['mean'][1]:.3f}±{r['std'][1]:.3f} "
            f"| ridge V {g['mean'][0]:.3f} A {g['mean'][1]:.3f} | {row['core_s_per_media_s']:.4f} core-s/s",
            flush=True,
        )
    base = next((r["core_s_per_media_s"] for r in results if r["row"] == "logmel stats"), None)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(
        f"\n{len(clips)} clips ({results[0]['media_s']:.0f} s of speech), {args.seeds} seeds x "
        f"{args.folds} folds, {time.perf_counter() - began:.0f} s; {machine}; load average {load:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end. Default now: {DEFAULT_AUDIO_MODEL} "
        f"(whisper-encoder window: {DEFAULT_WHISPER_WINDOW}); text unit: {DEFAULT_TEXT_UNIT}."
    )
    header = "embedder | dim | RCMA valence | RCMA arousal | ridge valence | ridge arousal | core-s / media-s"
    print(f"\n| {header} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in results:
        r, g = row["rcma"], row["ridge"]
        cost = f"{row['core_s_per_media_s']:.4f}" + (
            f" ({row['core_s_per_media_s'] / base:.1f}x)" if base else ""
        )
        print(
            f"| {row['row']} | {row['dim']} | {r['mean'][0]:.3f} ± {r['std'][0]:.3f} | {r['mean'][1]:.3f} ± "
            f"{r['std'][1]:.3f} | {g['mean'][0]:.3f} ± {g['std'][0]:.3f} | {g['mean'][1]:.3f} ± "
            f"{g['std'][1]:.3f} | {cost} |"
        )
    # Rows of earlier runs (`--only`) are kept unless rerun here.
    saved = OUT / "audio.json"
    kept = json.loads(saved.read_text())["rows"] if saved.exists() else []
    kept = [r for r in kept if r["row"] not in {row["row"] for row in results}]
    saved.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": kept + results}, indent=2))


if __name__ == "__main__":
    main()
