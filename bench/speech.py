"""The labelled real speech the benchmarks score on, and the trainer settings for short clips.

- speech-va: 47 clips (1.5-6.8 s, film/TV-like English), one valence and one arousal each
  (data/speech-va/labels_va.csv); speakers are not known, so each clip is its own group.
- CREMA-D: actors 1001 (mp4) and 1002 (mp3), one sentence in six acted emotions; each emotion's
  point on the valence/arousal circle is rcma's mapping in data/crema-d/labels_va.csv (given there
  for actor 1001's clips, read from the emotion code in the file name for both actors); grouped
  by actor, so no actor is in both training and test.
"""

from __future__ import annotations

import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
# Trainer settings for clips of 45-200 frames (the trainer's defaults are for long videos).
SPEECH = dict(
    window=64,
    hop=32,
    eval_hop=32,
    width=32,
    dropout=0.3,
    batch_size=8,
    epochs=20,
    patience=8,
    warmup_steps=10,
)


def _labels(path: Path) -> dict[str, tuple[float, float]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return {row["file"]: (float(row["valence"]), float(row["arousal"])) for row in csv.DictReader(f)}


def speech_va() -> dict[Path, tuple[float, float]]:
    """speech-va clip -> (valence, arousal)."""
    return {DATA / name: va for name, va in _labels(DATA / "speech-va" / "labels_va.csv").items()}


def crema_d() -> dict[Path, tuple[float, float]]:
    """Every CREMA-D clip in data/ with its emotion's (valence, arousal), one file per clip."""
    crema = DATA / "crema-d"
    by_emotion = {Path(name).stem.split("_")[2]: va for name, va in _labels(crema / "labels_va.csv").items()}
    clips = [*sorted((crema / "mp4").glob("*.mp4")), *sorted((crema / "AudioMP3").glob("*.mp3"))]
    return {clip: by_emotion[clip.stem.split("_")[2]] for clip in clips}


def group_of(clip: Path) -> str:
    """The speaker where known (a CREMA-D actor), else the clip itself."""
    return f"actor-{clip.stem.split('_')[0]}" if "_" in clip.stem else clip.stem
