"""The faces stage on the real media in data/: detection, tracking, alignment, embedders, the grid."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import CREMA_FLV, CREMA_MP4, DATA, HAMILTON, JFK, PEXELS, SINGLE_FACE

from pipeline import visual
from pipeline.align import ARCFACE_TEMPLATE, CROP_SIZE, similarity_transform
from pipeline.errors import ModelUnavailable
from pipeline.faces import TRACK_MIN_BATCH, AreaResizer, Face, FacesStage, Mtcnn, SubjectTracker, iou
from pipeline.files import CACHE_ENV
from pipeline.media import Media, frame_grid, grid_rows, iter_video_frames, probe
from pipeline.runner import Extractor, FatalError, discover, run_local
from pipeline.stages import Rows, build_stage, resolved
from pipeline.store import open_store

PEXELS_HAND_OVER_MOUTH = [*range(55, 100), *range(150, 216)]  # frames where a hand covers the mouth
HAMILTON_FIRST_SHOT = range(0, 20)  # the performer (right, ~40 px) and a seated man (left, ~25 px)


def media_for(path: Path, timestamps: np.ndarray | None = None) -> Media:
    info = probe(path)
    return Media(path, path.stem, info, frame_grid(path, info) if timestamps is None else timestamps)


def collect(stage: FacesStage, media: Media) -> dict[str, np.ndarray]:
    blocks = [block for block in stage.run(media) if isinstance(block, Rows)]
    assert [b.start for b in blocks] == list(np.cumsum([0] + [len(b) for b in blocks[:-1]]))
    return {k: np.concatenate([b.arrays[k] for b in blocks]) for k in blocks[0].arrays}


def decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture(scope="module")
def stage() -> FacesStage:
    stage = FacesStage(visual_model="none", crops=True, device="cpu")
    stage.load()
    return stage


@pytest.fixture(scope="module")
def extracted(stage: FacesStage):
    """Each file's arrays, extracted once per module."""
    cache: dict[Path, dict[str, np.ndarray]] = {}

    def get(path: Path) -> dict[str, np.ndarray]:
        if path not in cache:
            cache[path] = collect(stage, media_for(path))
        return cache[path]

    return get


