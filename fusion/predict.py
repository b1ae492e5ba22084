"""Evaluation and prediction with a trained checkpoint on a store.

Every check (checkpoint readable, store has the checkpoint's modalities at the same widths, the
split is not empty, features finite) happens before anything is written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.store import config_difference, id_file

from . import data as fd
from .metrics import scores
from .train import TrainError, build_model, load_checkpoint, pick_device, predict_frames

SUBMISSION = "submission"  # Aff-Wild2 challenge format: <video_id>.txt, `valence,arousal`, one line a frame


class PredictError(Exception):
    """A checkpoint and store that cannot be used together; the message says why in one line."""


def _prepare(
    model_path: Path, store: Path, splits: list[str] | None, need_labels: bool, device: str
) -> tuple[torch.nn.Module, dict[str, Any], fd.StoreData]:
    try:
        dev = pick_device(device)
        ckpt = load_checkpoint(model_path, dev)
        info = ckpt["data"]
        videos = fd.select_videos(store, splits, need_labels)
        data = fd.load(store, list(info["modalities"]), videos, info["visual_input"] or "auto", dev)
    except (TrainError, fd.DataError) as e:
        raise PredictError(str(e)) from None
    if data.dims != info["dims"]:
        changed = ", ".join(
            f"{m} {info['dims'][m]} in the checkpoint, {data.dims.get(m)} in the store"
            for m in info["dims"]
            if info["dims"][m] != data.dims.get(m)
        )
        raise PredictError(f"{model_path}: feature widths differ from {store}: {changed}")
    trained = info.get("stage_configs")  # absent in checkpoints of older runs
    if trained:
        try:
            found = fd.stage_configs(store, data.video_ids, list(info["modalities"]))
        except fd.DataError as e:
            raise PredictError(str(e)) from None
        for stage, record in trained.items():
            if stage in found and found[stage]["config_hash"] != record["config_hash"]:
                difference = config_difference(record["config"], found[stage]["config"], "trained on", "here")
                raise PredictError(
                    f"{store}: its {stage} features were made with other settings than {model_path} was "
                    f"trained on ({difference}); extract them with the model's settings"
                )
    return build_model(ckpt, dev), ckpt, data


def _hop(ckpt: dict[str, Any]) -> tuple[int, int]:
    cfg = ckpt["config"]
    return int(cfg["window"]), int(cfg["eval_hop"])


def evaluate(
    model_path: Path, store: Path, split: str | None = "val", device: str = "auto"
) -> dict[str, Any]:
    """CCC, PCC and RMSE per dimension over all labelled frames of the split, and per video."""
    model, ckpt, data = _prepare(model_path, store, [split] if split else None, True, device)
    window, hop = _hop(ckpt)
    pred = predict_frames(model, data, list(range(len(data.video_ids))), window, hop)
    true = data.labels[:-1].cpu().numpy()
    mask = data.labelled[:-1].cpu().numpy()
    if not mask.any():
        raise PredictError(f"{store}: split {split} has no labelled frames")
    per_video = {}
    for i, vid in enumerate(data.video_ids):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        m = mask[lo:hi]
        if m.any():
            per_video[vid] = scores(pred[lo:hi][m], true[lo:hi][m])
    return {
        "model": str(model_path),
        "features": str(store),
        "split": split or "all",
        "modalities": ckpt["data"]["modalities"],
        "overall": scores(pred[mask], true[mask]),
        "videos": per_video,
    }


def predict(
    model_path: Path,
    store: Path,
    out: Path,
    split: str | None = None,
    plots: bool = True,
    device: str = "auto",
) -> list[str]:
    """Per video: <id>.csv (frame, time, valence, arousal), submission/<id>.txt and plots/<id>.png."""
    model, ckpt, data = _prepare(model_path, store, [split] if split else None, split is not None, device)
    window, hop = _hop(ckpt)
    pred = predict_frames(model, data, list(range(len(data.video_ids))), window, hop)
    true = data.labels[:-1].cpu().numpy()
    mask = data.labelled[:-1].cpu().numpy()
    for i, vid in enumerate(data.video_ids):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        p, t = pred[lo:hi], data.timestamps[lo:hi]
        _write_csv(
            id_file(out, vid, ".csv"),
            ["frame", "time", "valence", "arousal"],
            ((k, f"{t[k]:.6f}", f"{p[k, 0]:.6f}", f"{p[k, 1]:.6f}") for k in range(hi - lo)),
        )
        _write_csv(
            id_file(out / SUBMISSION, vid, ".txt"),
            ["valence", "arousal"],
            ((f"{p[k, 0]:.6f}", f"{p[k, 1]:.6f}") for k in range(hi - lo)),
        )
        if plots:
            labels = np.where(mask[lo:hi, None], true[lo:hi], np.nan) if mask[lo:hi].any() else None
            plot_video(id_file(out / "plots", vid, ".png"), vid, t, p, labels)
    return data.video_ids


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_video(path: Path, vid: str, times: np.ndarray, pred: np.ndarray, labels: np.ndarray | None) -> None:
    """Valence and arousal over time: prediction, and the labels where there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
    for k, (ax, name) in enumerate(zip(axes, ("valence", "arousal"), strict=True)):
        ax.plot(times, pred[:, k], label="predicted", lw=1)
        if labels is not None:
            ax.plot(times, labels[:, k], label="label", lw=1, alpha=0.8)
        ax.set(ylabel=name, ylim=(-1.05, 1.05))
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_title(vid)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("time (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
