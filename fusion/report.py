"""The HTML report of a prediction run: one self-contained page (images embedded as data URIs).

At the top, what the model is: its modalities, its fusion, its validation CCC and the data and
feature settings it was trained on. Then per video: valence and arousal over time, a strip of
the aligned faces the visual stage saw, the transcript with each word's time, and the share of
frames on which each modality had data. The page is rendered from templates/report.html.j2.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FACES_IN_STRIP = 10
TOP_EXPRESSIONS = 3  # classes named under the face strip
MODALITY_NAMES = {"visual": "face (visual)", "audio": "voice (audio)", "text": "words (text)"}
TEMPLATES = Path(__file__).parent / "templates"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def model_summary(ckpt: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """What a reader needs to know about the model, in words, from the checkpoint alone."""
    cfg, data = ckpt.get("config", {}), ckpt["data"]
    mods = list(data["modalities"])
    mcfg = ckpt.get("model_config", {})
    if len(mods) == 1:
        fusion = "none (one modality)"
    elif mcfg.get("fusion", cfg.get("fusion")) == "concat":
        fusion = "concatenation of the modalities' TCN features (baseline)"
    else:
        joint = "all three" if mcfg.get("joint", cfg.get("joint")) == "all" else "the other modalities"
        fusion = (
            f"RCMA: recursive cross-modal attention, {mcfg.get('iterations', cfg.get('iterations'))} "
            f"iterations, each modality attending to {joint}"
        )
    val = ckpt.get("val") or {}
    state = ckpt.get("state") or {}
    stages = data.get("stages") or {}
    return {
        "path": str(model_path),
        "uses_faces": "visual" in mods,
        "modalities": [MODALITY_NAMES.get(m, m) for m in mods],
        "fusion": fusion,
        "window": cfg.get("window"),
        "visual_input": data.get("visual_input") or "",
        "val_split": cfg.get("val_split", "val"),
        "val": {k: val[k] for k in ("ccc", "ccc_valence", "ccc_arousal") if k in val},
        "val_frames": int(val.get("frames", 0)),
        "epoch": state.get("best_epoch") or state.get("epoch"),
        "epochs": state.get("epoch"),
        "features": cfg.get("features", ""),
        "train_split": cfg.get("train_split", "train"),
        "train_videos": _count_videos(cfg),
        "extraction": [
            _describe_stage(name, s.get("config", {})) for name, s in stages.items() if s.get("config")
        ],
    }


def _count_videos(cfg: dict[str, Any]) -> str:
    """Training videos and labelled frames, when the training store is still readable here."""
    from .data import DataError, read_splits

    store = Path(cfg.get("features", ""))
    try:
        splits = read_splits(store)
    except (DataError, OSError):
        return ""
    n = sum(1 for s in splits.values() if s == cfg.get("train_split", "train"))
    return f"{n} videos" if n else ""


def _describe_stage(name: str, config: dict[str, Any]) -> str:
    if name == "faces":
        model = config.get("visual_model", "?")
        what = "aligned 112x112 face crops (no embedder)" if model == "none" else f"{model} face embeddings"
        source = "aligned crops read from a folder" if config.get("faces_from") else "MTCNN detection"
        return f"faces: {source}, {what}"
    if name == "audio":
        model = config.get("audio_model", "?")
        extra = f", {config['logmel_pool']} pooling" if model == "logmel" else ""
        return f"audio: {model} embeddings{extra}, {config.get('sample_rate', 16000)} Hz"
    if name == "text":
        return (
            f"text: Whisper {config.get('asr_model', '?')} ({config.get('asr_backend', '?')}) transcript, "
            f"{config.get('text_model', '?')} sentence embeddings per {config.get('text_unit', '?')}"
        )
    return name


def read_expression(store: Path, vid: str) -> tuple[np.ndarray, list[str]] | None:
    """The face's per-frame expression probabilities (NaN where no face) and class names, when the
    faces stage stored them (an expression-trained embedder such as fer); else None."""
    from pipeline.store import open_store

    with open_store(store) as f:
        faces = f[f"videos/{vid}"].get("faces")
        if faces is None or "expression" not in faces:
            return None
        probabilities = faces["expression"][:].astype(np.float32)
        probabilities[~faces["present"][:]] = np.nan
        try:
            classes = [str(c) for c in json.loads(faces.attrs.get("expression_classes", "[]"))]
        except (TypeError, ValueError):  # a crafted attribute: no strip, not an error
            return None
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        return None
    return probabilities, classes


def video_section(
    store: Path,
    vid: str,
    times: np.ndarray,
    pred: np.ndarray,
    present: dict[str, np.ndarray],
    plot_png: bytes,
    source: str = "",
    expression: tuple[np.ndarray, list[str]] | None = None,
) -> dict[str, Any]:
    """Everything the report shows for one video, read from the store and the predictions."""
    from pipeline.store import open_store

    n = len(times)
    fps = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else 0.0
    section: dict[str, Any] = {
        "id": vid,
        "source": source,
        "frames": n,
        "duration": float(times[-1] - times[0]) + (1 / fps if fps else 0.0) if n else 0.0,
        "fps": fps,
        "plot": data_uri(plot_png),
        "mean": [float(np.nanmean(pred[:, k])) for k in range(2)] if n else [0.0, 0.0],
        "coverage": [
            {"name": MODALITY_NAMES.get(m, m), "share": float(mask.mean()) if n else 0.0}
            for m, mask in present.items()
        ],
        "faces": [],
        "faces_note": "",
        "expression": _top_expressions(expression),
        "transcript": [],
        "transcript_note": "",
    }
    with open_store(store) as f:
        group = f[f"videos/{vid}"]
        section["faces"], section["faces_note"] = _face_strip(group, times)
        section["transcript"], section["transcript_note"] = _transcript(group)
    return section


def _top_expressions(expression: tuple[np.ndarray, list[str]] | None) -> list[dict[str, Any]]:
    """The classes most often the face's strongest expression, with their share of the face frames."""
    if expression is None:
        return []
    probabilities, classes = expression
    seen = np.isfinite(probabilities).all(axis=1)
    if not seen.any():
        return []
    top = np.bincount(probabilities[seen].argmax(axis=1), minlength=len(classes)) / seen.sum()
    order = np.argsort(-top, kind="stable")[:TOP_EXPRESSIONS]
    return [{"name": classes[k], "share": float(top[k])} for k in order if top[k] > 0]


