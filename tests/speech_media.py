"""Media built from the real files in data/ for the audio and text tests, and a word error rate."""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from pathlib import Path

import av
import numpy as np

from pipeline.media import SAMPLE_RATE, Media, frame_grid, probe


def media_of(path: Path, fps: float = 30.0) -> Media:
    """A Media as the runner builds it."""
    info = probe(path)
    return Media(path, path.stem, info, frame_grid(path, info, fps))


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """16-bit mono PCM WAV, written with PyAV."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def remux(src: Path, dst: Path, keep_audio: bool, corrupt_audio: bool = False) -> Path:
    """Copies the video stream's packets (and the audio's, or garbage in their place) unchanged."""
    rng = np.random.default_rng(0)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        video_in = inp.streams.video[0]
        streams = {video_in.index: out.add_stream_from_template(video_in)}
        if keep_audio:
            audio_in = inp.streams.audio[0]
            streams[audio_in.index] = out.add_stream_from_template(audio_in)
        for packet in inp.demux(*[inp.streams[i] for i in streams]):
            if packet.dts is None:
                continue
            target = streams[packet.stream.index]
            if corrupt_audio and packet.stream.type == "audio":
                garbage = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                garbage.pts, garbage.dts, garbage.time_base = packet.pts, packet.dts, packet.time_base
                packet = garbage
            packet.stream = target
            out.mux(packet)
    return dst


def words_of(text: str) -> list[str]:
    """Lower case, punctuation removed (apostrophes kept), split on spaces and dashes."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    ref, hyp = words_of(reference), words_of(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def similarity(reference: str, hypothesis: str) -> float:
    """Character-level similarity (0..1) of the normalised texts: "a jacket" vs "to check it" is
    a near miss that word error rate scores as badly as a wrong sentence."""
    return SequenceMatcher(None, " ".join(words_of(reference)), " ".join(words_of(hypothesis))).ratio()
