"""Evaluation and prediction with a trained checkpoint, on a store or straight from media files.

Every check (checkpoint readable, store has the checkpoint's modalities at the same widths, the
split is not empty, features finite) happens before anything is written.

`predict_media` is the one place where fusion/ drives extraction: it rebuilds the stages the
checkpoint records (fusion.data.stage_configs, saved at training time), runs them through
pipeline.runner into a store, then predicts from that store like `predict`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ModelUnavailable, one_line, resolve_device
from pipeline.files import atomic_file
from pipeline.store import StoreError, check_output_folder, config_difference, id_file

from .config import TrainError
from .data import (
    STAGE_OF,
    DataError,
    StoreData,
    audio_only_fps,
    cut,
    load_store,
    select_videos,
    window_index,
    windows,
)
from .metrics import scores, video_scores
from .model import RCMA, Ensemble, autocast, build_model, load_checkpoint
from .plots import video_png

SUBMISSION = "submission"  # Aff-Wild2 challenge format: <video_id>.txt, `valence,arousal`, one line a frame
ABAW_FILE = "abaw_va_predictions.txt"  # ABAW VA layout: `image_location,valence,arousal`, <id>/00001.jpg ...
REPORT = "report.html"


class PredictError(Exception):
    """A checkpoint and store that cannot be used together; the message says why in one line."""


@torch.no_grad()
def predict_frames(
    model: RCMA | Ensemble,
    data: StoreData,
    chosen: list[int],
    window: int,
    hop: int,
    batch_size: int = 32,
) -> np.ndarray:
    """(N, 2) predictions for the chosen videos' frames, overlapping windows averaged; NaN elsewhere."""
    device = data.labels.device
    n = data.n_frames
    total = torch.zeros(n + 1, 2, device=device)
    count = torch.zeros(n + 1, device=device)
    starts, lengths = windows(data.offsets, window, hop, chosen)
    was_training = model.training
    model.eval()
    for lo in range(0, len(starts), batch_size):
        s = torch.as_tensor(starts[lo : lo + batch_size], device=device)
        k = torch.as_tensor(lengths[lo : lo + batch_size], device=device)
        index, valid = window_index(s, k, window, n)
        batch = cut(data, index, valid)
        with autocast(device):
            pred = model(batch["inputs"], batch["present"], valid)
        pred = pred.float() * valid.unsqueeze(-1)
        total.index_add_(0, index.flatten(), pred.flatten(0, 1))
        count.index_add_(0, index.flatten(), valid.flatten().float())
    model.train(was_training)
    out = (total[:n] / count[:n].unsqueeze(-1)).cpu().numpy()
    return out.astype(np.float32)


def _prepare(
    model_path: Path,
    store: Path,
    splits: list[str] | None,
    need_labels: bool,
    device: str,
    videos: list[str] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], StoreData]:
    try:
        dev = torch.device(resolve_device(device))
        ckpt = load_checkpoint(model_path, dev)
        info = ckpt["data"]
        if videos is None:
            videos = select_videos(store, splits, need_labels)
        data = load_store(store, list(info["modalities"]), videos, info["visual_input"] or "auto", dev)
    except (TrainError, DataError, ModelUnavailable) as e:
        raise PredictError(str(e)) from None
    if data.dims != info["dims"]:
        changed = ", ".join(
            f"{m} {info['dims'][m]} in the checkpoint, {data.dims.get(m)} in the store"
            for m in info["dims"]
            if info["dims"][m] != data.dims.get(m)
        )
        raise PredictError(f"{model_path}: feature widths differ from {store}: {changed}")
    trained = info.get("stages")  # absent in checkpoints of older runs
    for stage, record in (trained or {}).items():
        found = data.stages.get(stage)
        if stage != "grid" and found and found["config_hash"] != record["config_hash"]:
            difference = config_difference(record["config"], found["config"], "trained on", "here")
            raise PredictError(
                f"{store}: its {stage} features were made with other settings than {model_path} was "
                f"trained on ({difference}); extract them with the model's settings"
            )
    _check_audio_fps(model_path, (trained or {}).get("grid", {}).get("audio_fps"), store, data.video_ids)
    try:
        return build_model(ckpt, dev), ckpt, data
    except TrainError as e:
        raise PredictError(f"{model_path}: {e}") from None


