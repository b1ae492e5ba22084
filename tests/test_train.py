"""Training, resuming, evaluation and prediction on synthetic stores, and the bad inputs."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import add_video, interaction_store
from typer.testing import CliRunner

from cli import app
from fusion.data import DataError, load_store, window_index, windows
from fusion.model import load_checkpoint
from fusion.predict import PredictError, evaluate, predict
from fusion.train import TrainConfig, TrainError, train
from pipeline.store import read_rows, rebuild_index, shard_path, write_shard

SMALL = dict(window=32, hop=16, eval_hop=16, width=32, batch_size=16, warmup_steps=20, lr=3e-3, patience=100)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def interaction(tmp_path_factory) -> Path:
    return interaction_store(tmp_path_factory.mktemp("interaction") / "store.h5")


def config(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(features=str(store), out=str(out), **{**SMALL, **kw})


def test_rcma_beats_each_modality_alone_on_an_interaction(interaction, tmp_path):
    """Valence = a(t) v(t): only a model that combines audio and visual can predict it."""
    best = {}
    for name, mods in (("rcma", ["audio", "visual"]), ("audio", ["audio"]), ("visual", ["visual"])):
        result = train(config(interaction, tmp_path / name, modalities=mods, epochs=8), quiet=True)
        best[name] = result["best_ccc"]
    assert best["rcma"] > 0.85
    assert best["rcma"] > max(best["audio"], best["visual"]) + 0.3, best


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(interaction, tmp_path):
    mods = ["audio", "visual"]
    train(config(interaction, tmp_path / "whole", modalities=mods, epochs=3), quiet=True)
    train(config(interaction, tmp_path / "split", modalities=mods, epochs=1), quiet=True)
    with pytest.raises(TrainError, match="already holds a run"):
        train(config(interaction, tmp_path / "split", modalities=mods, epochs=3), quiet=True)
    with pytest.raises(TrainError, match="differs from the run's"):
        train(config(interaction, tmp_path / "split", modalities=mods, epochs=3, width=16), resume=True)
    train(config(interaction, tmp_path / "split", modalities=mods, epochs=3), resume=True, quiet=True)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert whole["state"] == split["state"] and whole["state"]["epoch"] == 3
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for key in ("optimizer", "scheduler"):
        assert str(whole[key]) == str(split[key])
    with (tmp_path / "split" / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    for name in ("best.pt", "last.pt", "config.json", "metrics.csv", "curves.png"):
        assert (tmp_path / "split" / name).is_file()
    assert any((tmp_path / "split" / "tb").iterdir())
    assert json.loads((tmp_path / "split" / "config.json").read_text())["data"]["dims"] == {
        "audio": 16,
        "visual": 16,
    }


def test_evaluate_and_predict_outputs(interaction, tmp_path):
    run = tmp_path / "run"
    train(config(interaction, run, modalities=["audio", "visual"], epochs=1), quiet=True)
    result = evaluate(run / "best.pt", interaction, "val", device="cpu")
    assert set(result["videos"]) == {"vid12", "vid13", "vid14", "vid15"}
    assert result["overall"]["frames"] == 4 * 300
    assert {"ccc_valence", "pcc_arousal", "rmse_valence", "ccc"} <= result["overall"].keys()
    out = tmp_path / "pred"
    videos = predict(run / "best.pt", interaction, out, split="val", device="cpu")
    assert len(videos) == 4
    with (out / "vid12.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300
    assert list(rows[0]) == ["frame", "time", "valence", "arousal", "audio_present", "visual_present"]
    assert float(rows[30]["time"]) == pytest.approx(1.0)
    lines = (out / "submission" / "vid12.txt").read_text().splitlines()
    assert lines[0] == "valence,arousal" and len(lines) == 301
    assert (out / "plots" / "vid12.png").stat().st_size > 1000
    cli = CliRunner().invoke(
        app, ["evaluate", "--model", str(run / "best.pt"), "--features", str(interaction), "--json"]
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["overall"]["frames"] == 1200


def test_cli_train_and_predict(interaction, tmp_path):
    run, out = tmp_path / "run", tmp_path / "pred"
    args = ["--features", str(interaction), "--out", str(run), "--modalities", "audio,visual"]
    small = ["--window", "32", "--hop", "16", "--width", "16", "--epochs", "1", "--threads", "1", "--quiet"]
    cli = CliRunner().invoke(app, ["train", *args, *small])
    assert cli.exit_code == 0, cli.output
    assert "best val CCC" in cli.output and (run / "best.pt").is_file()
    resumed = [
        "train",
        "--features",
        str(interaction),
        "--out",
        str(run),
        "--resume",
        "--epochs",
        "2",
        "--quiet",
    ]
    cli = CliRunner().invoke(app, resumed)  # the run's own window, width, modalities: none repeated
    assert cli.exit_code == 0, cli.output
    assert load_checkpoint(run / "last.pt")["state"]["epoch"] == 2
    assert load_checkpoint(run / "last.pt")["config"]["width"] == 16
    cli = CliRunner().invoke(app, [*resumed, "--width", "64"])
    assert cli.exit_code == 2 and "--width 64 differs from the run's 16" in cli.output
    cli = CliRunner().invoke(
        app, ["predict", "--model", str(run / "best.pt"), "--features", str(interaction), "--out", str(out)]
    )
    assert cli.exit_code == 0, cli.output
    assert len(list(out.glob("*.csv"))) == 16 and len(list((out / "plots").glob("*.png"))) == 16


def test_windows_stay_inside_videos_and_cover_every_frame():
    offsets = np.array([0, 10, 10, 110, 350])  # lengths 10 (short), 0, 100, 240
    starts, lengths = windows(offsets, 50, 40)
    assert starts.tolist() == [0, 10, 50, 60, 110, 150, 190, 230, 270, 300]
    assert lengths.tolist() == [10] + [50] * 9
    covered = np.zeros(350, int)
    for s, n in zip(starts, lengths, strict=True):
        video = np.searchsorted(offsets, s, side="right") - 1
        assert s + n <= offsets[video + 1]
        covered[s : s + n] += 1
    assert covered.min() >= 1
    index, valid = window_index(torch.tensor([0, 110]), torch.tensor([10, 50]), 50, 350)
    assert valid[0].sum() == 10 and (index[0, 10:] == 350).all() and index[1, -1] == 159


def write_av_store(
    store: Path, lengths: list[int], audio_dim: int = 4, visual: str = "embedding", text=False
):
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        stages = {
            "audio": {
                "present": np.ones(n, bool),
                "embedding": rng.normal(size=(n, audio_dim)).astype(np.float16),
            }
        }
        faces = {"present": rng.random(n) > 0.2}
        if visual == "embedding":
            faces["embedding"] = rng.normal(size=(n, 6)).astype(np.float16)
        elif visual == "crops":
            faces["crops"] = rng.integers(0, 255, (n, 112, 112, 3), dtype=np.uint8)
        if visual:
            stages["faces"] = faces
        if text:
            stages["text"] = {
                "present": rng.random(n) > 0.5,
                "embedding": rng.normal(size=(n, 5)).astype(np.float16),
            }
        y = rng.uniform(-1, 1, (2, n))
        labelled = rng.random(n) > 0.1
        add_video(store, f"v{i}", n, stages, (y[0], y[1]), "train" if i % 2 == 0 else "val", labelled)
    rebuild_index(store)
    return store


def test_short_videos_and_crops_train_on_all_three_modalities(tmp_path):
    store = write_av_store(tmp_path / "s.h5", [20, 7, 45, 12], visual="crops", text=True)
    cfg = config(store, tmp_path / "run", modalities=["audio", "visual", "text"], epochs=1, window=16, hop=8)
    result = train(cfg, quiet=True)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["data"]["visual_input"] == "crops" and ckpt["model_config"]["visual_crops"]
    assert np.isfinite(result["best_ccc"])
    out = tmp_path / "pred"
    predict(tmp_path / "run" / "best.pt", store, out, plots=False, device="cpu")
    with (out / "v1.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 7  # shorter than the window: padded, then cut back


def test_bad_inputs_are_one_line_errors_that_change_nothing(tmp_path):
    store = write_av_store(tmp_path / "s.h5", [40, 40, 40, 40])
    with pytest.raises(TrainError, match=r"video v0 has no text/embedding \(run `rcma extract"):
        train(config(store, tmp_path / "r0", modalities=["audio", "text"], epochs=1), quiet=True)
    assert not (tmp_path / "r0").exists()
    with pytest.raises(TrainError, match="no labelled videos in split test"):
        train(config(store, tmp_path / "r1", modalities=["audio"], val_split="test", epochs=1), quiet=True)
    with pytest.raises(TrainError, match="unknown modality"):
        train(config(store, tmp_path / "r1", modalities=["smell"], epochs=1), quiet=True)

    run = tmp_path / "run"
    train(config(store, run, modalities=["audio", "visual"], epochs=1), quiet=True)
    wider = write_av_store(tmp_path / "wide.h5", [40, 40], audio_dim=8)
    with pytest.raises(PredictError, match="audio 4 in the checkpoint, 8 in the store"):
        evaluate(run / "best.pt", wider, "val")
    no_faces = write_av_store(tmp_path / "nofaces.h5", [40, 40], visual="")
    out = tmp_path / "pred"
    with pytest.raises(PredictError, match="video v0 has no faces features"):
        predict(run / "best.pt", no_faces, out)
    assert not out.exists()
    with pytest.raises(PredictError, match="no such checkpoint"):
        evaluate(tmp_path / "nope.pt", store)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PredictError, match="not a readable checkpoint"):
        evaluate(tmp_path / "junk.pt", store)

    bad = shard_path(store, "audio", "v2")
    emb = read_rows(bad, "embedding")
    emb[17, 1] = np.nan
    write_shard(store, "audio", "v2", {"present": np.ones(40, bool), "embedding": emb}, {})
    with pytest.raises(
        TrainError, match="video v2: audio/embedding has NaN or inf values .* first at frame 17"
    ):
        train(config(store, tmp_path / "r2", modalities=["audio"], epochs=1), quiet=True)

    before = (run / "last.pt").stat().st_mtime_ns
    cli = CliRunner().invoke(
        app, ["train", "--features", str(store), "--out", str(run), "--modalities", "audio,visual"]
    )
    assert cli.exit_code == 2 and "already holds a run" in cli.output
    assert (run / "last.pt").stat().st_mtime_ns == before


def test_arrays_off_the_frame_grid_are_one_line_errors(tmp_path):
    store = write_av_store(tmp_path / "s.h5", [40, 40, 40, 40])
    run = tmp_path / "run"
    train(config(store, run, modalities=["audio"], epochs=1), quiet=True)
    short = {"present": np.ones(35, bool), "embedding": np.zeros((35, 4), np.float16)}
    write_shard(store, "audio", "v1", short, {})
    rebuild_index(store)
    message = r"video v1: audio/(present|embedding) has 35 rows but the video has 40 frames"
    with pytest.raises(DataError, match=message):
        load_store(store, ["audio"], ["v0", "v1"])
    with pytest.raises(TrainError, match=message):
        train(config(store, tmp_path / "r1", modalities=["audio"], epochs=1), quiet=True)
    with pytest.raises(PredictError, match=message):
        evaluate(run / "best.pt", store, "val", device="cpu")
    for command in ("evaluate", "predict"):
        cli = CliRunner().invoke(
            app, [command, "--model", str(run / "best.pt"), "--features", str(store), "--device", "cpu"]
        )
        assert cli.exit_code == 2 and "35 rows but the video has 40 frames" in cli.output, cli.output
    cli = CliRunner().invoke(app, ["predict", "--model", str(run / "best.pt"), "--features", "nope.h5"])
    assert cli.exit_code == 2 and "no such store" in cli.output, cli.output
    with pytest.raises(PredictError, match="no such store"):
        evaluate(run / "best.pt", tmp_path / "nope.h5")

    write_shard(store, "audio", "v1", {k: np.ones(40, v.dtype) for k, v in short.items()}, {})
    write_shard(store, "labels", "v2", {"valence": np.zeros(41, np.float32)}, {"split": "train"})
    rebuild_index(store)
    with pytest.raises(DataError, match="video v2: labels/valence has 41 rows but the video has 40"):
        load_store(store, ["audio"], ["v2"])


def test_validation_split_must_differ_from_the_training_split(tmp_path, monkeypatch):
    store = write_av_store(tmp_path / "s.h5", [40, 40])
    with pytest.raises(TrainError, match="validation split must differ from the training split"):
        train(config(store, tmp_path / "r0", modalities=["audio"], val_split="train"), quiet=True)
    monkeypatch.setattr("fusion.train.select_videos", lambda store, splits, need_labels: ["v0", "v1"])
    with pytest.raises(TrainError, match="video v0 is in both the training and the validation split"):
        train(config(store, tmp_path / "r1", modalities=["audio"]), quiet=True)
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()


def test_best_checkpoint_is_saved_before_last(tmp_path, monkeypatch):
    import fusion.train as ft

    store = write_av_store(tmp_path / "s.h5", [40, 40])
    saved = []
    save = ft.save_checkpoint
    monkeypatch.setattr(ft, "save_checkpoint", lambda obj, path: (saved.append(path.name), save(obj, path)))
    train(config(store, tmp_path / "run", modalities=["audio"], epochs=1), quiet=True)
    assert saved == ["best.pt", "last.pt"]


def test_a_model_refuses_features_made_with_other_settings(tmp_path):
    """A checkpoint records each stage's config; evaluate/predict name the setting that differs.
    A checkpoint from before configs were recorded still loads."""

    def make(store: Path, audio_model: str) -> Path:
        rng = np.random.default_rng(0)
        config = {"audio_model": audio_model, "sample_rate": 16000}
        for i in range(4):
            n = 64
            signal = rng.standard_normal(n)
            add_video(store, f"v{i}", n, {}, labels=(signal, signal), split="train" if i < 3 else "val")
            rows = {"present": np.ones(n, bool), "embedding": rng.standard_normal((n, 8)).astype(np.float16)}
            write_shard(store, "audio", f"v{i}", rows, {"config": config, "config_hash": audio_model})
        rebuild_index(store)
        return store

    trained_on = make(tmp_path / "a" / "store.h5", "logmel")
    other = make(tmp_path / "b" / "store.h5", "wav2vec2")
    run = tmp_path / "run"
    train(config(trained_on, run, modalities=["audio"], epochs=1, window=16, hop=8, eval_hop=8), quiet=True)
    ckpt = load_checkpoint(run / "best.pt", torch.device("cpu"))
    assert ckpt["data"]["stages"]["audio"]["config"]["audio_model"] == "logmel"
    assert evaluate(run / "best.pt", trained_on, "val", device="cpu")["overall"]["frames"] == 64
    with pytest.raises(PredictError) as refused:
        predict(run / "best.pt", other, tmp_path / "pred", device="cpu")
    assert "audio_model: logmel trained on, wav2vec2 here" in str(refused.value)
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())

    del ckpt["data"]["stages"]  # as written before configs were recorded
    torch.save(ckpt, tmp_path / "old.pt")
    assert evaluate(tmp_path / "old.pt", other, "val", device="cpu")["overall"]["frames"] == 64


def test_without_modalities_training_uses_every_one_the_store_has(tmp_path):
    store = write_av_store(tmp_path / "av.h5", [40, 40, 40, 40])  # audio and faces, no text
    result = train(config(store, tmp_path / "run", epochs=1), quiet=True)
    ckpt = load_checkpoint(Path(result["best"]))
    assert ckpt["data"]["modalities"] == ["audio", "visual"]
    every = write_av_store(tmp_path / "avt.h5", [40, 40, 40, 40], text=True)
    result = train(config(every, tmp_path / "all", epochs=1), quiet=True)
    assert load_checkpoint(Path(result["best"]))["data"]["modalities"] == ["audio", "visual", "text"]


def test_a_modality_only_some_labelled_videos_have_is_named_not_dropped(tmp_path):
    store = write_av_store(tmp_path / "s.h5", [40, 40, 40])
    audio = {"present": np.ones(40, bool), "embedding": np.zeros((40, 4), np.float16)}
    add_video(store, "v3", 40, {"audio": audio}, (np.zeros(40), np.zeros(40)), "train")  # no faces
    rebuild_index(store)
    with pytest.raises(TrainError, match=r"3 of 4 labelled videos have faces features: extract the rest"):
        train(config(store, tmp_path / "run", epochs=1), quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_naming_the_epoch_and_its_weights_are_refused(tmp_path):
    """--lr 1000 once gave NaN validation every epoch, exit 0, a NaN best.pt, and NaN predictions."""
    store = interaction_store(tmp_path / "s.h5", n_train=4, n_val=2, frames=100)
    run = tmp_path / "run"
    args = ["--features", str(store), "--out", str(run), "--modalities", "audio,visual", "--epochs", "3"]
    small = ["--window", "32", "--hop", "16", "--width", "16", "--warmup-steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, ["train", *args, *small, "--lr", "1000", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "training diverged in epoch" in lines[0], result.output
    assert "NaN or infinite" in lines[0] and "--lr 1000" in lines[0] and "learning rate" in lines[0]
    epoch = int(lines[0].split("diverged in epoch ")[1].split(":")[0])
    for name in ("best.pt", "last.pt"):  # those of earlier epochs only, and finite
        if epoch == 1:
            assert not (run / name).exists()
        else:
            assert load_checkpoint(run / name)["state"]["epoch"] == epoch - 1

    healthy = tmp_path / "healthy"
    train(config(store, healthy, modalities=["audio", "visual"], epochs=1), quiet=True)
    ckpt = torch.load(healthy / "best.pt", weights_only=True)
    ckpt["model"]["tcn_norm.audio.running_var"][0] = float("nan")  # as the diverged run left it
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(PredictError, match="weights are NaN or infinite"):
        evaluate(tmp_path / "nan.pt", store, "val", device="cpu")
    out = tmp_path / "pred"
    for command in (["evaluate"], ["predict", "--out", str(out)]):
        cli = CliRunner().invoke(
            app, [*command, "--model", str(tmp_path / "nan.pt"), "--features", str(store)]
        )
        assert cli.exit_code == 2 and len(cli.output.strip().splitlines()) == 1, cli.output
        assert "weights are NaN or infinite" in cli.output
    assert not out.exists()


def test_evaluate_on_per_clip_labels_shows_undefined_per_video_scores_as_a_dash(tmp_path):
    """Per-clip labels are constant in each video: its CCC was shown as 0.0000 and its PCC as nan."""
    rng = np.random.default_rng(0)
    store = tmp_path / "s.h5"
    for i, (valence, arousal) in enumerate([(-0.6, 0.7), (0.5, 0.1), (0.7, 0.5), (-0.2, -0.4)]):
        rows = {"present": np.ones(40, bool), "embedding": rng.normal(size=(40, 4)).astype(np.float16)}
        labels = (np.full(40, valence), np.full(40, arousal))
        add_video(store, f"v{i}", 40, {"audio": rows}, labels, "train" if i < 2 else "val")
    rebuild_index(store)
    run = tmp_path / "run"
    train(config(store, run, modalities=["audio"], epochs=1, window=16, hop=8, eval_hop=8), quiet=True)
    args = ["evaluate", "--model", str(run / "best.pt"), "--features", str(store), "--device", "cpu"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 8}
    for vid in ("v2", "v3"):
        cells = [c.strip() for c in rows[vid].split("│")[3:-1]]
        assert cells[:4] == ["-"] * 4 and all(float(c) >= 0 for c in cells[4:]), rows[vid]
    every = [c.strip() for c in rows["all frames"].split("│")[3:-1]]
    assert "-" not in every and "nan" not in every
    assert result.output.count("undefined for a video whose labels are constant") == 1
    scores = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert scores["videos"]["v2"]["ccc_valence"] is None and scores["videos"]["v2"]["rmse_valence"] >= 0
    assert isinstance(scores["overall"]["ccc_valence"], float)


def test_windows_with_no_input_never_count_in_the_loss(tmp_path):
    """A training video on which no modality is ever present trains exactly as if it had no labels."""
    runs = {}
    for name, labelled in (("labelled", True), ("unlabelled", False)):
        store = write_av_store(tmp_path / f"{name}.h5", [40, 40, 40, 40])
        n = 48
        blank = {"present": np.zeros(n, bool), "embedding": np.zeros((n, 4), np.float16)}
        blank_faces = {"present": np.zeros(n, bool), "embedding": np.zeros((n, 6), np.float16)}
        y = np.linspace(-0.9, 0.9, n)
        add_video(
            store, "blank", n, {"audio": blank, "faces": blank_faces}, (y, -y), "train", np.full(n, labelled)
        )
        rebuild_index(store)
        out = tmp_path / name
        train(config(store, out, modalities=["audio", "visual"], epochs=2), quiet=True)
        runs[name] = load_checkpoint(out / "last.pt")
    for key, value in runs["labelled"]["model"].items():
        assert torch.equal(value, runs["unlabelled"]["model"][key]), key


def test_the_loss_scaler_is_saved_and_restored_on_resume(tmp_path, monkeypatch):
    """The fp16 loss scaler runs on CUDA only; here a CPU scaler that doubles its scale every step
    stands in for it, so that a resume that started a fresh scaler would end on another scale."""
    import fusion.train as ft

    monkeypatch.setattr(
        ft, "loss_scaler", lambda device: torch.amp.GradScaler("cpu", init_scale=2.0, growth_interval=1)
    )
    store = write_av_store(tmp_path / "s.h5", [40, 40, 40, 40])
    train(config(store, tmp_path / "whole", modalities=["audio"], epochs=3), quiet=True)
    train(config(store, tmp_path / "split", modalities=["audio"], epochs=1), quiet=True)
    first = load_checkpoint(tmp_path / "split" / "last.pt")
    steps = first["state"]["step"]
    assert first["scaler"]["scale"] == 2.0 * 2**steps  # every step grew it: it was saved after them
    train(config(store, tmp_path / "split", modalities=["audio"], epochs=3), resume=True, quiet=True)
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (
        split["scaler"] == whole["scaler"] and whole["scaler"]["scale"] == 2.0 * 2 ** whole["state"]["step"]
    )
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
