"""The `rcma` command line: options in, calls out."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # one line per message, whatever the width

StoreOption = Annotated[Path, typer.Option("--store", help="The feature store's index file (store.h5).")]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars; errors and summary only.")
]


def fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


@app.command()
def extract(
    ctx: typer.Context,
    paths: Annotated[
        list[Path], typer.Argument(help="Video or audio files, or folders searched recursively.")
    ],
    store: StoreOption = Path("store.h5"),
    stages: Annotated[
        list[str], typer.Option("--stage", "-s", help="faces, audio, text or all; repeatable.")
    ] = ["faces"],
    visual_model: Annotated[
        str | None,
        typer.Option(
            help="fer (default: expression-trained, offline), vggface2 (identity), none (crops only), "
            "or a TorchScript (.pt) / ONNX (.onnx) model path.",
            show_default=False,
        ),
    ] = None,
    crops: Annotated[
        bool, typer.Option("--crops/--no-crops", help="Store the 112x112 aligned faces.")
    ] = True,
    subject: Annotated[
        str, typer.Option(help="faces: track the largest face, or the one in the left or right half.")
    ] = "largest",
    faces_from: Annotated[
        Path | None,
        typer.Option(
            help="faces: read each frame's aligned face from DIR/<video_id>/00001.jpg (Aff-Wild2's "
            "cropped-aligned layout) instead of detecting faces.",
            show_default=False,
        ),
    ] = None,
    audio_model: Annotated[
        str | None,
        typer.Option(
            help="whisper-encoder (default: the text stage's Whisper), logmel, wav2vec2, hubert or wavlm.",
            show_default=False,
        ),
    ] = None,
    audio_layer: Annotated[
        int | None,
        typer.Option(
            help="Layer of the audio model (whisper-encoder: a block, default a middle one, or -1 "
            "for its output; wav2vec2/hubert/wavlm: default the last).",
            show_default=False,
        ),
    ] = None,
    audio_weights: Annotated[
        str | None, typer.Option(help="Local checkpoint for wav2vec2/hubert/wavlm ($RCMA_AUDIO_WEIGHTS).")
    ] = None,
    logmel_pool: Annotated[
        str, typer.Option(help="logmel: stats (band mean+std, 128) or flat (96x64 patch).")
    ] = "stats",
    audio_window: Annotated[
        str | None,
        typer.Option(
            help="whisper-encoder: clip (default: each file at its own length) or padded (to 30 s).",
            show_default=False,
        ),
    ] = None,
    asr_model: Annotated[
        str | None,
        typer.Option(help="Whisper name, .pt checkpoint or CTranslate2 folder ($RCMA_ASR_MODEL)."),
    ] = None,
    asr_backend: Annotated[
        str | None, typer.Option(help="faster-whisper (default) or openai-whisper.", show_default=False)
    ] = None,
    asr_compute_type: Annotated[
        str | None,
        typer.Option(
            help="faster-whisper: auto (default: int8 on CPU, float16 on CUDA), int8, float32, ...",
            show_default=False,
        ),
    ] = None,
    text_model: Annotated[
        str | None, typer.Option(help="sentence-transformers name or folder ($RCMA_TEXT_MODEL).")
    ] = None,
    text_unit: Annotated[
        str | None,
        typer.Option(
            help="Per frame: word-context (default: the word in its segment), word, or segment.",
            show_default=False,
        ),
    ] = None,
    fps: Annotated[float, typer.Option(help="Frame rate of the grid given to audio-only files.")] = 30.0,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
    force: Annotated[bool, typer.Option(help="Recompute even what is already done.")] = False,
    workers: Annotated[
        str,
        typer.Option(
            help="Worker processes on this machine: auto (starts in this process, adds workers when the "
            "files left pay for their start-up, up to one per core; with CUDA, 2 per GPU) or a number "
            "(1: everything in this process)."
        ),
    ] = "auto",
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Dask scheduler address (tcp:// or tls://host:8786) or scheduler file; TLS settings "
            "come from Dask's config."
        ),
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="i/N: only the i-th of N shares of the files (array jobs).")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Extract features from media files into a store; re-running finishes only what is missing."""
    from pipeline.extract import ExtractSettings
    from pipeline.extract import extract as run_extraction
    from pipeline.runner import FatalError

    settings = ExtractSettings(**ctx.params)  # the options above, by name
    try:
        ok = run_extraction(settings, console)
    except FatalError as e:
        raise fail(str(e)) from None
    if not ok:
        raise typer.Exit(1)


