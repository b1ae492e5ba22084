"""Shared test fixtures: the bundled real media in data/ (see data/SOURCES.md for sources and licences)."""

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
CREMA_MP4 = sorted((DATA / "crema-d" / "mp4").glob("*.mp4"))
CREMA_FLV = sorted((DATA / "crema-d" / "VideoFlash").glob("*.flv"))
CREMA_MP3 = sorted((DATA / "crema-d" / "AudioMP3").glob("*.mp3"))
PEXELS = DATA / "pexels" / "WolfgangLanger_Pexels.mp4"
SINGLE_FACE = DATA / "pexels" / "single_face.mp4"
HAMILTON = DATA / "hamilton" / "short_hamilton_clip.mp4"
JFK = DATA / "jfk" / "jfk.flac"
SPEECH_VA = sorted((DATA / "speech-va").glob("*.wav"))
BEAT = DATA / "music" / "beat_small.wav"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store path in a fresh folder."""
    return tmp_path / "store.h5"


@pytest.fixture
def one_torch_thread():
    """Small models train fastest on one thread, and two threads crawl when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
