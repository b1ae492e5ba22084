"""Media decoding with PyAV: probing, the frame grid, streamed video frames and audio.

Every time here is in seconds from the container's start, so video frames and audio samples
share one clock. Nothing holds a whole video in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

DEFAULT_FPS = 30.0
SAMPLE_RATE = 16_000
# Frame threading hides a damaged packet's decode error (the stream just ends early); slice
# threading reports it, at almost the same speed.
DECODE_THREADING = "SLICE"
# How frames become RGB: "swscale" (PyAV's to_ndarray) or "opencv": the decoder's yuv420p planes
# through OpenCV's BT.601 limited-range conversion, about a fifth of swscale's time; the pixels
# differ by about one level on average (rounding, and chroma upsampled by repetition rather than
# interpolation). Other pixel formats and full-range video always go through swscale.
RGB_CONVERSIONS = ("swscale", "opencv")
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe")
TEXT_FORMATS = ("tty",)  # FFmpeg renders any text file as a "video" of ANSI art
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv"}
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".wma"}
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | AUDIO_EXTENSIONS
# Skipped in folders without opening: FFmpeg would read some as images or as text "video" (tty).
NOT_MEDIA_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".txt",
    ".csv",
    ".tsv",
    ".json",
    ".md",
    ".nfo",
    ".asc",
    ".ans",
    ".diz",
    ".xml",
    ".yaml",
    ".yml",
    ".h5",
    ".hdf5",
    ".npy",
    ".npz",
    ".pt",
    ".pth",
    ".onnx",
    ".pdf",
    ".zip",
    ".tar",
    ".gz",
}


class MediaError(Exception):
    """A file that cannot be used as media; the message names the problem, not the file."""


class GridMismatch(MediaError):
    """More frames decode than the container's header announced: the grid needs its own pass."""


@dataclass(frozen=True)
class MediaInfo:
    has_video: bool
    has_audio: bool
    fps: float
    width: int
    height: int
    duration: float


