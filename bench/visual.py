"""Which visual embedder carries expression: each one on real labelled faces, in the same run.

Embedders: `raw` (the aligned 112x112 crop in gray, area-downscaled to 16x16: the floor), `fer`
(the default, pipeline/fer.py), and any `--model` (vggface2, or a TorchScript / ONNX file), all
on the same aligned crops, made once by rcma's faces stage (`--store` keeps them for a re-run).

Per embedder, on clip-mean features (each dimension standardised by the training frames' mean
and std, then each person's mean over their clips removed):
- emotion: nearest-centroid accuracy, one centroid per emotion, leave-one-person-out;
- valence sign: the same with two centroids, positive and negative valence (clips with valence 0,
  CREMA-D's neutral, are left out);
- ms per face on the CPU (`--threads` torch threads, batches of BATCH, best of `--repeat`), and as
  a ratio to `raw`'s time in the same run;
and the whole faces stage's frames a second with `--visual-model none` and with `fer`, taking turns.
With one person (the repo's CREMA-D actor 1001, 6 clips) there is nobody to leave out: each clip
is cut into its first and second half, the halves are the two "persons" (train on one, test on
the other), and the output says so. That split measures separation within one face and one
session, not generalisation to new people: a held-out set is given by `--clips DIR --labels CSV`
(columns: clip (file name or stem in DIR), person, emotion, valence).

    .venv/bin/python bench/visual.py [--model PATH_OR_NAME ...] [--clips DIR --labels CSV]
        [--store crops.h5] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import torch  # noqa: E402

from pipeline import runner, visual  # noqa: E402
from pipeline.faces import FacesStage  # noqa: E402
from pipeline.media import Media, frame_grid, probe  # noqa: E402
from pipeline.store import open_store  # noqa: E402

CREMA = ROOT / "data" / "crema-d"
CREMA_VALENCE = {"happy": 1.0, "neutral": 0.0}  # every other CREMA-D emotion is unpleasant: -1
RAW = "raw"
RAW_SIZE = 16  # pixels a side of the gray `raw` features
BATCH = 64  # faces an embedder is given at once
SPLIT_SUFFIX = ("first half", "second half")


@dataclass(frozen=True)
class Clip:
    path: Path
    person: str
    emotion: str
    valence: float


def crema_clips() -> list[Clip]:
    """The repo's CREMA-D clips (actor 1001), labelled by their intended emotion."""
    clips = []
    with open(CREMA / "labels_subset.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = ROOT / "data" / row["file"]
            if path.suffix == ".mp4":
                emotion = row["intended_emotion"]
                clips.append(Clip(path, row["actor"], emotion, CREMA_VALENCE.get(emotion, -1.0)))
    return clips


def labelled_clips(folder: Path, labels: Path) -> list[Clip]:
    """Clips of `folder` named in the `labels` CSV (clip, person, emotion, valence)."""
    files = {p.name: p for p in folder.rglob("*") if p.is_file()} | {
        p.stem: p for p in folder.rglob("*") if p.is_file()
    }
    clips = []
    with open(labels, newline="") as f:
        for row in csv.DictReader(f):
            if row["clip"] not in files:
                raise SystemExit(f"{labels}: clip {row['clip']} is not in {folder}")
            clips.append(Clip(files[row["clip"]], row["person"], row["emotion"], float(row["valence"])))
    return clips


def aligned_faces(clips: list[Clip], store: Path) -> dict[Path, np.ndarray]:
    """Each clip's aligned crops of the frames where rcma's faces stage found the face."""
    jobs, _ = runner.discover([c.path for c in clips])
    outcomes = runner.extract(
        jobs, store, [("faces", {"visual_model": visual.NONE, "device": "cpu"})], workers=1
    )
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit(f"{failed[0].source}: {failed[0].error}")
    ids = {Path(o.source).resolve(): o.video_id for o in outcomes}
    with open_store(store) as f:
        faces = {}
        for clip in clips:
            group = f[f"videos/{ids[clip.path.resolve()]}/faces"]
            faces[clip.path] = group["crops"][:][group["present"][:]]
    return faces


def raw_features(faces: np.ndarray) -> np.ndarray:
    gray = [
        cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (RAW_SIZE, RAW_SIZE), interpolation=cv2.INTER_AREA)
        for f in faces
    ]
    return np.stack(gray).reshape(len(faces), -1).astype(np.float32) / 255.0


def timed(
    embed: Callable[[np.ndarray], np.ndarray], faces: np.ndarray, repeat: int
) -> tuple[np.ndarray, float]:
    """embed(faces) in batches, and its best time over `repeat` runs in ms per face."""
    embed(faces[:BATCH])  # warm-up
    best, out = float("inf"), np.zeros(0)
    for _ in range(repeat):
        start = time.perf_counter()
        out = np.concatenate([embed(faces[i : i + BATCH]) for i in range(0, len(faces), BATCH)])
        best = min(best, time.perf_counter() - start)
    return out, 1000 * best / len(faces)


