"""A model trained on real audio-only files (speech clips on a 30 fps grid, log-mel audio):
`evaluate` and `predict --features` compare the frame rate of the store's audio-only files with
the model's, and `rcma predict`'s one-line errors name only options it has."""

import shutil
from pathlib import Path

import pytest
from conftest import DATA, SPEECH_VA
from typer.testing import CliRunner

from cli import app
from fusion.predict import PredictError, evaluate
from fusion.train import TrainConfig, train
from pipeline import runner
from pipeline.labels import import_labels
from pipeline.stages import build_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLIPS = SPEECH_VA[:6]
LABELS = DATA / "speech-va" / "labels_va.csv"


def extract_audio(store: Path, files: list[Path], fps: float, **options) -> Path:
    """Log-mel audio of `files` on a grid of `fps` (as `rcma extract --fps`), labels imported."""
    stage = build_stage("audio", {"audio_model": "logmel", "device": "cpu", **options})
    jobs, _ = runner.discover(files)
    outcomes = runner.run_local(jobs, runner.Extractor(store, [stage], fps))
    assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
    rows = {Path(line.split(",")[0]).stem: line for line in LABELS.read_text().splitlines()[1:]}
    labels = store.with_name(f"{store.stem}-labels.csv")
    labels.write_text("file,valence,arousal\n" + "".join(f"{rows[p.stem]}\n" for p in files))
    splits = store.with_name(f"{store.stem}-splits.csv")
    splits.write_text("".join(f"{p.stem},{'val' if i % 3 == 2 else 'train'}\n" for i, p in enumerate(files)))
    import_labels(store, [labels], split_file=splits)
    return store


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speech")
    store = extract_audio(folder / "store.h5", CLIPS, 30.0)
    cfg = TrainConfig(
        features=str(store),
        out=str(folder / "run"),
        modalities=["audio"],
        window=32,
        hop=16,
        eval_hop=16,
        width=8,
        batch_size=8,
        epochs=1,
        device="cpu",
    )
    train(cfg, quiet=True)
    return folder / "run" / "best.pt"


def test_audio_only_files_on_another_frame_rate_are_refused(model, tmp_path):
    assert evaluate(model, model.parent.parent / "store.h5", "val", "cpu")["overall"]["frames"] > 0
    store = extract_audio(tmp_path / "store25.h5", CLIPS, 25.0)
    with pytest.raises(PredictError) as refused:
        evaluate(model, store, "val", "cpu")
    message = str(refused.value)
    assert "\n" not in message and "on a 25 fps frame grid" in message
    assert "trained on audio-only files at 30 fps; extract it with --fps 30" in message
    for command in ("evaluate", "predict"):
        out = tmp_path / command
        args = [command, "--model", str(model), "--features", str(store), "--device", "cpu"]
        result = CliRunner().invoke(app, [*args, *(["--out", str(out)] if command == "predict" else [])])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "on a 25 fps frame grid" in result.output
        assert not out.exists()


def test_predict_suggests_only_what_it_has(model, tmp_path):
    """`rcma predict` has no --force: a store it cannot use is left for another --store."""
    other = extract_audio(tmp_path / "flat.h5", CLIPS[:1], 30.0, logmel_pool="flat")
    args = ["predict", str(CLIPS[1]), "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--store", str(other), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "made with other settings" in result.output and "give another --store" in result.output
    assert "--force" not in result.output

    store = extract_audio(tmp_path / "s.h5", CLIPS[:1], 30.0)  # the same name, another file
    renamed = tmp_path / "elsewhere" / CLIPS[0].name
    renamed.parent.mkdir()
    shutil.copy(CLIPS[1], renamed)
    result = CliRunner().invoke(app, [*args, str(renamed), "--store", str(store), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"failed: {renamed}: audio: video id {CLIPS[0].stem!r} already holds" in result.output
    assert "rename one, or give another --store" in result.output and "--force" not in result.output
