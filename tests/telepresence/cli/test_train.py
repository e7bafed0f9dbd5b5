"""`telepresence train` (telepresence.cli.train.main): smoke runs of both families, pair files, resume, one-line errors."""

import json

import pytest
import torch

from models.refiner import Refiner
from models.training.data import TensorPairDataset, synthetic_pairs
from telepresence.cli.train import main as train_main

FAST = ["--no-progress", "--no-identity", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["small", "lora"])
def test_smoke_trains_both_stages_and_exports(tmp_path, family):
    run = tmp_path / "run"
    assert train_main(["--smoke", "--family", family, "--steps", "2", "--stage2-steps", "2", "--out", str(run), *FAST]) == 0
    records = _log(run)
    assert {r["stage"] for r in records if "stage" in r} == {1, 2}
    assert any("val/psnr" in r for r in records)
    info = json.loads((run / "refiner" / "training.json").read_text())
    assert info["steps"] == {"stage1": 2, "stage2": 2, "total": 4} and info["config"]["family"] == family
    model = Refiner.from_pretrained(run / "refiner")
    assert model.has_lora == (family == "lora")
    assert json.loads((run / "train_config.json").read_text())["model_preset"] == "tiny"


def test_pair_files_and_resume(tmp_path):
    pairs = tmp_path / "pairs.safetensors"
    TensorPairDataset.from_samples(synthetic_pairs(4, 32, seed=0)).save(pairs)
    run = tmp_path / "run"
    common = ["--data", str(pairs), "--out", str(run), "--preset", "tiny", "--resolution", "32", "--batch", "2",
              "--gan", "0", "--warmup", "0", "--log-every", "1", *FAST]
    assert train_main([*common, "--steps", "2"]) == 0
    assert train_main([*common, "--steps", "4", "--resume"]) == 0  # continues from the step-2 checkpoint
    steps = [r["step"] for r in _log(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_the_face_prior_losses_train_from_the_command_line(tmp_path):
    """--identity and --face-features: dlib's face network (the torch port) in the loss, logged per step."""
    run = tmp_path / "run"
    assert train_main(["--smoke", "--steps", "1", "--stage2-steps", "1", "--identity", "0.1", "--face-features", "0.05",
                       "--out", str(run), *FAST]) == 0
    config = json.loads((run / "train_config.json").read_text())
    assert config["identity_weight"] == 0.1 and config["face_feature_weight"] == 0.05
    steps = [r for r in _log(run) if "loss" in r]
    assert steps and all(r["id"] > 0 and r["face_fm"] > 0 for r in steps)


def test_the_face_prior_without_dlibs_model_files_is_one_line(tmp_path, capsys, monkeypatch):
    import models.face.identity as identity

    def missing(models_dir=None):
        raise identity.MissingEvalExtraError("face_recognition_models is not installed; pip install ...")

    monkeypatch.setattr(identity, "model_dir", missing)
    assert train_main(["--smoke", "--identity", "0.1", "--out", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("telepresence train: face_recognition_models is not installed") and "\n" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "{tmp}/missing", "--out", "{tmp}/run"], "--data '{tmp}/missing': no such file or folder"),
        (["--data", "{tmp}/notes.txt", "--out", "{tmp}/run"], "expected a pair file (.safetensors"),
        (["--data", "{tmp}/notes.txt"], "expected --out DIR"),
        (["--out", "{tmp}/run", "--steps", "3"], "expected --data (stage-1 pairs) for 3 stage-1 steps"),
        (["--smoke", "--family", "lora", "--base", "{tmp}", "--out", "{tmp}/run"], "holds neither refiner.json nor unet/config.json"),
        (["--captures", "{tmp}", "--prepare-only", "{tmp}/x.safetensors"], "--captures '{tmp}': expected {tmp}/cameras.json, got none"),
        (["--smoke", "--noise", "0.6", "0.2"], "expected 0 <= noise_min <= noise_max <= 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not pairs")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert train_main([*argv, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("telepresence train: ") and "\n" not in err
    assert message.replace("{tmp}", str(tmp_path)) in err
