"""The RCMA model, top to bottom: per-modality TCNs, recursive cross-modal attention, a head.

Praveen & Alam, "Recursive Cross-Modal Attention for Multimodal Fusion in Dimensional Emotion
Recognition" (ABAW6, CVPR 2024 workshops). For each modality m with features X_m (K x d_m) and a
joint representation J_m (K x d), one attention step is

    C_m  = tanh(X_m^T W_j J_m / sqrt(d))      W_j: K x K      C_m: d_m x d
    H_m  = ReLU(X_m W_c C_m)                  W_c: d_m x d_m  H_m: K x d
    X_m' = H_m W_h + X_m                      W_h: d x d_m    (residual)

J_m is the concatenation of the other modalities (RCMA) or of all of them (`joint="all"`, the
RJCMA variant). The step is applied L = `iterations` times, every modality updated at once from
the previous iteration's features, so J_m is recomputed from attended features each time. Each
iteration has its own W_j, W_c, W_h, as in the authors' code (`tied=True`: one set for all, the
recursion read literally). Because W_j is K x K, the window length K is part of the model.

What the authors' code (praveena2j/RJCMA, models/dense_coattn.py and av_crossatten.py) adds to
the equations, each a `ModelConfig` option:
- `attention="authors"`: biases on W_j, W_c, W_h, H_m = ReLU(tanh(X_m W_c C_m)) and the update
  ReLU(H_m W_h); `attention_dropout` (theirs: 0.6) on C_m and on the update;
- `joint_linear`: a linear layer on J_m first (their first version);
- `tcn_norm`: BatchNorm after each TCN (here over the frames of the batch that are not padding);
- `head="authors"`: Linear, BatchNorm, LeakyReLU, Linear, tanh.

Gates for weak complementarity (`gate`), where one modality carries little or nothing:
- "residual": the update is scaled per channel by tanh(g_m), g_m learned and zero at the start,
      X_m' = X_m + tanh(g_m) * (H_m W_h)
  so the model starts as the unfused TCNs and lets attention in only as far as it helps.
- "grjca": Praveen, Alam & Charton, "United we stand, Divided we fall" (CVPR 2025 workshops,
  arXiv 2503.12261). At iteration l a gate chooses, per frame, between the attended features
  A_m^l = X_m^{l-1} + H_m W_h and the unattended input X_m of the fusion,
      G_m^l  = softmax([A_m^l, X_m] W_g^l / T)                         (K x 2)
      X_m^l  = G_m^l[:, 0] * A_m^l + G_m^l[:, 1] * X_m
  and a stage gate weighs the L gated outputs,
      S_m    = softmax([X_m^1, ..., X_m^L] W_s / T)                     (K x L)
      X_m'   = sum_l S_m[:, l] * X_m^l
  with T = GATE_TEMPERATURE. (The paper names the gates' inputs in words; this is our reading.)

Inputs: each modality is z-normalised with statistics of the training split (buffers set by
`set_normalisation`, saved with the weights), zeroed on frames where it is absent, and, with
`presence`, given its presence flag as one more channel, so an absent frame and a real zero vector
differ. Every intermediate is zeroed on padding frames (past the end of a video shorter than K),
so padding can never reach a real frame through W_j or a batch statistic.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from pipeline.errors import one_line
from pipeline.files import atomic_file

from .config import LEGACY, ModelConfig, TrainError

KERNEL_SIZE = 5
DILATIONS = (1, 2, 4, 8)
HEAD_WIDTH = 128
CROP_STORED = 48  # aligned 112x112 faces are resized to this once, when the store is read
CROP_TRAIN = 40  # random crop (training) or centre crop (evaluation) fed to the CNN
CNN_CHANNELS = (32, 64, 128)
CROP_MEAN, CROP_STD = 0.5, 0.25
GATE_TEMPERATURE = 1.0
NORM_EPS = 1e-5


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the frames of a batch that are not padding; (B, K, C) in and out."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """A batch with fewer than two real frames has no variance of its own: it is normalised with
        the running statistics, as in evaluation, and leaves them as they are."""
        if self.training:
            n = keep.sum()
            mean = (x * keep).sum((0, 1)) / n.clamp_min(1.0)
            var = (((x - mean) * keep) ** 2).sum((0, 1)) / n.clamp_min(1.0)
            enough = n >= 2
            with torch.no_grad():
                step = self.momentum * enough.to(self.running_mean.dtype)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), step)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), step)
            mean = torch.where(enough, mean, self.running_mean)
            var = torch.where(enough, var, self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        return ((x - mean) * torch.rsqrt(var + NORM_EPS) * self.weight + self.bias) * keep


class TemporalBlock(nn.Module):
    """Two weight-normed dilated convolutions with a residual, centred (the task is offline)."""

    def __init__(self, c_in: int, c_out: int, dilation: int, dropout: float):
        super().__init__()
        pad = (KERNEL_SIZE - 1) * dilation // 2
        self.conv1 = weight_norm(nn.Conv1d(c_in, c_out, KERNEL_SIZE, padding=pad, dilation=dilation))
        self.conv2 = weight_norm(nn.Conv1d(c_out, c_out, KERNEL_SIZE, padding=pad, dilation=dilation))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, K)
        y = self.dropout(F.relu(self.conv1(x)))
        y = self.dropout(F.relu(self.conv2(y)))
        return F.relu(y + self.skip(x))


class TCN(nn.Module):
    def __init__(self, c_in: int, width: int, dropout: float):
        super().__init__()
        widths = [c_in] + [width] * len(DILATIONS)
        self.blocks = nn.Sequential(
            *[TemporalBlock(widths[i], widths[i + 1], d, dropout) for i, d in enumerate(DILATIONS)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, C) -> (B, K, width)
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)


class FaceCNN(nn.Module):
    """A small CNN from 48x48 aligned faces to one vector per frame, trained end to end.

    In training each window gets one random 40x40 crop and a random horizontal flip (the same for
    all its frames, so motion stays smooth); in evaluation the centre crop.
    """

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in CNN_CHANNELS:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, crops: torch.Tensor) -> torch.Tensor:  # (B, K, 3, 48, 48) uint8 -> (B, K, C)
        b, k = crops.shape[:2]
        margin = CROP_STORED - CROP_TRAIN
        if self.training:
            dy, dx = torch.randint(0, margin + 1, (2, b)).tolist()
            flip = (torch.rand(b) < 0.5).tolist()
            views = []
            for i in range(b):
                view = crops[i, :, :, dy[i] : dy[i] + CROP_TRAIN, dx[i] : dx[i] + CROP_TRAIN]
                views.append(view.flip(-1) if flip[i] else view)
            x = torch.stack(views)
        else:
            o = margin // 2
            x = crops[..., o : o + CROP_TRAIN, o : o + CROP_TRAIN]
        x = (x.float() / 255 - CROP_MEAN) / CROP_STD
        return self.net(x.flatten(0, 1)).view(b, k, -1)


class CrossModalAttention(nn.Module):
    """One attention step for one modality: the three equations above, with its own W_j, W_c, W_h."""

    def __init__(
        self,
        window: int,
        width: int,
        joint_width: int,
        attention: str = "paper",
        dropout: float = 0.0,
        joint_linear: bool = False,
        gate: str = "none",
    ):
        super().__init__()
        self.joint_width = joint_width
        self.authors = attention == "authors"
        self.w_j = nn.Parameter(torch.empty(window, window))
        self.w_c = nn.Parameter(torch.empty(width, width))
        self.w_h = nn.Parameter(torch.empty(joint_width, width))
        for w in (self.w_j, self.w_c, self.w_h):
            nn.init.xavier_uniform_(w)
        if self.authors:
            self.b_j = nn.Parameter(torch.zeros(window))
            self.b_c = nn.Parameter(torch.zeros(width))
            self.b_h = nn.Parameter(torch.zeros(width))
        self.joint_proj = nn.Linear(joint_width, joint_width) if joint_linear else None
        self.dropout = nn.Dropout(dropout)
        self.gain = nn.Parameter(torch.zeros(width)) if gate == "residual" else None

    def update(self, x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The attended update H_m W_h for x: (B, K, d_m) and its joint j: (B, K, d)."""
        if self.joint_proj is not None:
            j = self.joint_proj(j)
        key = x.transpose(1, 2) @ self.w_j  # (B, d_m, K)
        if self.authors:
            key = key + self.b_j
        c = self.dropout(torch.tanh(key @ j / math.sqrt(self.joint_width)))  # C_m: (B, d_m, d)
        if self.authors:
            h = F.relu(torch.tanh((x @ self.w_c + self.b_c) @ c))  # H_m: (B, K, d)
            return self.dropout(F.relu(h @ self.w_h + self.b_h))
        h = F.relu(x @ self.w_c @ c)
        return self.dropout(h @ self.w_h)

    def forward(self, x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """x: (B, K, d_m), j: (B, K, d) -> X_m': (B, K, d_m)."""
        u = self.update(x, j)
        if self.gain is not None:
            u = torch.tanh(self.gain) * u
        return x + u


class RecursiveCrossModalAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.iterations = cfg.iterations
        self.joint_of = {
            m: [o for o in cfg.modalities if cfg.joint == "all" or o != m] for m in cfg.modalities
        }  # fixed order, so J_m's columns always mean the same thing
        step_gate = "residual" if cfg.gate == "residual" else "none"

        def step() -> nn.ModuleDict:
            return nn.ModuleDict(
                {
                    m: CrossModalAttention(
                        cfg.window,
                        cfg.width,
                        cfg.width * len(others),
                        cfg.attention,
                        cfg.attention_dropout,
                        cfg.joint_linear,
                        step_gate,
                    )
                    for m, others in self.joint_of.items()
                }
            )

        self.steps = nn.ModuleList([step() for _ in range(1 if cfg.tied else cfg.iterations)])
        self.gates = self.stage_gate = None
        if cfg.gate == "grjca":
            self.gates = nn.ModuleList(
                [nn.ModuleDict({m: nn.Linear(2 * cfg.width, 2) for m in cfg.modalities}) for _ in self.steps]
            )
            self.stage_gate = nn.ModuleDict(
                {m: nn.Linear(cfg.iterations * cfg.width, cfg.iterations) for m in cfg.modalities}
            )

    def forward(self, xs: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """xs: modality -> (B, K, d_m); valid: (B, K, 1) float, 0 on padding frames."""
        unattended, gated = xs, []
        for i in range(self.iterations):
            step = self.steps[min(i, len(self.steps) - 1)]
            joints = {m: torch.cat([xs[o] for o in others], -1) for m, others in self.joint_of.items()}
            xs = {m: step[m](xs[m], joints[m]) * valid for m in xs}
            if self.gates is not None:
                gate = self.gates[min(i, len(self.gates) - 1)]
                xs = {m: _choose(gate[m], [xs[m], unattended[m]]) for m in xs}
                gated.append(xs)
        if self.stage_gate is not None and gated:
            xs = {m: _choose(self.stage_gate[m], [g[m] for g in gated]) for m in xs}
        return xs


def _choose(gate: nn.Linear, options: list[torch.Tensor]) -> torch.Tensor:
    """Per frame, a softmax-weighted mix of the options, the weights computed from all of them."""
    weights = torch.softmax(gate(torch.cat(options, -1)) / GATE_TEMPERATURE, -1)  # (B, K, n)
    return (torch.stack(options, -1) * weights.unsqueeze(-2)).sum(-1)


class Head(nn.Module):
    """Fused features -> valence, arousal in [-1, 1]."""

    def __init__(self, width: int, dropout: float, authors: bool):
        super().__init__()
        self.hidden = nn.Linear(width, HEAD_WIDTH)
        self.norm = MaskedBatchNorm(HEAD_WIDTH) if authors else None
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(HEAD_WIDTH, 2)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        h = F.leaky_relu(self.norm(h, keep)) if self.norm is not None else F.relu(h)
        return torch.tanh(self.out(self.dropout(h)))


class RCMA(nn.Module):
    """TCN per modality -> recursive cross-modal attention (or concatenation, or nothing) -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.face_cnn = FaceCNN() if cfg.visual_crops and "visual" in cfg.modalities else None
        extra = 1 if cfg.presence else 0
        self.tcn = nn.ModuleDict(
            {m: TCN(cfg.inputs[m] + extra, cfg.width, cfg.dropout) for m in cfg.modalities}
        )
        self.tcn_norm = (
            nn.ModuleDict({m: MaskedBatchNorm(cfg.width) for m in cfg.modalities}) if cfg.tcn_norm else None
        )
        self.normalised = [m for m in cfg.modalities if cfg.normalise and not self._is_crops(m)]
        for m in self.normalised:
            self.register_buffer(f"mean_{m}", torch.zeros(cfg.inputs[m]))
            self.register_buffer(f"std_{m}", torch.ones(cfg.inputs[m]))
        self.attention = None
        if cfg.fusion == "rcma" and len(cfg.modalities) > 1:
            self.attention = RecursiveCrossModalAttention(cfg)
        self.head = Head(cfg.width * len(cfg.modalities), cfg.dropout, cfg.head == "authors")

    def _is_crops(self, m: str) -> bool:
        return m == "visual" and self.face_cnn is not None

    def set_normalisation(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Per-channel mean and std of each normalised modality (from the training split only)."""
        for m in self.normalised:
            mean, std = stats[m]
            getattr(self, f"mean_{m}").copy_(mean)
            getattr(self, f"std_{m}").copy_(std.clamp_min(NORM_EPS))

    def _drop_modalities(self, present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Marks modalities absent from whole windows at random: only modalities the window has,
        and never all of them (one of those it has, drawn at random, is spared)."""
        has = modalities_in_window(present, self.cfg.modalities)  # (B, M)
        drop = (torch.rand(has.shape, device=has.device) < self.cfg.modality_dropout) & has
        emptied = has.any(1) & ~(has & ~drop).any(1)
        spared = torch.rand(has.shape, device=has.device).masked_fill(~has, -1.0).argmax(1)
        drop[torch.arange(len(has), device=has.device), spared] &= ~emptied
        return {m: present[m] & ~drop[:, i : i + 1] for i, m in enumerate(self.cfg.modalities)}

    def forward(
        self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor], valid: torch.Tensor
    ) -> torch.Tensor:
        """inputs: modality -> (B, K, D) features, or (B, K, 3, 48, 48) uint8 crops for visual;
        present: modality -> (B, K) bool; valid: (B, K) bool. Returns (B, K, 2) valence, arousal."""
        keep = valid.unsqueeze(-1).float()
        if self.training and self.cfg.modality_dropout > 0 and len(self.cfg.modalities) > 1:
            present = self._drop_modalities(present)
        xs = {}
        for m in self.cfg.modalities:
            x = self.face_cnn(inputs[m]) if self._is_crops(m) else inputs[m].float()
            if m in self.normalised:
                x = (x - getattr(self, f"mean_{m}")) / getattr(self, f"std_{m}")
            here = (present[m] & valid).unsqueeze(-1).float()
            x = x * here
            if self.cfg.presence:
                x = torch.cat([x, here], -1)
            x = self.tcn[m](x) * keep
            xs[m] = self.tcn_norm[m](x, keep) if self.tcn_norm is not None else x
        if self.attention is not None:
            xs = self.attention(xs, keep)
        return self.head(torch.cat([xs[m] for m in self.cfg.modalities], -1), keep)


def modalities_in_window(present: dict[str, torch.Tensor], modalities: list[str]) -> torch.Tensor:
    """(B, M) bool: whether each window (B, K) has any frame of each modality (padding has none)."""
    return torch.stack([present[m].any(1) for m in modalities], 1)


class Ensemble(nn.Module):
    """Several trained models (seeds) of one configuration; predicts the mean of their outputs."""

    def __init__(self, members: list[RCMA]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    def forward(self, *args: Any) -> torch.Tensor:
        return torch.stack([m(*args) for m in self.members]).mean(0)


# Parameter names that checkpoints of the first release (model class `Fusion`) used, and today's.
RENAMED = (("rcma.attend.", "attention.steps.0."), ("head.0.", "head.hidden."), ("head.3.", "head.out."))


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with parameter names of an older release renamed to today's."""
    out = {}
    for key, value in state.items():
        for old, new in RENAMED:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def model_config_of(saved: dict[str, Any]) -> ModelConfig:
    """A checkpoint's model config; settings it predates take the values it was trained with."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{**LEGACY, **{k: v for k, v in saved.items() if k in known}})


def build_model(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> RCMA | Ensemble:
    """The model of a checkpoint (one model, or the ensemble of its seeds), in eval mode."""
    cfg = model_config_of(ckpt["model_config"])
    states = ckpt["members"] if "members" in ckpt else [ckpt["model"]]
    models = []
    for state in states:
        model = RCMA(cfg)
        try:
            model.load_state_dict(upgrade_state(state))
        except RuntimeError as e:
            raise TrainError(
                f"the checkpoint's weights do not fit its model settings ({one_line(e)})"
            ) from None
        models.append(model)
    model = models[0] if len(models) == 1 else Ensemble(models)
    return model.to(device).eval()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16), full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint read as plain data (never unpickled beyond it) and checked by `checkpoint_problem`."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if (
        not isinstance(ckpt, dict)
        or not {"model_config", "data"} <= ckpt.keys()
        or not ({"model", "members"} & ckpt.keys())
    ):
        raise TrainError(f"{path}: not an rcma checkpoint")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise TrainError(f"{path}: {problem}")
    return ckpt


VISUAL_INPUT_KINDS = ("", "embedding", "crops")


def checkpoint_problem(ckpt: dict[str, Any]) -> str | None:
    """Why a checkpoint cannot be used, as one line; None when its settings, records and weights fit
    together. Checked before a model is built or a video extracted: the model is laid out on torch's
    meta device (no memory), so an absurd width or window costs nothing, and weights that are NaN or
    infinite (a diverged run) are refused rather than predicting NaN."""
    if not isinstance(ckpt["model_config"], dict):
        return "its model settings (model_config) are not a table of settings"
    try:
        cfg = model_config_of(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        return f"its model settings cannot be used ({one_line(e)})"
    run, data = ckpt.get("config"), ckpt["data"]
    if not isinstance(run, dict) or not isinstance(data, dict):
        return "lacks its run settings (config) or its data record; not a checkpoint rcma wrote"
    window, hop = run.get("window"), run.get("eval_hop")
    if window != cfg.window or not isinstance(hop, int) or not 1 <= hop <= cfg.window:
        return f"its window {window!r} and evaluation hop {hop!r} do not fit its model's window {cfg.window}"
    modalities = data.get("modalities")
    if (
        not isinstance(modalities, list)
        or set(modalities) != set(cfg.modalities)
        or data.get("dims") != cfg.inputs
        or data.get("visual_input") not in VISUAL_INPUT_KINDS
    ):
        return f"its data record {_short(data)} does not match its model settings"
    stages = data.get("stages", {})
    if not isinstance(stages, dict) or not all(_stage_record(name, r) for name, r in stages.items()):
        return "its record of how the features were extracted is damaged"
    states = ckpt["members"] if "members" in ckpt else [ckpt["model"]]
    if not isinstance(states, list) or not states or not all(isinstance(s, dict) for s in states):
        return "holds no weights"
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = {k: v.shape for k, v in RCMA(cfg).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError, TypeError) as e:
        return f"its model settings cannot be built ({one_line(e)})"
    for state in map(upgrade_state, states):
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            return "its weights are not all tensors"
        shapes = {k: v.shape for k, v in state.items()}
        if shapes != expected:
            differ = sorted(k for k in shapes.keys() | expected.keys() if shapes.get(k) != expected.get(k))
            return f"its weights do not fit its model settings (first difference: {differ[0]})"
        if not finite(state):
            return "its weights are NaN or infinite (the training diverged: retrain with a lower --lr)"
    return None


def finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict (weights and buffers) is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _stage_record(name: str, record: Any) -> bool:
    """A checkpoint's record of one stage: {"config": {...}, "config_hash": "..."}, or for the grid
    {"audio_fps": a positive number}."""
    if not isinstance(record, dict):
        return False
    if name == "grid":
        fps = record.get("audio_fps", 1.0)
        return isinstance(fps, int | float) and math.isfinite(fps) and fps > 0
    return isinstance(record.get("config"), dict) and isinstance(record.get("config_hash"), str)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)