def check_plausible_faces(arrays: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Landmarks inside their box, eyes above nose above mouth, a probability for a score."""
    boxes, points = arrays["boxes"][rows], arrays["landmarks"][rows]
    assert np.isfinite(boxes).all() and np.isfinite(points).all()
    size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    tolerance = 0.1 * size
    assert (points >= boxes[:, None, :2] - tolerance).all() and (
        points <= boxes[:, None, 2:] + tolerance
    ).all()
    eyes_y, nose_y, mouth_y = points[:, :2, 1].mean(1), points[:, 2, 1], points[:, 3:, 1].mean(1)
    assert (eyes_y < nose_y).all() and (nose_y < mouth_y).all()
    assert (points[:, 0, 0] < points[:, 1, 0]).all()  # left eye left of right eye
    assert ((arrays["score"][rows] > 0) & (arrays["score"][rows] <= 1)).all()


@pytest.mark.parametrize("path", CREMA_MP4, ids=lambda p: p.stem)
def test_crema_face_on_every_frame(extracted, path: Path):
    arrays = extracted(path)
    info = probe(path)
    assert arrays["present"].all()
    boxes = arrays["boxes"]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert ((centre[:, 0] > 0.3 * info.width) & (centre[:, 0] < 0.7 * info.width)).all()
    assert ((centre[:, 1] > 0.15 * info.height) & (centre[:, 1] < 0.7 * info.height)).all()
    height = boxes[:, 3] - boxes[:, 1]
    assert ((height > 0.15 * info.height) & (height < 0.6 * info.height)).all()
    assert (arrays["score"] > 0.9).all()
    check_plausible_faces(arrays, np.arange(len(boxes)))
    # one subject, followed smoothly: no frame-to-frame jump larger than a fifth of the face
    assert np.abs(np.diff(centre, axis=0)).max() < 0.2 * height.mean()


@pytest.mark.parametrize(
    "path, fps",
    [(CREMA_MP4[0], 29.97), (CREMA_FLV[0], 29.97), (SINGLE_FACE, 30.0), (PEXELS, 23.976)],
    ids=["crema-mp4", "crema-flv", "single-face", "pexels"],
)
def test_one_row_per_decoded_frame(extracted, path: Path, fps: float):
    assert probe(path).fps == pytest.approx(fps, abs=0.01)
    arrays = extracted(path)
    n = decoded_frame_count(path)
    assert all(len(a) == n for a in arrays.values())
    assert arrays["present"].mean() > 0.95


def test_array_layout_and_absent_values(extracted):
    arrays = extracted(SINGLE_FACE)
    n = len(arrays["present"])
    assert arrays["present"].dtype == bool
    assert arrays["boxes"].shape == (n, 4) and arrays["boxes"].dtype == np.float32
    assert arrays["landmarks"].shape == (n, 5, 2) and arrays["landmarks"].dtype == np.float32
    assert arrays["score"].shape == (n,) and arrays["score"].dtype == np.float32
    assert arrays["crops"].shape == (n, CROP_SIZE, CROP_SIZE, 3) and arrays["crops"].dtype == np.uint8
    assert "embedding" not in arrays  # --visual-model none


def test_hand_over_mouth_is_masked_or_plausible(extracted):
    arrays = extracted(PEXELS)
    rows = np.array(PEXELS_HAND_OVER_MOUTH)
    present = rows[arrays["present"][rows]]
    absent = rows[~arrays["present"][rows]]
    check_plausible_faces(arrays, present)
    assert np.isnan(arrays["boxes"][absent]).all() and (arrays["score"][absent] == 0).all()
    assert (arrays["crops"][absent] == 0).all()
    # the whole clip: the same woman throughout, centre right of the frame
    boxes = arrays["boxes"][arrays["present"]]
    assert arrays["present"].mean() > 0.9
    assert ((boxes[:, 0] + boxes[:, 2]) / 2 > 320).all()


def test_hamilton_keeps_the_small_main_subject(extracted):
    arrays = extracted(HAMILTON)
    rows = np.array(HAMILTON_FIRST_SHOT)
    assert arrays["present"][rows].all()
    boxes = arrays["boxes"][rows]
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    size = boxes[:, 2] - boxes[:, 0]
    assert (centre_x > 480).all(), "the track jumped to the seated man on the left"
    assert ((size > 25) & (size < 60)).all()
    check_plausible_faces(arrays, rows)


def test_crops_are_aligned_to_the_template(extracted):
    arrays = extracted(CREMA_MP4[0])
    # the stored landmarks map onto the template...
    for points in arrays["landmarks"][::10]:
        matrix = similarity_transform(points)
        mapped = points @ matrix[:, :2].T + matrix[:, 2]
        assert np.abs(mapped - ARCFACE_TEMPLATE).max() < 6
    # ...and a face detected afresh in the stored crops has its eyes where the template has them
    detector = Mtcnn("cpu")
    border = 32  # context around the crop, as MTCNN expects around a face
    for crop in arrays["crops"][::10]:
        faces = detector.detect(np.pad(crop, ((border, border), (border, border), (0, 0))), 20)
        assert faces, "no face in an aligned crop"
        eyes = max(faces, key=lambda f: f.score).landmarks[:2] - border
        assert np.linalg.norm(eyes - ARCFACE_TEMPLATE[:2], axis=1).max() < 6  # of a 35 px eye distance


def test_no_crops_option():
    stage = resolved(
        FacesStage.from_options({"visual_model": "none", "crops": False, "device": "cpu", "fps": 30.0})
    )
    assert stage.config()["crops"] is False
    arrays = collect(stage, media_for(SINGLE_FACE))
    assert "crops" not in arrays and "embedding" not in arrays
    assert arrays["present"].mean() > 0.95


def test_a_frame_that_did_not_decode_stays_absent(stage):
    grid = frame_grid(SINGLE_FACE, probe(SINGLE_FACE))
    step = grid[1] - grid[0]
    timestamps = np.concatenate([grid, grid[-1] + step * np.arange(1, 4)])  # three frames never decoded
    arrays = collect(stage, media_for(SINGLE_FACE, timestamps))
    assert len(arrays["present"]) == len(grid) + 3
    assert not arrays["present"][-3:].any()
    assert arrays["present"][: len(grid)].mean() > 0.95
    rows = grid_rows(
        np.array([grid[0], grid[5] + step * 0.1, grid[5] + step * 0.5 + 1e-3]), np.delete(grid, 6)
    )
    assert rows.tolist() == [0, 5, -1]


def test_audio_only_input_gives_absent_rows(stage):
    media = media_for(JFK)
    arrays = collect(stage, media)
    assert len(arrays["present"]) == media.n_frames > 300
    assert not arrays["present"].any() and np.isnan(arrays["boxes"]).all()
    assert (arrays["crops"] == 0).all()


def tiny_torch_model(dim: int) -> torch.nn.Module:
    """A random-weight stand-in for a real backbone (the test has no real weights offline)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, kernel_size=8, stride=8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, dim),
    ).eval()


