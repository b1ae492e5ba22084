"""Training settings checked up front, normalisation from training videos only, seed ensembles,
K-fold cross-validation by group, and a metrics log that survives a kill."""

import csv
import json

import numpy as np
import pytest
import torch
from synthetic import add_video, interaction_store
from typer.testing import CliRunner

from cli import app
from fusion.config import LEGACY, ModelConfig
from fusion.data import cut, load_store, window_index
from fusion.model import RCMA, Ensemble, build_model, load_checkpoint
from fusion.predict import PredictError, evaluate
from fusion.train import TrainConfig, TrainError, fold_of_videos, normalisation, train
from pipeline.store import rebuild_index

SMALL = dict(window=32, hop=16, width=16, batch_size=16, warmup_steps=5, lr=3e-3, patience=100)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(window=0), "--window must be at least 1"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(width=0), "--width must be at least 1"),
        (dict(epochs=0), "--epochs must be at least 1"),
        (dict(patience=0), "--patience must be at least 1"),
        (dict(hop=-1), "--hop must be at least 1"),
        (dict(window=32, eval_hop=64), "--eval-hop 64 must be between 1 and the window"),
        (dict(dropout=1.0), r"--dropout must be in \[0, 1\)"),
        (dict(lr=0.0), "--lr must be positive"),
        (dict(lr=float("nan")), "--lr must be a finite number, not nan"),
        (dict(lr=float("inf")), "--lr must be a finite number, not inf"),
        (dict(min_lr=float("nan")), "--min-lr must be a finite number"),
        (dict(min_lr=-1e-6), "--min-lr must be at least 0"),
        (dict(plateau_factor=1.0), "--plateau-factor must be below 1"),
        (dict(plateau_factor=-0.5), "--plateau-factor must be positive"),
        (dict(plateau_factor=float("inf")), "--plateau-factor must be a finite number"),
        (dict(weight_decay=float("nan")), "--weight-decay must be a finite number"),
        (dict(seeds=0), "--seeds must be at least 1"),
        (dict(folds=2), "--folds 2: use 0"),
        (dict(gate="sometimes"), "--gate sometimes: choose one of none, residual, grjca"),
        (dict(modalities=["audio", "audio"]), "each may be given once"),
        (dict(groups="g.csv"), "--groups only applies with --folds"),
        (dict(device="tpu"), "--device tpu"),
    ],
)
def test_config_refuses_settings_that_cannot_work(settings, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**settings)


def test_cli_reports_a_bad_setting_in_one_line_and_writes_nothing(tmp_path):
    for option in (
        ["--window", "0"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--min-lr", "nan"],
        ["--plateau-factor", "1"],
    ):
        result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *option])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
        assert option[0] in result.output, result.output  # the setting, not the missing store
    assert not (tmp_path / "run").exists()


def test_a_short_window_through_the_python_api_predicts_every_frame(tmp_path):
    store = interaction_store(tmp_path / "s.h5", n_train=4, n_val=2, frames=100)
    run = tmp_path / "run"
    train(
        TrainConfig(features=str(store), out=str(run), modalities=["audio"], epochs=1, window=64), quiet=True
    )
    assert load_checkpoint(run / "best.pt")["config"]["eval_hop"] == 32
    result = evaluate(run / "best.pt", store, "val", device="cpu")
    assert result["overall"]["frames"] == 200 and np.isfinite(result["overall"]["ccc"])


def write_shifted_store(path, n_videos=6, frames=60):
    """Audio with a mean of 100 in the training videos and 1000 in the validation videos."""
    rng = np.random.default_rng(0)
    for i in range(n_videos):
        split = "train" if i < 4 else "val"
        offset = 100.0 if split == "train" else 1000.0
        x = (offset + rng.standard_normal((frames, 3))).astype(np.float16)
        present = np.ones(frames, bool)
        present[:10] = False  # absent frames: their (zero) rows must not count
        x[:10] = 0
        stages = {"audio": {"present": present, "embedding": x}}
        add_video(path, f"v{i}", frames, stages, labels=(np.zeros(frames), np.zeros(frames)), split=split)
    rebuild_index(path)
    return path


