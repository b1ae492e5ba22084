"""Training throughput: windows cut from in-memory tensors vs. per-window HDF5 reads in a DataLoader.

Builds (once, then reuses) a synthetic store with the paper's feature sizes, then times the same
model, optimizer and batch shapes fed two ways:

- rcma: every array read from the store once (fusion.data.load_store), one tensor per modality (on the
  GPU when there is one), a batch is one gather by precomputed window indices;
- baseline: a torch Dataset that reads each window's rows from HDF5 (dataset handles opened once
  per worker, the strongest form of the usual approach), batched by a DataLoader with workers.

For each: frames/s of the data path alone, frames/s of full training steps, and the share of
step time spent waiting for data. Run `python bench/train.py --help` for the sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path[0] = str(Path(__file__).resolve().parents[1])  # so that bench/fusion.py is not `fusion`
from fusion.data import STAGE_OF, cut, load_store, select_videos, window_index, windows  # noqa: E402
from fusion.metrics import ccc_loss  # noqa: E402
from fusion.model import RCMA, ModelConfig, autocast  # noqa: E402
from pipeline.errors import resolve_device  # noqa: E402
from pipeline.store import GRID, rebuild_index, write_shard  # noqa: E402

MODALITIES = ("audio", "visual", "text")


def build_store(path: Path, frames: int, video_frames: int, dims: dict[str, int], seed: int = 0) -> Path:
    """A store of `frames` frames in videos of `video_frames`, reused when its spec matches."""
    spec = {"frames": frames, "video_frames": video_frames, "dims": dims, "seed": seed}
    spec_file = path.with_name(path.name + ".spec.json")
    if path.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return path
    rng = np.random.default_rng(seed)
    n_videos = max(1, frames // video_frames)
    started = time.perf_counter()
    for i in range(n_videos):
        n = video_frames if i < n_videos - 1 else frames - video_frames * (n_videos - 1)
        vid = f"v{i:05d}"
        write_shard(path, GRID, vid, {"timestamps": np.arange(n) / 30.0}, {"n_frames": n, "fps": 30.0})
        for m, stage in STAGE_OF.items():
            emb = rng.standard_normal((n, dims[m]), dtype=np.float32).astype(np.float16)
            write_shard(path, stage, vid, {"present": rng.random(n) > 0.05, "embedding": emb}, {})
        y = np.tanh(rng.standard_normal((2, n))).astype(np.float32)
        rows = {"valence": y[0], "arousal": y[1], "present": np.ones(n, bool)}
        write_shard(path, "labels", vid, rows, {"split": "train"})
    rebuild_index(path)
    spec_file.write_text(json.dumps(spec))
    print(f"wrote {frames:,} frames in {n_videos} videos to {path} in {time.perf_counter() - started:.0f} s")
    return path


class H5Windows(Dataset):
    """One window per item, read from the store's HDF5 files; padded to the window length."""

    def __init__(self, store: Path, items: list[tuple[str, int, int]], window: int):
        self.store, self.items, self.window = store, items, window
        self.file: h5py.File | None = None
        self.handles: dict[tuple[str, str], h5py.Dataset] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _get(self, vid: str, name: str) -> h5py.Dataset:
        if self.file is None:
            self.file = h5py.File(self.store, "r")  # opened in the worker, never shared across fork
        key = (vid, name)
        if key not in self.handles:
            self.handles[key] = self.file[f"videos/{vid}/{name}"]
        return self.handles[key]

    def __getitem__(self, i: int) -> dict:
        vid, start, n = self.items[i]
        k = self.window

        def read(name: str, dtype) -> torch.Tensor:
            rows = self._get(vid, name)[start : start + n]
            out = np.zeros((k, *rows.shape[1:]), dtype)
            out[:n] = rows
            return torch.from_numpy(out)

        valid = torch.zeros(k, dtype=torch.bool)
        valid[:n] = True
        return {
            "inputs": {m: read(f"{STAGE_OF[m]}/embedding", np.float16) for m in MODALITIES},
            "present": {m: read(f"{STAGE_OF[m]}/present", bool) for m in MODALITIES},
            "labels": torch.stack(
                [read("labels/valence", np.float32), read("labels/arousal", np.float32)], -1
            ),
            "labelled": read("labels/present", bool) & valid,
            "valid": valid,
        }


