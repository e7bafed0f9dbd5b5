"""Test double for telepresence.pipeline (the lead's module): same names, cheap, pose-dependent.

Each view is the input frame, resized to S x S, shifted by the camera orbit
(yaw moves the picture sideways, pitch up/down, dist scales it) with a red
marker whose position encodes the pose, so tests can see a pose change in
the decoded video. A frame darker than `dark_level` counts as "no face":
views then come from the last good frame (status "face_lost"), or a grey
placeholder before any (status "no_face_yet").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class ViewPose:
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    dist_scale: float = 1.0


@dataclass(frozen=True)
class PipelineConfig:
    device: str = "cpu"
    size: int = 256
    refiner: Optional[str] = "default"


@dataclass
class FrameResult:
    views: list[np.ndarray]
    face_found: bool
    status: str
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    dark_level = 8.0

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.size = config.size
        self._last: Optional[np.ndarray] = None
        self.calls = 0
        self.view_counts: list[int] = []

    def process(self, frame_rgb: np.ndarray, poses: Sequence[ViewPose]) -> FrameResult:
        self.calls += 1
        self.view_counts.append(len(poses))
        face = float(frame_rgb.mean()) > self.dark_level
        if face:
            self._last = cv2.resize(frame_rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
            status = "ok"
        else:
            status = "face_lost" if self._last is not None else "no_face_yet"
        base = self._last if self._last is not None else np.full((self.size, self.size, 3), 96, np.uint8)
        views = [self._view(base, pose) for pose in poses]
        return FrameResult(views, face, status, {"landmarks": 0.1, "avatar": 0.1, "render": 0.2, "refine": 0.3})

    def _view(self, base: np.ndarray, pose: ViewPose) -> np.ndarray:
        s = self.size
        dx = -pose.yaw_deg / 100.0 * s  # camera to the right: the head moves left in the picture
        dy = pose.pitch_deg / 100.0 * s
        scale = 1.0 / pose.dist_scale
        m = np.float32([[scale, 0, (1 - scale) * s / 2 + dx], [0, scale, (1 - scale) * s / 2 + dy]])
        view = cv2.warpAffine(base, m, (s, s), borderMode=cv2.BORDER_REPLICATE)
        centre = (int(s / 2 + pose.yaw_deg / 50.0 * s / 2), int(s / 2 - pose.pitch_deg / 50.0 * s / 2))
        cv2.circle(view, centre, s // 12, (255, 255, 255), -1)
        cv2.circle(view, centre, s // 16, (230, 20, 20), -1)
        return view