def test_torchscript_embedder_through_the_runner(tmp_path: Path, store: Path):
    model = tiny_torch_model(8)
    path = tmp_path / "backbone.pt"
    torch.jit.script(model).save(str(path))
    jobs, _ = discover([SINGLE_FACE])
    stages = [build_stage("faces", {"visual_model": str(path), "crops": True, "device": "cpu"})]
    outcomes = run_local(jobs, Extractor(store, stages))
    assert [o.status for o in outcomes] == ["done"]
    with open_store(store) as f:
        group = f[f"videos/{SINGLE_FACE.stem}/faces"]
        present, crops, embedding = group["present"][:], group["crops"][:], group["embedding"][:]
        assert group.attrs["visual_model"] == "torchscript:backbone.pt"
        assert group.attrs["visual_dim"] == 8
        assert len(group.attrs["visual_weights_sha256"]) == 64
        assert "pnet" in group.attrs["face_detector_sha256"]
    assert embedding.dtype == np.float16 and embedding.shape == (len(present), 8)
    assert present.mean() > 0.95 and not embedding[~present].any()
    with torch.no_grad():
        expected = model(torch.from_numpy(visual.to_unit_range(crops[present]))).numpy()
    np.testing.assert_allclose(embedding[present], expected, rtol=1e-2, atol=1e-2)
    assert np.std(expected, axis=0).max() > 0  # different faces, different vectors


def onnx_linear_pool_model(weight: np.ndarray) -> bytes:
    """An ONNX file, written field by field (no onnx package here): GlobalAveragePool -> Flatten -> MatMul.

    A random-weight stand-in for a real backbone; input "x" float (b,3,112,112), output "y" (b,D).
    """

    def varint(value: int) -> bytes:
        out = b""
        while True:
            byte, value = value & 0x7F, value >> 7
            out += bytes([byte | (0x80 if value else 0)])
            if not value:
                return out

    def field(number: int, value: bytes | int | str) -> bytes:
        if isinstance(value, int):
            return varint(number << 3) + varint(value)
        value = value.encode() if isinstance(value, str) else value
        return varint(number << 3 | 2) + varint(len(value)) + value

    def node(op: str, inputs: list[str], output: str) -> bytes:
        return b"".join(field(1, i) for i in inputs) + field(2, output) + field(4, op)

    def value_info(name: str, dims: list[int | str]) -> bytes:
        shape = b"".join(field(1, field(2, d) if isinstance(d, str) else field(1, d)) for d in dims)
        return field(1, name) + field(2, field(1, field(1, 1) + field(2, shape)))  # elem_type FLOAT

    dim_in, dim_out = weight.shape
    initializer = field(1, dim_in) + field(1, dim_out) + field(2, 1) + field(8, "w")
    initializer += field(9, weight.astype("<f4").tobytes())
    graph = (
        field(1, node("GlobalAveragePool", ["x"], "pooled"))
        + field(1, node("Flatten", ["pooled"], "flat"))
        + field(1, node("MatMul", ["flat", "w"], "y"))
        + field(2, "tiny")
        + field(5, initializer)
        + field(11, value_info("x", ["b", 3, CROP_SIZE, CROP_SIZE]))
        + field(12, value_info("y", ["b", dim_out]))
    )
    return field(1, 8) + field(7, graph) + field(8, field(2, 13))  # ir_version 8, opset 13