def to_device(batch: dict, device: torch.device) -> dict:
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model: RCMA, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device) -> None:
    with autocast(device):
        pred = model(batch["inputs"], batch["present"], batch["valid"])
    loss = ccc_loss(pred, batch["labels"], batch["labelled"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_loop(batches, n_steps: int, warmup: int, device: torch.device, train_step) -> dict[str, float]:
    """Runs warmup + n_steps batches; returns frames/s and the share of time waiting for data."""
    wait = total = 0.0
    frames = 0
    it = iter(batches)
    for i in range(warmup + n_steps):
        sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        sync(device)
        t1 = time.perf_counter()
        if train_step is not None:
            train_step(batch)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            wait += t1 - t0
            total += t2 - t0
            frames += int(batch["valid"].sum())
    return {"frames_per_s": frames / total, "data_share": wait / total, "seconds": total, "frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", type=Path, default=Path("bench/out/train_store.h5"))
    parser.add_argument("--frames", type=int, default=1_000_000, help="Frames in the synthetic store.")
    parser.add_argument("--video-frames", type=int, default=3000, help="Frames per synthetic video.")
    parser.add_argument("--audio-dim", type=int, default=128)
    parser.add_argument("--visual-dim", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--hop", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds, each timing both methods.")
    parser.add_argument("--steps", type=int, default=4, help="Timed training steps per method and round.")
    parser.add_argument("--data-steps", type=int, default=20, help="Timed data-only batches per round.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the baseline.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default).")
    parser.add_argument("--json", type=Path, default=Path("bench/out/train.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    dims = {"audio": args.audio_dim, "visual": args.visual_dim, "text": args.text_dim}
    args.store.parent.mkdir(parents=True, exist_ok=True)
    store = build_store(args.store, args.frames, args.video_frames, dims)

    t0 = time.perf_counter()
    videos = select_videos(store, ["train"], need_labels=True)
    data = load_store(store, list(MODALITIES), videos, "embedding", device)
    sync(device)
    load_s = time.perf_counter() - t0
    starts, lengths = windows(data.offsets, args.window, args.hop)
    print(f"{device}: loaded {data.n_frames:,} frames once in {load_s:.1f} s; {len(starts):,} windows")

    torch.manual_seed(0)
    cfg = ModelConfig(inputs=dims, window=args.window, width=args.width)
    model = RCMA(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step(batch: dict) -> None:
        step(model, optimizer, batch, device)

    g = torch.Generator().manual_seed(0)
    starts_t, lengths_t = torch.as_tensor(starts, device=device), torch.as_tensor(lengths, device=device)

    def rcma_batches():
        while True:
            order = torch.randperm(len(starts), generator=g).to(device)
            for lo in range(0, len(order) - args.batch_size + 1, args.batch_size):
                pick = order[lo : lo + args.batch_size]
                index, valid = window_index(starts_t[pick], lengths_t[pick], args.window, data.n_frames)
                yield cut(data, index, valid)

    items = []
    for i, vid in enumerate(videos):
        lo = int(data.offsets[i])
        items += [
            (vid, int(s - lo), int(n))
            for s, n in zip(*windows(data.offsets, args.window, args.hop, [i]), strict=True)
        ]
    loader = DataLoader(
        H5Windows(store, items, args.window),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )

    def baseline_batches():
        while True:
            for batch in loader:
                yield to_device(batch, device)

    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "frames_in_store": data.n_frames,
        "dims": dims,
        "window": args.window,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "load_once_s": load_s,
    }
    # The two methods alternate in rounds, so load from anything else on the machine hits both.
    streams = {"rcma": rcma_batches(), "baseline": baseline_batches()}
    for r in range(args.rounds):
        for name, batches in streams.items():
            for kind, steps, fn in (("data", args.data_steps, None), ("train", args.steps, train_step)):
                part = timed_loop(batches, steps, args.warmup if r == 0 else 0, device, fn)
                acc = results.setdefault(f"{name}_{kind}", {"seconds": 0.0, "frames": 0, "wait": 0.0})
                acc["seconds"] += part["seconds"]
                acc["frames"] += part["frames"]
                acc["wait"] += part["data_share"] * part["seconds"]
    for name in streams:
        for kind in ("data", "train"):
            acc = results[f"{name}_{kind}"]
            acc["frames_per_s"] = acc["frames"] / acc["seconds"]
            acc["data_share"] = acc.pop("wait") / acc["seconds"]
        d, t = results[f"{name}_data"], results[f"{name}_train"]
        print(
            f"{name:9s} data path {d['frames_per_s']:>12,.0f} frames/s | training {t['frames_per_s']:>9,.0f} "
            f"frames/s, {100 * t['data_share']:5.1f}% of step time waiting for data"
        )
    results["speedup_train"] = (
        results["rcma_train"]["frames_per_s"] / results["baseline_train"]["frames_per_s"]
    )
    results["speedup_data"] = results["rcma_data"]["frames_per_s"] / results["baseline_data"]["frames_per_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(
        f"training speedup {results['speedup_train']:.2f}x, "
        f"data path {results['speedup_data']:.0f}x -> {args.json}"
    )


if __name__ == "__main__":
    main()
