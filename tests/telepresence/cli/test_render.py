"""`telepresence render`: views, a contact sheet laid out one row per pitch, and nothing left behind on failure."""

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


def test_memory_exclude_spans_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["render", "--video", "clip.mp4", "--out", "x", "--memory-exclude", "3:1"])
    assert "START <= END" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["render", "--video", "clip.mp4", "--image", "a.jpg", "--out", "x"])


def test_a_video_time_past_the_end_or_without_a_face_says_which(tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.setenv("TELEPRESENCE_CACHE_DIR", str(tmp_path / "cache"))  # the clip's index is cached: keep it here
    clip = tmp_path / "grey.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (64, 64))
    for _ in range(10):  # one second of grey: no face anywhere
        writer.write(np.full((64, 64, 3), 128, np.uint8))
    writer.release()
    with pytest.raises(SystemExit) as past:
        main(["render", "--video", str(clip), "--at", "5", "--size", "64", "--refiner", "none", "--out", str(tmp_path / "o")])
    assert str(past.value) == f"--at 5: past the end of '{clip}' (1.0 s at 10 fps)"
    with pytest.raises(SystemExit) as faceless:
        main(["render", "--video", str(clip), "--at", "0.5", "--size", "64", "--refiner", "none", "--out", str(tmp_path / "o")])
    assert str(faceless.value) == f"--at 0.5: no face found in frame 5 of '{clip}'; none of its frames has one"
    assert not (tmp_path / "o").exists()
