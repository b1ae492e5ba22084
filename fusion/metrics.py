"""Agreement between predicted and true valence/arousal: CCC (the challenge metric), PCC, RMSE.

The numpy functions score whole sequences in float64 (evaluation); `ccc_loss` is the masked,
differentiable training loss. Both use population (1/n) variances, as the challenge does.
"""

from __future__ import annotations

import numpy as np
import torch

DIMENSIONS = ("valence", "arousal")


def ccc(pred: np.ndarray, true: np.ndarray) -> float:
    """Lin's concordance correlation coefficient: 2 cov / (var_p + var_t + (mean_p - mean_t)^2)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if len(pred) == 0:
        return float("nan")
    mp, mt = pred.mean(), true.mean()
    cov = ((pred - mp) * (true - mt)).mean()
    denom = pred.var() + true.var() + (mp - mt) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def pcc(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if len(pred) < 2 or pred.std() == 0 or true.std() == 0:
        return float("nan")
    return float(np.corrcoef(pred, true)[0, 1])


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    return float(np.sqrt(((pred - true) ** 2).mean())) if len(pred) else float("nan")


def scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """CCC, PCC and RMSE per dimension for (n, 2) arrays, plus `ccc` = mean of the two CCCs."""
    out: dict[str, float] = {}
    for i, name in enumerate(DIMENSIONS):
        out[f"ccc_{name}"] = ccc(pred[:, i], true[:, i])
        out[f"pcc_{name}"] = pcc(pred[:, i], true[:, i])
        out[f"rmse_{name}"] = rmse(pred[:, i], true[:, i])
    out["ccc"] = (out["ccc_valence"] + out["ccc_arousal"]) / 2
    out["frames"] = len(pred)
    return out


def video_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """`scores` of one video, with CCC and PCC None (undefined) for a dimension whose labels are
    constant, as per-clip labels are: agreement over time with a flat line says nothing."""
    out: dict[str, float | None] = dict(scores(pred, true))
    for i, name in enumerate(DIMENSIONS):
        if np.ptp(true[:, i]) == 0:
            out[f"ccc_{name}"] = out[f"pcc_{name}"] = out["ccc"] = None
    return out


def ccc_loss(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - CCC averaged over the last dimension, over the frames where `mask` is true.

    pred, true: (..., 2); mask: (...) bool. Weighted sums instead of boolean indexing keep the
    step free of host-device synchronisation.
    """
    pred, true = pred.float().flatten(0, -2), true.float().flatten(0, -2)
    w = mask.flatten().float().unsqueeze(-1)
    n = w.sum().clamp_min(1.0)
    mp, mt = (pred * w).sum(0) / n, (true * w).sum(0) / n
    dp, dt = (pred - mp) * w, (true - mt) * w
    cov = (dp * dt).sum(0) / n
    var_p, var_t = (dp * dp).sum(0) / n, (dt * dt).sum(0) / n
    value = 2 * cov / (var_p + var_t + (mp - mt) ** 2 + 1e-8)
    return 1 - value.mean()
