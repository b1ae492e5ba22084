"""A store as training data: every needed array read once into one contiguous tensor per modality.

All videos' frames are stacked end to end (video i owns rows offsets[i]:offsets[i+1]) with one
extra all-zero row at the end, N, that padding positions point to. A window is a start row and a
length; cutting a batch of windows is one gather with precomputed indices, on whatever device
the tensors live on, so the training loop never touches HDF5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import one_line
from pipeline.store import StoreError, damaged_members, open_store, stage_counts, video_ids

from .config import MODALITIES
from .model import CNN_CHANNELS, CROP_STORED

STAGE_OF = {"audio": "audio", "visual": "faces", "text": "text"}
READ_BLOCK = 4096  # crops are read and resized this many frames at a time


class DataError(Exception):
    """A store or split that cannot be trained or evaluated on; the message says why in one line."""


@dataclass
class StoreData:
    video_ids: list[str]
    offsets: np.ndarray  # (videos + 1,) int64
    timestamps: np.ndarray  # (N,) float64
    features: dict[str, torch.Tensor]  # (N + 1, D) float16, or (N + 1, 3, 48, 48) uint8 crops
    present: dict[str, torch.Tensor]  # (N + 1,) bool
    labels: torch.Tensor  # (N + 1, 2) float32
    labelled: torch.Tensor  # (N + 1,) bool
    dims: dict[str, int]  # input width per modality, as the model sees it
    visual_input: str  # "embedding", "crops" or "" (no visual)
    stages: dict[str, dict]  # how the features were extracted (see stage_configs)

    @property
    def n_frames(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _open(store: Path) -> h5py.File:
    try:
        return open_store(store)
    except StoreError as e:
        raise DataError(str(e)) from None


def read_splits(store: Path) -> dict[str, str]:
    """video id -> split ("" when labelled without a split); videos without labels are left out."""
    with _open(store) as f:
        out = {}
        for vid in video_ids(f):
            group = f[f"videos/{vid}"]
            _check_shards(store, vid, group, full=False, only="labels")
            if "labels" in group:
                split = group["labels"].attrs.get("split", "")
                out[vid] = _text(split)
        return out


def _text(value: bytes | str) -> str:
    """An HDF5 string attribute as str (h5py returns bytes or str depending on how it was written)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def select_videos(store: Path, splits: list[str] | None, need_labels: bool) -> list[str]:
    """Video ids in the given splits (all videos when None), with a clear error when none are."""
    with _open(store) as f:
        every = video_ids(f)
    if splits is None and not need_labels:
        if not every:
            raise DataError(f"{store}: the store has no videos")
        return every
    known = read_splits(store)
    chosen = [v for v in every if v in known and (splits is None or known[v] in splits)]
    if not chosen:
        have = sorted({s or "(none)" for s in known.values()})
        wanted = ", ".join(splits) if splits else "any"
        stale = stage_counts(store).get("labels")  # labels the index does not link: the likely cause
        if stale and stale.other_grid:
            raise DataError(
                f"{store}: no labelled videos in split {wanted}: the labels of {len(stale.other_grid)} "
                f"videos (e.g. {stale.other_grid[0]}) were made for another frame grid (the video file was "
                "replaced and extracted again); import them again with `rcma labels import`"
            )
        raise DataError(
            f"{store}: no labelled videos in split {wanted} (splits present: {', '.join(have) or 'none'}; "
            "set them with `rcma labels import ... --split` or `--split-file`)"
        )
    return chosen


def store_modalities(store: Path) -> list[str]:
    """The modalities every labelled video of the store has (its stage's shard), in MODALITIES order;
    a modality some labelled videos have and others lack is a one-line error, not silently dropped."""
    labelled = select_videos(store, None, need_labels=True)
    with _open(store) as f:
        counts = {m: sum(STAGE_OF[m] in f[f"videos/{v}"] for v in labelled) for m in MODALITIES}
    partial = [m for m in MODALITIES if 0 < counts[m] < len(labelled)]
    if partial:
        m = partial[0]
        raise DataError(
            f"{store}: {counts[m]} of {len(labelled)} labelled videos have {STAGE_OF[m]} features: extract "
            f"the rest (`rcma extract ... --stage {STAGE_OF[m]} --store {store}`) or choose --modalities"
        )
    chosen = [m for m in MODALITIES if counts[m]]
    if not chosen:
        raise DataError(f"{store}: its labelled videos have no features (run `rcma extract` first)")
    return chosen