def _check_audio_fps(model_path: Path, trained: float | None, store: Path, videos: list[str]) -> None:
    """Audio-only files on the frame grid the model's were on (`rcma extract --fps`): a model that
    learnt at 30 frames a second would read a 25 fps grid as speech a fifth faster."""
    if trained is None:
        return
    try:
        rates = audio_only_fps(store, videos)
    except DataError as e:
        raise PredictError(str(e)) from None
    for vid, fps in rates.items():
        if not math.isclose(fps, trained, rel_tol=1e-9):
            raise PredictError(
                f"{store}: video {vid} is an audio-only file on a {fps:g} fps frame grid, but {model_path} "
                f"was trained on audio-only files at {trained:g} fps; extract it with --fps {trained:g}"
            )


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
            per_video[vid] = video_scores(pred[lo:hi][m], true[lo:hi][m])
    return {
        "model": str(model_path),
        "features": str(store),
        "split": split or "all",
        "modalities": ckpt["data"]["modalities"],
        "overall": scores(pred[mask], true[mask]),
        "videos": per_video,
    }


def print_evaluation(
    model_path: Path, store: Path, split: str | None, device: str, as_json: bool, console: Any
) -> None:
    """`evaluate` (split "all": every labelled video), printed on the rich `console`: a table per
    video and over all frames, or JSON. A per-video score that is undefined (constant labels) is a
    dash, and one line says why."""
    import json

    from rich.table import Table

    result = evaluate(model_path, store, None if split == "all" else split, device)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("video", "frames", "CCC V", "CCC A", "PCC V", "PCC A", "RMSE V", "RMSE A")
    rows = [*result["videos"].items(), ("all frames", result["overall"])]
    for name, s in rows:
        table.add_row(
            name,
            str(s["frames"]),
            *(_cell(s[f"{k}_{d}"]) for k in ("ccc", "pcc", "rmse") for d in ("valence", "arousal")),
        )
    console.print(table)
    if any(v is None for _, s in rows for v in s.values()):
        console.print(
            "-: CCC and PCC are undefined for a video whose labels are constant (one label per clip); "
            "the all-frames row scores them across videos",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"mean CCC ({result['split']}): {result['overall']['ccc']:.4f}", highlight=False, soft_wrap=True
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass
class PredictRun:
    """What one prediction run produced, and the lines worth telling the user."""

    out: Path
    store: Path
    videos: list[str]
    report: Path
    failed: list[str] = field(default_factory=list)  # one line per input that could not be predicted
    warnings: list[str] = field(default_factory=list)  # one line per input predicted with a gap
    skipped: list[str] = field(default_factory=list)  # files in the folders given that are not media


def choose_videos(
    store: Path, split: str | None = None, split_file: Path | None = None, video_list: Path | None = None
) -> list[str] | None:
    """Videos to predict in a store: a split (from the store's labels, or from `split_file` for
    unlabelled videos such as a test set), or the ids in `video_list`; None means every video."""
    from pipeline.labels import LabelError, read_split_file
    from pipeline.store import open_store, video_ids

    if split_file is not None and split is None:
        raise PredictError(f"{split_file}: a split file needs --split NAME (which of its splits to predict)")
    if video_list is None and split_file is None:
        return None
    try:
        with open_store(store) as f:
            known = video_ids(f)
        if video_list is not None:
            if not video_list.is_file():
                raise PredictError(f"{video_list}: no such list file")
            wanted = [
                line.split(",")[0].strip()
                for line in video_list.read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
            where = str(video_list)
        else:
            mapping = read_split_file(split_file)
            wanted = [vid for vid, name in mapping.items() if name == split]
            where = f"{split_file} (split {split})"
    except (StoreError, LabelError, UnicodeDecodeError) as e:
        raise PredictError(one_line(e)) from None
    missing = [vid for vid in wanted if vid not in known]
    if missing:
        raise PredictError(
            f"{where}: {len(missing)} videos are not in {store}, first {missing[0]!r} "
            f"(extract them with `rcma extract ... --store {store}`)"
        )
    if not wanted:
        raise PredictError(f"{where}: lists no videos")
    return list(dict.fromkeys(wanted))


def predict(
    model_path: Path,
    store: Path,
    out: Path,
    split: str | None = None,
    plots: bool = True,
    device: str = "auto",
    videos: list[str] | None = None,
) -> list[str]:
    """Per video: <id>.csv, submission/<id>.txt and plots/<id>.png; for the run, the ABAW file and
    report.html. `videos` (see `choose_videos`) overrides `split`, and needs no labels."""
    try:
        check_output_folder(out, store)
    except StoreError as e:
        raise PredictError(str(e)) from None
    need_labels = split is not None and videos is None
    model, ckpt, data = _prepare(model_path, store, [split] if split else None, need_labels, device, videos)
    window, hop = _hop(ckpt)
    pred = predict_frames(model, data, list(range(len(data.video_ids))), window, hop)
    write_outputs(out, model_path, ckpt, data, pred, store, plots)
    return data.video_ids


def write_outputs(
    out: Path,
    model_path: Path,
    ckpt: dict[str, Any],
    data: StoreData,
    pred: np.ndarray,
    store: Path,
    plots: bool = True,
    failed: list[str] | None = None,
    notes: list[str] | None = None,
    sources: dict[str, str] | None = None,
) -> Path:
    """Writes every per-video file and the run's ABAW file and report; returns the report's path."""
    from .report import model_summary, read_expression, video_section, write_report

    true = data.labels[:-1].cpu().numpy()
    mask = data.labelled[:-1].cpu().numpy()
    modalities = list(ckpt["data"]["modalities"])
    present = {m: data.present[m][:-1].cpu().numpy() for m in modalities}
    sections = []
    abaw_rows: list[tuple[str, str, str]] = []
    for i, vid in enumerate(data.video_ids):
        lo, hi = data.offsets[i], data.offsets[i + 1]
        p, t = pred[lo:hi], data.timestamps[lo:hi]
        flags = {m: present[m][lo:hi] for m in modalities}
        _write_csv(
            id_file(out, vid, ".csv"),
            ["frame", "time", "valence", "arousal", *(f"{m}_present" for m in modalities)],
            (
                (k, f"{t[k]:.6f}", f"{p[k, 0]:.6f}", f"{p[k, 1]:.6f}", *(int(flags[m][k]) for m in flags))
                for k in range(hi - lo)
            ),
        )
        _write_csv(
            id_file(out / SUBMISSION, vid, ".txt"),
            ["valence", "arousal"],
            ((f"{p[k, 0]:.6f}", f"{p[k, 1]:.6f}") for k in range(hi - lo)),
        )
        abaw_rows += [(f"{vid}/{k + 1:05d}.jpg", f"{p[k, 0]:.6f}", f"{p[k, 1]:.6f}") for k in range(hi - lo)]
        labels = np.where(mask[lo:hi, None], true[lo:hi], np.nan) if mask[lo:hi].any() else None
        expression = read_expression(store, vid)
        png = video_png(vid, t, p, labels, flags, expression)
        if plots:
            with atomic_file(_parent_made(id_file(out / "plots", vid, ".png"))) as tmp:
                tmp.write_bytes(png)
        source = (sources or {}).get(vid, "")
        sections.append(video_section(store, vid, t, p, flags, png, source, expression))
    _write_csv(out / ABAW_FILE, ["image_location", "valence", "arousal"], abaw_rows)
    report = out / REPORT
    write_report(report, model_summary(ckpt, model_path), sections, failed or [], notes or [])
    return report


def rebuild_stages(ckpt: dict[str, Any], model_path: Path, device: str) -> tuple[list[Any], float | None]:
    """The stages (and audio-only frame rate) the checkpoint's features came from, checked to give the
    same config hash here; a model file or setting that cannot be reproduced is a one-line error."""
    from pipeline.stages import build_stage, config_hash, resolved

    recorded = ckpt["data"].get("stages")
    wanted = [STAGE_OF[m] for m in ckpt["data"]["modalities"]]
    if not recorded or any(stage not in recorded for stage in wanted):
        raise PredictError(
            f"{model_path}: the checkpoint does not record how its features were extracted (trained by an "
            "older rcma); extract with its training settings and run `rcma predict --features STORE`"
        )
    stages = []
    for name in wanted:
        config, expected = recorded[name]["config"], recorded[name]["config_hash"]
        if config.get("faces_from"):
            raise PredictError(
                f"{model_path}: trained on faces read from a folder of aligned crops (--faces-from): "
                "extract the videos' faces the same way, then run `rcma predict --features STORE`"
            )
        tried: list[dict[str, Any]] = []
        error = ""
        try:
            choices = list(_stage_options(name, config, device))
        except KeyError as e:
            raise PredictError(
                f"{model_path}: its record of the {name} stage lacks the setting {e}"
            ) from None
        for options in choices:
            try:
                stage = resolved(build_stage(name, options))
                got = stage.config()
            except (ModelUnavailable, ValueError, TypeError, OSError) as e:  # try the next; report the last
                error = one_line(e)
                continue
            if config_hash(stage) == expected:
                stages.append(stage)
                break
            tried.append(got)
        else:
            if not tried:
                raise PredictError(f"{model_path}: cannot rebuild its {name} stage: {error}")
            got = tried[-1]
            differ = [k for k in sorted(set(config) | set(got)) if config.get(k) != got.get(k)]
            shown = "; ".join(f"{k}: trained with {config.get(k)!r}, here {got.get(k)!r}" for k in differ[:3])
            gone = [v for v in config.values() if _looks_like_path(v) and not Path(v).expanduser().exists()]
            if gone:
                shown = f"model file {gone[0]} is missing; {shown}"
            raise PredictError(
                f"{model_path}: its {name} features cannot be reproduced here ({shown}); provide the same "
                "model files (paths or $RCMA_* variables, see `rcma doctor`) or extract with --features"
            )
    fps = ckpt["data"]["stages"].get("grid", {}).get("audio_fps")
    return stages, fps


def _stage_options(name: str, config: dict[str, Any], device: str) -> Iterator[dict[str, Any]]:
    """Options that should rebuild a stage with `config`: this machine's defaults (models found by
    $RCMA_* variables and packaged copies) first, then the model names the config records."""
    if name == "faces":
        yield {"visual_model": config["visual_model"], "crops": config["crops"], "device": device}
    elif name == "audio":
        options = {
            "audio_model": config["audio_model"],
            "logmel_pool": config.get("logmel_pool", "stats"),
            "audio_layer": config.get("audio_layer"),
            "audio_weights": config.get("audio_weights"),
            "audio_window": config.get("audio_window"),
            "device": device,
        }
        if config.get("whisper_runtime"):  # the encoder ran on the text stage's backend, or torch
            ctranslate2 = config["whisper_runtime"] == "ctranslate2"
            options["asr_backend"] = "faster-whisper" if ctranslate2 else "openai-whisper"
            options["asr_compute_type"] = config.get("whisper_compute_type")
        yield {**options, "asr_model": None}
        if config.get("whisper_model"):
            yield {**options, "asr_model": config["whisper_model"]}
    elif name == "text":
        options = {"asr_backend": config["asr_backend"], "text_unit": config["text_unit"], "device": device}
        if config.get("asr_compute_type"):  # int8 on a CPU and float16 on a GPU give other words
            options["asr_compute_type"] = config["asr_compute_type"]
        yield {**options, "asr_model": None, "text_model": None}
        yield {**options, "asr_model": config["asr_model"], "text_model": config["text_model"]}
    else:
        raise PredictError(f"unknown stage {name!r} in the checkpoint")


def predict_media(
    model_path: Path,
    inputs: list[Path],
    out: Path,
    store: Path | None = None,
    plots: bool = True,
    device: str = "auto",
    quiet: bool = False,
    say: Callable[[str], None] | None = None,
) -> PredictRun:
    """Extracts what the checkpoint needs from media files (reusing what `store` already holds),
    predicts every file that could be extracted, and writes the outputs and report.html into `out`.

    A file that cannot be read is a line in `failed`; the other files are still predicted.
    """
    from rich.console import Console

    from pipeline import runner
    from pipeline.media import DEFAULT_FPS
    from pipeline.store import check_store_path

    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    tell = say or (lambda line: console.print(line, highlight=False, markup=False))
    store = store or out / "store.h5"
    try:
        check_output_folder(out, store)
        ckpt = load_checkpoint(model_path)
    except (StoreError, TrainError) as e:
        raise PredictError(str(e)) from None
    stages, fps = rebuild_stages(ckpt, model_path, device)
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_store_path(store)
    except StoreError as e:
        raise PredictError(str(e)) from None
    jobs, found = runner.discover(inputs)
    run = PredictRun(out, store, [], out / REPORT)
    run.failed += [f"{path}: {problem}" for path, problem in found.bad_paths]
    run.skipped += [f"{path}: {problem}" for path, problem in found.not_media]
    for line in run.failed:
        tell(f"failed: {line}")
    for line in run.skipped:
        tell(f"skipped: {line}")
    if not jobs:
        raise PredictError("no media files found in " + ", ".join(map(str, inputs)))
    extractor = runner.Extractor(store, stages, fps or DEFAULT_FPS, forceable=False)
    bad: set[str] = set()
    with runner.progress_bars(console, quiet) as bars:
        files = bars.add_task("files", total=len(jobs))
        frames = bars.add_task("frames", total=None, visible=False)  # shown once a stage runs

        def on_frames(label: str, done: int, total: int) -> None:
            bars.update(frames, description=label, completed=done, total=total, visible=True)

        def on_job(job: runner.Job, outcomes: list[runner.Outcome]) -> None:
            for o in outcomes:
                if o.status == "failed" and job.video_id not in bad:
                    bad.add(job.video_id)
                    run.failed.append(f"{o.source}: {o.stage}: {o.error}")
                    tell(f"failed: {run.failed[-1]}")
                elif o.warning:
                    run.warnings.append(f"{o.source}: {o.stage}: {o.warning}")
                    tell(f"warning: {run.warnings[-1]}")
            bars.advance(files)

        try:
            runner.run_local(jobs, extractor, on_frames, on_job)
        except runner.FatalError as e:
            raise PredictError(f"{model_path}: {e}") from None
    good = [job for job in jobs if job.video_id not in bad]
    if not good:
        raise PredictError(f"none of the {len(jobs)} files could be extracted: {run.failed[-1]}")
    model, ckpt, data = _prepare(model_path, store, None, False, device, [job.video_id for job in good])
    window, hop = _hop(ckpt)
    pred = predict_frames(model, data, list(range(len(data.video_ids))), window, hop)
    sources = {job.video_id: str(job.path) for job in good}
    run.report = write_outputs(
        out, model_path, ckpt, data, pred, store, plots, run.failed, run.warnings, sources
    )
    run.videos = data.video_ids
    return run


def _looks_like_path(value: Any) -> bool:
    return isinstance(value, str) and (os.sep in value or value.endswith((".pt", ".onnx", ".bin")))


def _parent_made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    with atomic_file(_parent_made(path)) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def predict_inputs(
    model_path: Path,
    inputs: list[Path] | None,
    features: Path | None,
    store: Path | None,
    out: Path,
    split: str | None,
    split_file: Path | None,
    video_list: Path | None,
    plots: bool,
    device: str,
    quiet: bool,
    console: Any,
) -> bool:
    """`rcma predict`: media files (`inputs`, extracted then predicted, see `predict_media`) or a
    store's videos (`features`, chosen by split, split file or list); a summary line on the rich
    `console`. True when every input was predicted; PredictError for a run that cannot start."""
    if inputs:
        if features is not None or split or split_file or video_list:
            raise PredictError("give media files, or --features (with --split, --split-file, --list)")
        say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
        run = predict_media(model_path, inputs, out, store, plots, device, quiet, say=say)
        videos, report, failed = run.videos, run.report, len(run.failed)
    else:
        features = features or Path("store.h5")
        chosen = choose_videos(features, split, split_file, video_list)
        videos = predict(model_path, features, out, split, plots, device, chosen)
        report, failed = out / REPORT, 0
    console.print(
        f"{out}: predictions for {len(videos)} videos{f', {failed} failed' if failed else ''}; "
        f"report: {report}",
        highlight=False,
        soft_wrap=True,
    )
    return not failed