def test_normalisation_comes_from_the_training_split_and_is_applied_at_predict_time(tmp_path):
    store = write_shifted_store(tmp_path / "s.h5")
    data = load_store(store, ["audio"], [f"v{i}" for i in range(6)])
    mean, std = normalisation(data, [0, 1, 2, 3])["audio"]
    assert torch.allclose(mean, torch.full((3,), 100.0), atol=0.5)
    assert torch.all((std > 0.5) & (std < 1.5))
    run = tmp_path / "run"
    train(TrainConfig(features=str(store), out=str(run), modalities=["audio"], epochs=1, **SMALL), quiet=True)
    ckpt = load_checkpoint(run / "best.pt")
    torch.testing.assert_close(ckpt["model"]["mean_audio"], mean)
    torch.testing.assert_close(ckpt["model"]["std_audio"], std)
    model = build_model(ckpt)
    assert torch.equal(model.mean_audio, mean)  # the saved statistics, not recomputed from the store
    other = write_shifted_store(tmp_path / "other.h5")
    assert torch.equal(build_model(load_checkpoint(run / "best.pt")).mean_audio, mean)
    assert evaluate(run / "best.pt", other, "val", device="cpu")["overall"]["frames"] == 2 * 60


def test_absent_frames_and_real_zeros_differ_with_the_presence_flag():
    torch.manual_seed(0)
    dims = {"audio": 4, "text": 3}
    inputs = {m: torch.zeros(1, 16, d) for m, d in dims.items()}
    valid = torch.ones(1, 16, dtype=torch.bool)
    here = {m: torch.ones(1, 16, dtype=torch.bool) for m in dims}
    gone = {"audio": here["audio"], "text": torch.zeros(1, 16, dtype=torch.bool)}
    for presence in (True, False):
        model = RCMA(ModelConfig(inputs=dims, window=16, width=8, presence=presence)).eval()
        same = torch.allclose(model(inputs, here, valid), model(inputs, gone, valid))
        assert same != presence


def test_an_ensemble_predicts_the_mean_of_its_members(tmp_path):
    store = interaction_store(tmp_path / "s.h5", n_train=4, n_val=2, frames=64)
    run = tmp_path / "run"
    settings = dict(modalities=["audio", "visual"], epochs=2, seeds=3, seed=5, **SMALL)
    result = train(TrainConfig(features=str(store), out=str(run), **settings), quiet=True)
    ckpt = load_checkpoint(run / "best.pt")
    assert len(ckpt["members"]) == 3 and result["seeds"]["seeds"] == [5, 6, 7]
    ensemble = build_model(ckpt)
    assert isinstance(ensemble, Ensemble)
    members = [build_model(load_checkpoint(run / f"seed-{i}" / "best.pt")) for i in range(3)]
    for a, b in zip(ensemble.members, members, strict=True):  # each member is that seed's best model
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(members[0].head.out.weight, members[1].head.out.weight)
    data = load_store(store, ["audio", "visual"], ["vid04", "vid05"])
    batch = cut(data, *window_index(torch.tensor([0]), torch.tensor([32]), 32, data.n_frames))
    args = (batch["inputs"], batch["present"], batch["valid"])
    torch.testing.assert_close(ensemble(*args), torch.stack([m(*args) for m in members]).mean(0))
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["member_val_ccc"]) == 3 and summary["member_val_ccc_std"] >= 0
    assert evaluate(run / "best.pt", store, "val", device="cpu")["overall"]["frames"] == 2 * 64
    resumed = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--epochs", "3", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert [load_checkpoint(run / f"seed-{i}" / "last.pt")["state"]["epoch"] for i in range(3)] == [3, 3, 3]


def test_folds_never_split_a_group():
    videos = [f"v{i:02d}" for i in range(40)]
    groups = {v: f"speaker{i % 7}" for i, v in enumerate(videos)}
    for seed in range(5):
        fold = fold_of_videos(videos, groups, 5, seed)
        by_group: dict[str, set[int]] = {}
        for v, k in zip(videos, fold, strict=True):
            by_group.setdefault(groups[v], set()).add(k)
        assert all(len(ks) == 1 for ks in by_group.values())
        assert set(fold) == set(range(5))
    with pytest.raises(TrainError, match="only 7 groups"):
        fold_of_videos(videos, groups, 8, 0)