def _face_strip(group: h5py.Group, times: np.ndarray) -> tuple[list[dict[str, str]], str]:
    import cv2

    if "faces" not in group:
        return [], "the model does not use faces; no faces were extracted"
    faces = group["faces"]
    if "crops" not in faces:
        return [], "the faces stage stored no crops (extracted with --no-crops)"
    found = np.flatnonzero(faces["present"][:])
    if not len(found):
        return [], "no face was found in this video"
    picks = found[np.linspace(0, len(found) - 1, min(FACES_IN_STRIP, len(found))).round().astype(int)]
    strip = []
    for k in np.unique(picks):
        ok, png = cv2.imencode(".png", cv2.cvtColor(faces["crops"][int(k)], cv2.COLOR_RGB2BGR))
        if ok:
            strip.append({"src": data_uri(png.tobytes()), "time": f"{times[k]:.1f} s", "frame": str(int(k))})
    return strip, ""


def _transcript(group: h5py.Group) -> tuple[list[dict[str, Any]], str]:
    if "text" not in group:
        return [], "the model does not use words; no transcript was made"
    text = group["text"]
    if "words" not in text or len(text["words"]) == 0:
        return [], str(text.attrs.get("warning", "")) or "no speech was found"
    words = [w.decode() if isinstance(w, bytes) else str(w) for w in text["words"][:]]
    starts, ends = text["word_start"][:], text["word_end"][:]
    segment_of = text["word_segment"][:] if "word_segment" in text else np.zeros(len(words), int)
    segments: dict[int, dict[str, Any]] = {}
    for word, start, end, seg in zip(words, starts, ends, segment_of, strict=True):
        entry = segments.setdefault(int(seg), {"start": f"{start:.1f}", "words": []})
        entry["words"].append({"text": word.strip(), "start": f"{start:.2f}", "end": f"{end:.2f}"})
    return list(segments.values()), ""


def render(summary: dict[str, Any], videos: list[dict[str, Any]], failed: list[str], notes: list[str]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(model=summary, videos=videos, failed=failed, notes=notes)


def write_report(
    path: Path, summary: dict[str, Any], videos: list[dict[str, Any]], failed: list[str], notes: list[str]
) -> None:
    from pipeline.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(render(summary, videos, failed, notes), encoding="utf-8")
