"""Settings as plain data: the model's shape (`ModelConfig`) and a training run's (`TrainConfig`).

Both are stored in checkpoints as dicts. `TrainConfig` checks itself, so neither the Python API
nor the CLI (whose train options are made from its fields) can start a run that cannot work.
This module imports no torch, so the CLI starts fast.
"""

from __future__ import annotations

import math
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def too_small(settings: Any, minimum: dict[str, int]) -> str | None:
    """The first whole-number setting below its minimum (or not a whole number), as one line."""
    for name, low in minimum.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{_flag(name)} must be a whole number, not {value!r}"
        if value < low:
            return (
                f"{_flag(name)} must {'not be negative' if low == 0 else f'be at least {low}'}, not {value}"
            )
    return None


def not_fraction(settings: Any, names: tuple[str, ...]) -> str | None:
    """The first setting (a rate: dropout) outside [0, 1), as one line."""
    for name in names:
        value = getattr(settings, name)
        if not _real(value) or not 0 <= value < 1:
            return f"{_flag(name)} must be in [0, 1), not {value}"
    return None


def modality_problem(modalities: Any) -> str | None:
    """Why `modalities` is not a list of distinct known modalities, as one line; None when it is."""
    if not isinstance(modalities, list):
        return f"modalities {modalities!r}: expected a list of {', '.join(MODALITIES)}"
    bad = [str(m) for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        return f"unknown modality {', '.join(bad) or '(none)'}; choose from {', '.join(MODALITIES)}"
    if len(set(modalities)) != len(modalities):
        return f"modalities {','.join(modalities)}: each may be given once"
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
        """Checks every setting, so that a crafted checkpoint is one line, never a model built wrong."""
        if not isinstance(self.inputs, dict) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.inputs.values()
        ):
            raise ValueError(
                f"inputs {self.inputs!r}: each modality needs a whole-number width of at least 1"
            )
        if not self.modalities:
            self.modalities = [m for m in MODALITIES if m in self.inputs]
        problem = (
            unchosen(self, MODEL_CHOICES)
            or modality_problem(self.modalities)
            or too_small(self, {"window": 1, "width": 1, "iterations": 0})
            or not_fraction(self, ("dropout", "attention_dropout", "modality_dropout"))
        )
        if problem:
            raise ValueError(problem)
        if any(m not in self.inputs for m in self.modalities):
            raise ValueError(
                f"modalities {','.join(self.modalities)}: not all have an input width {self.inputs}"
            )


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
AT_LEAST_ONE = ("window", "hop", "width", "batch_size", "epochs", "patience", "seeds")
NOT_NEGATIVE = ("iterations", "warmup_steps", "plateau_patience", "threads")
POSITIVE = ("lr", "grad_clip", "plateau_factor")


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
        if self.eval_hop == 0 and isinstance(self.window, int) and self.window >= 1:
            self.eval_hop = max(1, self.window // 2)
        problem = (
            (modality_problem(self.modalities) if self.modalities else None)  # none: the store's
            or unchosen(self, {**MODEL_CHOICES, "visual": VISUAL_INPUTS})
            or too_small(self, {name: 1 for name in AT_LEAST_ONE} | {name: 0 for name in NOT_NEGATIVE})
            or not_fraction(self, ("dropout", "attention_dropout", "modality_dropout"))
            or self._rate_problem()
        )
        if problem:
            raise TrainError(problem)
        if not 1 <= self.eval_hop <= self.window:
            raise TrainError(f"--eval-hop {self.eval_hop} must be between 1 and the window ({self.window})")
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

    def _rate_problem(self) -> str | None:
        """The learning-rate settings: finite, positive (a floor and a decay may be 0), and a plateau
        factor below 1, since it multiplies the learning rate."""
        for name in (*POSITIVE, "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not _real(value) or not math.isfinite(value):
                return f"{_flag(name)} must be a finite number, not {value}"
            if value < 0 or (name in POSITIVE and value == 0):
                return (
                    f"{_flag(name)} must be {'positive' if name in POSITIVE else 'at least 0'}, not {value}"
                )
        if self.plateau_factor >= 1:
            return f"--plateau-factor must be below 1 (it multiplies the rate), not {self.plateau_factor}"
        return None

    def model_settings(self) -> dict[str, Any]:
        """The settings this config shares with ModelConfig, by name."""
        return {f.name: getattr(self, f.name) for f in fields(ModelConfig) if hasattr(self, f.name)}
