"""Training: windows cut from in-memory tensors, 1 - CCC loss, early stopping on validation CCC.

One plain `TrainConfig` holds every setting. A run folder gets config.json, metrics.csv,
TensorBoard logs (tb/), curves.png, and two checkpoints written atomically: last.pt after every
epoch (with optimizer, scheduler, RNG and early-stopping state, so `resume` continues exactly)
and best.pt at the best validation CCC. Checkpoints hold only tensors and plain Python values,
so they load with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import data as fd
from .metrics import ccc_loss, scores
from .model import MODALITIES, Fusion, ModelConfig

# Settings a resumed run must share with the checkpoint: they decide the model or the data.
LOG_EVERY = 10  # steps between training-loss logs
FIXED_ON_RESUME = ("modalities", "fusion", "joint", "visual", "window", "width", "iterations")


@dataclass
class TrainConfig:
    features: str = "store.h5"
    out: str = "runs/rcma"
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    fusion: str = "rcma"  # rcma | concat
    joint: str = "others"  # others (RCMA) | all (RJCMA)
    visual: str = "auto"  # auto | embedding | crops
    train_split: str = "train"
    val_split: str = "val"
    window: int = 300
    hop: int = 200
    eval_hop: int = 150
    width: int = 128
    iterations: int = 3
    dropout: float = 0.2
    batch_size: int = 32
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    min_lr: float = 1e-6
    patience: int = 10  # early stopping, in epochs without a better validation CCC
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default


class TrainError(Exception):
    """A run that cannot start or resume; the message says why in one line."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name} asked for, but torch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16), full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def model_config(cfg: TrainConfig, data: fd.StoreData) -> ModelConfig:
    return ModelConfig(
        inputs=dict(data.dims),
        window=cfg.window,
        width=cfg.width,
        iterations=cfg.iterations,
        fusion=cfg.fusion,
        joint=cfg.joint,
        dropout=cfg.dropout,
        visual_crops=data.visual_input == "crops",
        modalities=list(cfg.modalities),
    )


@torch.no_grad()
def predict_frames(
    model: Fusion, data: fd.StoreData, chosen: list[int], window: int, hop: int, batch_size: int = 32
) -> np.ndarray:
    """(N, 2) predictions for the chosen videos' frames, overlapping windows averaged; NaN elsewhere."""
    device = data.labels.device
    n = data.n_frames
    total = torch.zeros(n + 1, 2, device=device)
    count = torch.zeros(n + 1, device=device)
    starts, lengths = fd.windows(data.offsets, window, hop, chosen)
    was_training = model.training
    model.eval()
    for lo in range(0, len(starts), batch_size):
        s = torch.as_tensor(starts[lo : lo + batch_size], device=device)
        k = torch.as_tensor(lengths[lo : lo + batch_size], device=device)
        index, valid = fd.window_index(s, k, window, n)
        batch = fd.cut(data, index, valid)
        with autocast(device):
            pred = model(batch["inputs"], batch["present"], valid)
        pred = pred.float() * valid.unsqueeze(-1)
        total.index_add_(0, index.flatten(), pred.flatten(0, 1))
        count.index_add_(0, index.flatten(), valid.flatten().float())
    model.train(was_training)
    out = (total[:n] / count[:n].unsqueeze(-1)).cpu().numpy()
    return out.astype(np.float32)


def validate(model: Fusion, data: fd.StoreData, chosen: list[int], cfg: TrainConfig) -> dict[str, float]:
    """The challenge metric: CCC over all labelled frames of all chosen videos, concatenated."""
    pred = predict_frames(model, data, chosen, cfg.window, cfg.eval_hop, cfg.batch_size)
    rows = _rows(data, chosen)
    mask = data.labelled[:-1].cpu().numpy()[rows]
    return scores(pred[rows][mask], data.labels[:-1].cpu().numpy()[rows][mask])


