"""Tiny test videos written on the fly (no data files in the repository)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def astronaut_face(size: int = 256) -> np.ndarray:
    """The public-domain astronaut portrait cropped to her head, RGB uint8 [size, size, 3]."""
    import skimage.data

    return cv2.resize(skimage.data.astronaut()[0:320, 90:410], (size, size), interpolation=cv2.INTER_AREA)


def turned(image: np.ndarray, angle_rad: float, shift_px: float = 0.0) -> np.ndarray:
    """Fake a head turn: the homography of a camera rotating about its vertical axis, re-centred, plus a shift."""
    H, W = image.shape[:2]
    f = 1.2 * W
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    R = cv2.Rodrigues(np.array([0.0, angle_rad, 0.0]))[0]
    M = K @ R @ np.linalg.inv(K)
    c = M @ np.array([W / 2, H / 2, 1.0])
    # Keep the picture centre in place (a turn, not a pan), then shift.
    M = np.array([[1, 0, W / 2 - c[0] / c[2] + shift_px], [0, 1, H / 2 - c[1] / c[2]], [0, 0, 1]]) @ M
    return cv2.warpPerspective(image, M, (W, H), borderMode=cv2.BORDER_REFLECT)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Write RGB uint8 frames as an mp4 (OpenCV's mp4v)."""
    H, W = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


def write_face_clip(path: Path, n: int = 10, size: int = 160) -> Path:
    """A head 'turning' from one side to the other while drifting a little."""
    face = astronaut_face(size)
    frames = [turned(face, 0.05 * (k - n / 2), shift_px=0.5 * k) for k in range(n)]
    return write_video(path, frames)


def write_faceless_clip(path: Path, n: int = 6, size: int = 96) -> Path:
    """Gradients and noise: no face anywhere."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    frames = []
    for k in range(n):
        img = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 40.0 * k)], 2)
        img += rng.normal(0, 20, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return write_video(path, frames)
