"""Fusion ablation: single modalities, concatenation and RCMA with each option on and off.

Three tasks, every row cross-validated (K folds by video: fold k tests, fold k + 1 early-stops,
the rest train; no test fold is ever looked at while training) and repeated over seeds:

- interaction: synthetic, audio carries a(t), visual v(t), valence = a(t) v(t): fusion must win;
- speech: the 47 labelled speech clips in data/speech-va, audio = Whisper-encoder states, text =
  MiniLM embeddings of their own Whisper transcripts;
- speech, text uninformative: the same clips, each given the text features of a CREMA-D clip
  (every CREMA-D clip says "Don't forget a jacket"), so text carries nothing: fusion must not lose
  to audio alone.

Each row prints the mean over seeds of the test CCC (mean of the K folds' test CCC), its spread
(std over seeds), and its ratio to the best single modality of the same task, measured in the same
run. Features are extracted once into bench/out/ and reused. `python bench/fusion.py --help`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

# This file is named like the package it measures: look for modules in the repository, not in bench/.
sys.path[:1] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
sys.path.append(str(Path(__file__).resolve().parent))
from speech import SPEECH, speech_va  # noqa: E402
from synthetic import add_video, interaction_store  # noqa: E402

from fusion.train import TrainConfig, train  # noqa: E402
from pipeline import runner  # noqa: E402
from pipeline.stages import build_stage  # noqa: E402
from pipeline.store import rebuild_index  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
OUT = ROOT / "bench" / "out"
# Every row names each setting it depends on, so a change of defaults does not change the rows.
BEFORE = dict(tied=True, gate="none", tcn_norm=False, presence=False, normalise=False, modality_dropout=0.0)
UNTIED = {**BEFORE, "tied": False}
NORMALISED = {**UNTIED, "tcn_norm": True, "normalise": True, "presence": True}
AUTHORS = dict(attention="authors", attention_dropout=0.6, joint_linear=True, head="authors")
GATED = {**NORMALISED, "gate": "residual"}
ROWS: list[tuple[str, str, dict]] = [
    ("first modality alone", "first", NORMALISED),
    ("second modality alone", "second", NORMALISED),
    ("concatenation", "both", {**NORMALISED, "fusion": "concat"}),
    (
        "concatenation, modality dropout 0.5",
        "both",
        {**NORMALISED, "fusion": "concat", "modality_dropout": 0.5},
    ),
    ("RCMA as landed (tied, no normalisation, no gate)", "both", BEFORE),
    ("+ untied weights", "both", UNTIED),
    ("+ normalisation and presence flags", "both", NORMALISED),
    ("+ the authors' extras (dropout 0.6 on C and update, ...)", "both", {**NORMALISED, **AUTHORS}),
    ("+ residual gate", "both", GATED),
    ("+ GRJCA gates (instead of the residual gate)", "both", {**NORMALISED, "gate": "grjca"}),
    ("+ residual gate, modality dropout 0.5", "both", {**GATED, "modality_dropout": 0.5}),
    (
        "+ residual gate, modality dropout 0.5, the authors' extras",
        "both",
        {**GATED, "modality_dropout": 0.5, **AUTHORS},
    ),
    ("RCMA with rcma's defaults", "both", {}),
]
SYNTHETIC = dict(window=32, hop=16, eval_hop=16, width=32, batch_size=16, warmup_steps=20, lr=3e-3, epochs=8)


def extract_speech(store: Path) -> Path:
    """Whisper-encoder audio and MiniLM text of the speech clips and the CREMA-D clips, once."""
    if store.exists():
        return store
    jobs, _ = runner.discover([*sorted((DATA / "speech-va").glob("*.wav")), DATA / "crema-d" / "mp4"])
    # The features the documented rows were measured with, whatever the defaults are now.
    audio = {"audio_model": "whisper-encoder", "audio_window": "padded", "asr_backend": "openai-whisper"}
    stages = [build_stage("audio", audio), build_stage("text", {"text_unit": "word-context"})]
    outcomes = runner.run_local(jobs, runner.Extractor(store, stages))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit(f"extraction failed: {failed[0].error}")
    return store


def speech_stores(features: Path) -> tuple[Path, Path]:
    """Two labelled stores built from the extracted features: real text, and CREMA-D's text."""
    real, fixed = OUT / "speech-real.h5", OUT / "speech-crema-text.h5"
    if real.exists() and fixed.exists():
        return real, fixed
    labels = {path.stem: va for path, va in speech_va().items()}
    with h5py.File(features) as f:
        videos = f["videos"]
        crema = sorted(v for v in videos if not v.isdigit())
        donors = [(videos[c]["text/embedding"][:], videos[c]["text/present"][:]) for c in crema]
        for i, vid in enumerate(sorted(labels)):
            g = videos[vid]
            n = int(g.attrs["n_frames"])
            audio = {"present": g["audio/present"][:], "embedding": g["audio/embedding"][:]}
            y = tuple(np.full(n, value, np.float32) for value in labels[vid])
            text = {"present": g["text/present"][:], "embedding": g["text/embedding"][:]}
            add_video(real, vid, n, {"audio": audio, "text": text}, labels=y)
            embedding, present = donors[i % len(donors)]
            text = {
                "present": np.resize(present, n),
                "embedding": np.resize(embedding, (n, embedding.shape[1])),
            }
            add_video(fixed, vid, n, {"audio": audio, "text": text}, labels=y)
    for store in (real, fixed):
        rebuild_index(store)
    return real, fixed