def load_store(
    store: Path,
    modalities: list[str],
    videos: list[str],
    visual: str = "auto",
    device: str | torch.device = "cpu",
) -> StoreData:
    """Reads the given videos' arrays for `modalities` once, checks them, and moves them to `device`.

    visual: "embedding" (faces/embedding), "crops" (faces/crops, for the end-to-end CNN) or "auto"
    (the embedding when every video has one, else the crops).
    """
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise DataError(f"unknown modality {bad or modalities}; choose from {', '.join(MODALITIES)}")
    with _open(store) as f:
        groups = [f[f"videos/{v}"] for v in videos]
        needed = {"timestamps", "labels", *(STAGE_OF[m] for m in modalities)}  # the shards it reads
        for vid, g in zip(videos, groups, strict=True):
            _check_shards(store, vid, g, full=False, only=needed)
        lengths = np.array([int(g.attrs["n_frames"]) for g in groups], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        n = int(offsets[-1])
        visual_input = _visual_input(store, groups, videos, visual) if "visual" in modalities else ""
        timestamps = np.zeros(n, np.float64)
        labels = np.zeros((n + 1, 2), np.float32)
        labelled = np.zeros(n + 1, bool)
        features: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        dims: dict[str, int] = {}
        for m in modalities:
            stage = STAGE_OF[m]
            name = "crops" if m == "visual" and visual_input == "crops" else "embedding"
            for vid, g in zip(videos, groups, strict=True):
                if stage not in g or name not in g[stage]:
                    flag = " --crops" if name == "crops" else ""
                    raise DataError(
                        f"{store}: video {vid} has no {stage}/{name} (run `rcma extract ... --stage {stage}"
                        f"{flag} --store {store}`)"
                    )
            if name == "crops":
                features[m] = np.zeros((n + 1, 3, CROP_STORED, CROP_STORED), np.uint8)
                dims[m] = CNN_CHANNELS[-1]
            else:
                widths = {g[stage][name].shape[1] for g in groups}
                if len(widths) > 1:
                    raise DataError(f"{store}: {stage}/{name} widths differ between videos: {sorted(widths)}")
                dims[m] = widths.pop()
                features[m] = np.zeros((n + 1, dims[m]), np.float16)
            present[m] = np.zeros(n + 1, bool)
        for i, (vid, g) in enumerate(zip(videos, groups, strict=True)):
            lo, hi = offsets[i], offsets[i + 1]
            try:
                timestamps[lo:hi] = _on_grid(store, vid, "grid", g["timestamps"], hi - lo)[:]
                if "labels" in g:
                    lab = g["labels"]
                    labels[lo:hi, 0] = _on_grid(store, vid, "labels", lab["valence"], hi - lo)[:]
                    labels[lo:hi, 1] = _on_grid(store, vid, "labels", lab["arousal"], hi - lo)[:]
                    labelled[lo:hi] = _on_grid(store, vid, "labels", lab["present"], hi - lo)[:]
                for m in modalities:
                    stage = STAGE_OF[m]
                    group = g[stage]
                    present[m][lo:hi] = _on_grid(store, vid, stage, group["present"], hi - lo)[:]
                    if m == "visual" and visual_input == "crops":
                        _read_crops(_on_grid(store, vid, stage, group["crops"], hi - lo), features[m][lo:hi])
                    else:
                        block = _on_grid(store, vid, stage, group["embedding"], hi - lo)[:]
                        if not np.isfinite(block).all():
                            bad_rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
                            raise DataError(
                                f"{store}: video {vid}: {STAGE_OF[m]}/embedding has NaN or inf values "
                                f"({len(bad_rows)} frames, first at frame {bad_rows[0]})"
                            )
                        features[m][lo:hi] = block
            except OSError as e:  # a chunk whose checksum fails, or a file damaged past its header
                _check_shards(store, vid, g, full=True)
                raise DataError(f"{store}: video {vid}: cannot read its data ({one_line(e)})") from None
        if not np.isfinite(labels).all():
            raise DataError(f"{store}: labels contain NaN or inf values")
    return StoreData(
        video_ids=list(videos),
        offsets=offsets,
        timestamps=timestamps,
        features={m: torch.from_numpy(a).to(device) for m, a in features.items()},
        present={m: torch.from_numpy(a).to(device) for m, a in present.items()},
        labels=torch.from_numpy(labels).to(device),
        labelled=torch.from_numpy(labelled).to(device),
        dims=dims,
        visual_input=visual_input,
        stages=stage_configs(store, videos, modalities),
    )


def _check_shards(
    store: Path, vid: str, group: h5py.Group, full: bool, only: str | set[str] | None = None
) -> None:
    """A one-line error naming the video and the file when one of its shards is missing or damaged."""
    try:
        damaged = damaged_members(store, group, full, only)
    except StoreError as e:  # a link out of the store's shard folder
        raise DataError(str(e)) from None
    if damaged:
        name, problem = next(iter(damaged.items()))
        raise DataError(
            f"{store}: video {vid}: {name} shard {problem} (see `rcma status`; the next `rcma extract` "
            "recomputes it)"
        )


def _on_grid(store: Path, vid: str, stage: str, dataset: h5py.Dataset, n_frames: int) -> h5py.Dataset:
    """The dataset, once it is known to have one row per frame of the video."""
    if len(dataset) != n_frames:
        name = dataset.name.rsplit("/", 1)[-1]
        raise DataError(
            f"{store}: video {vid}: {stage}/{name} has {len(dataset)} rows but the video has "
            f"{n_frames} frames (made for another frame grid?)"
        )
    return dataset


def _visual_input(store: Path, groups: list[h5py.Group], videos: list[str], visual: str) -> str:
    if visual not in ("auto", "embedding", "crops"):
        raise DataError(f"visual input must be auto, embedding or crops, not {visual!r}")
    missing = [v for v, g in zip(videos, groups, strict=True) if "faces" not in g]
    if missing:
        raise DataError(
            f"{store}: video {missing[0]} has no faces features "
            f"(run `rcma extract ... --stage faces --store {store}`)"
        )
    if visual != "auto":
        return visual
    return "embedding" if all("embedding" in g["faces"] for g in groups) else "crops"


def _read_crops(dataset: h5py.Dataset, out: np.ndarray) -> None:
    """(n, 112, 112, 3) uint8 -> (n, 3, 48, 48) uint8, area-resized block by block."""
    for lo in range(0, len(out), READ_BLOCK):
        block = torch.from_numpy(dataset[lo : lo + READ_BLOCK]).permute(0, 3, 1, 2).float()
        small = F.interpolate(block, size=(CROP_STORED, CROP_STORED), mode="area")
        out[lo : lo + len(block)] = small.round().clamp(0, 255).to(torch.uint8).numpy()


def windows(
    offsets: np.ndarray, window: int, hop: int, chosen: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(start row, length) of every window of the chosen videos; windows never cross a video's end.

    Starts go 0, hop, 2 hop, ... and a last window ends exactly at the video's end, so every frame
    is covered. A video shorter than `window` gives one window of its length (padded when cut).
    """
    starts, lengths = [], []
    for i in range(len(offsets) - 1) if chosen is None else chosen:
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        n = hi - lo
        if n == 0:
            continue
        if n <= window:
            starts.append(lo)
            lengths.append(n)
            continue
        s = list(range(0, n - window + 1, hop))
        if s[-1] != n - window:
            s.append(n - window)
        starts += [lo + x for x in s]
        lengths += [window] * len(s)
    return np.array(starts, np.int64), np.array(lengths, np.int64)


def window_index(
    starts: torch.Tensor, lengths: torch.Tensor, window: int, pad_row: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (B, K) of a batch of windows, padding positions pointing at `pad_row`, and validity."""
    steps = torch.arange(window, device=starts.device)
    valid = steps.unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(valid, starts.unsqueeze(1) + steps, pad_row)
    return index, valid


def cut(data: StoreData, index: torch.Tensor, valid: torch.Tensor) -> dict[str, object]:
    """One batch: features, presence, labels and masks gathered at `index` (B, K)."""
    return {
        "inputs": {m: x[index] for m, x in data.features.items()},
        "present": {m: p[index] for m, p in data.present.items()},
        "valid": valid,
        "labels": data.labels[index],
        "labelled": data.labelled[index] & valid,
    }


def stage_configs(store: Path, videos: list[str], modalities: list[str]) -> dict[str, dict]:
    """How the features of `modalities` were extracted, as recorded by each stage's shards.

    {stage: {"config": ..., "config_hash": ...}} for every stage that recorded its config (stores
    written by hand may not), plus {"grid": {"audio_fps": ...}} when audio-only files are among the
    videos (their frame grid comes from `rcma extract --fps`). `rcma predict VIDEO` rebuilds these
    stages to extract new videos exactly as the training videos were. Videos whose shards disagree
    are an error: the model would have been trained on a mix of two feature sets.
    """

    from pipeline.stages import hash_config, shared_config

    out: dict[str, dict] = {}
    first: dict[str, str] = {}
    rates = audio_only_fps(store, videos)
    if rates:
        out["grid"] = {"audio_fps": next(iter(rates.values()))}
    with _open(store) as f:
        for vid in videos:
            group = f[f"videos/{vid}"]
            for stage in dict.fromkeys(STAGE_OF[m] for m in modalities if m in STAGE_OF):
                attrs = group[stage].attrs if stage in group else {}
                if "config_hash" not in attrs:
                    continue
                config = attrs["config"]
                config = json.loads(_text(config))
                shared = shared_config(stage, config)  # the subject of a two-person video is per video
                shared_hash = hash_config(stage, shared)
                if stage in out and out[stage]["config_hash"] != shared_hash:
                    raise DataError(
                        f"{store}: {stage} features of videos {first[stage]} and {vid} were extracted with "
                        "different settings; re-run `rcma extract` on all of them with one setting"
                    )
                if stage not in out:
                    out[stage] = {"config": shared, "config_hash": shared_hash}
                    first[stage] = vid
    return out


def audio_only_fps(store: Path, videos: list[str]) -> dict[str, float]:
    """The frame rate of each audio-only file among `videos`, in their order: its frame grid is
    the one `rcma extract --fps` gave it, not the file's own."""
    with _open(store) as f:
        groups = {vid: f[f"videos/{vid}"].attrs for vid in videos}
        return {
            vid: float(attrs["fps"])
            for vid, attrs in groups.items()
            if "has_video" in attrs and not bool(attrs["has_video"])
        }
