"""Training: windows cut from in-memory tensors, 1 - CCC loss, early stopping on validation CCC.

One plain `TrainConfig` holds every setting, checks itself, and is what the CLI's options are made
from. A run folder gets config.json, metrics.csv, TensorBoard logs (tb/), curves.png, and two
checkpoints written atomically: last.pt after every epoch (with optimizer, scheduler, loss scaler,
RNG, early-stopping state and the metrics so far, so `resume` continues exactly) and best.pt at the
best validation CCC. With `seeds` > 1 each seed trains in seed-<i>/ and best.pt holds all their
best weights: one model that predicts their mean. With `folds` = K the labelled videos are split
into K folds by group (a speaker never in two folds), and fold k tests a model trained on the
others (fold k + 1 its validation). Checkpoints hold only tensors and plain Python values, so they
load with torch.load(weights_only=True).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.errors import ModelUnavailable, resolve_device
from pipeline.files import atomic_file
from pipeline.store import StoreError, check_output_folder

from .config import FIXED_ON_RESUME, LEGACY, ModelConfig, TrainConfig, TrainError
from .data import (
    DataError,
    StoreData,
    cut,
    load_store,
    select_videos,
    store_modalities,
    window_index,
    windows,
)
from .metrics import ccc_loss, scores
from .model import (
    RCMA,
    Ensemble,
    autocast,
    build_model,
    finite,
    load_checkpoint,
    modalities_in_window,
    save_checkpoint,
    upgrade_state,
)
from .plots import curves_png
from .predict import predict_frames

LOG_EVERY = 10  # steps between training-loss logs


def model_config(cfg: TrainConfig, data: StoreData) -> ModelConfig:
    return ModelConfig(
        inputs=dict(data.dims), visual_crops=data.visual_input == "crops", **cfg.model_settings()
    )


def normalisation(data: StoreData, chosen: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of each embedding modality over the chosen videos' present frames."""
    rows = torch.as_tensor(_rows(data, chosen), device=data.labels.device)
    stats = {}
    for m, x in data.features.items():
        if x.dim() != 2:  # face crops: the CNN normalises its own input
            continue
        here = rows[data.present[m][rows]]
        if len(here) == 0:
            stats[m] = (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
            continue
        mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        square = torch.zeros_like(mean)
        for block in here.split(1 << 16):
            values = x[block].double()
            mean += values.sum(0)
            square += (values * values).sum(0)
        mean /= len(here)
        std = (square / len(here) - mean * mean).clamp_min(0).sqrt()
        stats[m] = (mean.float().cpu(), std.float().cpu())
    return stats


def validate(
    model: RCMA | Ensemble, data: StoreData, chosen: list[int], cfg: TrainConfig
) -> dict[str, float]:
    """The challenge metric: CCC over all labelled frames of all chosen videos, concatenated."""
    pred = predict_frames(model, data, chosen, cfg.window, cfg.eval_hop, cfg.batch_size)
    rows = _rows(data, chosen)
    mask = data.labelled[:-1].cpu().numpy()[rows]
    return scores(pred[rows][mask], data.labels[:-1].cpu().numpy()[rows][mask])


def _rows(data: StoreData, chosen: list[int]) -> np.ndarray:
    return np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in chosen])


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Trains (or resumes) a run; returns the best validation scores and where they were saved.

    With `folds` it cross-validates instead and returns the test scores per fold and their spread.
    """
    console = Console(stderr=True, quiet=quiet)
    out = Path(cfg.out)
    try:
        device = torch.device(resolve_device(cfg.device))
        check_output_folder(out, Path(cfg.features))
    except (ModelUnavailable, StoreError) as e:
        raise TrainError(str(e)) from None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not resume and out.exists() and any(out.glob("**/last.pt")):
        raise TrainError(f"{out} already holds a run (last.pt); use --resume or another --out")
    store = Path(cfg.features)
    if not cfg.modalities:
        try:
            cfg = replace(cfg, modalities=store_modalities(store))
        except DataError as e:
            raise TrainError(str(e)) from None
        console.print(
            f"modalities: {','.join(cfg.modalities)} (every one the store has; --modalities chooses)"
        )
    if resume:
        _check_resumable(out, cfg)
    if cfg.folds or cfg.seeds > 1:  # the members' folders hold their own; this one is for --resume
        out.mkdir(parents=True, exist_ok=True)
        settings = json.dumps({"train": asdict(cfg)}, indent=2)
        with atomic_file(out / "config.json") as tmp:
            tmp.write_text(settings)
    if cfg.folds:
        return _cross_validate(cfg, store, device, resume, console)
    try:
        train_ids = select_videos(store, [cfg.train_split], need_labels=True)
        val_ids = select_videos(store, [cfg.val_split], need_labels=True)
        both = sorted(set(train_ids) & set(val_ids))
        if both:
            raise TrainError(f"{store}: video {both[0]} is in both the training and the validation split")
        data = load_store(store, cfg.modalities, train_ids + val_ids, cfg.visual, device)
    except DataError as e:
        raise TrainError(str(e)) from None
    train_idx = list(range(len(train_ids)))
    val_idx = list(range(len(train_ids), len(train_ids) + len(val_ids)))
    _check_labelled(data, store, {cfg.train_split: train_idx, cfg.val_split: val_idx})
    return _train_seeds(cfg, data, train_idx, val_idx, out, resume, console)


def _check_labelled(data: StoreData, store: Path, parts: dict[str, list[int]]) -> None:
    labelled = data.labelled[:-1].cpu().numpy()
    for name, chosen in parts.items():
        if not chosen or not labelled[_rows(data, chosen)].any():
            raise TrainError(f"{store}: the {name} split's {len(chosen)} videos have no labelled frames")


def _train_seeds(
    cfg: TrainConfig,
    data: StoreData,
    train_idx: list[int],
    val_idx: list[int],
    out: Path,
    resume: bool,
    console: Console,
) -> dict[str, Any]:
    """One model in `out`, or with `seeds` > 1 one per seed and their ensemble in out/best.pt."""
    if cfg.seeds == 1:
        return fit(cfg, data, train_idx, val_idx, out, resume, console)
    results = []
    for i in range(cfg.seeds):
        console.print(f"seed {cfg.seed + i} ({i + 1} of {cfg.seeds})", highlight=False)
        member = replace(cfg, seed=cfg.seed + i, out=str(out / f"seed-{i}"))
        results.append(fit(member, data, train_idx, val_idx, Path(member.out), resume, console))
    ckpts = [load_checkpoint(r["best"]) for r in results]
    ensemble = build_model({**ckpts[0], "members": [c["model"] for c in ckpts]}, data.labels.device)
    val = validate(ensemble, data, val_idx, cfg)
    best = [r["best_ccc"] for r in results]
    summary = {
        "seeds": [cfg.seed + i for i in range(cfg.seeds)],
        "member_val_ccc": best,
        "member_val_ccc_mean": float(np.mean(best)),
        "member_val_ccc_std": float(np.std(best)),
        "ensemble_val": val,
    }
    checkpoint = {
        "config": asdict(cfg),
        "model_config": ckpts[0]["model_config"],
        "data": ckpts[0]["data"],
        "state": {"epoch": max(c["state"]["epoch"] for c in ckpts), "best": val["ccc"]},
        "val": val,
        "members": [c["model"] for c in ckpts],
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, out / "best.pt")
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    console.print(
        f"{cfg.seeds} seeds: val CCC {summary['member_val_ccc_mean']:.4f} "
        f"± {summary['member_val_ccc_std']:.4f} each, {val['ccc']:.4f} for their mean prediction",
        highlight=False,
    )
    return {
        "best_ccc": val["ccc"],
        "best_epoch": max(r["best_epoch"] for r in results),
        "epochs": max(r["epochs"] for r in results),
        "best": str(out / "best.pt"),
        "seeds": summary,
    }


def fold_of_videos(videos: list[str], groups: dict[str, str], folds: int, seed: int) -> list[int]:
    """The fold of each video: whole groups dealt round-robin to folds in a seeded random order."""
    names = sorted({groups.get(v, v) for v in videos})
    if len(names) < folds:
        raise TrainError(f"--folds {folds}: only {len(names)} groups of labelled videos to split")
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of_group = {names[g]: k % folds for k, g in enumerate(order)}
    return [fold_of_group[groups.get(v, v)] for v in videos]


def read_groups(path: Path) -> dict[str, str]:
    """video_id -> group from a CSV with a header naming `video_id` and `group` columns."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: cannot read the groups file ({type(e).__name__})") from None
    if not rows or not {"video_id", "group"} <= rows[0].keys():
        raise TrainError(f"{path}: a groups file needs a header with video_id and group columns")
    return {r["video_id"]: r["group"] for r in rows}


