"""The `rcma` command line: options in, calls out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

StoreOption = Annotated[Path, typer.Option("--store", help="The feature store's index file (store.h5).")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars; errors and summary only.")
]


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


@app.command()
def extract(
    paths: Annotated[
        list[Path], typer.Argument(help="Video or audio files, or folders searched recursively.")
    ],
    store: StoreOption = Path("store.h5"),
    stage: Annotated[
        list[str], typer.Option("--stage", "-s", help="faces, audio, text or all; repeatable.")
    ] = ["faces"],
    visual_model: Annotated[
        str, typer.Option(help="vggface2, none, or a TorchScript (.pt) / ONNX (.onnx) model path.")
    ] = "vggface2",
    crops: Annotated[
        bool, typer.Option("--crops/--no-crops", help="Store the 112x112 aligned faces.")
    ] = True,
    fps: Annotated[float, typer.Option(help="Frame rate of the grid given to audio-only files.")] = 30.0,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
    force: Annotated[bool, typer.Option(help="Recompute even what is already done.")] = False,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (tcp://host:8786) or scheduler file.")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Extract features from media files into a store; re-running finishes only what is missing."""
    from pipeline import runner
    from pipeline.stages import build_stage, expand
    from pipeline.store import StoreError, check_store_path

    try:
        check_store_path(store)
        names = expand([n.strip() for item in stage for n in item.split(",") if n.strip()])
    except (StoreError, ValueError) as e:
        raise fail(str(e)) from None
    options = {"visual_model": visual_model, "crops": crops, "device": device}
    jobs, report = runner.discover(paths)
    for path, problem in report.bad_paths:
        console.print(f"[red]error:[/red] {path}: {problem}", highlight=False)
    for path, problem in report.not_media:
        console.print(f"[yellow]skipped:[/yellow] {path}: {problem}", highlight=False)
    if not jobs:
        raise fail("no media files found in " + ", ".join(map(str, paths)))

    def show_failures(job: runner.Job, outcomes: list[runner.Outcome]) -> None:
        for o in outcomes:
            if o.warning:
                console.print(
                    f"[yellow]warning:[/yellow] {o.source}: {o.stage}: {o.warning}", highlight=False
                )
            if o.status == "failed":
                console.print(f"[red]failed:[/red] {o.source}: {o.stage}: {o.error}", highlight=False)

    try:
        if scheduler:
            specs = [(name, options) for name in names]
            report.outcomes = runner.run_dask(jobs, scheduler, store, specs, fps, force, show_failures)
        else:
            stages = [build_stage(name, options) for name in names]
            extractor = runner.Extractor(store, stages, fps, force)
            with _progress(quiet) as bars:
                files = bars.add_task("files", total=len(jobs))
                frames = bars.add_task("frames", total=None)

                def on_frames(label: str, done: int, total: int) -> None:
                    bars.update(frames, description=label, completed=done, total=total)

                def on_job(job: runner.Job, outcomes: list[runner.Outcome]) -> None:
                    show_failures(job, outcomes)
                    bars.advance(files)

                report.outcomes = runner.run_local(jobs, extractor, on_frames, on_job)
    except runner.FatalError as e:
        raise fail(str(e)) from None
    counts = report.counts()
    console.print(
        f"{store}: {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed "
        f"({len(jobs)} files, stages: {', '.join(names)})",
        highlight=False,
    )
    if not report.ok:
        raise typer.Exit(1)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<32.32}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


@app.command()
def status(store: StoreOption = Path("store.h5")) -> None:
    """Per stage: done, failed and missing counts, and every failure with its error."""
    from pipeline.store import stage_counts

    counts = stage_counts(store)
    if not counts:
        raise fail(f"{store}: nothing extracted yet (no {store.name}.d/ folder)")
    table = Table("stage", "done", "failed", "missing")
    for name, c in counts.items():
        table.add_row(name, str(len(c.done)), str(len(c.failed)), str(len(c.missing)))
    Console().print(table)
    for name, c in counts.items():
        for video_id, error in c.failed.items():
            Console().print(f"{name} {video_id}: {error}", highlight=False, soft_wrap=True)


@app.command()
def show(store: StoreOption = Path("store.h5")) -> None:
    """Per video: frames, frame rate, and the share of frames each stage found data on."""
    from pipeline.store import StoreError, summarize

    try:
        videos = summarize(store)
    except StoreError as e:
        raise fail(str(e)) from None
    stages = sorted({stage for v in videos for stage in v.present})
    table = Table("video", "frames", "fps", "seconds", *(f"{s} present" for s in stages))
    for v in videos:
        shares = (f"{v.present[s]:.0%}" if s in v.present else "-" for s in stages)
        table.add_row(v.video_id, str(v.n_frames), f"{v.fps:.3f}", f"{v.duration:.1f}", *shares)
    Console().print(table)


@app.command()
def index(store: StoreOption = Path("store.h5")) -> None:
    """Rebuild store.h5 from its shards (after a crash, or to repair a damaged index)."""
    from pipeline.store import rebuild_index

    console.print(f"{store}: {rebuild_index(store)} videos indexed")


@app.command()
def pack(
    store: StoreOption = Path("store.h5"),
    out: Annotated[Path, typer.Option(help="The self-contained file to write.")] = Path("packed.h5"),
) -> None:
    """Copy a store and all its shards into one self-contained HDF5 file."""
    from pipeline.store import StoreError, pack_store

    try:
        pack_store(store, out)
    except StoreError as e:
        raise fail(str(e)) from None
    console.print(f"{out}: written")


if __name__ == "__main__":
    app()
