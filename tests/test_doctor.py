"""`rcma doctor`: one screen on models, device, versions and decoding; exit 1 when the default
pipeline lacks something."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline import doctor
from pipeline.doctor import DOWNLOAD, MISSING, OK


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RCMA_VGGFACE2_WEIGHTS", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def vggface2_shaped(tmp_path_factory):
    """InceptionResnetV1 weights with random values: the vggface2 file cannot be downloaded here."""
    from facenet_pytorch import InceptionResnetV1

    path = tmp_path_factory.mktemp("weights") / "vggface2.pt"
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), path)
    return path


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_everything_present_exits_zero_and_names_where_models_are(empty_cache, monkeypatch, vggface2_shaped):
    weights = vggface2_shaped
    monkeypatch.setenv("RCMA_VGGFACE2_WEIGHTS", str(weights))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "everything the default pipeline needs is here" in result.output
    squashed = "".join(result.output.split())  # long paths fold over lines
    assert f"$RCMA_VGGFACE2_WEIGHTS={weights}" in squashed
    assert "tiny.en" in result.output and "all-MiniLM-L6-v2" in result.output  # the packaged models
    assert "device (auto)" in result.output and "torch 2." in result.output
    assert "mp4 (h264+aac)" in result.output and "wav (pcm_s16le)" in result.output
    assert len(result.output.splitlines()) <= 40  # one screen


def test_missing_default_model_exits_one_and_says_how_to_provide_it(empty_cache, monkeypatch):
    monkeypatch.setenv("RCMA_VGGFACE2_WEIGHTS", str(empty_cache / "nowhere.pt"))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert f"vggface2: weights file {empty_cache / 'nowhere.pt'} (from --visual-model or" in result.output
    assert (
        result.output.splitlines()[-1] == "error: missing for the default pipeline: faces: vggface2 embedder"
    )


def test_a_model_not_in_the_cache_is_a_download_when_reachable_and_missing_when_not(empty_cache):
    reachable = by_name(doctor.model_checks(lambda url: True))["faces: vggface2 embedder"]
    assert reachable.status == DOWNLOAD and not reachable.failed and "github.com" in reachable.detail
    offline = by_name(doctor.model_checks(lambda url: False))["faces: vggface2 embedder"]
    assert offline.status == MISSING and offline.failed
    assert "$RCMA_VGGFACE2_WEIGHTS" in offline.detail and "--visual-model none" in offline.detail


def test_a_missing_package_or_container_is_reported(monkeypatch):
    monkeypatch.setattr(doctor, "PACKAGES", (*doctor.PACKAGES, "rcma-no-such-package"))
    missing = by_name(doctor.version_checks())["rcma-no-such-package"]
    assert missing.status == MISSING and missing.failed
    monkeypatch.setattr(doctor, "CONTAINERS", (("mp4", ".mp4", ("no-such-encoder",), "aac", True),))
    checks = by_name(doctor.decode_checks())
    assert (
        checks["mp4"].status == MISSING and checks["mp4"].failed and "no-such-encoder" in checks["mp4"].detail
    )
    assert checks["PyAV"].status == OK


def test_a_model_that_is_here_but_does_not_load_is_missing_in_one_line(empty_cache, monkeypatch):
    """doctor said ok for these, and extract then refused them: it now loads what it finds."""
    weights = empty_cache / "random.pt"
    weights.write_bytes(bytes(range(256)) * 20)
    monkeypatch.setenv("RCMA_VGGFACE2_WEIGHTS", str(weights))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "faces: vggface2 embedder" in line)
    assert "missing" in line and f"{weights} is not a readable PyTorch state dict" in line
    assert (
        result.output.splitlines()[-1] == "error: missing for the default pipeline: faces: vggface2 embedder"
    )

    empty = empty_cache / "text-model"
    empty.mkdir()
    for variable, value, name, message in (
        ("RCMA_ASR_MODEL", "/nonexistent", "text: Whisper", "/nonexistent (from --asr-model or $RCMA_ASR"),
        (
            "RCMA_TEXT_MODEL",
            str(empty),
            "text: sentence embedder",
            "not a sentence-transformers model folder",
        ),
    ):
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            check = by_name(doctor.model_checks(lambda url: False))[name]
        assert check.status == MISSING and check.failed and message in check.detail, check
        assert "\n" not in check.detail
