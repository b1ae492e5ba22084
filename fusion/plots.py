"""Every plot rcma draws, as PNG bytes: a run's training curves and a video's predictions. The one
module that imports matplotlib (headless, Agg)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

CURVES_DPI = 80
VIDEO_DPI = 90
EXPRESSION_ROW = 0.3  # height of one expression class's row, against 3 for a valence panel


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, dpi: int) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(fig)
    return buffer.getvalue()


def curves_png(rows: list[dict[str, Any]]) -> bytes:
    """A training run's loss and validation CCC per epoch (metrics.csv rows) as PNG bytes."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker=".")
    ax1.set(xlabel="epoch", ylabel="train loss (1 - CCC)")
    for key, label in (("val_ccc", "mean"), ("val_ccc_valence", "valence"), ("val_ccc_arousal", "arousal")):
        ax2.plot(epochs, [r[key] for r in rows], marker=".", label=label)
    ax2.set(xlabel="epoch", ylabel="validation CCC")
    ax2.legend()
    return _png(fig, CURVES_DPI)


def video_png(
    vid: str,
    times: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray | None,
    present: dict[str, np.ndarray] | None = None,
    expression: tuple[np.ndarray, list[str]] | None = None,
) -> bytes:
    """Valence and arousal over time as PNG bytes: prediction, the labels where there are any; under
    them, with `expression` ((n,k) per-frame class probabilities, NaN where no face, and the class
    names), a strip of the face's expression; then a band per input showing the frames where it had
    data."""
    plt = _pyplot()
    present = present or {}
    strip = [EXPRESSION_ROW * len(expression[1])] if expression is not None else []
    ratios = [3, 3, *strip] + ([0.35 * len(present)] if present else [])
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(10, 4.2 + sum(ratios[2:]) * 0.85), sharex=True, height_ratios=ratios
    )
    for k, (ax, name) in enumerate(zip(axes, ("valence", "arousal"), strict=False)):
        ax.plot(times, pred[:, k], label="predicted", lw=1.4, color=("#1f77b4", "#d62728")[k])
        if labels is not None:
            ax.plot(times, labels[:, k], label="label", lw=1.2, alpha=0.8, color="#555555", ls="--")
        ax.set(ylabel=name, ylim=(-1.05, 1.05))
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    if expression is not None:
        _expression_strip(axes[2], times, *expression)
    if present:
        band = axes[-1]
        step = _frame_step(times)
        for row, mask in enumerate(present.values()):
            runs = _runs(mask)
            band.broken_barh(
                [(times[a], times[b - 1] - times[a] + step) for a, b in runs],
                (row + 0.15, 0.7),
                color="#3c8d5a",
            )
        band.set(ylim=(0, len(present)), yticks=np.arange(len(present)) + 0.5, yticklabels=list(present))
        band.tick_params(axis="y", length=0, labelsize=8)
        band.invert_yaxis()  # the first input on top
        band.grid(False)
    axes[0].set_title(vid)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    return _png(fig, VIDEO_DPI)


def _frame_step(times: np.ndarray) -> float:
    """A frame's duration on the plot's time axis (1 s for a single frame)."""
    return float(np.median(np.diff(times))) if len(times) > 1 else 1.0


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs of the runs of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _expression_strip(ax: Any, times: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> None:
    """Each class's probability over time as a row of shades; frames without a face stay blank."""
    step = _frame_step(times)
    shown = np.ma.masked_invalid(np.asarray(probabilities, dtype=np.float32).T)
    extent = (float(times[0]), float(times[-1]) + step, len(classes), 0) if len(times) else (0, 1, 1, 0)
    ax.imshow(shown, aspect="auto", cmap="Purples", vmin=0, vmax=1, extent=extent, interpolation="nearest")
    ax.set(ylim=(len(classes), 0), yticks=np.arange(len(classes)) + 0.5, yticklabels=classes)
    ax.tick_params(axis="y", length=0, labelsize=8)
    ax.set_ylabel("face's\nexpression", fontsize=8)
    ax.grid(False)
