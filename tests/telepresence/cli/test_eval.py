"""`telepresence eval` argument handling, on tiny clips and multi-camera sets."""
import json
import logging
import sys

import pytest

from telepresence.cli.eval import eval_main
from tests.fake_avatar import fake_avatar_module
from tests.multiview_sets import write_photo_set
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


def test_a_run_that_evaluates_nothing_keeps_an_earlier_runs_results(tmp_path, capsys):
    """A corrupt clip (bad input) used to overwrite --out's results.json and results.md with empty tables."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"pairs": ["an earlier run"]}')
    (out / "results.md").write_text("an earlier run")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video")
    code = eval_main(["--clips", str(tmp_path / "corrupt.mp4"), "--out", str(out), "--methods", "baseline",
                      "--no-identity", "--no-cache", "-q"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"telepresence eval: no clip could be evaluated (nothing written to {out})" in err and "skipped corrupt: " in err
    assert (out / "results.json").read_text() == '{"pairs": ["an earlier run"]}'
    assert (out / "results.md").read_text() == "an earlier run" and sorted(p.name for p in out.iterdir()) == [
        "results.json", "results.md"]


def test_eval_names_the_missing_avatar(clip_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "models.avatar", None)  # as if the avatar were not installed
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", "none", "--no-cache", "-q"])
    assert code == 2
    assert "models.avatar" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "magic"]) == 2
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "baseline"]) == 2
    assert "no video files" in capsys.readouterr().err


def test_a_refiner_path_that_does_not_exist_is_an_error(clip_dir, tmp_path, capsys):
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", str(tmp_path / "nowhere"),
                      "--no-cache", "-q"])
    assert code == 2
    assert "refiner weights not found" in capsys.readouterr().err


def test_default_refiner_with_nothing_shipped_falls_back_to_the_raw_avatar_like_the_demo(
        clip_dir, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TELEPRESENCE_WEIGHTS", str(tmp_path / "no-weights"))  # nothing shipped here
    monkeypatch.setitem(sys.modules, "models.avatar", fake_avatar_module())
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):
        code = eval_main(["--clips", str(clip_dir), "--out", str(out), "--size", "64", "--max-pairs", "2",
                          "--methods", "baseline", "raw,refined",  # space- and comma-separated alike
                          "--no-identity", "--no-landmarks", "--no-flicker", "--no-cache", "-q"])
    assert code == 0, capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if "refine" in r.getMessage()]
    assert len(said) == 1 and "no shipped refiner weights" in said[0] and "raw avatar" in said[0]
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["methods"] == ["baseline", "raw"] and doc["meta"]["refiner"] is None
    assert "refined: not run (no refiner weights shipped" in (out / "results.md").read_text()
    assert "raw       PSNR head [dB]" in capsys.readouterr().out


def test_eval_multiview_sets_beside_clips(clip_dir, tmp_path, capsys):
    sets = tmp_path / "sets"
    write_photo_set(sets / "astronaut")
    out = tmp_path / "eval"
    code = eval_main(["--clips", str(clip_dir / "face.mp4"), "--multiview", str(sets), "--out", str(out),
                      "--methods", "baseline", "--size", "96", "--no-identity", "--no-cache", "-q", "--max-pairs", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "reenactment (other frame of a clip): 1 clip(s)" in printed
    assert "multi-camera (same moment): 1 set(s), 2 targets" in printed and "60+:" in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["clips"] == ["face"] and doc["multiview"]["sets"] == ["astronaut"]


def test_eval_multiview_argument_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert eval_main(["--out", str(tmp_path / "o")]) == 2
    assert "--clips PATH ... and/or --multiview DIR" in capsys.readouterr().err
    assert eval_main(["--multiview", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert eval_main(["--multiview", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no multi-camera sets" in capsys.readouterr().err
    assert eval_main(["--multiview", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "raw", "magic"]) == 2


def test_cuda_without_a_gpu_and_an_out_that_is_a_file_are_one_line_each(tmp_path, capsys):
    import torch

    from telepresence.cli.eval import eval_main

    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "a_file").write_text("")
    assert eval_main(["--clips", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "a_file")]) == 2
    assert capsys.readouterr().err.strip() == f"telepresence eval: --out {tmp_path / 'a_file'}: exists and is not a folder"
    if not torch.cuda.is_available():  # on a GPU machine the device is fine: only the --out check above applies
        assert eval_main(["--clips", str(tmp_path / "clip.mp4"), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [
    (["--size", "10"], "--size 10: expected pixels in [32, 2048], got 10"),
    (["--max-pairs", "0"], "--max-pairs 0: expected >= 1, got 0"),
    (["--stride", "0"], "--stride 0: expected >= 1, got 0"),
])
def test_a_bad_number_names_its_flag_not_the_config_field(flags, said, tmp_path, capsys):
    """EvalConfig's "expected size in [32, 2048]" and "expected max_pairs_per_bin >= 1" named no flag the user typed."""
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "baseline", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"telepresence eval: {said}"]