def test_cross_validation_tests_every_video_once_and_reports_the_spread(tmp_path):
    store = interaction_store(tmp_path / "s.h5", n_train=6, n_val=3, frames=64)
    groups = tmp_path / "groups.csv"
    groups.write_text("video_id,group\n" + "".join(f"vid{i:02d},g{i // 3}\n" for i in range(9)))
    run = tmp_path / "cv"
    cfg = TrainConfig(
        features=str(store), out=str(run), modalities=["audio"], epochs=1, folds=3, groups=str(groups)
    )
    result = train(cfg, quiet=True)
    summary = json.loads((run / "folds.json").read_text())
    tested = [v for f in summary["folds"] for v in f["videos"]]
    assert sorted(tested) == [f"vid{i:02d}" for i in range(9)]
    for f in summary["folds"]:  # a group's three videos are tested together
        assert len({int(v[3:]) // 3 for v in f["videos"]}) == 1
    assert summary["test_pooled"]["frames"] == 9 * 64
    assert result["best_ccc"] == pytest.approx(np.mean([f["test"]["ccc"] for f in summary["folds"]]))
    for k in range(3):
        assert (run / f"fold-{k}" / "best.pt").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("video_id,group\nvid00,a\n")
    with pytest.raises(TrainError, match="no group for video vid01"):
        train(TrainConfig(**{**vars(cfg), "out": str(tmp_path / "cv2"), "groups": str(bad)}), quiet=True)


def test_a_kill_between_last_pt_and_metrics_csv_loses_no_row(tmp_path, monkeypatch):
    import fusion.train as ft

    store = interaction_store(tmp_path / "s.h5", n_train=4, n_val=2, frames=64)
    run = tmp_path / "run"
    cfg = TrainConfig(features=str(store), out=str(run), modalities=["audio"], epochs=2, **SMALL)
    written = ft._write_history

    def killed_on_epoch_2(path, rows):
        if len(rows) == 2:
            raise KeyboardInterrupt  # last.pt of epoch 2 is on disk, its metrics row is not
        written(path, rows)

    monkeypatch.setattr(ft, "_write_history", killed_on_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    monkeypatch.setattr(ft, "_write_history", written)
    with (run / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]
    train(TrainConfig(**{**vars(cfg), "epochs": 3}), resume=True, quiet=True)
    with (run / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_a_checkpoint_of_the_first_release_still_predicts(tmp_path):
    """Release 0.1 saved `Fusion` weights (rcma.attend.*, head.0.*) and no settings for the later options."""
    store = interaction_store(tmp_path / "s.h5", n_train=2, n_val=2, frames=40)
    torch.manual_seed(0)
    model = RCMA(ModelConfig(inputs={"audio": 16, "visual": 16}, window=32, width=8, **LEGACY)).eval()
    renames = {"attention.steps.0.": "rcma.attend.", "head.hidden.": "head.0.", "head.out.": "head.3."}
    old_state = {}
    for key, value in model.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old) if key.startswith(new) else key
        old_state[key] = value
    old_config = dict(inputs={"audio": 16, "visual": 16}, window=32, width=8, iterations=3, fusion="rcma")
    old_config.update(joint="others", dropout=0.2, visual_crops=False, modalities=["audio", "visual"])
    ckpt = {
        "config": {"window": 32, "eval_hop": 16},
        "model_config": old_config,
        "data": {
            "modalities": ["audio", "visual"],
            "dims": {"audio": 16, "visual": 16},
            "visual_input": "embedding",
        },
        "model": old_state,
    }
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = build_model(load_checkpoint(tmp_path / "old.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    result = evaluate(tmp_path / "old.pt", store, "val", device="cpu")
    assert result["overall"]["frames"] == 2 * 40
    del old_state["head.3.bias"]
    torch.save({**ckpt, "model": old_state}, tmp_path / "broken.pt")
    with pytest.raises(PredictError, match="weights do not fit its model settings"):
        evaluate(tmp_path / "broken.pt", store, "val", device="cpu")
