"""A cheap, pose-dependent FramePipeline (telepresence.pipeline) for streaming tests and benchmarks.

Each view is the input frame, resized to S x S, shifted by the camera orbit
(yaw moves the picture sideways, pitch up/down, dist scales it) with a red
marker whose position encodes the pose, so tests can see a pose change in
the decoded video. A frame darker than `dark_level` counts as "no face":
views then come from the last good frame (status "face_lost"), or a grey
placeholder before any (status "no_face_yet"). The "eyes" (head tracking) are the centroid of the
frame's bright pixels (luma over `head_level`), put in metres at `eyes_dist_m` from the camera through
the configured field of view: a bright disc moving on a dark clip is a head moving.

    telepresence send --pipeline tests.fake_pipeline:build_pipeline ...   (hidden flag, tests only)
    telepresence send --pipeline tests.fake_pipeline:build_pipeline_with_refiner ...  (says a refiner is on)

`build_failing_pipeline` makes one whose process a pure blue frame kills and a pure green frame hangs
(the faults of a call participant's pipeline process, telepresence.stream.worker).

Its appearance memory is a number: the fill grows by `memory_step` with every frame with a face and
reset_memory() (a viewer's reset button) puts it back to 0 on the next frame, as the real one does.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import cv2
import numpy as np

from models.geometry.camera import OrbitPose
from telepresence.pipeline import (
    STATUS_FACE_LOST,
    STATUS_NO_FACE_YET,
    STATUS_OK,
    Analysis,
    FrameResult,
    PipelineConfig,
)


def build_pipeline(config: PipelineConfig) -> "Pipeline":
    return Pipeline(config)


def build_pipeline_with_refiner(config: PipelineConfig) -> "Pipeline":
    """The same pictures, announced as refined (the page's refiner badge)."""
    pipeline = Pipeline(config)
    pipeline.refiner_name = "fake-refiner"
    return pipeline


def build_pipeline_naming_mps(config: PipelineConfig) -> "Pipeline":
    """The same pictures; its refiner name says which CUDA MPS pipe folder its process was given (worker env)."""
    import os

    pipeline = Pipeline(config)
    pipeline.refiner_name = f"mps pipe: {os.environ.get('CUDA_MPS_PIPE_DIRECTORY')}"
    return pipeline


def build_pipeline_refusing_mps(config: PipelineConfig) -> "Pipeline":
    """Does not start where it is given a CUDA MPS pipe folder (as a CUDA pipeline whose MPS server cannot be had)."""
    import os

    from telepresence.pipeline import PipelineUnavailableError

    if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        raise PipelineUnavailableError("CUDA error: MPS client failed to connect to the MPS control daemon or the MPS server")
    return build_pipeline_naming_mps(config)


def build_pipeline_compiling(config: PipelineConfig) -> "Pipeline":
    """Says its GPU kernels are compiling for its first 45 frames (1.5 s at 30 fps), then compiled."""
    pipeline = Pipeline(config)
    pipeline.compiling_frames = 45
    return pipeline


def build_failing_pipeline(config: PipelineConfig) -> "Pipeline":
    return FailingPipeline(config)


class Pipeline:
    dark_level = 8.0
    head_level = 160.0
    eyes_dist_m = 0.6
    memory_step = 0.01
    refiner_name: Optional[str] = None
    compiling_frames: Optional[int] = None  # report FrameResult.kernels: "compiling" this many frames, then "compiled"

    def __init__(self, config: PipelineConfig = PipelineConfig()) -> None:
        self.config = config
        self.size: int = config.size
        self.device = config.device
        self._last: Optional[np.ndarray] = None
        self.calls = 0
        self.view_counts: list[int] = []
        self.closed = False
        self.memory_fill = 0.0
        self.memory_resets = 0
        self._reset_memory = False

    def analyze(self, frame_rgb: np.ndarray, t_s: Optional[float] = None) -> Analysis:
        t0 = time.perf_counter()
        face = float(frame_rgb.mean()) > self.dark_level
        eyes = self._eyes_m(frame_rgb) if face else None
        return Analysis(True if face else None, (time.perf_counter() - t0) * 1e3, eyes)

    def _eyes_m(self, frame_rgb: np.ndarray) -> Optional[np.ndarray]:
        small = frame_rgb[::4, ::4].mean(axis=2)  # [H/4, W/4] luma
        ys, xs = np.nonzero(small > self.head_level)
        if xs.size == 0:
            return None
        H, W = frame_rgb.shape[:2]
        f = (H / 2) / np.tan(np.radians(self.config.source_fov_deg) / 2)
        u, v = xs.mean() * 4 + 2, ys.mean() * 4 + 2
        return np.array([(u - W / 2) / f * self.eyes_dist_m, (v - H / 2) / f * self.eyes_dist_m, self.eyes_dist_m])

    def process(self, frame_rgb: np.ndarray, poses: Sequence[OrbitPose], analysis: Optional[Analysis] = None) -> FrameResult:
        self.calls += 1
        self.view_counts.append(len(poses))
        if analysis is None:
            analysis = self.analyze(frame_rgb)
        face = analysis.observation is not None
        if self._reset_memory:
            self._reset_memory, self.memory_fill = False, 0.0
            self.memory_resets += 1
        if face:
            self.memory_fill = min(1.0, self.memory_fill + self.memory_step)
            self._last = cv2.resize(frame_rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
            status = STATUS_OK
        else:
            status = STATUS_FACE_LOST if self._last is not None else STATUS_NO_FACE_YET
        base = self._last if self._last is not None else np.full((self.size, self.size, 3), 96, np.uint8)
        views = [self._view(base, pose) for pose in poses]
        kernels = None if self.compiling_frames is None else "compiling" if self.calls <= self.compiling_frames else "compiled"
        return FrameResult(views, face, status, {"landmarks": analysis.landmarks_ms, "avatar": 0.1, "render": 0.2, "refine": 0.3},
                           self.memory_fill, kernels=kernels)

    def reset_memory(self) -> None:
        self._reset_memory = True

    def close(self) -> None:
        self.closed = True

    def _view(self, base: np.ndarray, pose: OrbitPose) -> np.ndarray:
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


BLUE, GREEN, MAGENTA = (0, 0, 255), (0, 255, 0), (255, 0, 255)


def is_colour(frame_rgb: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 40.0) -> bool:
    """Whether the frame is all one colour, near `rgb` (a video codec moves pure colours a little)."""
    return bool(np.abs(frame_rgb.reshape(-1, 3).mean(axis=0) - np.array(rgb)).max() < tolerance)


class FailingPipeline(Pipeline):
    """The fake pipeline, but a pure blue frame ends its process (exit code 3) and a pure green one
    makes process() hang: a call participant's pipeline that crashes or stops answering. A magenta one
    holds process() up for COMPILE_S while its kernels() says "compiling" (compile_avatar "wait")."""

    COMPILE_S = 5.0
    compiling = False

    def kernels(self) -> Optional[str]:
        return "compiling" if self.compiling else None

    def process(self, frame_rgb: np.ndarray, poses: Sequence[OrbitPose], analysis: Optional[Analysis] = None) -> FrameResult:
        if is_colour(frame_rgb, BLUE):
            os._exit(3)
        if is_colour(frame_rgb, GREEN):
            time.sleep(3600)
        if is_colour(frame_rgb, MAGENTA):
            self.compiling = True
            time.sleep(self.COMPILE_S)
            self.compiling = False
        if is_colour(frame_rgb, (255, 0, 0)):
            raise ValueError("a red frame")
        return super().process(frame_rgb, poses, analysis)
