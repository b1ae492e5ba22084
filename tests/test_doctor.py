"""`rcma doctor`: one screen on models, device, versions and decoding; exit 1 when the default
pipeline lacks something."""

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline import doctor, fer, visual
from pipeline.doctor import DOWNLOAD, MISSING, OK


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RCMA_VGGFACE2_WEIGHTS", raising=False)
    monkeypatch.delenv("RCMA_FER_WEIGHTS", raising=False)
    return tmp_path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(doctor, "reachable", lambda url: False)


@pytest.fixture(scope="module")
def vggface2_shaped(tmp_path_factory):
    """InceptionResnetV1 weights with random values: the vggface2 file cannot be downloaded here."""
    from facenet_pytorch import InceptionResnetV1

    path = tmp_path_factory.mktemp("weights") / "vggface2.pt"
    torch.save(InceptionResnetV1(pretrained=None).state_dict(), path)
    return path


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


FER_CHECK = "faces: fer embedder (expression)"
VGGFACE2_CHECK = "faces: vggface2 embedder (identity)"


def test_offline_everything_the_default_needs_is_here_and_vggface2_is_only_reported(empty_cache, offline):
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "everything the default pipeline needs is here" in result.output
    assert "packaged with fer 25.10.3; 135-d, checksum matches, loaded" in result.output
    assert "tiny.en" in result.output and "all-MiniLM-L6-v2" in result.output  # the packaged models
    assert "device (auto)" in result.output and "torch 2." in result.output
    assert "mp4 (h264+aac)" in result.output and "wav (pcm_s16le)" in result.output
    assert len(result.output.splitlines()) <= 40  # one screen


def test_given_weights_are_named_where_they_are(empty_cache, offline, monkeypatch, vggface2_shaped):
    weights = vggface2_shaped
    monkeypatch.setenv("RCMA_VGGFACE2_WEIGHTS", str(weights))
    copy = empty_cache / "emotion_model.hdf5"
    copy.write_bytes(fer.weights_path().read_bytes())
    monkeypatch.setenv("RCMA_FER_WEIGHTS", str(copy))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    squashed = "".join(result.output.split())  # long paths fold over lines
    assert f"$RCMA_VGGFACE2_WEIGHTS={weights}" in squashed
    assert f"$RCMA_FER_WEIGHTS={copy};135-d,checksummatches,loaded" in squashed
    assert f"$RCMA_VGGFACE2_WEIGHTS={weights};512-d,loaded" in squashed


def test_missing_default_model_exits_one_and_says_how_to_provide_it(empty_cache, offline, monkeypatch):
    monkeypatch.setenv("RCMA_FER_WEIGHTS", str(empty_cache / "nowhere.hdf5"))
    result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert f"{empty_cache / 'nowhere.hdf5'} (from $RCMA_FER_WEIGHTS) does not exist" in result.output
    assert result.output.splitlines()[-1] == f"error: missing for the default pipeline: {FER_CHECK}"


def test_a_damaged_fer_file_is_missing_not_present(empty_cache, monkeypatch):
    damaged = empty_cache / "emotion_model.hdf5"
    damaged.write_bytes(fer.weights_path().read_bytes()[:-1000])
    monkeypatch.setenv("RCMA_FER_WEIGHTS", str(damaged))
    check = by_name(doctor.model_checks(lambda url: False))[FER_CHECK]
    assert check.status == MISSING and check.failed
    assert str(damaged) in check.detail and "SHA-256" in check.detail


def test_vggface2_not_in_the_cache_is_a_download_when_reachable_and_missing_when_not(empty_cache):
    reachable = by_name(doctor.model_checks(lambda url: True))[VGGFACE2_CHECK]
    assert reachable.status == DOWNLOAD and not reachable.failed and "github.com" in reachable.detail
    offline = by_name(doctor.model_checks(lambda url: False))[VGGFACE2_CHECK]
    assert offline.status == MISSING and not offline.failed  # not the default: reported, not needed
    assert "$RCMA_VGGFACE2_WEIGHTS" in offline.detail


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
    line = next(line for line in result.output.splitlines() if VGGFACE2_CHECK in line)
    assert "missing" in line and f"{weights} is not a readable PyTorch state dict" in line
    assert result.exit_code == 0  # an option, not the default: reported, not needed
    with monkeypatch.context() as env:
        env.setattr(visual, "DEFAULT", visual.VGGFACE2)
        result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: missing for the default pipeline: {VGGFACE2_CHECK}"

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
