"""The one logging setup every command makes (telepresence.cli.console)."""
import os
import subprocess
import sys

from tests.conftest import REPO

OPEN_A_CORRUPT_CLIP = ("import sys; from telepresence.cli.console import configure_logging; configure_logging({verbose}); "
                       "import cv2; assert not cv2.VideoCapture(sys.argv[1]).isOpened()")


def test_ffmpegs_own_lines_are_quiet_unless_verbose(tmp_path):
    """A corrupt clip gave `render --video` and `eval` FFmpeg's "[mov,mp4,...] moov atom not found" above the one
    clear line; -v keeps it."""
    clip = tmp_path / "corrupt.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))  # an MP4 header and nothing after it
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}  # an earlier test's main() set it
    runs = {verbose: subprocess.run([sys.executable, "-c", OPEN_A_CORRUPT_CLIP.format(verbose=verbose), str(clip)],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            for verbose in (False, True)}
    assert runs[False].returncode == 0 and runs[False].stderr == "", runs[False].stderr
    assert runs[True].returncode == 0 and "moov atom not found" in runs[True].stderr, runs[True].stderr