@app.command()
def status(
    store: StoreOption = Path("store.h5"),
    verify: Annotated[
        bool, typer.Option("--verify", help="Read every array to check its checksums (slower).")
    ] = False,
) -> None:
    """Per stage: done, damaged, failed and missing counts, and every failure with its error.

    Each shard is opened (finding missing, truncated or header-damaged files); --verify also reads
    all data, finding silent corruption through the shards' checksums. Exit 1 when a shard is damaged."""
    from pipeline.store import StoreError
    from pipeline.tables import status as print_status

    try:
        damaged = print_status(store, verify, Console())
    except StoreError as e:
        raise fail(str(e)) from None
    if damaged:
        raise typer.Exit(1)


@app.command()
def show(store: StoreOption = Path("store.h5")) -> None:
    """Per video: frames, frame rate, and the share of frames each stage found data on."""
    from pipeline.store import StoreError
    from pipeline.tables import show as print_videos

    try:
        print_videos(store, Console(), console)
    except StoreError as e:
        raise fail(str(e)) from None


@app.command()
def index(store: StoreOption = Path("store.h5")) -> None:
    """Rebuild store.h5 from its shards (after a crash, or to repair a damaged index).

    Also removes temporary files left by killed writers (never those of a running extract)."""
    from pipeline.extract import reindex
    from pipeline.store import StoreError

    try:
        reindex(store, console)
    except (StoreError, OSError) as e:
        raise fail(str(e)) from None


@app.command()
def pack(
    store: StoreOption = Path("store.h5"),
    out: Annotated[Path, typer.Option(help="The self-contained file to write.")] = Path("packed.h5"),
) -> None:
    """Copy a store and all its shards into one self-contained HDF5 file."""
    from pipeline.store import StoreError, pack_store

    try:
        pack_store(store, out)
    except (StoreError, OSError) as e:
        raise fail(str(e)) from None
    console.print(f"{out}: written")


