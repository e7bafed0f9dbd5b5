"""`telepresence eval` argument handling, on tiny clips."""
import json
import sys
import pytest

from telepresence.cli.eval import eval_main
from tests.tiny_clips import write_face_clip, write_faceless_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_face_clip(d / "face.mp4", n=8)
    write_faceless_clip(d / "noise.mp4", n=4)
    return d


def test_eval_baseline_only_writes_results_and_reports_the_faceless_clip(clip_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_main(["--clips", str(clip_dir), "--out", str(out), "--methods", "baseline", "--size", "96",
                      "--no-identity", "--no-cache", "-q", "--max-pairs", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped noise: no face" in captured.err
    assert "baseline  PSNR head [dB]  0-10:" in captured.out
    doc = json.loads((out / "results.json").read_text())
    assert doc["clips"] == ["face"] and doc["skipped"][0]["clip"] == "noise"
    assert "raw, refined: not run (--methods baseline)" in (out / "results.md").read_text()


def test_eval_with_only_faceless_clips_fails_cleanly(tmp_path, capsys):
    write_faceless_clip(tmp_path / "noise.mp4", n=3)
    code = eval_main(["--clips", str(tmp_path / "noise.mp4"), "--out", str(tmp_path / "o"), "--methods", "baseline",
                      "--no-identity", "--no-cache", "-q"])
    assert code == 1
    assert "no clip could be evaluated" in capsys.readouterr().err


def test_eval_names_the_missing_avatar(clip_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "models.avatar", None)  # as if the avatar were not installed
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", "none", "--no-cache", "-q"])
    assert code == 2
    assert "models.avatar" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "magic"]) == 2
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "baseline"]) == 2
    assert "no video files" in capsys.readouterr().err


def test_missing_refiner_weights_are_an_error_not_a_silent_fallback(clip_dir, tmp_path, capsys):
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", str(tmp_path / "nowhere"),
                      "--no-cache", "-q"])
    assert code == 2
    assert "refiner weights not found" in capsys.readouterr().err
