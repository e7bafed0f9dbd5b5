"""`telepresence render`: views, a contact sheet laid out one row per pitch, no stale views from an earlier run, and
nothing left behind on failure."""

import cv2
import pytest

from telepresence.cli import main


@pytest.mark.slow
def test_views_and_one_sheet_row_per_pitch(tmp_path, test_data):
    out = tmp_path / "views"
    code = main(["render", "--image", str(test_data / "lp_s42.jpg"), "--yaw", "-20", "0", "20", "--pitch", "-10", "10",
                 "--size", "64", "--refiner", "none", "--out", str(out)])
    assert code == 0
    assert len(list(out.glob("view_yaw*_pitch*.png"))) == 6
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    caption, gap = 14, 4  # contact_sheet's caption strip for 64 px pictures, and its gap
    assert sheet.shape[0] == gap + 2 * (caption + 64 + gap)  # two rows: one per pitch
    assert sheet.shape[1] == gap + 4 * (64 + gap)  # the source, then three yaws



@pytest.mark.slow
def test_a_reused_folder_keeps_only_this_runs_views(tmp_path, test_data, caplog):
    """An earlier run's views at other angles are removed (and said so in one line); other files are left alone."""
    out = tmp_path / "views"
    out.mkdir()
    for name in ("view_yaw+45_pitch+0.png", "view_yaw-7.5_pitch-10.png", "view_yaw+0_pitch+0.png",
                 "notes.png", "view_yaw+45_pitch+0 (copy).png", "view_front.png"):
        (out / name).write_bytes(b"old")
    with caplog.at_level("INFO", logger="telepresence.cli.render"):
        code = main(["render", "--image", str(test_data / "lp_s42.jpg"), "--yaw", "0", "20", "--size", "64",
                     "--refiner", "none", "--out", str(out)])
    assert code == 0
    assert sorted(f.name for f in out.glob("view_yaw*_pitch*.png")) == [
        "view_yaw+0_pitch+0.png", "view_yaw+20_pitch+0.png", "view_yaw+45_pitch+0 (copy).png"]
    assert (out / "view_yaw+0_pitch+0.png").read_bytes() != b"old"  # rewritten, not counted as removed
    assert (out / "notes.png").exists() and (out / "view_front.png").exists()
    assert [r.getMessage() for r in caplog.records if "removed" in r.getMessage()] == [
        f"removed 2 view(s) of an earlier run from {out}"]

def test_a_failed_render_leaves_no_output_folder(tmp_path, test_data, capsys):
    out = tmp_path / "never"
    code = main(["render", "--image", str(test_data / "lp_s33.jpg"), "--size", "64", "--refiner", "none", "--out", str(out)])
    assert code == 2  # a dog: no face
    assert "no face" in capsys.readouterr().err
    assert not out.exists()