@dataclass
class Media:
    """One input file, its id in the store and its frame grid: what a stage is given."""

    path: Path
    video_id: str
    info: MediaInfo
    timestamps: np.ndarray  # (n,) float64 seconds; one row per frame
    _cache: dict = field(default_factory=dict, repr=False)
    # True while the grid is still to be decoded, by the first video_frames() pass: `timestamps`
    # then holds NaNs, as many as the container's header announces frames (see shared_grid).
    grid_pending: bool = False

    @property
    def n_frames(self) -> int:
        return len(self.timestamps)

    def video_frames(
        self, batch_size: int = 32, conversion: str = "swscale", first_batch: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (grid rows (b,), frames (b,h,w,3) uint8 RGB) in presentation order; row -1 is
        a decoded frame off the grid.

        While `grid_pending`, this one decoding pass also builds the grid: each decoded frame is
        the next row, and `timestamps` is set (and checked as frame_grid checks it) at the end.
        """
        if not self.grid_pending:
            for times, frames in iter_video_frames(
                self.path, batch_size, conversion=conversion, first_batch=first_batch
            ):
                yield grid_rows(times, self.timestamps), frames
            return
        expected = self.n_frames
        times: list[np.ndarray] = []
        decoded = 0
        for batch_times, frames in iter_video_frames(
            self.path, batch_size, conversion=conversion, first_batch=first_batch
        ):
            if decoded + len(batch_times) > expected:
                raise GridMismatch(f"more than the {expected} frames the header announces decode")
            times.append(batch_times)
            yield np.arange(decoded, decoded + len(batch_times)), frames
            decoded += len(batch_times)
        self.timestamps = checked_grid(np.concatenate(times) if times else np.zeros(0), expected)
        self.grid_pending = False

    def audio(self) -> np.ndarray | None:
        """The audio track as 16 kHz mono float32 from t=0, decoded once per Media."""
        if "audio" not in self._cache:
            self._cache["audio"] = read_audio(self.path) if self.info.has_audio else None
        return self._cache["audio"]


def shared_grid(path: Path, video_id: str, info: MediaInfo) -> Media | None:
    """A Media whose grid the first video_frames() pass decodes (one pass for grid and pixels),
    or None when the container does not say how many frames to expect (the grid needs its own)."""
    with _open(path) as container:
        expected = container.streams.video[0].frames if container.streams.video else 0
    if not expected:
        return None
    return Media(path, video_id, info, np.full(expected, np.nan), grid_pending=True)


def grid_rows(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The grid row of each decoded frame time (nearest within half a frame), else -1."""
    if len(grid) == 0:
        return np.full(len(times), -1)
    rows = nearest_rows(times, grid)
    step = float(np.median(np.diff(grid))) if len(grid) > 1 else 1.0
    return np.where(np.abs(grid[rows] - times) <= step / 2, rows, -1)


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except FileNotFoundError:
        raise MediaError("no such file") from None
    except PermissionError:
        raise MediaError("permission denied") from None
    except IsADirectoryError:
        raise MediaError("is a directory") from None
    except av.error.FFmpegError as e:
        raise MediaError(
            f"not a readable media file: corrupt, truncated or not media ({e.strerror or e})"
        ) from None


def _start_time(container: av.container.InputContainer) -> float:
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def probe(path: Path) -> MediaInfo:
    with _open(path) as container:
        if container.format.name in IMAGE_FORMATS:
            raise MediaError(f"a still image ({container.format.name}), not a video or audio file")
        if container.format.name in TEXT_FORMATS:
            raise MediaError("a text file, not a video or audio file")
        video = container.streams.video[0] if container.streams.video else None
        has_audio = bool(container.streams.audio)
        if video is None and not has_audio:
            raise MediaError("no video or audio stream")
        duration = container.duration / av.time_base if container.duration else 0.0
        if video is None:
            return MediaInfo(False, True, DEFAULT_FPS, 0, 0, duration)
        rate = video.average_rate or video.guessed_rate or video.base_rate
        width, height = video.codec_context.width, video.codec_context.height
        if _quarter_turns(container, video) % 2:
            width, height = height, width
        return MediaInfo(True, has_audio, float(rate) if rate else DEFAULT_FPS, width, height, duration)


def _quarter_turns(container: av.container.InputContainer, video: av.VideoStream) -> int:
    """The display rotation of the first frame, in counter-clockwise quarter turns (0 if unknown)."""
    try:
        frame = next(container.decode(video))
    except (StopIteration, av.error.FFmpegError):
        return 0
    return round(frame.rotation / 90) % 4


def frame_grid(
    path: Path, info: MediaInfo, fps: float = DEFAULT_FPS, audio: np.ndarray | None = None
) -> np.ndarray:
    """Presentation times of the decoded video frames; a regular grid at `fps` for audio-only files.

    The video is decoded (not converted to pixels) rather than demuxed, so the grid holds exactly
    the frames a decoder produces, and a damaged file fails here, before any model runs. An
    audio-only file's grid is as long as its audio: pass the decoded `audio` (`read_audio`) when
    the stages will use it, so it is decoded once.
    """
    if not info.has_video:
        seconds = (len(audio) if audio is not None else len(read_audio(path))) / SAMPLE_RATE
        n = int(np.floor(seconds * fps))
        if n == 0:
            raise MediaError("audio track is empty")
        return np.arange(n, dtype=np.float64) / fps
    times = []
    with _open(path) as container:
        start = _start_time(container)
        stream = container.streams.video[0]
        stream.thread_type = DECODE_THREADING
        try:
            for frame in container.decode(stream):
                times.append(_frame_time(frame, start, len(times), info.fps))
        except av.error.FFmpegError as e:
            raise _decode_error("video", e, times[-1] if times else None, info.duration) from None
        expected = stream.frames
    return checked_grid(np.asarray(times, dtype=np.float64), expected)


def checked_grid(times: np.ndarray, expected: int) -> np.ndarray:
    """The decoded frame times as a grid, refused when frames are missing or out of order."""
    if not len(times):
        raise MediaError("video stream has no frames")
    if expected and len(times) < expected:
        raise MediaError(f"truncated video: {len(times)} of {expected} frames decode")
    grid = np.asarray(times, dtype=np.float64)
    if np.any(np.diff(grid) <= 0):
        raise MediaError("video frame timestamps are not increasing")
    return grid


def _decode_error(
    kind: str, error: av.error.FFmpegError, reached: float | None, duration: float | None
) -> MediaError:
    """Damaged media fails whole: a silently shortened grid would misalign labels later."""
    reason = error.strerror or str(error)
    if reached is None:
        return MediaError(f"{kind} stream cannot be decoded ({reason})")
    of = f" of {duration:.2f} s" if duration else ""
    return MediaError(f"corrupt or truncated {kind}: decoding failed at {reached:.2f} s{of} ({reason})")


def _frame_time(frame: av.VideoFrame, start: float, index: int, fps: float) -> float:
    if frame.pts is None or frame.time_base is None:
        return index / fps
    return float(frame.pts * frame.time_base) - start


def iter_video_frames(
    path: Path,
    batch_size: int = 32,
    max_side: int | None = None,
    conversion: str = "swscale",
    first_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (timestamps (b,), frames (b,h,w,3) uint8 RGB) in presentation order; the first
    batch holds `first_batch` frames when given (a consumer can start before a full batch decodes).

    `max_side` downscales frames whose longer side exceeds it, during conversion (by swscale);
    `conversion` is one of RGB_CONVERSIONS.
    """
    if conversion not in RGB_CONVERSIONS:
        raise ValueError(f"unknown RGB conversion {conversion!r}; choose from {', '.join(RGB_CONVERSIONS)}")
    with _open(path) as container:
        start = _start_time(container)
        stream = container.streams.video[0]
        stream.thread_type = DECODE_THREADING
        fps = float(stream.average_rate or DEFAULT_FPS)
        times: list[float] = []
        frames: list[np.ndarray] = []
        index = 0
        size = first_batch or batch_size
        try:
            for frame in container.decode(stream):
                times.append(_frame_time(frame, start, index, fps))
                frames.append(_to_rgb(frame, max_side, conversion))
                index += 1
                if len(frames) == size:
                    yield np.asarray(times), np.stack(frames)
                    times, frames, size = [], [], batch_size
        except av.error.FFmpegError as e:
            last = times[-1] if times else None
            raise _decode_error(
                "video", e, last, container.duration and container.duration / av.time_base
            ) from None
        if frames:
            yield np.asarray(times), np.stack(frames)


def _to_rgb(frame: av.VideoFrame, max_side: int | None, conversion: str = "swscale") -> np.ndarray:
    """The frame as displayed: phone videos store a display rotation instead of rotated pixels."""
    if max_side and max(frame.width, frame.height) > max_side:
        scale = max_side / max(frame.width, frame.height)
        width, height = round(frame.width * scale), round(frame.height * scale)
        image = frame.to_ndarray(format="rgb24", width=width, height=height)
    elif conversion == "opencv" and _opencv_converts(frame):
        image = cv2.cvtColor(frame.to_ndarray(format="yuv420p"), cv2.COLOR_YUV2RGB_I420)
    else:
        image = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise, as np.rot90 turns them
    return np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image


def _opencv_converts(frame: av.VideoFrame) -> bool:
    """Whether OpenCV's I420 conversion fits the frame: limited-range yuv420p of even size."""
    limited = frame.color_range != 2  # 2: full ("JPEG") range
    even = frame.width % 2 == 0 and frame.height % 2 == 0
    return frame.format.name == "yuv420p" and limited and even


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio track as mono float32 at `sample_rate`, sample 0 at t=0.

    Leading silence is inserted when the track starts after the container does, so sample
    index / sample_rate is a time on the same clock as the frame grid.
    """
    chunks: list[np.ndarray] = []
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        start = _start_time(container)
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        offset = None
        try:
            for frame in container.decode(stream):
                if offset is None and frame.pts is not None and frame.time_base is not None:
                    offset = float(frame.pts * frame.time_base) - start
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as e:
            decoded = sum(map(len, chunks)) / sample_rate if chunks else None
            raise _decode_error(
                "audio", e, decoded, container.duration and container.duration / av.time_base
            ) from None
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    lead = max(0, round((offset or 0.0) * sample_rate))
    if lead:
        audio = np.concatenate([np.zeros(lead, np.float32), audio])
    return audio.astype(np.float32, copy=False)


def nearest_rows(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Per time, the row of the nearest timestamp of a sorted, non-empty frame grid (of two equally
    near, the earlier)."""
    right = np.clip(np.searchsorted(grid, times), 0, len(grid) - 1)
    left = np.clip(right - 1, 0, None)
    return np.where(np.abs(grid[left] - times) <= np.abs(grid[right] - times), left, right)
