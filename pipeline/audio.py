"""The audio stage: one embedding per frame of the grid, from the 16 kHz mono track.

Embedders (`--audio-model`):
- `logmel`: VGGish-style log-mel patch, 0.96 s (96 hops of 10 ms x 64 mel bands, 125-7500 Hz)
  centred on each frame, no weights. `--logmel-pool stats` (default) keeps the mean and the
  standard deviation of each band over the patch (128 values); `flat` keeps the whole patch
  (96 x 64 = 6144 values, time-major), the input a VGGish network would take.
- `wav2vec2`, `hubert`, `wavlm`: torchaudio's BASE bundles (12 layers, 768 wide, 50 states/s),
  the output of transformer layer `--audio-layer` (default: the last).
- `whisper-encoder` (the default): the encoder states of the Whisper model the text stage
  transcribes with (50 states/s): the output of block `--audio-layer` (default
  DEFAULT_WHISPER_LAYER), or with -1 the encoder's output after its last layer norm.

Models with a state sequence are mapped onto the frame grid by time: each frame takes the state
whose centre is nearest its timestamp. Frames past the end of the audio, and every frame of a
file without an audio track, are `present` False with zero embeddings.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline import asr
from pipeline.errors import resolve_device
from pipeline.files import sha256_file
from pipeline.media import SAMPLE_RATE, Media
from pipeline.stages import Extra, Rows, Stage, library_versions
from pipeline.weights import fetch_weights, weights_checksum

AUDIO_MODELS = ("logmel", "wav2vec2", "hubert", "wavlm", "whisper-encoder")
DEFAULT_AUDIO_MODEL = "whisper-encoder"  # chosen by bench/audio.py, see docs/benchmarks.md
AUDIO_WEIGHTS_ENV = "RCMA_AUDIO_WEIGHTS"
AUDIO_WEIGHTS_OPTION = "--audio-weights"
ROWS_PER_BLOCK = 1024

LOGMEL_HOP_S = 0.010
LOGMEL_WINDOW = 400  # 25 ms
LOGMEL_N_FFT = 512
LOGMEL_BANDS = 64
LOGMEL_FMIN, LOGMEL_FMAX = 125.0, 7500.0
LOGMEL_OFFSET = 0.01  # log(mel + 0.01), as VGGish
LOGMEL_PATCH = 96  # 0.96 s
LOGMEL_POOLS = ("stats", "flat")

SSL_BUNDLES = {"wav2vec2": "WAV2VEC2_BASE", "hubert": "HUBERT_BASE", "wavlm": "WAVLM_BASE"}
SSL_LAYERS = 12  # transformer layers of every BASE bundle
SSL_URL = "https://download.pytorch.org/torchaudio/models/"
SSL_STRIDE = 320  # samples per state of the conv feature extractor
SSL_FIELD = 400  # samples seen by one state
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # a Whisper window; also bounds memory for the SSL models
WHISPER_STRIDE = 320  # 10 ms mel hops, conv2 stride 2 (checked against the model when it loads)
WHISPER_BATCH = 4
WHISPER_WINDOWS = ("clip", "padded")
DEFAULT_WHISPER_WINDOW = "clip"
# The block whose output carried valence and arousal best in bench/audio.py (tiny.en, 4 blocks);
# WHISPER_FINAL asks for the encoder's output, after its last layer norm.
DEFAULT_WHISPER_LAYER = 2
WHISPER_FINAL = -1


class AudioEmbedder(ABC):
    """Embeds a waveform at given times; every time is inside the waveform."""

    name: str
    dim: int

    def load(self, device: str) -> None:
        """Loads weights; after this `dim` is known."""

    def provenance(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def embed(self, audio: np.ndarray, times: np.ndarray) -> Iterator[np.ndarray]:
        """Yields float16 blocks of rows, in order, one row per time."""


class LogMel(AudioEmbedder):
    name = "logmel"

    def __init__(self, pool: str = "stats"):
        if pool not in LOGMEL_POOLS:
            raise ValueError(f"unknown --logmel-pool {pool!r}; choose from {', '.join(LOGMEL_POOLS)}")
        self.pool = pool
        self.dim = 2 * LOGMEL_BANDS if pool == "stats" else LOGMEL_PATCH * LOGMEL_BANDS

    def load(self, device: str) -> None:
        import torchaudio

        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=LOGMEL_N_FFT,
            win_length=LOGMEL_WINDOW,
            hop_length=round(LOGMEL_HOP_S * SAMPLE_RATE),
            f_min=LOGMEL_FMIN,
            f_max=LOGMEL_FMAX,
            n_mels=LOGMEL_BANDS,
            power=1.0,
            center=True,
        )

    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """(hops, 64) log-mel; hop j is centred at j * 10 ms (the STFT is centred)."""
        with torch.inference_mode():
            mel = self.transform(torch.from_numpy(audio))
        return torch.log(mel + LOGMEL_OFFSET).T.numpy()

    def embed(self, audio: np.ndarray, times: np.ndarray) -> Iterator[np.ndarray]:
        half = LOGMEL_PATCH // 2
        silence = np.full((half, LOGMEL_BANDS), np.log(LOGMEL_OFFSET), np.float32)
        mel = np.concatenate([silence, self.log_mel(audio), silence])
        # Patch of frame t: hops c-48 .. c+47 around c = round(t / 10 ms), in padded indices c .. c+95.
        first = np.clip(np.round(times / LOGMEL_HOP_S).astype(np.int64), 0, len(mel) - 2 * half)
        if self.pool == "stats":
            padded = mel.astype(np.float64)
            s1 = np.concatenate([np.zeros((1, LOGMEL_BANDS)), np.cumsum(padded, axis=0)])
            s2 = np.concatenate([np.zeros((1, LOGMEL_BANDS)), np.cumsum(padded**2, axis=0)])
        for lo in range(0, len(times), ROWS_PER_BLOCK):
            starts = first[lo : lo + ROWS_PER_BLOCK]
            if self.pool == "stats":
                total = s1[starts + LOGMEL_PATCH] - s1[starts]
                squares = s2[starts + LOGMEL_PATCH] - s2[starts]
                mean = total / LOGMEL_PATCH
                std = np.sqrt(np.maximum(squares / LOGMEL_PATCH - mean**2, 0.0))
                yield np.concatenate([mean, std], axis=1).astype(np.float16)
            else:
                index = starts[:, None] + np.arange(LOGMEL_PATCH)[None, :]
                yield mel[index].reshape(len(starts), -1).astype(np.float16)


class StateSequence(AudioEmbedder):
    """A model giving one state every `stride` samples, run on windows of `CHUNK_SAMPLES`."""

    stride: int
    centre: float  # samples from a state's first sample to its centre

    @abstractmethod
    def states(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """(states, dim) float arrays, one per chunk (all of CHUNK_SAMPLES but maybe the last)."""

    @abstractmethod
    def n_states(self, n_samples: int) -> int:
        """States a chunk of `n_samples` gives."""

    @property
    def batch(self) -> int:
        return 1

    def embed(self, audio: np.ndarray, times: np.ndarray) -> Iterator[np.ndarray]:
        starts = list(range(0, len(audio), CHUNK_SAMPLES))
        per_chunk = CHUNK_SAMPLES // self.stride
        total = (len(starts) - 1) * per_chunk + self.n_states(len(audio) - starts[-1])
        # The state whose centre is nearest; a time halfway between two takes the later one.
        index = np.floor((times * SAMPLE_RATE - self.centre) / self.stride + 0.5).astype(np.int64)
        index = np.clip(index, 0, max(total - 1, 0))
        done = 0
        for lo in range(0, len(starts), self.batch):
            group = starts[lo : lo + self.batch]
            outputs = self.states([audio[s : s + CHUNK_SAMPLES] for s in group])
            states = np.concatenate(outputs).astype(np.float16)
            first = (group[0] // CHUNK_SAMPLES) * per_chunk
            end = done + int(np.searchsorted(index[done:], first + len(states)))
            if end > done:
                yield states[index[done:end] - first]
            done = end
        if done < len(times):  # rounding past the last state
            yield np.repeat(states[-1:], len(times) - done, axis=0)


class SelfSupervised(StateSequence):
    """torchaudio's wav2vec2 / HuBERT / WavLM BASE bundles; weights downloaded once, checked by size."""

    stride = SSL_STRIDE
    centre = SSL_FIELD / 2

    def __init__(self, kind: str, layer: int | None = None, weights: str | None = None):
        self.name = kind
        self.bundle_name = SSL_BUNDLES[kind]
        if layer is not None and not 1 <= layer <= SSL_LAYERS:
            raise ValueError(f"--audio-layer {layer}: {self.bundle_name} has layers 1..{SSL_LAYERS}")
        self.layer = layer
        self.weights = weights

    def load(self, device: str) -> None:
        import torchaudio

        bundle = getattr(torchaudio.pipelines, self.bundle_name)
        path = fetch_weights(
            self.bundle_name.lower(),
            SSL_URL + bundle._path,
            None,
            env_var=AUDIO_WEIGHTS_ENV,
            option=AUDIO_WEIGHTS_OPTION,
            local=self.weights or os.environ.get(AUDIO_WEIGHTS_ENV),
        )
        factory = torchaudio.models.wavlm_model if self.name == "wavlm" else torchaudio.models.wav2vec2_model
        model = factory(**bundle._params)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        n_layers = len(model.encoder.transformer.layers)
        if self.layer is not None and not 1 <= self.layer <= n_layers:
            raise ValueError(f"--audio-layer {self.layer}: {self.bundle_name} has layers 1..{n_layers}")
        self.model = model.to(device).eval()
        self.device = device
        self.dim = bundle._params["encoder_embed_dim"]
        self.weights_path = path
        self.weights_sha256 = sha256_file(path)

    def provenance(self) -> dict[str, Any]:
        return {
            "audio_bundle": self.bundle_name,
            "audio_weights_path": str(self.weights_path),
            "audio_weights_sha256": self.weights_sha256,
        }

    def n_states(self, n_samples: int) -> int:
        return -(-n_samples // SSL_STRIDE)

    def states(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Each chunk is zero-padded so it gives one state per started stride (1500 per 30 s)."""
        out = []
        for chunk in chunks:
            padded = self.n_states(len(chunk)) * SSL_STRIDE + SSL_FIELD - SSL_STRIDE
            chunk = np.pad(chunk, (0, padded - len(chunk)))
            with torch.inference_mode():
                wave = torch.from_numpy(chunk)[None].to(self.device)
                layers, _ = self.model.extract_features(wave, num_layers=self.layer)
            out.append(layers[-1][0].float().cpu().numpy())
        return out


def whisper_state_timing(encoder) -> tuple[int, float]:
    """(stride, centre) in samples of the encoder's states, from its real strides and paddings.

    Whisper's STFT is centred (`torch.stft(center=True)`): mel frame j is centred on sample
    hop * j. A convolution with kernel k, stride s and padding p centres output i on input
    s * i - p + (k - 1) / 2. Through conv1 (3, 1, 1) and conv2 (3, 2, 1) state i is centred on
    mel frame 2i, sample 320 i: its centre is 0 samples after its first stride, not 160.
    """
    from whisper.audio import HOP_LENGTH

    stride, centre = HOP_LENGTH, 0.0  # samples per input step, and step 0's centre
    for conv in (encoder.conv1, encoder.conv2):
        (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
        centre += stride * ((k - 1) / 2 - p)
        stride *= s
    return stride, centre


class WhisperEncoder(StateSequence):
    """Whisper's encoder on windows of at most 30 s.

    `window`: "clip" encodes each window at its own length (a 2 s file costs 2 s of encoder,
    not 30; the positional embedding is cut to the window), "padded" zero-pads each window to
    30 s, as Whisper does when it transcribes. `runtime`: "torch" runs openai-whisper's encoder
    (any block, float32); "ctranslate2" takes the final states from the faster-whisper model the
    text stage transcribes with, at its compute type: one model in memory for both stages.
    """

    name = "whisper-encoder"
    stride = WHISPER_STRIDE
    centre = 0.0  # replaced by `whisper_state_timing` of the loaded torch model

    def __init__(
        self,
        asr_model: str | None = None,
        layer: int | None = None,
        window: str = DEFAULT_WHISPER_WINDOW,
        runtime: str = "torch",
        compute_type: str | None = None,
    ):
        if window not in WHISPER_WINDOWS:
            raise ValueError(f"unknown --audio-window {window!r}; choose from {', '.join(WHISPER_WINDOWS)}")
        if runtime == "ctranslate2" and layer is not None:
            raise ValueError("CTranslate2 gives only the encoder's final states: no --audio-layer")
        self.asr_model = asr_model
        self.layer = layer
        self.window = window
        self.runtime = runtime
        self.compute_type = compute_type
        self._source: asr.WhisperSource | None = None

    @property
    def batch(self) -> int:
        return WHISPER_BATCH

    def resolve(self) -> None:
        """Finds the Whisper model (for torch, converting the packaged one on first use)."""
        backend = "faster-whisper" if self.runtime == "ctranslate2" else "openai-whisper"
        self._source = asr.resolve(self.asr_model, backend)

    @property
    def source(self) -> asr.WhisperSource:
        if self._source is None:
            self.resolve()
        return self._source

    def load(self, device: str) -> None:
        self.device = device
        if self.runtime == "ctranslate2":
            self.model = asr.shared("faster-whisper", self.source, device, self.compute_type)
            self.n_mels = self.model.model.n_mels
            # The same convolutions as openai-whisper's (tests/test_audio.py checks the states).
            self.stride, self.centre = WHISPER_STRIDE, 0.0
            self.dim = self.states([np.zeros(self.stride, np.float32)])[0].shape[1]
            return
        self.model = asr.shared("openai-whisper", self.source, device)
        n_layers = self.model.dims.n_audio_layer
        if self.layer is not None and not 0 <= self.layer <= n_layers:
            raise ValueError(
                f"--audio-layer {self.layer}: Whisper {self.source.name} has blocks 0..{n_layers}"
            )
        self.n_mels = self.model.dims.n_mels
        self.dim = self.model.dims.n_audio_state
        self.stride, self.centre = whisper_state_timing(self.model.encoder)
        if CHUNK_SAMPLES % self.stride:
            raise ValueError(
                f"Whisper {self.source.name}: a state every {self.stride} samples does not tile 30 s"
            )

    def provenance(self) -> dict[str, Any]:
        return self.source.provenance("whisper")

    def n_states(self, n_samples: int) -> int:
        return -(-n_samples // self.stride)

    def log_mel(self, chunk: np.ndarray) -> torch.Tensor:
        """Whisper's log-mel of the window: padded to 30 s, or to a whole number of states."""
        import whisper

        audio = torch.from_numpy(chunk)
        if self.window == "padded":
            audio = whisper.pad_or_trim(audio)
        else:
            audio = torch.nn.functional.pad(audio, (0, -len(chunk) % self.stride))
        return whisper.log_mel_spectrogram(audio, n_mels=self.n_mels)

    def states(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        # Windows of one length are encoded together (with "clip", all but maybe the last).
        for _, same in itertools.groupby(map(self.log_mel, chunks), key=lambda mel: mel.shape):
            out += list(self._encode(torch.stack(list(same))))
        return [x[: self.n_states(len(c))] for x, c in zip(out, chunks, strict=True)]

    def _encode(self, mel: torch.Tensor) -> np.ndarray:
        """(batch, states, dim) float32 from (batch, n_mels, frames)."""
        if self.runtime == "ctranslate2":
            import ctranslate2

            features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
            with asr.MODEL_LOCK:
                return np.asarray(self.model.model.encode(features, to_cpu=True), np.float32)
        encoder = self.model.encoder
        with asr.MODEL_LOCK, torch.inference_mode():
            x = torch.nn.functional.gelu(encoder.conv1(mel.to(self.device)))
            x = torch.nn.functional.gelu(encoder.conv2(x))
            x = (x.permute(0, 2, 1) + encoder.positional_embedding[: x.shape[2]]).to(x.dtype)
            for block in encoder.blocks[: self.layer]:
                x = block(x)
            if self.layer is None:
                x = encoder.ln_post(x)
        return x.float().cpu().numpy()


def build_embedder(
    audio_model: str,
    audio_layer: int | None,
    audio_weights: str | None,
    logmel_pool: str,
    audio_window: str | None,
    asr_model: str | None,
    asr_backend: str,
) -> AudioEmbedder:
    """The embedder the options name; a CTranslate2 encoder's compute type is set when the stage
    resolves its device (`AudioStage.resolve`)."""
    if audio_model != "whisper-encoder" and audio_window is not None:
        raise ValueError(f"--audio-window is for whisper-encoder, not {audio_model}")
    if audio_model == "logmel":
        if audio_layer is not None:
            raise ValueError("--audio-layer is for wav2vec2, hubert, wavlm and whisper-encoder, not logmel")
        return LogMel(logmel_pool)
    if audio_model in SSL_BUNDLES:
        return SelfSupervised(audio_model, audio_layer, audio_weights)
    if audio_model == "whisper-encoder":
        if asr_backend not in asr.BACKENDS:
            raise ValueError(f"unknown --asr-backend {asr_backend!r}; choose from {', '.join(asr.BACKENDS)}")
        layer = DEFAULT_WHISPER_LAYER if audio_layer is None else audio_layer
        final = layer == WHISPER_FINAL
        # The final states from the text stage's own faster-whisper model; inner blocks from torch.
        runtime = "ctranslate2" if final and asr_backend == "faster-whisper" else "torch"
        window = audio_window or DEFAULT_WHISPER_WINDOW
        return WhisperEncoder(asr_model, None if final else layer, window, runtime)
    raise ValueError(f"unknown --audio-model {audio_model!r}; choose from {', '.join(AUDIO_MODELS)}")


class AudioStage(Stage):
    name = "audio"

    def __init__(
        self,
        audio_model: str | None = None,
        audio_layer: int | None = None,
        audio_weights: str | None = None,
        logmel_pool: str = "stats",
        audio_window: str | None = None,
        asr_model: str | None = None,
        asr_backend: str | None = None,
        asr_compute_type: str | None = None,
        device: str = "auto",
    ):
        self.audio_model = audio_model or DEFAULT_AUDIO_MODEL
        self.audio_layer = audio_layer
        self.logmel_pool = logmel_pool
        self.asr_compute_type = asr_compute_type or asr.DEFAULT_COMPUTE_TYPE
        self.device = device
        self.embedder = build_embedder(
            self.audio_model,
            audio_layer,
            audio_weights,
            logmel_pool,
            audio_window,
            asr_model,
            asr_backend or asr.DEFAULT_BACKEND,
        )
        self.weights_sha256 = ""

    def resolve(self) -> None:
        self.torch_device = resolve_device(self.device)
        if isinstance(self.embedder, SelfSupervised):
            local = self.embedder.weights or os.environ.get(AUDIO_WEIGHTS_ENV)
            if local and os.path.isfile(local):  # user-given weights: their content is the config
                self.weights_sha256 = weights_checksum(local)
        if isinstance(self.embedder, WhisperEncoder):
            if self.embedder.runtime == "ctranslate2":  # the text stage's compute type: one model
                compute_type = asr.resolve_compute_type(self.asr_compute_type, self.torch_device)
                self.embedder.compute_type = compute_type
            self.embedder.resolve()
        super().resolve()

    def config(self) -> dict[str, Any]:
        self.check_resolved()
        config: dict[str, Any] = {"audio_model": self.audio_model, "sample_rate": SAMPLE_RATE}
        if self.audio_model == "logmel":
            config["logmel_pool"] = self.logmel_pool
        elif isinstance(self.embedder, WhisperEncoder):
            layer = self.embedder.layer
            config["audio_layer"] = WHISPER_FINAL if layer is None else layer
        else:
            config["audio_layer"] = self.audio_layer
        if isinstance(self.embedder, SelfSupervised):
            config["audio_weights"] = self.embedder.weights
            if self.weights_sha256:
                config["audio_weights_sha256"] = self.weights_sha256
        if isinstance(self.embedder, WhisperEncoder):
            config["whisper_model"] = self.embedder.source.name
            config["whisper_weights_sha256"] = self.embedder.source.sha256
            config["audio_window"] = self.embedder.window
            config["whisper_runtime"] = self.embedder.runtime
            if self.embedder.runtime == "ctranslate2":
                config["whisper_compute_type"] = self.embedder.compute_type
            # States were once placed half a state late; stores made then are recomputed.
            config["whisper_state_timing"] = "centre from conv strides and paddings"
        return config

    def load(self) -> None:
        if not self.resolved:
            self.resolve()
        self.embedder.load(self.torch_device)

    def provenance(self) -> dict[str, Any]:
        return {
            "audio_embedder": self.audio_model,
            "embedding_dim": self.embedder.dim,
            "versions": library_versions("torchaudio", "openai-whisper", "faster-whisper", "ctranslate2"),
            **self.embedder.provenance(),
        }

    def run(self, media: Media) -> Iterator[Rows | Extra]:
        audio = media.audio()
        n = media.n_frames
        duration = len(audio) / SAMPLE_RATE if audio is not None else 0.0
        inside = int(np.searchsorted(media.timestamps, duration, side="left"))
        start = 0
        if inside:
            for block in self.embedder.embed(audio, media.timestamps[:inside]):
                yield Rows(start, {"present": np.ones(len(block), bool), "embedding": block})
                start += len(block)
        for lo in range(start, n, ROWS_PER_BLOCK):
            rows = min(ROWS_PER_BLOCK, n - lo)
            yield Rows(
                lo,
                {
                    "present": np.zeros(rows, bool),
                    "embedding": np.zeros((rows, self.embedder.dim), np.float16),
                },
            )
        if audio is None:
            yield Extra(attrs={"warning": "no audio track: every frame marked absent"})