def test_a_user_sees_only_the_projects_lines(tmp_path, test_data):
    """No TFLite/absl lines, no warnings: the one clear error is all that is printed (-v shows the rest)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = subprocess.run([sys.executable, "-m", "telepresence.cli", "render", "--image", str(test_data / "lp_s33.jpg"),
                          "--size", "64", "--refiner", "none", "--out", str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["telepresence render: no face found in the picture"], run.stderr
    verbose = subprocess.run([sys.executable, "-m", "telepresence.cli", "-v", "render", "--image",
                              str(test_data / "lp_s33.jpg"), "--size", "64", "--refiner", "none", "--out", str(tmp_path / "o")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 2 and len(verbose.stderr.splitlines()) > 1  # the native lines are there with -v


@pytest.mark.parametrize("flags, said", [
    (["--size", "0"], "--size: expected pixels in [16, 4096], got 0"),
    (["--size", "100000"], "--size: expected pixels in [16, 4096]"),
    (["--yaw", "nan"], "--yaw: expected a finite number, got nan"),
    (["--roll", "inf"], "--roll: expected a finite number"),
    (["--pitch", "0", "90"], "--pitch: expected degrees in [-89, 89], got 0 90"),
    (["--dist", "0"], "--dist: expected a multiple of the source's distance above 0.05"),
    (["--fov", "180"], "--fov: expected degrees in [1, 150], got 180"),
    (["--source-fov", "nan"], "--source-fov: expected degrees in [1, 150], got nan"),
    (["--device", "foo"], "--device foo: expected cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device mps: expected cpu, cuda or cuda:N"),
    (["--at", "3"], "--at: only with --video"),
    (["--no-memory", "--memory-every", "2"], "--memory-every, --no-memory: only with --video"),
    (["--out", " "], "--out: expected a folder"),
])
def test_every_option_is_checked_before_any_work(flags, said, tmp_path, capsys):
    argv = ["render", "--image", str(tmp_path / "not-read.jpg"), "--out", str(tmp_path / "views"), *flags]
    with pytest.raises(SystemExit) as stop:
        main(argv)  # the picture does not exist: an error about it would mean the options were not checked first
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("telepresence render: error: ") and said in err[-1], err
    assert not (tmp_path / "views").exists()


def test_video_options_are_checked_before_the_clip_is_read(tmp_path, capsys):
    for flags, said in ((["--at", "-1"], "--at: expected seconds from the start of the clip (0 or more), got -1"),
                        (["--at", "nan"], "--at: expected a finite number"),
                        (["--memory-every", "0"], "--memory-every: expected 1 or more, got 0"),
                        (["--memory-exclude", "nan:nan"], "expected finite seconds, got 'nan:nan'")):
        with pytest.raises(SystemExit):
            main(["render", "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "v"), *flags])
        assert said in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        main(["render", "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "a_file")])
    assert "--out " + str(tmp_path / "a_file") + ": exists and is not a folder" in capsys.readouterr().err


def test_memory_exclude_spans_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["render", "--video", "clip.mp4", "--out", "x", "--memory-exclude", "3:1"])
    assert "START <= END" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", "--video", "clip.mp4", "--image", "a.jpg", "--out", "x"])


def test_cuda_without_a_gpu_is_one_prefixed_line_and_bad_input(tmp_path, capsys):
    """It was a bare "--device cuda: ..." and exit status 1, where eval says the same with its name and 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is fine")
    code = main(["render", "--image", str(tmp_path / "not-read.jpg"), "--device", "cuda", "--out", str(tmp_path / "v")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "telepresence render: --device cuda: CUDA is not available on this machine (use --device cpu)"]


def test_a_video_time_past_the_end_or_without_a_face_says_which(tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.setenv("TELEPRESENCE_CACHE_DIR", str(tmp_path / "cache"))  # the clip's index is cached: keep it here
    clip = tmp_path / "grey.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 64))
    for _ in range(10):  # one second of grey: no face anywhere
        writer.write(np.full((64, 64, 3), 128, np.uint8))
    writer.release()
    capsys.readouterr()
    assert main(["render", "--video", str(clip), "--at", "5", "--size", "64", "--refiner", "none",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"telepresence render: --at 5: past the end of '{clip}' (1.0 s at 10 fps)")
    assert main(["render", "--video", str(clip), "--at", "0.5", "--size", "64", "--refiner", "none",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"telepresence render: --at 0.5: no face found in frame 5 of '{clip}'; none of its frames has one")
    assert not (tmp_path / "o").exists()


def test_an_out_folder_that_cannot_be_made_or_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--out under a file, or in a folder without write permission: one line at once, not a traceback (or a run that
    writes nothing) after the face analysis and the avatar."""
    (tmp_path / "a_file").write_text("")
    argv = ["render", "--image", str(tmp_path / "not-read.jpg"), "--size", "64", "--refiner", "none"]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "a_file" / "views")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"telepresence render: error: --out {tmp_path / 'a_file' / 'views'}: {tmp_path / 'a_file'} is not a folder")
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only folder is to a user who is not root
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path / "ro" / "views")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"telepresence render: error: --out {tmp_path / 'ro' / 'views'}: no permission to write in {tmp_path}")


def test_a_view_that_cannot_be_written_is_an_error_not_a_silent_success(tmp_path):
    """cv2.imwrite returns False where it cannot write (it raises nothing): the run said it had written the views."""
    import torch

    from models.geometry.camera import OrbitPose
    from telepresence.cli.render import StageTimer, _write

    (tmp_path / "contact_sheet.png").mkdir()  # in the way of the sheet
    views, reference = torch.rand(1, 3, 16, 16), torch.rand(3, 16, 16)
    with pytest.raises(OSError, match="cannot write .*contact_sheet.png"):
        _write(tmp_path, [OrbitPose()], views, reference, None, 1, StageTimer())
    assert (tmp_path / "view_yaw+0_pitch+0.png").is_file()


def test_a_refiner_folder_that_is_not_there_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--refiner PATH with nothing there: refused with the other flags (it was said only after the face analysis)."""
    import telepresence.cli.render as render

    monkeypatch.setattr(render, "read_still", lambda path: pytest.fail("read the image before refusing --refiner"))
    with pytest.raises(SystemExit) as stop:
        main(["render", "--image", str(tmp_path / "not-read.jpg"), "--size", "64", "--refiner",
              str(tmp_path / "nowhere"), "--out", str(tmp_path / "views")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"telepresence render: error: --refiner {tmp_path / 'nowhere'}: no such folder (expected ")
    assert not (tmp_path / "views").exists()


def test_a_refiner_that_cannot_be_loaded_is_one_line(tmp_path, test_data, capsys, monkeypatch):
    """--refiner FOLDER holding no refiner: one line and exit 2, not MissingModelError's traceback."""
    import telepresence.cli.render as render

    class Analyzer:  # the face analysis is not what this is about (and takes a second)
        def __init__(self, config):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def analyze(self, image):
            return object()

    monkeypatch.setattr(render, "FaceAnalyzer", Analyzer)
    (tmp_path / "empty").mkdir()
    code = main(["render", "--image", str(test_data / "lp_s42.jpg"), "--size", "64", "--refiner",
                 str(tmp_path / "empty"), "--out", str(tmp_path / "views")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"telepresence render: --refiner {tmp_path / 'empty'}: no refiner at ")
    assert "hf download" not in err[0]
    assert not (tmp_path / "views").exists()
