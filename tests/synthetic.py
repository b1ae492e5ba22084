"""Synthetic feature stores for the fusion tests, written through the store's own shard writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.store import GRID, rebuild_index, write_shard

FPS = 30.0


def add_video(
    store: Path,
    vid: str,
    n: int,
    stages: dict[str, dict[str, np.ndarray]],
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    split: str = "",
    labelled: np.ndarray | None = None,
) -> None:
    """A grid shard for `vid`, one shard per stage in `stages`, and optionally a labels shard."""
    timestamps = np.arange(n) / FPS
    attrs = {"source": f"{vid}.mp4", "n_frames": n, "fps": FPS, "duration": n / FPS}
    write_shard(store, GRID, vid, {"timestamps": timestamps}, attrs)
    for stage, rows in stages.items():
        write_shard(store, stage, vid, rows, {"stage": stage})
    if labels is not None:
        present = np.ones(n, bool) if labelled is None else labelled
        rows = {
            "valence": labels[0].astype(np.float32),
            "arousal": labels[1].astype(np.float32),
            "present": present,
        }
        write_shard(store, "labels", vid, rows, {"split": split})


def smooth_signal(rng: np.random.Generator, n: int, width: int = 15) -> np.ndarray:
    """A slowly varying signal in about [-1, 1]: moving-averaged noise, scaled to unit max."""
    noise = rng.standard_normal(n + 4 * width)
    kernel = np.hanning(4 * width)
    x = np.convolve(noise, kernel / kernel.sum(), mode="valid")[:n]
    return x / (np.abs(x).max() + 1e-8)


def interaction_store(
    store: Path,
    n_train: int = 12,
    n_val: int = 4,
    frames: int = 300,
    dims: tuple[int, int] = (16, 16),
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    """Audio carries a(t), visual carries v(t); arousal = a(t), valence = a(t) * v(t) * gain.

    Valence depends on the interaction of the two modalities, so neither alone can predict it.
    """
    rng = np.random.default_rng(seed)
    u_a = rng.standard_normal(dims[0])
    u_v = rng.standard_normal(dims[1])
    for i in range(n_train + n_val):
        a, v = smooth_signal(rng, frames), smooth_signal(rng, frames)
        audio = a[:, None] * u_a + noise * rng.standard_normal((frames, dims[0]))
        visual = v[:, None] * u_v + noise * rng.standard_normal((frames, dims[1]))
        valence = np.clip(2 * a * v, -1, 1)
        split = "train" if i < n_train else "val"
        add_video(
            store,
            f"vid{i:02d}",
            frames,
            {
                "audio": {"present": np.ones(frames, bool), "embedding": audio.astype(np.float16)},
                "faces": {"present": np.ones(frames, bool), "embedding": visual.astype(np.float16)},
            },
            labels=(valence, a),
            split=split,
        )
    rebuild_index(store)
    return store
