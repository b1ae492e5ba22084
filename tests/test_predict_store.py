"""`rcma predict --features STORE`: choosing unlabelled videos (a test set), the ABAW layout, the report."""

import csv
from pathlib import Path

import numpy as np
import pytest
from synthetic import add_video, interaction_store
from typer.testing import CliRunner

from cli import app
from fusion.train import TrainConfig, train
from pipeline.store import rebuild_index

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A store with 16 labelled videos and two unlabelled test videos, and a model trained on it."""
    folder = tmp_path_factory.mktemp("store")
    store = interaction_store(folder / "store.h5", n_train=6, n_val=2, frames=120)
    rng = np.random.default_rng(1)
    for vid, n in (("test-a", 90), ("test-b", 45)):
        add_video(
            store,
            vid,
            n,
            {
                "audio": {
                    "present": np.ones(n, bool),
                    "embedding": rng.standard_normal((n, 16)).astype(np.float16),
                },
                "faces": {"present": np.arange(n) < n // 2, "embedding": np.zeros((n, 16), np.float16)},
            },
        )
    rebuild_index(store)
    cfg = TrainConfig(
        features=str(store),
        out=str(folder / "run"),
        modalities=["audio", "visual"],
        window=32,
        hop=16,
        eval_hop=16,
        width=16,
        epochs=1,
        device="cpu",
    )
    train(cfg, quiet=True)
    return store, folder / "run" / "best.pt"


def predict(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", *args])
    return result.exit_code, result.output


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_unlabelled_test_set_by_list_file(trained, tmp_path):
    store, model = trained
    listing = tmp_path / "test_set.txt"
    listing.write_text("test-a\n\ntest-b\n")
    out = tmp_path / "out"
    code, output = predict(
        "--model", str(model), "--features", str(store), "--out", str(out), "--list", str(listing)
    )
    assert code == 0, output
    assert f"predictions for 2 videos; report: {out / 'report.html'}" in output
    assert sorted(p.name for p in out.glob("*.csv")) == ["test-a.csv", "test-b.csv"]
    a = rows(out / "test-a.csv")
    assert len(a) == 90 and [r["visual_present"] for r in a] == ["1"] * 45 + ["0"] * 45
    assert {r["audio_present"] for r in a} == {"1"}
    abaw = rows(out / "abaw_va_predictions.txt")
    assert len(abaw) == 135
    assert (
        abaw[0]["image_location"] == "test-a/00001.jpg" and abaw[89]["image_location"] == "test-a/00090.jpg"
    )
    assert abaw[90]["image_location"] == "test-b/00001.jpg"
    assert abaw[0]["valence"] == a[0]["valence"] and abaw[0]["arousal"] == a[0]["arousal"]
    assert all(-1 <= float(r["valence"]) <= 1 and -1 <= float(r["arousal"]) <= 1 for r in abaw)
    assert len((out / "submission" / "test-b.txt").read_text().splitlines()) == 1 + 45
    page = (out / "report.html").read_text()
    assert "test-a" in page and "the model does not use words" in page


def test_unlabelled_test_set_by_split_file(trained, tmp_path):
    store, model = trained
    splits = tmp_path / "splits.csv"
    splits.write_text("video_id,split\ntest-b,test\nvid00,train\n")
    out = tmp_path / "out"
    args = ["--model", str(model), "--features", str(store), "--out", str(out)]
    code, output = predict(*args, "--split", "test", "--split-file", str(splits))
    assert code == 0, output
    assert [p.name for p in out.glob("*.csv")] == ["test-b.csv"]
    code, output = predict(*args, "--split", "test")  # the store's own labels know no test split
    assert code == 2 and "no labelled videos in split test" in output


def test_bad_selections_are_one_line_errors(trained, tmp_path):
    store, model = trained
    listing = tmp_path / "list.txt"
    listing.write_text("test-a\nnot-there\n")
    args = ["--model", str(model), "--features", str(store), "--out", str(tmp_path / "out")]
    for extra, message in (
        (["--list", str(listing)], f"{listing}: 1 videos are not in {store}, first 'not-there'"),
        (["--list", str(tmp_path / "nope.txt")], "nope.txt: no such list file"),
        (["--split-file", str(listing)], "a split file needs --split NAME"),
        ([str(tmp_path), "--list", str(listing)], "give media files, or --features"),
    ):
        code, output = predict(*args, *extra)
        assert code == 2 and output.startswith("error:") and message in output, output
        assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
