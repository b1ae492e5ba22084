"""Whisper over many short files at once: does it pay, and are the words still each file's own?

A 2-4 s clip pays for a whole padded 30 s Whisper window. Two ways to share windows between
files, against the text stage's way (each file alone: Silero VAD, faster-whisper's batched
pipeline over that file's windows, the hallucination filters):

- **batched**: every file keeps its own windows, and the windows of all files go through
  faster-whisper's batched pipeline together, `asr.DECODE_BATCH` per encoder and decoder call;
- **packed**: the speech of consecutive files, `GAP_S` of silence between them, is grouped into
  shared windows of up to 30 s (as the stage groups one file's stretches of speech), so a window
  holds several files; words are handed back to the file they fall in.

Both then run the same hallucination filters on each file. Printed: wall and CPU seconds of
each against the stage's way (measured in the same run, best of `--repeat`), and how far each
file's kept words move from its words transcribed alone (word error rate, files that differ).
Media: the 54 short real clips of data/ (JFK, six CREMA-D clips, 47 speech-va clips), CPU, the
packaged tiny.en int8. Usage: python bench/asr_batching.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from speech_media import wer  # noqa: E402

from pipeline import asr  # noqa: E402
from pipeline.media import SAMPLE_RATE, read_audio  # noqa: E402
from pipeline.text import TextStage  # noqa: E402

DATA = ROOT / "data"
CLIPS = [
    DATA / "jfk" / "jfk.flac",
    *sorted((DATA / "crema-d" / "mp4").glob("*.mp4")),
    *sorted((DATA / "speech-va").glob("*.wav")),
]
GAP_S = 1.0  # silence between two files in one packed window


def together(stage: TextStage, audios: list[np.ndarray], pack: bool) -> list[asr.Transcript]:
    """Each file's kept transcript, from one batched-pipeline call over all files' windows."""
    from faster_whisper import BatchedInferencePipeline

    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    speeches = [asr.speech_regions(audio, stage.filters, SAMPLE_RATE) for audio in audios]
    offsets = np.cumsum([0] + [(len(audio) + len(gap)) / SAMPLE_RATE for audio in audios])[:-1]
    if pack:
        shifted = [speech + offset for speech, offset in zip(speeches, offsets, strict=True)]
        windows = asr.speech_windows(np.concatenate(shifted))
    else:
        windows = [
            {"start": w["start"] + offset, "end": w["end"] + offset}
            for speech, offset in zip(speeches, offsets, strict=True)
            for w in asr.speech_windows(speech)
        ]
    heard = [asr.Transcript(language="en", language_detected=False) for _ in audios]
    if windows:
        segments, _ = BatchedInferencePipeline(stage.asr).transcribe(
            np.concatenate([part for audio in audios for part in (audio, gap)]),
            language="en",
            word_timestamps=True,
            clip_timestamps=windows,
            batch_size=asr.DECODE_BATCH,
            beam_size=1,
        )
        for segment in segments:
            last = -1  # a segment of a packed window may run over several files: one piece each
            for word in segment.words or []:
                k = int(np.searchsorted(offsets, (word.start + word.end) / 2, side="right")) - 1
                if k != last:
                    asr._add_segment(
                        heard[k],
                        "",
                        segment.start - offsets[k],
                        segment.end - offsets[k],
                        segment.avg_logprob,
                        segment.no_speech_prob,
                        segment.compression_ratio,
                    )
                    last = k
                asr._add_word(
                    heard[k], word.word, word.start - offsets[k], word.end - offsets[k], word.probability
                )
    return [
        asr.drop_hallucinations(transcript, audio, speech, SAMPLE_RATE, stage.filters)
        for transcript, audio, speech in zip(heard, audios, speeches, strict=True)
    ]


def best_of(work: Callable[[], list[asr.Transcript]], repeat: int) -> tuple[float, float, list]:
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    stage = TextStage(device="cpu")
    stage.load()
    if stage.asr.model.is_multilingual:
        sys.exit("this benchmark packs English-only models (tiny.en is the packaged one)")
    audios = [read_audio(path) for path in CLIPS]
    seconds = sum(len(audio) for audio in audios) / SAMPLE_RATE
    stage.transcribe(audios[0])  # warm-up
    ways = {
        "each file alone (the text stage)": lambda: [stage.transcribe(audio) for audio in audios],
        "batched: own windows, shared calls": lambda: together(stage, audios, pack=False),
        "packed: files share windows": lambda: together(stage, audios, pack=True),
    }
    runs = {name: best_of(work, args.repeat) for name, work in ways.items()}
    alone_wall, alone_cpu, alone = next(iter(runs.values()))
    print(f"{len(CLIPS)} clips, {seconds:.1f} s of audio; {os.getloadavg()[0]:.2f} load average at end\n")
    print(f"{'':<38}{'wall s':>8}{'speed-up':>10}{'CPU s':>8}{'word error vs alone':>21}{'files differ':>14}")
    for name, (wall, cpu, transcripts) in runs.items():
        errors = [
            wer(" ".join(a.words), " ".join(b.words)) if a.words else float(bool(b.words))
            for a, b in zip(alone, transcripts, strict=True)
        ]
        differ = sum(error > 0 for error in errors)
        print(
            f"{name:<38}{wall:>8.2f}{alone_wall / wall:>9.2f}x{cpu:>8.2f}"
            f"{np.mean(errors):>21.3f}{differ:>10}/{len(CLIPS)}"
        )
    packed = runs["packed: files share windows"][2]
    print("\nfiles whose packed words differ most from their words alone:")
    worst = sorted(range(len(CLIPS)), key=lambda i: -len(set(packed[i].words) ^ set(alone[i].words)))
    for i in worst[:4]:
        print(f"  {CLIPS[i].name}: alone  {alone[i].text!r}")
        print(f"  {'':<{len(CLIPS[i].name)}}  packed {packed[i].text!r}")


if __name__ == "__main__":
    main()