def test_onnx_embedder(tmp_path: Path, extracted):
    weight = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    path = tmp_path / "backbone.onnx"
    path.write_bytes(onnx_linear_pool_model(weight))
    embedder = visual.build_embedder(str(path), "cpu")
    assert embedder.name == "onnx:backbone.onnx" and embedder.dim == 5
    crops = extracted(CREMA_MP4[0])["crops"][:6]
    expected = visual.to_unit_range(crops).mean(axis=(2, 3)) @ weight
    np.testing.assert_allclose(embedder(crops), expected, rtol=1e-4, atol=1e-5)
    arrays = collect(FacesStage(visual_model=str(path), device="cpu"), media_for(SINGLE_FACE))
    assert arrays["embedding"].shape == (len(arrays["present"]), 5)
    assert arrays["embedding"].dtype == np.float16


@pytest.mark.slow
def test_vggface2_from_a_weights_file(tmp_path: Path, monkeypatch, extracted):
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    weights = tmp_path / "random-inception-resnet-v1.pt"  # random weights: the real ones need a download
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), weights)
    monkeypatch.setenv(visual.VGGFACE2_ENV, str(weights))
    embedder = visual.build_embedder("vggface2", "cpu")
    assert embedder.dim == 512 and len(embedder.sha256) == 64
    vectors = embedder(extracted(CREMA_MP4[0])["crops"][:2])
    assert vectors.shape == (2, 512) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_vggface2_offline_is_one_clear_fatal_line(tmp_path: Path, monkeypatch, store: Path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(visual.VGGFACE2_ENV, raising=False)
    # a closed local port: the download fails at once, as it does offline
    monkeypatch.setattr(visual, "VGGFACE2_URL", "http://127.0.0.1:9/20180402-114759-vggface2.pt")
    with pytest.raises(ModelUnavailable) as error:
        FacesStage(visual_model="vggface2", device="cpu").load()
    message = str(error.value)
    assert "\n" not in message
    for part in ("20180402-114759-vggface2.pt", visual.VGGFACE2_ENV, "--visual-model", "--visual-model none"):
        assert part in message
    jobs, _ = discover([SINGLE_FACE])
    with pytest.raises(FatalError, match="vggface2"):
        run_local(jobs, Extractor(store, [FacesStage(visual_model="vggface2", device="cpu")]))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"visual_model": "missing/model.onnx"}, "no such file"),
        ({"visual_model": str(PEXELS)}, "unknown model type"),
        ({"visual_model": "none", "device": "tpu"}, "--device tpu"),
    ],
    ids=["missing-file", "not-a-model", "bad-device"],
)
def test_bad_options_fail_at_load(options: dict, words: str):
    with pytest.raises(ModelUnavailable, match=words):
        FacesStage.from_options({"device": "cpu", **options}).load()


def test_config_and_provenance(tmp_path: Path):
    path = tmp_path / "m.pt"
    torch.jit.script(tiny_torch_model(3)).save(str(path))
    stage = resolved(FacesStage(visual_model=str(path), device="cpu"))
    before = stage.config()
    assert before["visual_model_sha256"] and before["detector"]["min_face_px"] == 20
    torch.jit.script(tiny_torch_model(4)).save(str(path))
    stage.resolve()  # what a new run does before any job
    assert stage.config() != before  # a replaced model file is a changed config
    stage.load()
    provenance = stage.provenance()
    assert set(provenance["face_detector_sha256"]) == {"pnet", "rnet", "onet"}
    assert provenance["versions"]["facenet-pytorch"] == "2.5.3"