def _rows(data: fd.StoreData, chosen: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in chosen])


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Trains (or resumes) a run; returns the best validation scores and where they were saved."""
    console = Console(stderr=True, quiet=quiet)
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = _start_checkpoint(out, cfg, resume)
    bad = [m for m in cfg.modalities if m not in MODALITIES]
    if bad or not cfg.modalities:
        raise TrainError(
            f"unknown modality {', '.join(bad) or '(none)'}; choose from {', '.join(MODALITIES)}"
        )
    if cfg.val_split == cfg.train_split:
        raise TrainError(f"validation split must differ from the training split ({cfg.train_split})")
    store = Path(cfg.features)
    try:
        train_ids = fd.select_videos(store, [cfg.train_split], need_labels=True)
        val_ids = fd.select_videos(store, [cfg.val_split], need_labels=True)
        both = sorted(set(train_ids) & set(val_ids))
        if both:
            raise TrainError(f"{store}: video {both[0]} is in both the training and the validation split")
        data = fd.load(store, cfg.modalities, train_ids + val_ids, cfg.visual, device)
        stages = fd.stage_configs(store, train_ids + val_ids, cfg.modalities)
    except fd.DataError as e:
        raise TrainError(str(e)) from None
    train_idx = list(range(len(train_ids)))
    val_idx = list(range(len(train_ids), len(train_ids) + len(val_ids)))
    labelled = data.labelled[:-1].cpu().numpy()
    for name, chosen in ((cfg.train_split, train_idx), (cfg.val_split, val_idx)):
        if not labelled[_rows(data, chosen)].any():
            raise TrainError(f"{store}: the {name} split's {len(chosen)} videos have no labelled frames")
    data_info = {"modalities": list(cfg.modalities), "dims": data.dims, "visual_input": data.visual_input}
    if ckpt is None or "stages" in ckpt["data"]:  # runs from before stages were recorded resume as they were
        data_info["stages"] = stages  # how the features were extracted: `rcma predict VIDEO` repeats it
    if ckpt is not None and ckpt["data"] != data_info:
        raise TrainError(f"{store}: features {data_info} differ from the checkpoint's {ckpt['data']}")

    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, data)
    model = Fusion(mcfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
    )
    shuffle = torch.Generator().manual_seed(cfg.seed)
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        plateau.load_state_dict(ckpt["scheduler"])
        state = dict(ckpt["state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        shuffle.set_state(ckpt["rng"]["shuffle"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(
        out / "config.json",
        json.dumps({"train": asdict(cfg), "model": asdict(mcfg), "data": data_info}, indent=2),
    )
    history = _history(out / "metrics.csv", state["epoch"])
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out / "tb"), purge_step=state["step"] + 1 if state["step"] else None)

    starts, lengths = fd.windows(data.offsets, cfg.window, cfg.hop, train_idx)
    starts_t = torch.as_tensor(starts, device=device)
    lengths_t = torch.as_tensor(lengths, device=device)
    steps_per_epoch = math.ceil(len(starts) / cfg.batch_size)
    console.print(
        f"{len(train_ids)} train videos ({int(lengths.sum())} frames, {len(starts)} windows), "
        f"{len(val_ids)} val videos; modalities {','.join(cfg.modalities)}"
        f"{' (visual from crops)' if data.visual_input == 'crops' else ''}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {device}",
        highlight=False,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=quiet,
        transient=True,
    )
    model.train()
    with progress:
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"] + 1
            task = progress.add_task(f"epoch {epoch}", total=steps_per_epoch, info="")
            order = torch.randperm(len(starts), generator=shuffle)
            loss_sum, frames, data_time = torch.zeros((), device=device), 0, 0.0
            began = time.perf_counter()
            for lo in range(0, len(order), cfg.batch_size):
                if state["step"] < cfg.warmup_steps:
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * (state["step"] + 1) / cfg.warmup_steps
                t0 = time.perf_counter()
                pick_cpu = order[lo : lo + cfg.batch_size]
                pick = pick_cpu.to(device, non_blocking=True)
                index, valid = fd.window_index(starts_t[pick], lengths_t[pick], cfg.window, data.n_frames)
                batch = fd.cut(data, index, valid)
                data_time += time.perf_counter() - t0
                with autocast(device):
                    pred = model(batch["inputs"], batch["present"], valid)
                loss = ccc_loss(pred, batch["labels"], batch["labelled"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                state["step"] += 1
                loss_sum += loss.detach()
                frames += int(lengths[pick_cpu.numpy()].sum())
                if state["step"] % LOG_EVERY == 0:  # .item() waits for the GPU: not every step
                    value = loss.item()
                    tb.add_scalar("train/loss", value, state["step"])
                    progress.update(task, info=f"loss {value:.3f}")
                progress.update(task, advance=1)
            seconds = time.perf_counter() - began
            progress.remove_task(task)
            val = validate(model, data, val_idx, cfg)
            score = val["ccc"] if math.isfinite(val["ccc"]) else -1.0
            if state["step"] > cfg.warmup_steps:
                plateau.step(score)
            state["epoch"] = epoch
            improved = score > state["best"]
            if improved:
                state.update(best=score, best_epoch=epoch, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            row = {
                "epoch": epoch,
                "step": state["step"],
                "train_loss": loss_sum.item() / steps_per_epoch,
                "val_ccc": val["ccc"],
                "val_ccc_valence": val["ccc_valence"],
                "val_ccc_arousal": val["ccc_arousal"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "frames_per_s": frames / seconds,
                "data_share": data_time / seconds,  # on CUDA without a sync: a lower bound
            }
            history.append(row)
            checkpoint = {
                "config": asdict(cfg),
                "model_config": asdict(mcfg),
                "data": data_info,
                "state": dict(state),
                "val": val,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": plateau.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "shuffle": shuffle.get_state(),
                },
            }
            if improved:  # best.pt first: last.pt must never claim a best epoch best.pt lacks
                _atomic_save(checkpoint, out / "best.pt")
            _atomic_save(checkpoint, out / "last.pt")
            _write_history(out / "metrics.csv", history)
            for key in ("train_loss", "val_ccc", "val_ccc_valence", "val_ccc_arousal", "lr"):
                tb.add_scalar(key.replace("_", "/", 1), row[key], state["step"])
            tb.flush()
            _plot_curves(out / "curves.png", history)
            console.print(
                f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  val CCC {val['ccc']:.4f} "
                f"(V {val['ccc_valence']:.4f}, A {val['ccc_arousal']:.4f})  "
                f"{row['frames_per_s']:,.0f} frames/s{'  *' if improved else ''}",
                highlight=False,
            )
    tb.close()
    return {
        "best_ccc": state["best"],
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "best": str(out / "best.pt"),
    }


def _start_checkpoint(out: Path, cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    last = out / "last.pt"
    if not resume:
        if last.exists():
            raise TrainError(f"{out} already holds a run (last.pt); use --resume or another --out")
        return None
    if not last.exists():
        raise TrainError(f"{last}: nothing to resume")
    ckpt = load_checkpoint(last)
    saved = ckpt["config"]
    for key in FIXED_ON_RESUME:
        if saved[key] != getattr(cfg, key):
            given, theirs = (
                ",".join(v) if isinstance(v, list) else v for v in (getattr(cfg, key), saved[key])
            )
            raise TrainError(f"--{key} {given} differs from the run's {theirs}; resume with --{key} {theirs}")
    return ckpt


def saved_config(out: Path) -> dict[str, Any]:
    """The settings of the run in `out`, so that resuming it needs no options repeated."""
    last = Path(out) / "last.pt"
    if not last.exists():
        raise TrainError(f"{last}: nothing to resume")
    return dict(load_checkpoint(last)["config"])


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "data"} <= ckpt.keys():
        raise TrainError(f"{path}: not an rcma checkpoint")
    return ckpt


def build_model(ckpt: dict[str, Any], device: torch.device) -> Fusion:
    known = {f.name for f in fields(ModelConfig)}
    model = Fusion(ModelConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known}))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _history(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Rows already logged, cut back to the checkpoint's epoch (a crash may have logged more)."""
    if not path.exists() or upto_epoch == 0:
        return []
    with path.open() as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: int(v) if k in ("epoch", "step") else v for k, v in r.items()})
    os.replace(tmp, path)


def _plot_curves(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in rows], marker=".")
    ax1.set(xlabel="epoch", ylabel="train loss (1 - CCC)")
    for key, label in (("val_ccc", "mean"), ("val_ccc_valence", "valence"), ("val_ccc_arousal", "arousal")):
        ax2.plot(epochs, [r[key] for r in rows], marker=".", label=label)
    ax2.set(xlabel="epoch", ylabel="validation CCC")
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
