"""Smoothing over frames: the One-Euro filter, and the face's landmarks smoothed with it for a live avatar.

MediaPipe's landmarks jitter by a fraction of a pixel to a pixel from frame to frame on a head at rest
(median frame-to-frame motion 0.86 % of the inter-ocular distance on the memory report's clips). The
avatar's mesh follows them, so a viewer sees the head wobble and the texture of surface the frame
does not show (the fill, the appearance memory) slide. Smoothed by a One-Euro filter (slow motion smoothed
hard, fast motion barely), the motion falls to 0.55 % IOD and the orbit views' flicker by 7 % (docs/avatar.md),
for about one frame of lag in the mouth's opening.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from models.face.analysis import LEFT_EYE_OUTER, RIGHT_EYE_OUTER, FaceObservation, observation_from_landmarks

__all__ = ["LandmarkSmoother", "OneEuroFilter"]


class OneEuroFilter:
    """Speed-adaptive low-pass filter of a vector signal (Casiez, Roussel, Vogel, CHI 2012).

    Each sample: dx = (x - x_prev) / dt, smoothed at d_cutoff_hz; the cutoff for x is
    min_cutoff_hz + beta * |dx| (per component); each low-pass step is x_hat += a (x - x_hat) with
    a = 1 / (1 + tau / dt), tau = 1 / (2 pi cutoff). Slow motion is smoothed hard, fast motion barely.
    """

    def __init__(self, min_cutoff_hz: float, beta: float, d_cutoff_hz: float) -> None:
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.d_cutoff_hz = d_cutoff_hz
        self._t: Optional[float] = None
        self._x: Optional[np.ndarray] = None
        self._dx: Optional[np.ndarray] = None

    @staticmethod
    def _alpha(cutoff_hz: np.ndarray | float, dt_s: float) -> np.ndarray | float:
        tau = 1.0 / (2.0 * math.pi * cutoff_hz)
        return 1.0 / (1.0 + tau / dt_s)

    @property
    def last_t(self) -> Optional[float]:
        """Time of the last sample filtered (None: none since the start or the last reset)."""
        return self._t

    def reset(self) -> None:
        self._t = self._x = self._dx = None

    def __call__(self, t_s: float, x: np.ndarray) -> np.ndarray:
        """Filter sample x [D] taken at t_s seconds; a sample not newer than the last returns the last output."""
        x = np.asarray(x, np.float64)
        if self._x is None or self._t is None or x.shape != self._x.shape:
            self._t, self._x, self._dx = t_s, x.copy(), np.zeros_like(x)
            return self._x.copy()
        dt = t_s - self._t
        if dt <= 0:
            return self._x.copy()
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(self.d_cutoff_hz, dt) * (dx - self._dx)
        cutoff = self.min_cutoff_hz + self.beta * np.abs(self._dx)
        self._x = self._x + self._alpha(cutoff, dt) * (x - self._x)
        self._t = t_s
        return self._x.copy()


class LandmarkSmoother:
    """A live face's landmarks smoothed over frames (a One-Euro filter per coordinate); the observation's
    metric points and head pose are worked out again from them (models.face.analysis.observation_from_landmarks).

    beta is per inter-ocular distance per second, so the same motion of the face is smoothed alike at any
    picture size. A face back after ``reset_after_s`` without one, or a picture of another size, starts afresh
    (no glide from where the face was), and so does a frame stamped before the last (a clip that loops)."""

    def __init__(self, min_cutoff_hz: float = 1.0, beta_iod: float = 4.0, d_cutoff_hz: float = 1.0,
                 reset_after_s: float = 0.5) -> None:
        self.beta_iod = beta_iod
        self.reset_after_s = reset_after_s
        self.filter = OneEuroFilter(min_cutoff_hz, beta_iod, d_cutoff_hz)
        self._size: Optional[tuple[int, int]] = None

    def reset(self) -> None:
        self.filter.reset()

    def __call__(self, t_s: float, obs: FaceObservation) -> FaceObservation:
        """The observation of the frame captured at t_s seconds, its landmarks smoothed."""
        last = self.filter.last_t
        if tuple(obs.image_size) != self._size or (last is not None and not 0.0 <= t_s - last <= self.reset_after_s):
            self.filter.reset()
            self._size = tuple(obs.image_size)
        lm = obs.landmarks_px.astype(np.float64)
        iod = float(np.hypot(*(lm[LEFT_EYE_OUTER, :2] - lm[RIGHT_EYE_OUTER, :2])))
        self.filter.beta = self.beta_iod / max(iod, 1.0)  # per pixel per second at this face's size
        smoothed = self.filter(t_s, lm.reshape(-1)).reshape(lm.shape).astype(np.float32)
        return observation_from_landmarks(smoothed, obs.image_size, obs.fov_deg, obs.mask)
