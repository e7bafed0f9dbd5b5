"""Head-tracked parallax: where a participant's eyes are in front of their screen -> the camera offset
through which they see the others, like a window. docs/call.md gives the numbers and the reasons.

The input is the midpoint of the eyes in the participant's own capture camera (OpenCV frame, metres:
+x to the right of the picture, which is the participant's LEFT, +y down, +z away from the camera),
from `telepresence.pipeline.Analysis.eyes_m`. The watched person is taken to sit `depth_m` behind
the screen, seen head-on from eyes on the camera's axis (`neutral_y_m` below it); with x, y, z the eyes:

    yaw   = -gain * atan2(x, z + depth_m)                     degrees
    pitch = -gain * atan2(y - neutral_y_m, z + depth_m)       degrees
    dist  = (z + depth_m) / (rest_m + depth_m)

so the head moving to the participant's left (x > 0) moves the camera to the viewer's left (yaw < 0,
models/geometry/camera.py): more of the other person's right cheek shows, as through a window; eyes
above the screen's centre look down onto the head (pitch > 0); leaning in brings the camera closer.
The eyes are smoothed by a One-Euro filter (Casiez, Roussel, Vogel, CHI 2012) before the mapping,
and the offset is clamped to the sender's pose limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from models.face.smoothing import OneEuroFilter

from .messages import PoseLimits


@dataclass(frozen=True)
class HeadTrackingConfig:
    """The window model and its smoothing."""

    gain: float = 2.0
    """Multiplies the window's angles (1 = a true window; see docs/call.md for why 2)."""
    depth_m: float = 0.6
    """How far behind the screen the watched person's head is taken to be, metres."""
    rest_m: float = 0.6
    """The participant's distance from the camera at which the camera distance is unchanged, metres."""
    neutral_y_m: float = 0.0
    """Height of the eyes (below the camera, +y) that sees the others head-on, metres. 0: level with the
    camera, where people put their face in their own picture. A true window would take the screen's
    centre (about 0.10 m below a laptop's camera), showing everyone from above to a centred person."""
    min_cutoff_hz: float = 1.0
    """One-Euro filter: cutoff frequency of a head at rest (lower: steadier, more lag)."""
    beta: float = 0.2
    """One-Euro filter: cutoff added per cm/s of head speed (higher: less lag when moving)."""
    d_cutoff_hz: float = 1.0
    """One-Euro filter: cutoff of the speed estimate."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gain <= 10.0:
            raise ValueError(f"gain: expected 0..10, got {self.gain}")
        if self.depth_m <= 0 or self.rest_m <= 0:
            raise ValueError(f"expected depth_m > 0 and rest_m > 0, got {self.depth_m}, {self.rest_m}")
        if self.min_cutoff_hz <= 0 or self.d_cutoff_hz <= 0 or self.beta < 0:
            raise ValueError("expected min_cutoff_hz > 0, d_cutoff_hz > 0, beta >= 0")

    def degrees_per_cm(self, dist_m: Optional[float] = None) -> float:
        """Yaw (or pitch) change per cm of head motion near the axis, at `dist_m` (default rest_m)."""
        z = self.rest_m if dist_m is None else dist_m
        return self.gain * math.degrees(0.01 / (z + self.depth_m))


@dataclass(frozen=True)
class HeadOffset:
    """The camera offset one participant's head asks for (added to their orbit of each tile)."""

    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    dist_scale: float = 1.0
    tracking: bool = False
    """False: no face in the newest frame; the offset is the last one seen (or none yet)."""


def window_offset(eyes_m: np.ndarray, config: HeadTrackingConfig, limits: PoseLimits) -> HeadOffset:
    """The window mapping of the module doc: eyes [3] in the camera frame, metres -> clamped offset."""
    x, y, z = (float(v) for v in eyes_m)
    reach = max(z, 0.05) + config.depth_m  # eyes behind the camera's plane would be noise: keep it positive
    yaw = -config.gain * math.degrees(math.atan2(x, reach))
    pitch = -config.gain * math.degrees(math.atan2(y - config.neutral_y_m, reach))
    dist = reach / (config.rest_m + config.depth_m)
    return HeadOffset(
        yaw_deg=min(max(yaw, -limits.yaw_deg), limits.yaw_deg),
        pitch_deg=min(max(pitch, -limits.pitch_deg), limits.pitch_deg),
        dist_scale=min(max(dist, limits.dist_min), limits.dist_max),
        tracking=True,
    )


class HeadTracker:
    """One participant's eyes, frame after frame -> their smoothed, clamped HeadOffset."""

    lost_reset_s = 1.0
    """A face back after this long restarts the filter (no glide from where it was)."""

    def __init__(self, config: HeadTrackingConfig = HeadTrackingConfig(), limits: PoseLimits = PoseLimits()) -> None:
        self.config = config
        self.limits = limits
        # the filter runs in centimetres: beta is per cm/s
        self.filter = OneEuroFilter(config.min_cutoff_hz, config.beta, config.d_cutoff_hz)
        self.offset = HeadOffset()
        self._last_seen: Optional[float] = None

    def update(self, t_s: float, eyes_m: Optional[np.ndarray]) -> HeadOffset:
        """The offset after the frame captured at t_s (seconds) whose eyes are eyes_m [3] (None: no face)."""
        if eyes_m is None:
            self.offset = HeadOffset(self.offset.yaw_deg, self.offset.pitch_deg, self.offset.dist_scale, tracking=False)
            return self.offset
        if self._last_seen is not None and t_s - self._last_seen > self.lost_reset_s:
            self.filter.reset()
        self._last_seen = t_s
        smoothed_m = self.filter(t_s, np.asarray(eyes_m, np.float64) * 100.0) / 100.0
        self.offset = window_offset(smoothed_m, self.config, self.limits)
        return self.offset