def run(task: str, store: Path, pair: list[str], settings: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, which, overrides in ROWS:
        modalities = {"first": pair[:1], "second": pair[1:], "both": pair}[which]
        if which != "both":
            name = f"{modalities[0]} alone"
        scores = []
        began = time.perf_counter()
        for seed in range(args.seeds):
            out = OUT / "fusion-runs" / task / f"{len(rows):02d}" / f"seed-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = TrainConfig(
                features=str(store),
                out=str(out),
                modalities=modalities,
                folds=args.folds,
                seed=seed,
                device="cpu",
                **{**settings, **overrides},
            )
            result = train(cfg, quiet=True)
            scores.append(result["folds"]["test_ccc_mean"])
        rows.append(
            {
                "task": task,
                "row": name,
                "settings": overrides,
                "test_ccc": scores,
                "mean": float(np.mean(scores)),
                "std": float(np.std(scores)),
                "seconds": time.perf_counter() - began,
            }
        )
        r = rows[-1]
        print(f"{task:28s} {name:58s} {r['mean']:.3f} ± {r['std']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    best_single = max(r["mean"] for r in rows[:2])
    for r in rows:
        r["vs_best_single"] = r["mean"] / best_single if best_single > 0 else float("nan")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--tasks", default="interaction,speech,speech-uninformative-text")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    rows = []
    began = time.perf_counter()
    if "interaction" in tasks:
        store = OUT / "interaction.h5"
        if not store.exists():
            interaction_store(store)
        rows += run("interaction", store, ["audio", "visual"], SYNTHETIC, args)
    if {"speech", "speech-uninformative-text"} & set(tasks):
        real, fixed = speech_stores(extract_speech(OUT / "fusion.h5"))
        if "speech" in tasks:
            rows += run("speech", real, ["audio", "text"], SPEECH, args)
        if "speech-uninformative-text" in tasks:
            rows += run("speech-uninformative-text", fixed, ["audio", "text"], SPEECH, args)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    seconds = time.perf_counter() - began
    print(f"\n{len(rows)} rows, {args.seeds} seeds x {args.folds} folds, {seconds:.0f} s; {machine}")
    print("\n| task | model | test CCC (mean ± std over seeds) | / best single |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['row']} | {r['mean']:.3f} ± {r['std']:.3f} | {r['vs_best_single']:.2f} |")
    (OUT / "fusion.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
