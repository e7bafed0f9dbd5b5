"""Bad and extreme pictures given to `send` and `render`: one clear line, exit 2, the same for both;
pictures larger than the pipeline uses are downscaled on load."""

import logging
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from telepresence.stream.capture import MAX_SOURCE_SIDE, open_source
from tests.conftest import REPO, TEST_DATA

MAXRSS = "import resource, sys; from telepresence.cli import main; code = main(sys.argv[1:]); " \
         "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)"


def telepresence(*args, timeout_s=120):
    """`telepresence ARGS` from this checkout, reporting its peak memory on stderr."""
    return subprocess.run([sys.executable, "-c", MAXRSS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def peak_rss_mb(result):
    return int(re.search(r"maxrss_kb (\d+)", result.stderr).group(1)) / 1024


@pytest.fixture(scope="module")
def bad_pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(folder / "small.png"), np.zeros((12, 40, 3), np.uint8))
    jpeg = (TEST_DATA / "lp_s10.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("not a picture")
    (folder / "folder.png").mkdir()
    return folder


CASES = [
    ("tiny.png", "too small"),
    ("small.png", "too small"),
    ("truncated.jpg", "not an image file, or corrupt"),
    ("text.png", "not an image file, or corrupt"),
    ("folder.png", "is a directory"),
    ("missing.png", "no such file"),
]


@pytest.mark.slow  # two processes per case
@pytest.mark.parametrize("name, message", CASES)
def test_send_and_render_reject_a_bad_picture_alike(bad_pictures, tmp_path, name, message):
    path = str(bad_pictures / name)
    send = telepresence("send", "--source", path, "--signaling", "ws://127.0.0.1:9/ws", "--pipeline", "tests.fake_pipeline")
    render = telepresence("render", "--image", path, "--out", str(tmp_path), "--refiner", "none")
    for command, result in (("send", send), ("render", render)):
        lines = [line for line in result.stderr.splitlines() if not line.startswith("maxrss_kb")]
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (command, result.stderr[-2000:])
        errors = [line for line in lines if message in line]
        assert len(errors) == 1 and path in errors[0], (command, lines)


@pytest.mark.slow
def test_a_directory_is_named_as_one_for_send(bad_pictures):
    result = telepresence("send", "--source", str(bad_pictures), "--signaling", "ws://127.0.0.1:9/ws",
                          "--pipeline", "tests.fake_pipeline")
    assert result.returncode == 2 and "is a directory" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def huge_picture(tmp_path_factory):
    """A 10000 x 10000 JPEG of a real face (the test still, enlarged)."""
    face = cv2.imread(str(TEST_DATA / "lp_s10.jpg"))
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    cv2.imwrite(str(path), cv2.resize(face, (10000, 10000), interpolation=cv2.INTER_LINEAR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return path


def test_a_huge_still_is_downscaled_on_load_for_send(huge_picture, caplog):
    with caplog.at_level(logging.INFO):
        source = open_source(str(huge_picture))
    source.grab()
    assert source.retrieve().shape == (MAX_SOURCE_SIDE, MAX_SOURCE_SIDE, 3)
    assert len([r for r in caplog.records if "downscaled" in r.getMessage()]) == 1


@pytest.mark.slow
def test_a_huge_still_renders_in_about_the_memory_of_a_capped_one(huge_picture, tmp_path):
    """Peak memory of `render` on the 10000 px still against the same still at the 1920 px cap: the
    only extra is decoding the file once (10000 x 10000 x 3 bytes = 286 MB) before it is downscaled."""
    capped = tmp_path / "capped.jpg"
    cv2.imwrite(str(capped), cv2.resize(cv2.imread(str(TEST_DATA / "lp_s10.jpg")), (MAX_SOURCE_SIDE, MAX_SOURCE_SIDE)))
    peaks = {}
    for name, path in (("huge", huge_picture), ("capped", capped)):
        result = telepresence("render", "--image", str(path), "--out", str(tmp_path / name), "--refiner", "none",
                              "--size", "128", "--yaw", "0", "20", timeout_s=300)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = peak_rss_mb(result)
        if name == "huge":
            assert len(re.findall(r"downscaled .*10000x10000 to 1920x1920", result.stderr)) == 1, result.stderr[-2000:]
    assert peaks["huge"] < peaks["capped"] + 450, peaks


class _Analyzer:
    """models.face.analysis.FaceAnalyzer as the still's check uses it, without MediaPipe's second of start-up."""

    face = False
    configs = []

    def __init__(self, config):
        self.configs.append(config)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def analyze(self, image, with_mask=None):
        from models.face.analysis import NoFaceError

        if not self.face:
            raise NoFaceError("no face found in the picture")
        return object()


@pytest.fixture
def analyzer(monkeypatch):
    import models.face.analysis

    monkeypatch.setattr(_Analyzer, "configs", [])
    monkeypatch.setattr(models.face.analysis, "FaceAnalyzer", _Analyzer)
    return _Analyzer


def test_a_still_without_a_face_is_refused_before_the_sender_loads_or_joins(analyzer, tmp_path, caplog, monkeypatch):
    """`send --source noface.png` joined its room and sat silent: its user heard nothing, and its viewers would
    have waited for a face a still never shows. Now one line and exit 2, as for an unreadable picture."""
    from telepresence.cli import main, send

    async def join(sender):  # were the check gone, the sender would retry its join forever: fail at once instead
        raise AssertionError("the sender went on to join its room")

    monkeypatch.setattr(send, "serve", join)

    still = tmp_path / "noface.png"
    cv2.imwrite(str(still), np.full((64, 64, 3), 128, np.uint8))
    with caplog.at_level(logging.INFO, logger="telepresence"):
        code = main(["send", "--source", str(still), "--signaling", "ws://127.0.0.1:9/ws", "--pipeline",
                     "tests.fake_pipeline"])
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"--source {still}: no face found in the picture (a still never shows one later: the viewers would see nothing)"]
    assert not any("loading the pipeline" in r.getMessage() for r in caplog.records)
    assert [c.static_image for c in analyzer.configs] == [True]


def test_a_still_with_a_face_is_checked_once_and_a_clip_not_at_all(analyzer, tmp_path):
    from telepresence.cli.options import open_source_from_args

    analyzer.face = True
    still = tmp_path / "face.png"
    cv2.imwrite(str(still), np.full((64, 64, 3), 128, np.uint8))
    source = open_source_from_args(str(still))
    source.grab()
    assert source.retrieve().shape == (64, 64, 3) and len(analyzer.configs) == 1
    open_source_from_args("sample").close()
    assert len(analyzer.configs) == 1
