"""The faces stage: one subject per video, found by MTCNN, tracked, aligned and embedded.

Per frame it writes (absent frames in brackets):
    present   (n,) bool
    boxes     (n,4) float32   x1,y1,x2,y2 in original-frame pixels, as MTCNN gives them (a box may
                              reach past the frame's edge)                                [NaN]
    landmarks (n,5,2) float32 left eye, right eye, nose, mouth left, mouth right (x,y)   [NaN]
    score     (n,) float32    MTCNN's O-Net face probability                              [0]
    crops     (n,112,112,3) uint8  aligned onto the ArcFace template (unless --no-crops) [zeros]
    embedding (n,D) float16   the visual embedder's output (unless --visual-model none)  [zeros]
    expression (n,C) float16  the embedder's expression-class probabilities, when it has classes
                              (fer: C=7, named by the `expression_classes` attr)          [zeros]

Speed: MTCNN spends most of its time running P-Net over the fine levels of a full-frame image
pyramid. Once the subject is found, the next frames are tracked by O-Net alone (MTCNN's last
stage, under 1 ms a frame) on the square around the last box, as MTCNN runs it on R-Net's boxes,
up to TRACK_BATCH frames in one batch on the same square while the track holds (after a frame
whose face moved off it, the next batch starts there, on the box before it, and is as long as the
last one held); only that square is resized (halved first while it is several times O-Net's
48 px: HALVE_HEADROOM), so an HD frame costs the tracker about what a small one does; where it
reaches past the frame's edge it is padded with zeros (as the original MTCNN pads;
facenet-pytorch clips, which squashes the face O-Net sees and makes a track along the edge
drift). O-Net's regression lags a fast-moving face and
wanders under an occluding hand, so a tracked face that scores under TRACK_SCORE, or whose box
overlaps the box it came from by less than TRACK_IOU (a large correction), is searched for
again in a window around the last box (SEARCH_RADIUS box sizes each way), at the pyramid levels
of the full detector that fit faces from SEARCH_MIN_FACE times the tracked size up; so is every
REFINE_FRAMES-th frame. The whole frame is searched (at the same levels) only when the window
holds no face that matches the track, and at every level only while no subject is tracked. The
detector itself is MTCNN's three stages with their crops batched and OpenCV's area resize of
uint8 pixels (AreaResizer: the pyramid's levels share one chain of halvings of the frame). On
talking heads most frames cost one O-Net pass, and the boxes and landmarks stay within the
spread of the full detector's own results (bench/faces.py measures both, HD clips included).

Subject: the largest face of the first frame with a face; then the detection that overlaps or
is near the last box, so another face entering the frame does not take the track over. A track
missing for REACQUIRE_AFTER_S (a cut, the subject leaving) is given up for the largest face.
With `subject` "left" or "right" (Aff-Wild2's two-subject videos), a track starts only on a face
whose centre is in that half of the frame (the largest there), so the other person is never
taken when the tracked one is out of view.

With `faces_from` (a folder of aligned crops in Aff-Wild2's layout, see pipeline.face_folder) no
face is detected: each frame's image is its crop, and boxes, landmarks and score are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline import face_folder
from pipeline.align import CROP_SIZE, align_face
from pipeline.errors import resolve_device
from pipeline.files import sha256_file
from pipeline.media import VIDEO_EXTENSIONS, Media
from pipeline.stages import Extra, Rows, Stage, library_versions
from pipeline.threads import cv2_threads, prefetched, torch_threads
from pipeline.visual import DEFAULT, NAMED, NONE, Embedder, build_embedder

MIN_FACE_PX = 20  # MTCNN's default smallest face, kept so small faces (Hamilton's ~40 px) are found
THRESHOLDS = (0.6, 0.7, 0.7)  # P-Net, R-Net, O-Net; MTCNN's defaults
PYRAMID_FACTOR = 0.709  # MTCNN's default scale step
SEARCH_RADIUS = 1.5  # the tracking window reaches this many box sizes from the box's centre
SEARCH_MIN_FACE = 0.7  # smallest face looked for in the window, relative to the tracked box
MATCH_IOU = 0.3  # a detection with this IoU with the last box is the same subject...
MATCH_CENTRE = 0.5  # ...or one whose centre is within this many box sizes of the last one's
MATCH_SCALE = 1.5  # ...and whose size is within this factor of it
TRACK_BATCH = 16  # frames O-Net tracks in one batch, all on the box before them...
TRACK_MIN_BATCH = 2  # ...or fewer, down to this, as many as stayed on the box in the batch before
REFINE_FRAMES = 120  # at most this many frames tracked by O-Net alone between two window searches
TRACK_SCORE = 0.95  # a face O-Net tracks with a lower score is searched for in its window instead...
TRACK_IOU = 0.85  # ...and so is one whose box overlaps the box it was tracked from by less...
START_MIN_FACE = 0.1  # a track starts on faces this fraction of the short side or larger, if any
# Area resizes (pyramid levels, the nets' crops) first halve a large image while it stays this many
# times the target size: on HD frames a face square's resize then costs one read of its pixels
HALVE_HEADROOM = 2
REACQUIRE_AFTER_S = 0.5  # a track lost this long is given up for the largest face in view
SUBJECTS = ("largest", "left", "right")
DECODE_BATCH = 16
FIRST_DECODE_BATCH = 4  # detection starts after 4 decoded frames, not 16: short clips wait less
RGB_CONVERSION = "opencv"  # pipeline.media.RGB_CONVERSIONS: a fifth of swscale's time per frame
# The networks run on a small window are too small to gain from intra-op threads on a CPU (their
# synchronisation costs more, and collapses when other processes share the cores); one thread
# detects while the decode thread keeps another core busy.
DETECTOR_CPU_THREADS = 1
ABSENT_BLOCK = 1024


@dataclass
class Face:
    box: np.ndarray  # (4,) x1,y1,x2,y2
    landmarks: np.ndarray  # (5,2)
    score: float

    @property
    def size(self) -> float:
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    @property
    def centre(self) -> np.ndarray:
        return (self.box[:2] + self.box[2:]) / 2


def pyramid_min_face(min_face: float) -> float:
    """The largest MTCNN min_face_size <= `min_face` whose pyramid is a tail of the default one.

    Keeping to the default pyramid's scales is what keeps windowed detections close to full ones.
    """
    if min_face <= MIN_FACE_PX:
        return float(MIN_FACE_PX)
    level = math.floor(math.log(min_face / MIN_FACE_PX) / math.log(1 / PYRAMID_FACTOR) + 1e-9)
    return MIN_FACE_PX / PYRAMID_FACTOR**level


class Mtcnn:
    """facenet-pytorch's three MTCNN networks with their packaged weights, run on one image."""

    def __init__(self, device: str):
        from facenet_pytorch import ONet, PNet, RNet

        # channels-last makes the nets' max-pooling several times faster on CPU, same results
        self.nets = [
            net.eval().to(device, memory_format=torch.channels_last) for net in (PNet(), RNet(), ONet())
        ]
        self.device = device

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """(b,h,w,3) pixels as the nets' normalised (b,3,h,w) float input, channels-last in memory."""
        normalised = (np.asarray(pixels, dtype=np.float32) - 127.5) * 0.0078125
        return torch.from_numpy(normalised).to(self.device).permute(0, 3, 1, 2)

    def crops(self, image: np.ndarray, squares: np.ndarray, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """The nets' input for each square (n,4) of `image`, cut and resized as detect_face does
        (pad(): 1-based, clipped to the frame; area resize); and which squares kept any pixels."""
        height, width = image.shape[:2]
        corners = np.trunc(squares).astype(np.int64)
        x, y = np.maximum(corners[:, 0], 1), np.maximum(corners[:, 1], 1)
        ex, ey = np.minimum(corners[:, 2], width), np.minimum(corners[:, 3], height)
        keep = (ey > y - 1) & (ex > x - 1)
        pixels = np.empty((int(keep.sum()), size, size, 3), dtype=np.uint8)
        for i, k in enumerate(np.flatnonzero(keep)):
            pixels[i] = area_resize(image[y[k] - 1 : ey[k], x[k] - 1 : ex[k]], size, size)
        return keep, self.tensor(pixels)

    @torch.no_grad()
    def detect(self, image: np.ndarray, min_face: float) -> list[Face]:
        """MTCNN's three stages as facenet-pytorch's detect_face runs them (the same pyramid,
        thresholds, non-maximum suppressions and box arithmetic), with OpenCV's resizes of the
        uint8 pixels (area_resize), each stage's crops in one batch and the box arithmetic in
        numpy: several times faster on a CPU."""
        from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, generateBoundingBox
        from torchvision.ops import nms

        min_face = pyramid_min_face(min_face)
        height, width = image.shape[:2]
        if min(height, width) < min_face:
            return []  # no pyramid level fits
        image = np.ascontiguousarray(image)
        resize = AreaResizer(image)
        scale, side = 12.0 / min_face, min(height, width) * 12.0 / min_face
        proposals = []
        while side >= 12:
            level = resize(int(height * scale + 1), int(width * scale + 1))
            reg, prob = self.nets[0](self.tensor(level[None]))
            boxes, _ = generateBoundingBox(reg, prob[:, 1], scale, THRESHOLDS[0])
            proposals.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
            scale, side = scale * PYRAMID_FACTOR, side * PYRAMID_FACTOR
        boxes = torch.cat(proposals).cpu().numpy() if proposals else np.zeros((0, 9), np.float32)
        boxes = boxes[nms(torch.from_numpy(boxes[:, :4]), torch.from_numpy(boxes[:, 4]), 0.7).numpy()]
        size = boxes[:, 2:4] - boxes[:, 0:2]
        boxes = boxes[:, :4] + boxes[:, 5:9] * np.tile(size, 2)  # P-Net's regression
        # R-Net
        squares = np.array([square_box(b) for b in boxes], dtype=np.float32).reshape(-1, 4)
        keep, pixels = self.crops(image, squares, 24)
        squares = squares[keep]
        if not len(squares):
            return []
        reg, prob = (t.cpu().numpy() for t in self.nets[1](pixels))
        passed = prob[:, 1] > THRESHOLDS[1]
        squares, score, reg = squares[passed], prob[passed, 1], reg[passed]
        pick = nms(torch.from_numpy(squares), torch.from_numpy(score), 0.7).numpy()
        squares, reg = squares[pick], reg[pick]
        sides = squares[:, 2:3] - squares[:, 0:1] + 1
        squares = np.array([square_box(b) for b in squares + reg * sides], dtype=np.float32).reshape(-1, 4)
        # O-Net
        keep, pixels = self.crops(image, squares, 48)
        squares = squares[keep]
        if not len(squares):
            return []
        reg, points, prob = (t.cpu().numpy() for t in self.nets[2](pixels))
        passed = prob[:, 1] > THRESHOLDS[2]
        squares, score, reg, points = squares[passed], prob[passed, 1], reg[passed], points[passed]
        sides = squares[:, 2:3] - squares[:, 0:1] + 1
        landmarks = (
            np.stack([sides * points[:, :5], sides * points[:, 5:]], axis=2) + squares[:, None, :2] - 1
        )
        boxes = squares + reg * sides
        pick = batched_nms_numpy(
            torch.from_numpy(boxes), torch.from_numpy(score), torch.zeros(len(boxes)), 0.7, "Min"
        ).numpy()
        return [
            Face(boxes[k].astype(np.float32), landmarks[k].astype(np.float32), float(score[k])) for k in pick
        ]

    def refine(self, image: np.ndarray, box: np.ndarray) -> Face | None:
        """O-Net alone on the square around `box` (see refine_many)."""
        return self.refine_many([image], box)[0]

    @torch.no_grad()
    def refine_many(self, images: list[np.ndarray], box: np.ndarray) -> list[Face | None]:
        """O-Net alone on the square around `box` in each image, in one batch, as MTCNN's last
        stage runs on R-Net's boxes: the same square and outputs as detect_face's, in numpy, with
        zeros past the frame's edge (None: no face). Only the square's pixels are resized."""
        height, width = images[0].shape[:2]
        square = square_box(box)
        x, y = max(int(square[0]), 1), max(int(square[1]), 1)  # pad(): 1-based, clipped to the frame
        ex, ey = min(int(square[2]), width), min(int(square[3]), height)
        if ey <= y - 1 or ex <= x - 1:
            return [None] * len(images)
        x0, y0 = int(square[0]), int(square[1])
        inside = (x, y, ex, ey) == (x0, y0, int(square[2]), int(square[3]))
        crops = np.empty((len(images), 48, 48, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            cut = image[y - 1 : ey, x - 1 : ex]
            if not inside:  # zeros past the frame's edge
                padded = np.zeros((int(square[3]) - y0 + 1, int(square[2]) - x0 + 1, 3), np.uint8)
                padded[y - y0 : y - y0 + cut.shape[0], x - x0 : x - x0 + cut.shape[1]] = cut
                cut = padded
            crops[i] = area_resize(cut, 48, 48)
        reg, points, prob = (t.cpu().numpy() for t in self.nets[2](self.tensor(crops)))
        side = square[2] - square[0] + 1
        boxes = (square + reg * side).astype(np.float32)
        landmarks = np.stack([side * points[:, :5], side * points[:, 5:]], axis=2) + square[:2] - 1
        return [
            Face(boxes[i], landmarks[i].astype(np.float32), float(prob[i, 1]))
            if prob[i, 1] >= THRESHOLDS[2]
            else None
            for i in range(len(images))
        ]


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h,w,3) pixels resized by pixel-area averaging, MTCNN's resize for its pyramid and
    crops (see AreaResizer)."""
    return AreaResizer(image)(height, width)


class AreaResizer:
    """Pixel-area resizes of one uint8 (h,w,3) image, MTCNN's resize for its pyramid and crops.

    OpenCV's INTER_AREA on the uint8 pixels: several times faster than detect_face's torch "area"
    resize of float pixels, with the same intent (its weights are exact pixel overlaps where
    torch's bins overlap by whole pixels, so values differ slightly). A large reduction first
    halves the image (2x2 pixel means, OpenCV's fast path) while the result stays at least
    HALVE_HEADROOM times the target size, then averages the rest: the cost of a resize is then
    about one read of the source instead of growing with its size over the target's (a face
    square of an HD frame cut to O-Net's 48 px, a pyramid level of the whole frame). The halvings
    are kept for the next resize of the same image (the pyramid's levels share them). An odd
    last row or column is left out of a halving (at most 2**k - 1 source pixels at the far edges
    after k halvings)."""

    def __init__(self, image: np.ndarray):
        self.halvings = [image]

    def __call__(self, height: int, width: int) -> np.ndarray:
        k = 0
        while True:
            h, w = self.halvings[k].shape[:2]
            if h // 2 < HALVE_HEADROOM * height or w // 2 < HALVE_HEADROOM * width:
                break
            if k + 1 == len(self.halvings):
                self.halvings.append(halve(self.halvings[k]))
            k += 1
        return cv2.resize(self.halvings[k], (width, height), interpolation=cv2.INTER_AREA)


def halve(image: np.ndarray) -> np.ndarray:
    """Each 2x2 block of pixels averaged (an odd last row or column left out)."""
    h, w = image.shape[0] // 2, image.shape[1] // 2
    return cv2.resize(image[: 2 * h, : 2 * w], (w, h), interpolation=cv2.INTER_AREA)


def square_box(box: np.ndarray) -> np.ndarray:
    """The square MTCNN makes of a box before its next stage (detect_face's rerec)."""
    width, height = box[2] - box[0], box[3] - box[1]
    side = max(width, height)
    x, y = box[0] + width * 0.5 - side * 0.5, box[1] + height * 0.5 - side * 0.5
    return np.array([x, y, x + side, y + side], dtype=np.float32)


def weights_sha256() -> dict[str, str]:
    """SHA-256 of MTCNN's packaged weight files."""
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    return {name: sha256_file(data / f"{name}.pt") for name in ("pnet", "rnet", "onet")}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def pick_subject(faces: list[Face], width: int, subject: str = "largest") -> Face | None:
    """The face a track starts on: the largest, among those in the frame's left or right half
    when `subject` says so."""
    half = width / 2
    if subject == "left":
        faces = [f for f in faces if f.centre[0] < half]
    elif subject == "right":
        faces = [f for f in faces if f.centre[0] >= half]
    if not faces:
        return None
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


class SubjectTracker:
    """Follows one face: the largest to start, then whichever detection continues its track."""

    def __init__(self, detector: Mtcnn, reacquire_after: int, subject: str = "largest"):
        self.detector = detector
        self.subject = subject
        self.reacquire_after = reacquire_after
        self.last: Face | None = None
        self.missed = 0
        self.full_detections = 0
        self.refined = 0  # frames since the last window search
        self.window_searches = 0
        self.batch = TRACK_BATCH  # frames O-Net tracks in its next batch

    def track(self, frames: np.ndarray) -> list[Face | None]:
        """`update` over consecutive frames. While the track is steady, O-Net runs on the same
        square (the last box before them) in a batch of them. The first frame whose face moved
        off that square starts the next batch, on the box just before it, as long as the batch
        before held (at least TRACK_MIN_BATCH; a batch that holds doubles the next, up to
        TRACK_BATCH); a frame O-Net loses on the box just before it is searched for."""
        faces: list[Face | None] = []
        while len(faces) < len(frames):
            if self.last is not None and self.missed == 0 and self.refined < REFINE_FRAMES:
                ahead = frames[len(faces) : len(faces) + min(self.batch, REFINE_FRAMES - self.refined)]
                anchor = self.last
                done = len(faces)
                for face in self.detector.refine_many(list(ahead), anchor.box):
                    if not self._steady(face, anchor) or self._continuation([face]) is None:
                        break
                    self.refined += 1
                    self.last = face
                    faces.append(face)
                else:
                    if len(ahead) == self.batch:
                        self.batch = min(TRACK_BATCH, 2 * self.batch)
                    continue
                self.batch = max(TRACK_MIN_BATCH, len(faces) - done)
                if len(faces) == done:  # O-Net on the last box just failed on this frame: search
                    faces.append(self._search(frames[done]))
                # else the face moved from the batch's box: the next batch starts at this frame, on
                # the box just before it
                continue
            faces.append(self.update(frames[len(faces)]))
        return faces

    def update(self, frame: np.ndarray) -> Face | None:
        if self.last is not None and self.missed == 0 and self.refined < REFINE_FRAMES:
            face = self.detector.refine(frame, self.last.box)
            if self._steady(face, self.last) and self._continuation([face]) is not None:
                self.refined += 1
                self.last = face
                return face
        return self._search(frame)

    def _search(self, frame: np.ndarray) -> Face | None:
        """The frame searched: in the window around the last box, else as a whole."""
        self.refined = 0
        if self.last is not None:
            face = self._continuation(self._search_window(frame))
            if face is None:  # out of the window: the whole frame, at the pyramid levels of its size
                face = self._continuation(self._detect_full(frame, SEARCH_MIN_FACE * self.last.size))
            if face is not None:
                return self._keep(face)
            self.missed += 1
            if self.missed < self.reacquire_after:
                return None
        start = self._start(frame)
        return None if start is None else self._keep(start)

    def _start(self, frame: np.ndarray) -> Face | None:
        """The face a track starts on. Faces from START_MIN_FACE of the frame's short side up are
        looked for first (the pyramid's cheap tail); the fine levels only when that finds none."""
        coarse = max(float(MIN_FACE_PX), START_MIN_FACE * min(frame.shape[:2]))
        for min_face in dict.fromkeys((coarse, float(MIN_FACE_PX))):
            start = pick_subject(self._detect_full(frame, min_face), frame.shape[1], self.subject)
            if start is not None:
                return start
        return None

    @staticmethod
    def _steady(face: Face | None, source: Face) -> bool:
        """Whether O-Net's track can be trusted: a confident face, little corrected from the
        box it was tracked from."""
        return face is not None and face.score >= TRACK_SCORE and iou(face.box, source.box) >= TRACK_IOU

    def _keep(self, face: Face) -> Face:
        self.last, self.missed = face, 0
        return face

    def _detect_full(self, frame: np.ndarray, min_face: float) -> list[Face]:
        self.full_detections += 1
        return self.detector.detect(frame, min_face)

    def _search_window(self, frame: np.ndarray) -> list[Face]:
        assert self.last is not None
        self.window_searches += 1
        height, width = frame.shape[:2]
        size, (cx, cy) = self.last.size, self.last.centre
        reach = SEARCH_RADIUS * size
        x0, y0 = max(0, math.floor(cx - reach)), max(0, math.floor(cy - reach))
        x1, y1 = min(width, math.ceil(cx + reach)), min(height, math.ceil(cy + reach))
        if x1 <= x0 or y1 <= y0:
            return []
        faces = self.detector.detect(frame[y0:y1, x0:x1], SEARCH_MIN_FACE * size)
        offset = np.array([x0, y0], dtype=np.float32)
        for face in faces:
            face.box += np.tile(offset, 2)
            face.landmarks += offset
        return faces

    def _continuation(self, faces: list[Face]) -> Face | None:
        assert self.last is not None
        last = self.last
        best, best_key = None, None
        for face in faces:
            overlap = iou(face.box, last.box)
            distance = float(np.linalg.norm(face.centre - last.centre)) / max(last.size, 1.0)
            ratio = face.size / max(last.size, 1.0)
            near = distance <= MATCH_CENTRE and 1 / MATCH_SCALE <= ratio <= MATCH_SCALE
            if overlap < MATCH_IOU and not near:
                continue
            key = (overlap, -distance)
            if best_key is None or key > best_key:
                best, best_key = face, key
        return best


class FacesStage(Stage):
    name = "faces"
    decodes_video = True  # the runner may build the frame grid in this stage's decoding pass

    def __init__(
        self,
        visual_model: str | None = None,  # None: visual.DEFAULT
        crops: bool = True,
        device: str = "auto",
        subject: str = "largest",
        faces_from: str | Path | None = None,
    ):
        if subject not in SUBJECTS:
            raise ValueError(f"unknown --subject {subject!r}; choose from {', '.join(SUBJECTS)}")
        self.subject = subject
        self.faces_from = None if faces_from is None else Path(faces_from).expanduser()
        self.decodes_video = self.faces_from is None  # crops from a folder need only the grid
        self.visual_model = str(visual_model or DEFAULT)
        self.crops = bool(crops)
        self.device = device
        self.detector: Mtcnn | None = None
        self.loaded = False
        self.embedder: Embedder | None = None
        self._model_sha: tuple[tuple[str, int, int], str] | None = None

    def resolve(self) -> None:
        if self.faces_from is not None and not self.faces_from.is_dir():
            raise ValueError(f"--faces-from {self.faces_from}: no such folder")
        self.torch_device = resolve_device(self.device)
        self.visual_model_sha256 = self._model_file_sha256()
        super().resolve()

    def config(self) -> dict[str, Any]:
        self.check_resolved()
        # per video (stages.PER_VIDEO): in the shard's config, out of the store's; the default is left
        # out, so shards made before the option have the same per-video settings
        subject = {} if self.subject == "largest" else {"subject": self.subject}
        embedding = {
            "visual_model": self.visual_model,
            "visual_model_sha256": self.visual_model_sha256,
            "crops": self.crops,
            "crop_size": CROP_SIZE,
        }
        if self.faces_from is not None:  # the folder itself is in each shard's provenance
            return {**subject, **embedding, "faces_from": "folder of aligned crops"}
        return {
            **subject,
            **embedding,
            "alignment": "arcface-5-point-similarity",
            "detector": {
                "min_face_px": MIN_FACE_PX,
                "thresholds": list(THRESHOLDS),
                "pyramid_factor": PYRAMID_FACTOR,
                "search_radius": SEARCH_RADIUS,
                "search_min_face": SEARCH_MIN_FACE,
                "match_iou": MATCH_IOU,
                "match_centre": MATCH_CENTRE,
                "match_scale": MATCH_SCALE,
                "refine_frames": REFINE_FRAMES,
                "track_batch": TRACK_BATCH,
                "track_min_batch": TRACK_MIN_BATCH,
                "first_decode_batch": FIRST_DECODE_BATCH,
                "track_score": TRACK_SCORE,
                "track_iou": TRACK_IOU,
                "resize": "opencv-inter-area-uint8",
                "halve_headroom": HALVE_HEADROOM,
                "rgb_conversion": RGB_CONVERSION,
                "track_padding": "zeros",
                "start_min_face": START_MIN_FACE,
                "reacquire_after_s": REACQUIRE_AFTER_S,
            },
        }

    def _model_file_sha256(self) -> str | None:
        """A model file's checksum, so replacing the file at the same path recomputes."""
        if self.visual_model in NAMED:
            return None
        path = Path(self.visual_model).expanduser()
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if self._model_sha is None or self._model_sha[0] != key:
            self._model_sha = (key, sha256_file(path))
        return self._model_sha[1]

    def load(self) -> None:
        if not self.resolved:
            self.resolve()
        self.detector = Mtcnn(self.torch_device) if self.faces_from is None else None
        self.embedder = build_embedder(self.visual_model, self.torch_device)
        self.loaded = True

    def provenance(self) -> dict[str, Any]:
        embedder = self.embedder
        if self.faces_from is not None:
            source = {"faces_from": str(self.faces_from.absolute())}
        else:
            source = {
                "face_detector": "MTCNN (facenet-pytorch P-Net, R-Net, O-Net, packaged weights)",
                "face_detector_sha256": weights_sha256(),
            }
        return {
            **source,
            "visual_model": embedder.name if embedder else NONE,
            "visual_weights_sha256": embedder.sha256 if embedder else None,
            "visual_dim": embedder.dim if embedder else 0,
            **({"expression_classes": list(embedder.classes)} if embedder and embedder.classes else {}),
            "versions": library_versions("facenet-pytorch", "opencv-python-headless", "onnxruntime"),
        }

    def run(self, media: Media) -> Iterator[Rows | Extra]:
        if not self.loaded:
            self.load()
        if self.faces_from is not None:
            yield from self._run_from_folder(media)
            return
        n = media.n_frames
        next_row = 0
        faces_found = 0
        if media.info.has_video:
            reacquire_after = max(1, round(REACQUIRE_AFTER_S * media.info.fps))
            tracker = SubjectTracker(self.detector, reacquire_after, self.subject)
            threads = DETECTOR_CPU_THREADS if self.detector.device == "cpu" else None
            for rows, frames in prefetched(
                media.video_frames(DECODE_BATCH, RGB_CONVERSION, FIRST_DECODE_BATCH)
            ):
                found = []
                stop = next_row
                with torch_threads(threads), cv2_threads(1):  # on or off the grid: the track needs each step
                    faces = tracker.track(frames)
                for row, frame, face in zip(rows, frames, faces, strict=True):
                    if row < next_row:
                        continue  # off the grid, or a repeated time
                    stop = max(stop, row + 1)
                    if face is not None:
                        found.append((row - next_row, frame, face))
                with cv2_threads(1):
                    block = self._block(stop - next_row, found) if stop > next_row else None
                faces_found += len(found)
                if block is not None:
                    yield Rows(next_row, block)
                    next_row = stop
        yield from self._absent_rows(next_row, n)
        if not media.info.has_video:
            if media.path.suffix.lower() in VIDEO_EXTENSIONS:  # audio files are not expected to have one
                yield Extra(attrs={"warning": "no video stream: every frame marked absent"})
        elif not faces_found:
            yield Extra(attrs={"warning": "no face found: every frame marked absent"})

    def _absent_rows(self, start: int, stop: int) -> Iterator[Rows]:
        """Rows `start` to `stop` with no face, in blocks of ABSENT_BLOCK."""
        for first in range(start, stop, ABSENT_BLOCK):
            yield Rows(first, self._absent(min(ABSENT_BLOCK, stop - first)))

    def _absent(self, count: int) -> dict[str, np.ndarray]:
        arrays = {
            "present": np.zeros(count, dtype=bool),
            "boxes": np.full((count, 4), np.nan, dtype=np.float32),
            "landmarks": np.full((count, 5, 2), np.nan, dtype=np.float32),
            "score": np.zeros(count, dtype=np.float32),
        }
        if self.crops:
            arrays["crops"] = np.zeros((count, CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
        if self.embedder is not None:
            arrays["embedding"] = np.zeros((count, self.embedder.dim), dtype=np.float16)
            if self.embedder.classes:
                arrays["expression"] = np.zeros((count, len(self.embedder.classes)), dtype=np.float16)
        return arrays

    def _block(self, count: int, found: list[tuple[int, np.ndarray, Face]]) -> dict[str, np.ndarray]:
        """`count` rows, filled in at the (row, frame, face) triples where a face was found."""
        arrays = self._absent(count)
        if not found:
            return arrays
        index = np.array([row for row, _, _ in found])
        arrays["present"][index] = True
        arrays["boxes"][index] = [face.box for _, _, face in found]
        arrays["landmarks"][index] = [face.landmarks for _, _, face in found]
        arrays["score"][index] = [face.score for _, _, face in found]
        if self.crops or self.embedder is not None:
            crops = np.stack([align_face(frame, face.landmarks) for _, frame, face in found])
            self._put_crops(arrays, index, crops)
        return arrays

    def _put_crops(self, arrays: dict[str, np.ndarray], index: np.ndarray, crops: np.ndarray) -> None:
        """The aligned faces `crops` and their embeddings into `arrays` at rows `index`."""
        if self.crops:
            arrays["crops"][index] = crops
        if self.embedder is not None:
            on_cpu = self.torch_device == "cpu"  # elsewhere the caller's torch threads
            with torch_threads(self.embedder.cpu_threads if on_cpu else None):
                embedding = self.embedder(crops)
            arrays["embedding"][index] = embedding.astype(np.float16)
            if self.embedder.classes:
                arrays["expression"][index] = self.embedder.expression(embedding).astype(np.float16)

    def _run_from_folder(self, media: Media) -> Iterator[Rows | Extra]:
        """Each frame's crop read from the video's folder under `faces_from`; no detection."""
        n = media.n_frames
        folder = face_folder.find_folder(self.faces_from, media.video_id, self.subject)
        if folder is None:
            yield from self._absent_rows(0, n)
            yield Extra(
                attrs={
                    "warning": f"no folder {media.video_id} in {self.faces_from}: every frame marked absent"
                }
            )
            return
        images = face_folder.list_images(folder)
        damaged: list[str] = []
        next_row = 0
        for rows, crops, bad in images.blocks(n):
            damaged += bad
            if not len(rows):
                continue
            stop = int(rows[-1]) + 1
            arrays = self._absent(stop - next_row)
            index = rows - next_row
            arrays["present"][index] = True
            arrays["score"][index] = np.nan
            self._put_crops(arrays, index, crops)
            yield Rows(next_row, arrays)
            next_row = stop
        yield from self._absent_rows(next_row, n)
        warning = face_folder.warning(folder, damaged, images.skipped)
        if warning:
            yield Extra(attrs={"warning": warning})