def evaluation_sets(
    clips: list[Clip], frames: dict[Path, np.ndarray]
) -> tuple[list[Clip], dict[Clip, np.ndarray], str]:
    """The clips to evaluate on and their frames' features, and the protocol in words: the clips
    as they are with two or more persons; with one, each clip's halves as two persons."""
    if len({c.person for c in clips}) > 1:
        return clips, {c: frames[c.path] for c in clips}, "leave-one-person-out"
    split: dict[Clip, np.ndarray] = {}
    for clip in clips:
        x = frames[clip.path]
        for k, part in enumerate((x[: len(x) // 2], x[len(x) // 2 :])):
            split[Clip(clip.path, f"{clip.person} {SPLIT_SUFFIX[k]}", clip.emotion, clip.valence)] = part
    protocol = (
        "one person only: within-person split (train on each clip's first half, test on its second, "
        "and the reverse), not held-out people"
    )
    return list(split), split, protocol


def separation(clips: list[Clip], frames: dict[Path, np.ndarray]) -> tuple[float, float, str]:
    """(emotion accuracy, valence-sign accuracy, protocol) of nearest-centroid classification of
    clip-mean features, each person in turn held out (see the module's docstring)."""
    clips, features, protocol = evaluation_sets(clips, frames)
    persons = sorted({c.person for c in clips})
    emotion_hits, valence_hits = [], []
    for held in persons:
        train = [c for c in clips if c.person != held]
        test = [c for c in clips if c.person == held]
        seen = np.concatenate([features[c] for c in train])
        mean, std = seen.mean(0), seen.std(0) + 1e-6
        means = {c: ((features[c] - mean) / std).mean(0) for c in clips}
        for person in persons:  # each person's mean over their clips removed
            own = [c for c in clips if c.person == person]
            centre = np.mean([means[c] for c in own], axis=0)
            for c in own:
                means[c] = means[c] - centre
        emotion_hits += _nearest_centroid(train, test, means, lambda c: c.emotion)
        signed = [c for c in train if c.valence != 0]
        valence_hits += _nearest_centroid(
            signed, [c for c in test if c.valence != 0], means, lambda c: c.valence > 0
        )
    return float(np.mean(emotion_hits)), float(np.mean(valence_hits)), protocol


def _nearest_centroid(
    train: list[Clip], test: list[Clip], means: dict[Clip, np.ndarray], label
) -> list[bool]:
    classes = sorted({label(c) for c in train})
    centroids = np.stack([np.mean([means[c] for c in train if label(c) == k], axis=0) for k in classes])
    return [classes[int(np.linalg.norm(centroids - means[c], axis=1).argmin())] == label(c) for c in test]


def stage_speed(clips: list[Clip], models: list[str], repeat: int) -> dict[str, float]:
    """Frames a second of the whole faces stage (decoding, detection, alignment, the embedder) over
    the clips, per --visual-model, best of `repeat`, the models taking turns."""
    media = [
        Media(c.path, c.path.stem, info, frame_grid(c.path, info)) for c in clips for info in [probe(c.path)]
    ]
    stages = {model: FacesStage(visual_model=model, device="cpu") for model in models}
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeat):
        for model, stage in stages.items():
            start = time.perf_counter()
            for m in media:
                for _block in stage.run(m):
                    pass
            best[model] = min(best[model], time.perf_counter() - start)
    frames = sum(len(m.timestamps) for m in media)
    return {model: frames / seconds for model, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="vggface2, or a TorchScript/ONNX path")
    parser.add_argument("--clips", type=Path, help="a folder of labelled clips (with --labels)")
    parser.add_argument("--labels", type=Path, help="CSV: clip, person, emotion, valence")
    parser.add_argument(
        "--store", type=Path, help="where the aligned crops are kept (default: a temp folder)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the embedders")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if (args.clips is None) != (args.labels is None):
        parser.error("--clips and --labels go together")
    clips = labelled_clips(args.clips, args.labels) if args.clips else crema_clips()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="rcma-bench-visual-") as folder:
        faces = aligned_faces(clips, args.store or Path(folder) / "crops.h5")
    embedders: dict[str, Callable[[np.ndarray], np.ndarray]] = {RAW: raw_features}
    for name in [visual.FER, *args.model]:
        embedder = visual.build_embedder(name, "cpu")
        assert embedder is not None
        embedders[embedder.name] = embedder

    every = np.concatenate(list(faces.values()))
    print(
        f"{len(clips)} clips, {len({c.person for c in clips})} person(s), {len({c.emotion for c in clips})} "
        f"emotions, {len(every)} faces; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} on {args.threads} thread(s)"
    )
    load_before = os.getloadavg()[0]
    rows = []
    for name, embed in embedders.items():
        features, ms = timed(embed, every, args.repeat)
        bounds = np.cumsum([0] + [len(faces[c.path]) for c in clips])
        per_clip = {c.path: features[bounds[i] : bounds[i + 1]] for i, c in enumerate(clips)}
        emotion, valence, protocol = separation(clips, per_clip)
        rows.append((name, features.shape[1], emotion, valence, ms))
    print(f"protocol: {protocol}; chance: emotion {1 / len({c.emotion for c in clips}):.2f}")
    print(f"1-minute load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    raw_ms = rows[0][4]
    width = max(len(row[0]) for row in rows)
    print(f"{'embedder':<{width}} {'dim':>5} {'emotion':>8} {'valence':>8} {'ms/face':>8} {'x raw':>7}")
    for name, dim, emotion, valence, ms in rows:
        print(f"{name:<{width}} {dim:>5} {emotion:>8.2f} {valence:>8.2f} {ms:>8.3f} {ms / raw_ms:>7.1f}")
    speed = stage_speed(clips, [visual.NONE, visual.FER], args.repeat)
    none, with_fer = speed[visual.NONE], speed[visual.FER]
    print(
        f"faces stage ({args.threads} torch thread(s) given): --visual-model none {none:.1f} frames/s, "
        f"fer {with_fer:.1f} frames/s: {none / with_fer:.2f}x the time"
    )


if __name__ == "__main__":
    main()
