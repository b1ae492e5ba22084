"""Settings as plain data: the model's shape (`ModelConfig`) and a training run's (`TrainConfig`).

Both are stored in checkpoints as dicts. `TrainConfig` checks itself, so neither the Python API
nor the CLI (whose train options are made from its fields) can start a run that cannot work.
This module imports no torch, so the CLI starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.errors import ModelUnavailable, check_device

MODALITIES = ("audio", "visual", "text")
FUSIONS = ("rcma", "concat")
JOINTS = ("others", "all")
ATTENTIONS = ("paper", "authors")
GATES = ("none", "residual", "grjca")
HEADS = ("mlp", "authors")
MODEL_CHOICES = {"fusion": FUSIONS, "joint": JOINTS, "gate": GATES, "attention": ATTENTIONS, "head": HEADS}


def unchosen(settings: Any, choices: dict[str, tuple[str, ...]]) -> str | None:
    """The first setting whose value is not among its choices, as one line; None when all are."""
    for name, allowed in choices.items():
        if getattr(settings, name) not in allowed:
            return f"--{name} {getattr(settings, name)}: choose one of {', '.join(allowed)}"
    return None


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
    tied: bool = False  # one W_j, W_c, W_h for all iterations
    gate: str = "residual"  # none | residual | grjca
    attention: str = "paper"  # paper (the equations) | authors (their code's extras)
    attention_dropout: float = 0.0  # on C_m and on the update (the authors use 0.6)
    joint_linear: bool = False  # a linear layer on J_m (the authors' first version)
    tcn_norm: bool = True  # BatchNorm after each TCN
    head: str = "mlp"  # mlp | authors
    presence: bool = True  # each modality's presence flag as one more input channel
    normalise: bool = True  # z-normalise inputs with the training split's statistics
    modality_dropout: float = 0.5  # in training, each modality absent from a whole window this often

    def __post_init__(self) -> None:
        if not self.modalities:
            self.modalities = [m for m in MODALITIES if m in self.inputs]
        problem = unchosen(self, MODEL_CHOICES)
        if problem:
            raise ValueError(problem)


# The settings of checkpoints written before these options existed: they load as they were trained.
LEGACY = dict(
    tied=True,
    gate="none",
    tcn_norm=False,
    presence=False,
    normalise=False,
    attention="paper",
    head="mlp",
    modality_dropout=0.0,
)

# Settings a resumed run must share with the checkpoint: they decide the model or the data.
FIXED_ON_RESUME = (
    "modalities",
    "fusion",
    "joint",
    "visual",
    "window",
    "width",
    "iterations",
    "tied",
    "gate",
    "attention",
    "joint_linear",
    "tcn_norm",
    "head",
    "presence",
    "normalise",
    "seeds",
    "folds",
    "seed",  # with folds, the seed and the groups decide which videos each fold tests
    "groups",
)
VISUAL_INPUTS = ("auto", "embedding", "crops")


class TrainError(Exception):
    """A run that cannot start or resume; the message says why in one line."""


def setting(default: Any, help: str) -> Any:
    """A TrainConfig field with the help text its CLI option shows."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    features: str = setting("store.h5", "The store, with labels.")
    out: str = setting("runs/rcma", "Run folder (checkpoints, logs).")
    modalities: list[str] = setting([], "Any of audio,visual,text (default: every one the store has).")
    fusion: str = setting(ModelConfig.fusion, "rcma, or concat (baseline).")
    joint: str = setting(ModelConfig.joint, "others (RCMA) or all (RJCMA).")
    gate: str = setting(ModelConfig.gate, "none, residual (zero-initialised gain), or grjca.")
    tied: bool = setting(ModelConfig.tied, "One set of attention weights for all iterations.")
    attention: str = setting(ModelConfig.attention, "paper (the equations) or authors (their code).")
    attention_dropout: float = setting(ModelConfig.attention_dropout, "Dropout on C and the update.")
    joint_linear: bool = setting(ModelConfig.joint_linear, "A linear layer on the joint representation.")
    tcn_norm: bool = setting(ModelConfig.tcn_norm, "BatchNorm after each TCN.")
    head: str = setting(ModelConfig.head, "mlp, or authors (Linear, BatchNorm, LeakyReLU, Linear).")
    presence: bool = setting(ModelConfig.presence, "Give the model each modality's presence flag.")
    normalise: bool = setting(ModelConfig.normalise, "z-normalise features with training statistics.")
    modality_dropout: float = setting(
        ModelConfig.modality_dropout, "Training: drop each modality from a whole window this often."
    )
    visual: str = setting("auto", "auto, embedding, or crops (end-to-end CNN).")
    train_split: str = setting("train", "Split trained on.")
    val_split: str = setting("val", "Split for early stopping.")
    window: int = setting(ModelConfig.window, "Frames per window, K.")
    hop: int = setting(200, "Training window hop.")
    eval_hop: int = setting(0, "Evaluation window hop (0: half the window).")
    width: int = setting(ModelConfig.width, "TCN output width per modality.")
    iterations: int = setting(ModelConfig.iterations, "Recursive attention iterations, L.")
    dropout: float = setting(ModelConfig.dropout, "Dropout in the TCNs and the head.")
    batch_size: int = setting(32, "Windows per step.")
    epochs: int = setting(50, "At most this many epochs.")
    lr: float = setting(1e-3, "Peak learning rate (Adam).")
    weight_decay: float = setting(0.0, "Adam weight decay.")
    warmup_steps: int = setting(100, "Steps of linear learning-rate warm-up.")
    plateau_patience: int = setting(3, "Epochs without progress before the learning rate drops.")
    plateau_factor: float = setting(0.5, "Learning-rate drop factor on a plateau.")
    min_lr: float = setting(1e-6, "Lowest learning rate.")
    patience: int = setting(10, "Stop after this many epochs without a better val CCC.")
    grad_clip: float = setting(1.0, "Gradient norm clip.")
    seed: int = setting(0, "Random seed (of the first model, with --seeds).")
    seeds: int = setting(1, "Train this many seeds; best.pt predicts their mean.")
    folds: int = setting(0, "K-fold cross-validation over all labelled videos (0: use the splits).")
    groups: str = setting("", "CSV of video_id,group: folds never split a group (default: by video).")
    device: str = setting("auto", "cpu, cuda, or auto.")
    threads: int = setting(0, "CPU threads for torch (0: torch's default).")

    def __post_init__(self) -> None:
        if self.eval_hop == 0 and self.window >= 1:
            self.eval_hop = max(1, self.window // 2)
        bad = [m for m in self.modalities if m not in MODALITIES]  # none given: the store's (train)
        if bad:
            raise TrainError(f"unknown modality {', '.join(bad)}; choose from {', '.join(MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise TrainError(f"modalities {','.join(self.modalities)}: each may be given once")
        problem = unchosen(self, {**MODEL_CHOICES, "visual": VISUAL_INPUTS})
        if problem:
            raise TrainError(problem)
        for name in ("window", "hop", "width", "batch_size", "epochs", "patience", "seeds"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("iterations", "warmup_steps", "plateau_patience", "threads", "weight_decay"):
            if getattr(self, name) < 0:
                raise TrainError(
                    f"--{name.replace('_', '-')} must not be negative, not {getattr(self, name)}"
                )
        if not 1 <= self.eval_hop <= self.window:
            raise TrainError(f"--eval-hop {self.eval_hop} must be between 1 and the window ({self.window})")
        for name in ("dropout", "attention_dropout", "modality_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be in [0, 1), not {getattr(self, name)}")
        for name in ("lr", "grad_clip", "plateau_factor"):
            if not getattr(self, name) > 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.folds == 1 or self.folds == 2 or self.folds < 0:
            raise TrainError(
                f"--folds {self.folds}: use 0 (the splits) or 3 or more (test, validation, train)"
            )
        if self.groups and not self.folds:
            raise TrainError("--groups only applies with --folds")
        if not self.folds and self.val_split == self.train_split:
            raise TrainError(f"validation split must differ from the training split ({self.train_split})")
        try:
            check_device(self.device)
        except ModelUnavailable as e:
            raise TrainError(str(e)) from None

    def model_settings(self) -> dict[str, Any]:
        """The settings this config shares with ModelConfig, by name."""
        return {f.name: getattr(self, f.name) for f in fields(ModelConfig) if hasattr(self, f.name)}
