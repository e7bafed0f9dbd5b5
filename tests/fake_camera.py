"""Clips for Chromium's fake camera (`--use-file-for-fake-video-capture=FILE.y4m`) and for Python
participants: the embedded sample, a head that turns (tests/data lp_d12 frames), a synthetic head
(a bright disc on a dark ground, which the fake pipeline tracks) that moves to one side.

Chromium reads YUV4MPEG2 with a C420 header (planar I420), plays it at the header's rate and loops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tests.conftest import REPO, TEST_DATA

SAMPLE = REPO / "telepresence" / "assets" / "sample.mp4"
TURN_FRAMES = ("lp_d12_f000.jpg", "lp_d12_f105.jpg")
"""The first and the last of the head-turn frames: the head turned one way, then the other."""


def write_y4m(path: Path, frames: Sequence[np.ndarray], fps: int) -> Path:
    """RGB uint8 [H, W, 3] frames (even H, W) -> a YUV4MPEG2 C420 file."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


def sample_frames(side: int = 320, step: int = 2) -> list[np.ndarray]:
    """Every `step`-th frame of the embedded sample clip, side x side RGB."""
    capture = cv2.VideoCapture(str(SAMPLE))
    frames = []
    index = 0
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (side, side), interpolation=cv2.INTER_AREA))
        index += 1
    capture.release()
    return frames


def turn_pictures(side: int = 320) -> list[np.ndarray]:
    """The two head-turn pictures (TURN_FRAMES), side x side RGB."""
    out = []
    for name in TURN_FRAMES:
        bgr = cv2.imread(str(TEST_DATA / name))
        out.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (side, side), interpolation=cv2.INTER_AREA))
    return out


def turn_frames(fps: int, hold_s: float = 2.0, side: int = 320) -> list[np.ndarray]:
    """The head turned one way for hold_s, then the other way for hold_s (a loop of 2 hold_s)."""
    first, last = turn_pictures(side)
    n = int(round(hold_s * fps))
    return [first] * n + [last] * n


def head_frame(offset: float, width: int = 320, height: int = 240) -> np.ndarray:
    """A synthetic head: a bright disc on a dark ground, `offset` (-1..1) of the half width right of centre."""
    image = np.full((height, width, 3), 40, np.uint8)
    centre = (int(width / 2 + offset * width / 2), height // 2)
    cv2.circle(image, centre, height // 6, (235, 225, 215), -1)
    return image


def head_moving_frames(offset: float, fps: int, move_s: float = 0.5, stay_s: float = 4.5) -> list[np.ndarray]:
    """The synthetic head moving from the centre to `offset` in move_s, then staying there stay_s."""
    moving = int(round(move_s * fps))
    return [head_frame(offset * (i + 1) / moving) for i in range(moving)] + [head_frame(offset)] * int(round(stay_s * fps))