def _cross_validate(
    cfg: TrainConfig, store: Path, device: torch.device, resume: bool, console: Console
) -> dict[str, Any]:
    try:
        videos = select_videos(store, None, need_labels=True)
        data = load_store(store, cfg.modalities, videos, cfg.visual, device)
    except DataError as e:
        raise TrainError(str(e)) from None
    groups = read_groups(Path(cfg.groups)) if cfg.groups else {}
    missing = [v for v in videos if cfg.groups and v not in groups]
    if missing:
        raise TrainError(f"{cfg.groups}: no group for video {missing[0]} ({len(missing)} videos missing)")
    fold = np.array(fold_of_videos(videos, groups, cfg.folds, cfg.seed))
    out = Path(cfg.out)
    per_fold, pooled_pred, pooled_true = [], [], []
    labelled = data.labelled[:-1].cpu().numpy()
    for k in range(cfg.folds):
        test_idx = list(np.flatnonzero(fold == k))
        val_idx = list(np.flatnonzero(fold == (k + 1) % cfg.folds))
        train_idx = list(np.flatnonzero((fold != k) & (fold != (k + 1) % cfg.folds)))
        _check_labelled(data, store, {f"fold {k} test": test_idx, f"fold {k} training": train_idx})
        console.print(
            f"fold {k + 1} of {cfg.folds}: {len(train_idx)} train, {len(val_idx)} val, "
            f"{len(test_idx)} test videos",
            highlight=False,
        )
        result = _train_seeds(
            replace(cfg, out=str(out / f"fold-{k}")),
            data,
            train_idx,
            val_idx,
            out / f"fold-{k}",
            resume,
            console,
        )
        model = build_model(load_checkpoint(result["best"]), device)
        pred = predict_frames(model, data, test_idx, cfg.window, cfg.eval_hop, cfg.batch_size)
        rows = _rows(data, test_idx)
        rows = rows[labelled[rows]]
        true = data.labels[:-1].cpu().numpy()[rows]
        test = scores(pred[rows], true)
        pooled_pred.append(pred[rows])
        pooled_true.append(true)
        per_fold.append(
            {"fold": k, "videos": [videos[i] for i in test_idx], "val": result["best_ccc"], "test": test}
        )
        console.print(f"fold {k + 1}: test CCC {test['ccc']:.4f}", highlight=False)
    test_ccc = [f["test"]["ccc"] for f in per_fold]
    summary = {
        "folds": per_fold,
        "test_ccc_mean": float(np.mean(test_ccc)),
        "test_ccc_std": float(np.std(test_ccc)),
        "test_pooled": scores(np.concatenate(pooled_pred), np.concatenate(pooled_true)),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "folds.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    console.print(
        f"{cfg.folds}-fold test CCC {summary['test_ccc_mean']:.4f} ± {summary['test_ccc_std']:.4f} "
        f"(all folds' frames pooled: {summary['test_pooled']['ccc']:.4f})",
        highlight=False,
    )
    return {
        "best_ccc": summary["test_ccc_mean"],
        "best": str(out / "folds.json"),
        "folds": summary,
        "best_epoch": 0,
        "epochs": 0,
    }


