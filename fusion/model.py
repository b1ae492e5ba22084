"""The RCMA model, top to bottom: per-modality TCNs, recursive cross-modal attention, a head.

Praveen & Alam, "Recursive Cross-Modal Attention for Multimodal Fusion in Dimensional Emotion
Recognition" (ABAW6, CVPR 2024 workshops). For each modality m with features X_m (K x d_m) and a
joint representation J_m (K x d), one attention step is

    C_m  = tanh(X_m^T W_j J_m / sqrt(d))      W_j: K x K      C_m: d_m x d
    H_m  = ReLU(X_m W_c C_m)                  W_c: d_m x d_m  H_m: K x d
    X_m' = H_m W_h + X_m                      W_h: d x d_m    (residual)

J_m is the concatenation of the other modalities (RCMA) or of all of them (`joint="all"`, the
RJCMA variant). The step is applied `iterations` times with the same weights (the recursion of
the paper), every modality updated at once from the previous iteration's features, so J_m is
recomputed from attended features each time. Because W_j is K x K, the window length K is part
of the model: prediction uses windows of the same K.

Masks: a modality's features are zeroed on frames where it is absent (no face, no speech), and
every intermediate is zeroed on padding frames (past the end of a video shorter than K), so
padding can never reach a real frame through W_j.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

MODALITIES = ("audio", "visual", "text")
KERNEL_SIZE = 5
DILATIONS = (1, 2, 4, 8)
HEAD_WIDTH = 128
CROP_STORED = 48  # aligned 112x112 faces are resized to this once, when the store is read
CROP_TRAIN = 40  # random crop (training) or centre crop (evaluation) fed to the CNN
CNN_CHANNELS = (32, 64, 128)
CROP_MEAN, CROP_STD = 0.5, 0.25


@dataclass
class ModelConfig:
    """Everything that fixes the model's shape; stored in checkpoints as plain data."""

    inputs: dict[str, int]  # modality -> input feature width (for visual crops: CNN_CHANNELS[-1])
    window: int = 300  # K
    width: int = 128  # d_m: every modality's TCN output width
    iterations: int = 3  # L
    fusion: str = "rcma"  # "rcma" or "concat"; ignored with a single modality
    joint: str = "others"  # "others" (RCMA) or "all" (RJCMA)
    dropout: float = 0.2
    visual_crops: bool = False
    modalities: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.modalities:
            self.modalities = [m for m in MODALITIES if m in self.inputs]
        if self.fusion not in ("rcma", "concat"):
            raise ValueError(f"fusion must be rcma or concat, not {self.fusion!r}")
        if self.joint not in ("others", "all"):
            raise ValueError(f"joint must be others or all, not {self.joint!r}")


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

    def __init__(self, window: int, width: int, joint_width: int):
        super().__init__()
        self.joint_width = joint_width
        self.w_j = nn.Parameter(torch.empty(window, window))
        self.w_c = nn.Parameter(torch.empty(width, width))
        self.w_h = nn.Parameter(torch.empty(joint_width, width))
        for w in (self.w_j, self.w_c, self.w_h):
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """x: (B, K, d_m), j: (B, K, d) -> X_m': (B, K, d_m)."""
        c = torch.tanh(x.transpose(1, 2) @ self.w_j @ j / math.sqrt(self.joint_width))  # (B, d_m, d)
        h = F.relu(x @ self.w_c @ c)  # (B, K, d)
        return h @ self.w_h + x


class RecursiveCrossModalAttention(nn.Module):
    def __init__(self, modalities: list[str], window: int, width: int, iterations: int, joint: str):
        super().__init__()
        self.iterations = iterations
        self.joint_of = {
            m: [o for o in modalities if joint == "all" or o != m] for m in modalities
        }  # fixed order, so J_m's columns always mean the same thing
        self.attend = nn.ModuleDict(
            {m: CrossModalAttention(window, width, width * len(self.joint_of[m])) for m in modalities}
        )

    def forward(self, xs: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """xs: modality -> (B, K, d_m); valid: (B, K, 1) float, 0 on padding frames."""
        for _ in range(self.iterations):
            joints = {m: torch.cat([xs[o] for o in others], -1) for m, others in self.joint_of.items()}
            xs = {m: self.attend[m](xs[m], joints[m]) * valid for m in xs}
        return xs


class Fusion(nn.Module):
    """TCN per modality -> RCMA (or concatenation, or nothing for one modality) -> head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.face_cnn = FaceCNN() if cfg.visual_crops and "visual" in cfg.modalities else None
        self.tcn = nn.ModuleDict({m: TCN(cfg.inputs[m], cfg.width, cfg.dropout) for m in cfg.modalities})
        self.rcma = None
        if cfg.fusion == "rcma" and len(cfg.modalities) > 1:
            self.rcma = RecursiveCrossModalAttention(
                cfg.modalities, cfg.window, cfg.width, cfg.iterations, cfg.joint
            )
        self.head = nn.Sequential(
            nn.Linear(cfg.width * len(cfg.modalities), HEAD_WIDTH),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(HEAD_WIDTH, 2),
            nn.Tanh(),
        )

    def forward(
        self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor], valid: torch.Tensor
    ) -> torch.Tensor:
        """inputs: modality -> (B, K, D) features, or (B, K, 3, 48, 48) uint8 crops for visual;
        present: modality -> (B, K) bool; valid: (B, K) bool. Returns (B, K, 2) valence, arousal."""
        keep = valid.unsqueeze(-1).float()
        xs = {}
        for m in self.cfg.modalities:
            x = inputs[m]
            if m == "visual" and self.face_cnn is not None:
                x = self.face_cnn(x)
            x = x.float() * (present[m] & valid).unsqueeze(-1).float()
            xs[m] = self.tcn[m](x) * keep
        if self.rcma is not None:
            xs = self.rcma(xs, keep)
        return self.head(torch.cat([xs[m] for m in self.cfg.modalities], -1))
