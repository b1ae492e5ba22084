"""What `rcma status` and `rcma show` print about a store: per stage, and per video."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.labels import STAGE as LABELS
from pipeline.store import GRID, StoreError, config_summary, shard_root, stage_counts, summarize

SHOW_TABLE_MAX = 500  # rows `rcma show` lays out as a table; more are printed as plain columns


def status(store: Path, verify: bool, console: Console) -> int:
    """Per stage: done, damaged, failed and missing counts, its config, and every failure with its
    error; returns the number of damaged shards. StoreError when nothing was extracted yet."""
    counts = stage_counts(store, verify)
    if not counts:
        raise StoreError(f"{store}: nothing extracted yet (no {store.name}.d/ folder)")
    table = Table("stage", "done", "damaged", "failed", "missing", "other config", "older grid")
    for name, c in counts.items():
        table.add_row(
            name,
            *(str(len(x)) for x in (c.done, c.damaged, c.failed, c.missing, c.other_config, c.other_grid)),
        )
    console.print(table)
    lines = []
    for name, c in counts.items():
        if c.config:
            lines.append(
                f"{name} config {c.config['config_hash']}: {config_summary(c.config.get('config', {}))}"
            )
    for name, c in counts.items():
        lines += [f"{name} {video_id}: {error}" for video_id, error in c.failed.items()]
        lines += [
            f"{name} {video_id}: {problem} ({_repair(store, name, problem)})"
            for video_id, problem in c.damaged.items()
        ]
        if c.other_config:
            lines.append(
                f"{name}: {len(c.other_config)} shards of another config (not indexed; recomputed when "
                f"their videos are extracted again), e.g. {c.other_config[0]}"
            )
        if c.other_grid:
            again = (
                "import them again with `rcma labels import`"
                if name == LABELS
                else "recomputed when their videos are extracted again"
            )
            lines.append(
                f"{name}: {len(c.other_grid)} shards made for an older frame grid of their video (the file "
                f"was replaced; not indexed: {again}), e.g. {c.other_grid[0]}"
            )
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    return sum(len(c.damaged) for c in counts.values())


def _repair(store: Path, stage: str, problem: str) -> str:
    """What repairs a damaged shard: labels are only written by `labels import`; a video's frame grid
    (damaged in every stage) and a stage's features by the next extract."""
    if stage == LABELS and not problem.startswith(f"{shard_root(store) / GRID}{os.sep}"):
        return "`rcma labels import` writes it again"
    return "the next extract recomputes it"


def show(store: Path, console: Console, warnings: Console) -> None:
    """Per video: frames, frame rate, and the share of frames each stage found data on; damaged
    shards as warnings. StoreError for a store that cannot be read."""
    videos = summarize(store)
    stages = sorted({stage for v in videos for stage in [*v.present, *v.damaged] if stage != "timestamps"})
    header = ["video", "frames", "fps", "s", *stages]
    rows = [
        [
            v.video_id,
            str(v.n_frames),
            f"{v.fps:.3f}",
            f"{v.duration:.1f}",
            *(
                f"{v.present[s]:.0%}" if s in v.present else "damaged" if s in v.damaged else "-"
                for s in stages
            ),
        ]
        for v in videos
    ]
    if len(rows) <= SHOW_TABLE_MAX:
        table = Table(*header, caption="stage columns: share of frames with data")
        table.columns[0].no_wrap = True
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # a table of 100,000 rows takes rich minutes to lay out: aligned plain columns instead
        width = max(len(header[0]), *(len(row[0]) for row in rows))
        lines = [
            f"{row[0]:<{width}}" + "".join(f"  {cell:>8}" for cell in row[1:]) for row in [header, *rows]
        ]
        print("\n".join(lines))
        print("stage columns: share of frames with data")
    for v in videos:
        for stage, problem in v.damaged.items():
            warnings.print(
                f"[yellow]damaged:[/yellow] {v.video_id} {stage}: {problem}", highlight=False, soft_wrap=True
            )