def first_frames(src: Path, dst: Path, n: int) -> Path:
    """The first n frames of src, re-encoded."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = (
            inp.streams.video[0].width,
            inp.streams.video[0].height,
            "yuv420p",
        )
        for k, frame in enumerate(inp.decode(video=0)):
            if k == n:
                break
            out.mux(
                stream.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24"))
            )
        out.mux(stream.encode())
    return dst


def test_subject_option_tracks_the_left_or_the_right_person(tmp_path: Path):
    clip = first_frames(HAMILTON, tmp_path / "two_people.mp4", len(HAMILTON_FIRST_SHOT))
    media = media_for(clip)
    centres = {}
    for subject in ("largest", "left", "right"):
        stage = FacesStage(visual_model="none", crops=False, device="cpu", subject=subject)
        arrays = collect(stage, media)
        assert arrays["present"].mean() > 0.5, subject
        boxes = arrays["boxes"][arrays["present"]]
        centres[subject] = (boxes[:, 0] + boxes[:, 2]) / 2 / media.info.width
    assert (centres["left"] < 0.5).all() and (centres["right"] >= 0.5).all()
    assert (centres["largest"] >= 0.5).all()  # the performer, right, is the larger face
    assert (
        "subject" not in resolved(FacesStage(device="cpu")).config()
    )  # stores made before the option stay done
    assert resolved(FacesStage(device="cpu", subject="left")).config()["subject"] == "left"
    with pytest.raises(ValueError, match="unknown --subject 'middle'"):
        FacesStage(device="cpu", subject="middle")


class CountingContainer:
    """A PyAV input container that counts the video and audio frames decoded from it."""

    def __init__(self, container):
        self._container = container
        self.video_frames = self.audio_frames = 0

    def __getattr__(self, name: str):
        return getattr(self._container, name)

    def __enter__(self):
        self._container.__enter__()
        return self

    def __exit__(self, *exc):
        return self._container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self.video_frames += isinstance(frame, av.VideoFrame)
            self.audio_frames += isinstance(frame, av.AudioFrame)
            yield frame


@pytest.fixture
def opened(monkeypatch) -> list[CountingContainer]:
    """Every container av.open opens for reading from now on, counting what is decoded from it."""
    containers: list[CountingContainer] = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        container = real_open(*args, **kwargs)
        if len(args) > 1 or kwargs.get("mode", "r") != "r":
            return container  # written files are not decodes
        containers.append(CountingContainer(container))
        return containers[-1]

    monkeypatch.setattr(av, "open", counting_open)
    return containers


def decode_passes(containers: list[CountingContainer]) -> tuple[int, int]:
    """(passes over the video's frames, passes over the audio): probe's one-frame peek is no pass."""
    return sum(c.video_frames > 1 for c in containers), sum(c.audio_frames > 0 for c in containers)


def test_one_video_decode_per_file_for_grid_and_faces(opened, store: Path):
    jobs, _ = discover([SINGLE_FACE])
    stages = [
        FacesStage(visual_model="none", crops=True, device="cpu"),
        build_stage("audio", {"audio_model": "logmel", "device": "cpu"}),
    ]
    n = decoded_frame_count(SINGLE_FACE)
    opened.clear()
    outcomes = run_local(jobs, Extractor(store, stages))
    assert [o.status for o in outcomes] == ["done", "done"]
    assert decode_passes(opened) == (1, 1)  # the grid and the faces from one pass; the audio once
    assert sum(c.video_frames for c in opened) <= n + 1  # + probe's peek at the first frame
    expected = collect(FacesStage(visual_model="none", crops=True, device="cpu"), media_for(SINGLE_FACE))
    with open_store(store) as f:
        video = f[f"videos/{SINGLE_FACE.stem}"]
        np.testing.assert_array_equal(video["timestamps"][:], frame_grid(SINGLE_FACE, probe(SINGLE_FACE)))
        for name in ("present", "boxes", "landmarks", "crops"):
            np.testing.assert_array_equal(video[f"faces/{name}"][:], expected[name])
    opened.clear()
    outcomes = run_local(jobs, Extractor(store, stages))
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert decode_passes(opened) == (0, 0)  # the stored grid, and both stages done


def test_a_header_that_undercounts_gets_the_grid_its_own_pass(opened, store: Path, monkeypatch):
    from pipeline.runner import extractor as runner

    n = decoded_frame_count(SINGLE_FACE)

    def undercounted(path: Path, video_id: str, info) -> Media:
        return Media(path, video_id, info, np.full(n - 1, np.nan), grid_pending=True)

    monkeypatch.setattr(runner, "shared_grid", undercounted)
    jobs, _ = discover([SINGLE_FACE])
    opened.clear()
    outcomes = run_local(jobs, Extractor(store, [FacesStage(visual_model="none", crops=False, device="cpu")]))
    assert [o.status for o in outcomes] == ["done"]
    assert decode_passes(opened)[0] == 3  # the shared pass, given up; then the grid's and the faces' own
    with open_store(store) as f:
        video = f[f"videos/{SINGLE_FACE.stem}"]
        assert len(video["timestamps"]) == len(video["faces/present"]) == n
        assert video["faces/present"][:].mean() > 0.95


def test_similarity_transform_is_opencvs_least_squares_fit():
    import cv2

    rng = np.random.default_rng(0)
    for _ in range(50):
        scale, angle = rng.uniform(0.2, 3), rng.uniform(-0.6, 0.6)
        turn = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = ARCFACE_TEMPLATE @ turn.T + rng.uniform(-300, 300, 2) + rng.normal(0, 3, (5, 2))
        points = points.astype(np.float32)
        # every point an inlier: OpenCV's refinement ends at the least-squares similarity
        reference, _ = cv2.estimateAffinePartial2D(
            points, ARCFACE_TEMPLATE, method=cv2.RANSAC, ransacReprojThreshold=1e6
        )
        ours = similarity_transform(points)
        mapped = np.c_[points, np.ones(5)]
        assert np.abs(mapped @ ours.T - mapped @ reference.T).max() < 1e-2
    assert similarity_transform(np.full((5, 2), 7.0)) is None  # no spread: no transform
    assert similarity_transform(np.full((5, 2), np.nan)) is None


@pytest.mark.parametrize("path", [SINGLE_FACE, HAMILTON, CREMA_FLV[0]], ids=["bt601", "bt709-tagged", "flv"])
def test_opencv_rgb_conversion_matches_swscale(path: Path):
    from pipeline.media import iter_video_frames

    (times, ours), (reference_times, reference) = (
        next(iter_video_frames(path, batch_size=8, conversion=conversion))
        for conversion in ("opencv", "swscale")
    )
    np.testing.assert_array_equal(times, reference_times)
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert difference.mean() < 2 and np.percentile(difference, 99) <= 8  # rounding and chroma siting
    with pytest.raises(ValueError, match="unknown RGB conversion"):
        next(iter_video_frames(path, conversion="pillow"))


def test_a_small_first_decode_batch_gives_the_same_frames_sooner():
    plain = list(iter_video_frames(SINGLE_FACE, 16))
    early = list(iter_video_frames(SINGLE_FACE, 16, first_batch=4))
    assert [len(t) for t, _ in early][:3] == [4, 16, 16]
    for part in (0, 1):  # timestamps, then pixels
        whole = [np.concatenate([batch[part] for batch in run]) for run in (plain, early)]
        np.testing.assert_array_equal(*whole)


def extract_faces(store: Path, video: Path, *options: str) -> tuple[int, str]:
    """`rcma extract VIDEO --stage faces --visual-model none` (crops kept), in this process, on the CPU."""
    from typer.testing import CliRunner

    from cli import app

    args = ["extract", str(video), "--stage", "faces", "--visual-model", "none", "--store", str(store)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--workers", "1", "--quiet", *options])
    return result.exit_code, result.output


def subjects_of(store: Path) -> dict[str, str]:
    """The subject each video's faces shard in the index records."""
    import json

    with open_store(store) as f:
        return {
            vid: json.loads(f[f"videos/{vid}/faces"].attrs["config"]).get("subject", "largest")
            for vid in f["videos"]
            if "faces" in f[f"videos/{vid}"]
        }


def test_two_subject_videos_share_a_store_with_others_and_train(tmp_path: Path):
    """Aff-Wild2's workflow: a two-person video extracted once per subject (`--subject left`) into
    the store of the other videos; --force on one video keeps the others' faces; both train."""
    from fusion.data import load_store
    from fusion.train import TrainConfig, train
    from pipeline.labels import import_labels
    from pipeline.store import stage_config, stage_counts

    one = first_frames(SINGLE_FACE, tmp_path / "one.mp4", 12)
    two = first_frames(HAMILTON, tmp_path / "two.mp4", len(HAMILTON_FIRST_SHOT))
    store = tmp_path / "store.h5"
    code, output = extract_faces(store, one)
    assert code == 0, output
    code, output = extract_faces(store, two, "--subject", "left")
    assert code == 0, output
    record = stage_config(store, "faces")
    assert "subject" not in record["config"]  # the store's settings: not the subject of one video
    assert subjects_of(store) == {"one": "largest", "two": "left"}

    code, output = extract_faces(store, two, "--subject", "left", "--force")
    assert code == 0, output
    assert stage_config(store, "faces") == record
    counts = stage_counts(store)["faces"]
    assert counts.done == ["one", "two"] and counts.other_config == [], counts
    assert subjects_of(store) == {"one": "largest", "two": "left"}
    code, output = extract_faces(store, one)
    assert code == 0 and "0 done, 1 already done" in output, output  # `one` kept its faces

    # the other subject is a new result for this video, not a new store setting: recomputed, no --force
    code, output = extract_faces(store, two, "--subject", "right")
    assert code == 0 and "1 done, 0 already done" in output, output
    assert subjects_of(store) == {"one": "largest", "two": "right"}
    code, output = extract_faces(store, two, "--subject", "right")
    assert code == 0 and "0 done, 1 already done" in output, output

    labels = tmp_path / "labels.csv"
    splits = tmp_path / "splits.csv"
    labels.write_text("video_id,valence,arousal\none,0.5,0.2\ntwo,-0.3,0.4\n")
    splits.write_text("one,train\ntwo,val\n")
    import_labels(store, [labels], split_file=splits)
    data = load_store(store, ["visual"], ["one", "two"], "crops")
    assert data.stages["faces"]["config"] == record["config"]
    assert data.present["visual"][:-1].float().mean() > 0.5
    cfg = TrainConfig(
        features=str(store),
        out=str(tmp_path / "run"),
        modalities=["visual"],
        window=8,
        hop=4,
        eval_hop=4,
        width=8,
        batch_size=4,
        epochs=1,
        device="cpu",
    )
    assert np.isfinite(train(cfg, quiet=True)["best_ccc"])


def test_a_store_whose_faces_hash_held_the_subject_keeps_its_videos(tmp_path: Path, monkeypatch):
    """A store written before the subject left the config hash (by `--subject left`) takes other
    videos: its shards are re-stamped with today's hash, their arrays untouched, none recomputed."""
    import json

    import h5py

    from pipeline import stages
    from pipeline.runner import extractor, jobs
    from pipeline.store import shard_path, stage_config, stage_counts

    two = first_frames(HAMILTON, tmp_path / "two.mp4", 8)
    one = first_frames(SINGLE_FACE, tmp_path / "one.mp4", 8)
    store = tmp_path / "store.h5"
    with monkeypatch.context() as old:  # the earlier rule: every setting in the hash and the record
        for module in (stages, jobs, extractor):
            old.setattr(module, "shared_config", lambda name, config: config)
        assert extract_faces(store, two, "--subject", "left")[0] == 0
    legacy = stage_config(store, "faces")
    assert legacy["config"]["subject"] == "left"
    shard = shard_path(store, "faces", "two")
    with h5py.File(shard, "r") as f:
        crops = f["crops"][:]
        assert f.attrs["config_hash"] == legacy["config_hash"]

    code, output = extract_faces(store, one)
    assert code == 0 and "1 done" in output, output
    record = stage_config(store, "faces")
    assert "subject" not in record["config"] and record["config_hash"] != legacy["config_hash"]
    with h5py.File(shard, "r") as f:
        assert f.attrs["config_hash"] == record["config_hash"]
        assert json.loads(f.attrs["config"])["subject"] == "left"
        np.testing.assert_array_equal(f["crops"][:], crops)
    assert stage_counts(store)["faces"].done == ["one", "two"]
    code, output = extract_faces(store, two, "--subject", "left")
    assert code == 0 and "0 done, 1 already done" in output, output


HD_CLIPS = [DATA / "liveportrait" / "s18.mp4", DATA / "liveportrait" / "d13.mp4"]  # 1280x720, 720x1280
# the default detector on the full-resolution frames (tests/fixtures/make_hd_faces_reference.py)
HD_REFERENCE = Path(__file__).parent / "fixtures" / "hd_faces_reference.npz"
HD_FRAMES = 36  # the first three decode batches (4 + 16 + 16 frames)


@pytest.mark.parametrize("path", HD_CLIPS, ids=lambda p: p.stem)
def test_hd_faces_agree_with_full_resolution_mtcnn(stage: FacesStage, path: Path):
    """On HD talking heads the stage's boxes and landmarks stay within the accuracy bounds (mean
    box IoU >= 0.90, landmark error <= 0.04 of the eye distance) of the default detector on the
    full-resolution frames (bench/faces.py measures whole clips, and a 1080p one)."""
    blocks = stage.run(media_for(path))
    rows: list[Rows] = []
    while sum(len(b) for b in rows) < HD_FRAMES:
        rows.append(next(blocks))
    blocks.close()
    ours = {
        k: np.concatenate([b.arrays[k] for b in rows])[:HD_FRAMES] for k in ("present", "boxes", "landmarks")
    }
    with np.load(HD_REFERENCE) as reference:
        boxes, points = reference[f"{path.stem}_boxes"], reference[f"{path.stem}_landmarks"]
    assert ours["present"].all()
    overlaps = [iou(a, b) for a, b in zip(ours["boxes"], boxes, strict=True)]
    eyes = np.linalg.norm(points[:, 0] - points[:, 1], axis=1)
    errors = np.linalg.norm(ours["landmarks"] - points, axis=2).mean(1) / eyes
    assert np.mean(overlaps) >= 0.90 and min(overlaps) >= 0.80, overlaps
    assert errors.mean() <= 0.04 and errors.max() <= 0.08, errors


def test_area_resizer_halves_large_reductions_and_keeps_the_pixels():
    frame = next(iter_video_frames(HD_CLIPS[0], 1))[1][0]  # 1280x720, a face in the middle
    square = frame[100:700, 340:940]  # 600 px
    resize = AreaResizer(square)
    small = resize(48, 48)
    # 600 -> 300 -> 150, then INTER_AREA to 48: halved while the result stays >= 2x the target
    assert [h.shape[0] for h in resize.halvings] == [600, 300, 150]
    direct = cv2.resize(square, (48, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - direct.astype(int)).mean() < 1.5
    resize(96, 96)  # the next resize of the same image reuses the halvings
    assert len(resize.halvings) == 3
    odd = AreaResizer(frame[:601, :599])  # an odd last row / column is left out of a halving
    assert odd(48, 48).shape == (48, 48, 3) and odd.halvings[1].shape == (300, 299, 3)
    near = AreaResizer(square[:150, :150])  # under 4x the target: one INTER_AREA, as before
    assert np.array_equal(
        near(48, 48), cv2.resize(square[:150, :150], (48, 48), interpolation=cv2.INTER_AREA)
    )
    assert len(near.halvings) == 1


class MovingFace:
    """A stand-in detector: frame i (its pixel value) holds a sure face at x = STEP * i, which
    O-Net finds exactly from any box; the face moves off a box within three frames."""

    STEP = 4.0

    def __init__(self) -> None:
        self.batches: list[int] = []

    def face(self, index: int) -> Face:
        box = np.array([self.STEP * index, 0, self.STEP * index + 100, 100], dtype=np.float32)
        return Face(box, np.zeros((5, 2), np.float32), 0.99)

    def refine_many(self, images: list[np.ndarray], box: np.ndarray) -> list[Face | None]:
        self.batches.append(len(images))
        return [self.face(int(image.flat[0])) for image in images]

    def detect(self, image: np.ndarray, min_face: float) -> list[Face]:
        return [self.face(int(image.flat[0]))]


def test_tracking_batches_shrink_to_what_holds_on_a_moving_face():
    """A face moving off the batch's box within a few frames: the next batch is as long as the
    last one held, not TRACK_BATCH frames of which most are thrown away, nor one frame at a time."""
    detector = MovingFace()
    tracker = SubjectTracker(detector, reacquire_after=15)  # type: ignore[arg-type]
    tracker.last = detector.face(0)
    frames = np.arange(1, 97, dtype=np.uint8).reshape(-1, 1, 1, 1)
    faces = []
    for start in range(0, len(frames), 16):
        faces += tracker.track(frames[start : start + 16])
    assert [f.box[0] for f in faces] == [MovingFace.STEP * i for i in range(1, 97)]
    assert min(detector.batches) >= TRACK_MIN_BATCH
    assert sum(detector.batches) <= 1.75 * len(frames), detector.batches  # TRACK_BATCH each: 5.7x