def fit(
    cfg: TrainConfig,
    data: StoreData,
    train_idx: list[int],
    val_idx: list[int],
    out: Path,
    resume: bool,
    console: Console,
) -> dict[str, Any]:
    """Trains one model on the training videos, early-stopping on the validation videos."""
    device = data.labels.device
    ckpt = _start_checkpoint(out, resume)
    data_info = {"modalities": list(cfg.modalities), "dims": data.dims, "visual_input": data.visual_input}
    if ckpt is None or "stages" in ckpt["data"]:  # runs from before stages were recorded resume as they were
        data_info["stages"] = data.stages  # how the features were extracted: `rcma predict VIDEO` repeats it
    if ckpt is not None and ckpt["data"] != data_info:
        raise TrainError(f"{cfg.features}: features {data_info} differ from the checkpoint's {ckpt['data']}")

    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, data)
    model = RCMA(mcfg).to(device)
    model.set_normalisation(normalisation(data, train_idx))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
    )
    shuffle = torch.Generator().manual_seed(cfg.seed)
    scaler = loss_scaler(device)
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0}
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        model.load_state_dict(upgrade_state(ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        plateau.load_state_dict(ckpt["scheduler"])
        state = dict(ckpt["state"])
        history = [dict(r) for r in ckpt.get("history", _history(out / "metrics.csv", state["epoch"]))]
        if ckpt.get("scaler"):  # empty when no scaler ran; absent in runs from before it was saved
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        shuffle.set_state(ckpt["rng"]["shuffle"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    out.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps({"train": asdict(cfg), "model": asdict(mcfg), "data": data_info}, indent=2)
    with atomic_file(out / "config.json") as tmp:
        tmp.write_text(config_json)
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(out / "tb"), purge_step=state["step"] + 1 if state["step"] else None)

    starts, lengths = windows(data.offsets, cfg.window, cfg.hop, train_idx)
    starts_t = torch.as_tensor(starts, device=device)
    lengths_t = torch.as_tensor(lengths, device=device)
    steps_per_epoch = math.ceil(len(starts) / cfg.batch_size)
    console.print(
        f"{len(train_idx)} train videos ({int(lengths.sum())} frames, {len(starts)} windows), "
        f"{len(val_idx)} val videos; modalities {','.join(cfg.modalities)}"
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
        disable=console.quiet,
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
                index, valid = window_index(starts_t[pick], lengths_t[pick], cfg.window, data.n_frames)
                batch = cut(data, index, valid)
                data_time += time.perf_counter() - t0
                with autocast(device):
                    pred = model(batch["inputs"], batch["present"], valid)
                # a window with no input at all has nothing to learn from: its frames never count
                has_input = modalities_in_window(batch["present"], cfg.modalities).any(1, keepdim=True)
                loss = ccc_loss(pred, batch["labels"], batch["labelled"] & has_input)
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
            diverged = _diverged(model, loss_sum)
            if diverged:  # stop before anything of this epoch is saved: best.pt and last.pt stay finite
                tb.close()
                raise TrainError(
                    f"{out}: training diverged in epoch {epoch}: its {diverged} became NaN or infinite; "
                    f"the learning rate is likely too high (--lr {cfg.lr:g}): try a lower one"
                )
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
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": plateau.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "shuffle": shuffle.get_state(),
                },
            }
            if improved:  # best.pt first: last.pt must never claim a best epoch best.pt lacks
                save_checkpoint(checkpoint, out / "best.pt")
            save_checkpoint(checkpoint, out / "last.pt")
            _write_history(out / "metrics.csv", history)
            for key in ("train_loss", "val_ccc", "val_ccc_valence", "val_ccc_arousal", "lr"):
                tb.add_scalar(key.replace("_", "/", 1), row[key], state["step"])
            tb.flush()
            with atomic_file(out / "curves.png") as tmp:
                tmp.write_bytes(curves_png(history))
            console.print(
                f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  val CCC {val['ccc']:.4f} "
                f"(V {val['ccc_valence']:.4f}, A {val['ccc_arousal']:.4f})  "
                f"{row['frames_per_s']:,.0f} frames/s{'  *' if improved else ''}",
                highlight=False,
            )
    tb.close()
    if not (out / "best.pt").exists():
        raise TrainError(f"{out}: no epoch finished, so there is no best.pt")
    return {
        "best_ccc": state["best"],
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "best": str(out / "best.pt"),
    }


def _diverged(model: RCMA, loss_sum: torch.Tensor) -> str:
    """What of an epoch's training became NaN or infinite ("" when nothing did). Weights include the
    BatchNorm statistics: a too-large step can leave the loss finite but them NaN."""
    if not torch.isfinite(loss_sum):
        return "training loss"
    return "" if finite(model.state_dict()) else "weights"


def loss_scaler(device: torch.device) -> torch.amp.GradScaler:
    """The fp16 loss scaler: on where autocast runs in float16 (CUDA without bfloat16), else off.
    Its scale is part of a run's state: saved in last.pt and restored on resume."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    """The model- and data-deciding settings of `cfg` match the run's own."""
    saved = saved_config(out)
    for key in FIXED_ON_RESUME:
        if key in saved and saved[key] != getattr(cfg, key):
            given, theirs = (
                ",".join(v) if isinstance(v, list) else v for v in (getattr(cfg, key), saved[key])
            )
            raise TrainError(f"--{key} {given} differs from the run's {theirs}; resume with --{key} {theirs}")


def _start_checkpoint(out: Path, resume: bool) -> dict[str, Any] | None:
    """last.pt of a run to continue; None to start afresh (a seed or fold that had not started)."""
    last = out / "last.pt"
    if resume and last.exists():
        return load_checkpoint(last)
    return None


def saved_config(out: Path) -> dict[str, Any]:
    """The settings of the run in `out`, so that resuming it needs no options repeated."""
    out = Path(out)
    config = out / "config.json"
    if not config.exists() or not any(out.glob("**/last.pt")):
        raise TrainError(f"{out / 'last.pt'}: nothing to resume")
    try:
        saved = dict(json.loads(config.read_text())["train"])
    except (OSError, ValueError, KeyError, TypeError):
        raise TrainError(f"{config}: not a readable run configuration") from None
    return {**LEGACY, **saved}  # a run from before an option existed was trained without it


def resolve_config(given: dict[str, Any], typed: set[str], resume: bool) -> TrainConfig:
    """The run's settings: `given` as they are, or on resume the run's own with `typed` ones on top."""
    if not resume:
        return TrainConfig(**given)
    saved = saved_config(Path(given["out"]))
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **{k: given[k] for k in typed}})


def run(given: dict[str, Any], typed: set[str], resume: bool = False, quiet: bool = False) -> str:
    """`rcma train`: the options as given (modalities comma-separated; `typed`, those given on the
    command line, override a resumed run's own), trained; returns the result as one line."""
    modalities = [m.strip() for m in given["modalities"].split(",") if m.strip()]
    result = train(
        resolve_config({**given, "modalities": modalities}, typed, resume), resume=resume, quiet=quiet
    )
    if "folds" in result:
        return f"mean test CCC over folds {result['best_ccc']:.4f} -> {result['best']}"
    return f"best val CCC {result['best_ccc']:.4f} at epoch {result['best_epoch']} -> {result['best']}"


def _history(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Rows of a run whose checkpoints predate `history` in last.pt, cut back to its epoch."""
    if not path.exists() or upto_epoch == 0:
        return []
    with path.open() as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: int(v) if k in ("epoch", "step") else v for k, v in r.items()})

    with atomic_file(path) as tmp:
        write(tmp)