models_app = typer.Typer(no_args_is_help=True, help="Local models: list them, convert Whisper weights.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """Whisper and text models usable here without a download, and the ones used by default."""
    from pipeline.doctor import print_local_models

    print_local_models(Console())


@models_app.command("convert-whisper")
def models_convert_whisper(
    source: Annotated[
        Path | None, typer.Argument(help="CTranslate2 Whisper folder (default: the packaged tiny.en).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Checkpoint to write (default: into the rcma cache).")
    ] = None,
) -> None:
    """Convert a CTranslate2 (faster-whisper) model into a checkpoint openai-whisper loads."""
    from pipeline import asr
    from pipeline.ct2_whisper import ConversionError

    try:
        path = asr.convert_whisper(source, out)
    except (ConversionError, asr.ModelUnavailable) as e:
        raise fail(str(e)) from None
    console.print(
        f"{path}: written (load with whisper.load_model or pass --asr-model)", highlight=False, soft_wrap=True
    )


labels_app = typer.Typer(no_args_is_help=True, help="Valence/arousal labels in a store.")
app.add_typer(labels_app, name="labels")


@labels_app.command("import")
def labels_import(
    paths: Annotated[
        list[Path], typer.Argument(help="Aff-Wild2 <video_id>.txt files, label CSVs, or folders of them.")
    ],
    store: StoreOption = Path("store.h5"),
    split: Annotated[str | None, typer.Option(help="train, val or test, for every imported video.")] = None,
    split_file: Annotated[
        Path | None, typer.Option(help="A CSV or text file of `video_id,split` lines.")
    ] = None,
) -> None:
    """Import per-frame or per-clip valence/arousal labels; an error writes nothing."""
    from pipeline.labels import LabelError, import_and_report

    try:
        import_and_report(store, paths, split, split_file, console)
    except LabelError as e:
        raise fail(str(e)) from None


def _typed(ctx: typer.Context, option: str) -> bool:
    """Whether `option` was given on the command line (typer vendors click: compare by name)."""
    source = ctx.get_parameter_source(option)
    return source is not None and source.name == "COMMANDLINE"


def _with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """Gives `command` one option per TrainConfig field, with its default and help: one list."""
    from fusion.config import TrainConfig

    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind: type = type(default)
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        if isinstance(default, list):  # modalities: one comma-separated value
            kind, default = str, ",".join(default)
        option = typer.Option(*names, help=f.metadata["help"])
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )
    for name, annotation, default in (
        ("resume", Annotated[bool, typer.Option(help="Continue the run in --out from last.pt.")], False),
        ("quiet", QuietOption, False),
    ):
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@app.command()
@_with_train_options
def train(ctx: typer.Context, resume: bool = False, quiet: bool = False, **settings: Any) -> None:
    """Train the TCN + recursive cross-modal attention model on a store's labelled videos.

    With --resume the run's own settings are used; options given on the command line override
    them (those that shape the model must then match the run). --seeds N trains N seeds and
    keeps their mean prediction; --folds K cross-validates instead."""
    from fusion.train import TrainError, run

    typed = {name for name in settings if _typed(ctx, name)}
    try:
        console.print(run(settings, typed, resume, quiet), highlight=False, soft_wrap=True)
    except TrainError as e:
        raise fail(str(e)) from None


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="A checkpoint (best.pt or last.pt).")],
    features: Annotated[Path, typer.Option(help="The feature store with labels.")] = Path("store.h5"),
    split: Annotated[str, typer.Option(help="train, val, test, or all labelled videos.")] = "val",
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
) -> None:
    """CCC, PCC and RMSE per dimension, over all frames of the split and per video."""
    from fusion.predict import PredictError, print_evaluation

    try:
        print_evaluation(model, features, split, device, as_json, Console())
    except PredictError as e:
        raise fail(str(e)) from None


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="A checkpoint (best.pt or last.pt).")],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Videos or folders: extracted as the model's training videos were, then predicted."
        ),
    ] = None,
    features: Annotated[
        Path | None, typer.Option(help="Predict a store's videos instead of media files.")
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="With media files: the store to extract into (default: OUT/store.h5).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for CSVs, plots/, submission/ and report.html.")] = Path(
        "predictions"
    ),
    split: Annotated[str | None, typer.Option(help="Only this split's videos (default: all).")] = None,
    split_file: Annotated[
        Path | None, typer.Option(help="`video_id,split` lines giving --split for unlabelled videos.")
    ] = None,
    video_list: Annotated[
        Path | None,
        typer.Option("--list", help="A file of video ids to predict, one a line (no labels needed)."),
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="A PNG per video.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
    quiet: QuietOption = False,
) -> None:
    """Per-frame valence/arousal: CSV and plot per video, ABAW submission files, and report.html.

    Give media files (`rcma predict clip.mp4 --model best.pt`) to extract and predict in one go,
    or --features STORE to predict videos already extracted."""
    from fusion.predict import PredictError, predict_inputs

    try:
        ok = predict_inputs(
            model, inputs, features, store, out, split, split_file, video_list, plots, device, quiet, console
        )
    except PredictError as e:
        raise fail(str(e)) from None
    if not ok:
        raise typer.Exit(1)


@app.command()
def doctor() -> None:
    """Models present or to be downloaded, torch device, versions, media decoding; exit 1 if the
    default pipeline lacks something."""
    from pipeline.doctor import print_checks, run_checks

    failed = print_checks(run_checks(), Console(highlight=False))
    if failed:
        raise fail(f"missing for the default pipeline: {', '.join(c.name for c in failed)}", 1)
    console.print("everything the default pipeline needs is here", highlight=False)


if __name__ == "__main__":
    app()
