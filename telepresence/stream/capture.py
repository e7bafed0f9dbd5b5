"""Capture sources and the capture thread.

A source follows OpenCV's capture model: `grab()` blocks until the next frame
is due (a webcam's next exposure, or a file's next frame at its own frame
rate), `retrieve()` decodes it to RGB. The capture thread stamps the moment
`grab()` returns as the frame's capture time and hands the frame on through a
newest-wins slot, so a slow pipeline drops camera frames instead of queueing
them.

Sources: `WebcamSource` (camera index), `VideoFileSource` (loops),
`ImageSource` (a still, repeated at a fixed rate) and `SampleSource` (the
embedded clip, see assets/README.md). `open_source()` parses the command-line
spelling of each.

Frames reach the pipeline between MIN_SOURCE_SIDE and MAX_SOURCE_SIDE pixels a
side: a still is read by `read_still` (also `telepresence render`'s reader: the same
checks and messages) and downscaled once on load; a larger video or camera frame
is downscaled by the capture thread (said once in the log); a source whose frames
are too small stops the capture thread, which reports it.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.resources
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from models.face.analysis import MIN_IMAGE_SIDE, ImageReadError, read_image

from .slot import LatestSlot

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MAX_SOURCE_SIDE = 1920
"""Longer side of the frames handed to the pipeline, pixels: face analysis and the avatar's
texture need no more, and a 10000 px still would cost gigabytes per frame."""
MIN_SOURCE_SIDE = MIN_IMAGE_SIDE
"""Shorter side below which face analysis cannot work, pixels."""


class SourceError(RuntimeError):
    """A capture source could not be opened or read."""


class CameraNotFoundError(SourceError):
    """No camera answers at the requested index."""


@dataclass(frozen=True)
class CapturedFrame:
    """One frame as it left the capture stage."""

    image: np.ndarray = field(repr=False)
    """[H, W, 3] uint8 RGB; read-only, shared with later stages."""
    frame_id: int
    """Counts frames from 0 since the capture thread started."""
    t_capture: float
    """Wall-clock time (time.time(), seconds) at which the frame was grabbed."""
    capture_ms: float
    """Time spent decoding and converting this frame."""

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"expected a [H, W, 3] uint8 image, got {self.image.shape} {self.image.dtype}")


class FrameSource(abc.ABC):
    """A stream of RGB frames."""

    name: str = "source"
    fps: float = 30.0

    @abc.abstractmethod
    def grab(self) -> None:
        """Block until the next frame is available (raises SourceError on failure)."""

    @abc.abstractmethod
    def retrieve(self) -> np.ndarray:
        """The grabbed frame as a read-only [H, W, 3] uint8 RGB array."""

    def close(self) -> None:
        """Release the device or file."""

    def frame_time(self) -> Optional[float]:
        """When the frame just retrieved was taken (time.time() seconds), for a source that knows it
        better than the moment grab() returned (a remote camera that stamps its frames); None: that moment."""
        return None

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pacer:
    """Sleeps so that successive calls are 1/fps apart; resyncs instead of bursting after a stall."""

    def __init__(self, fps: float) -> None:
        self.interval_s = 1.0 / fps
        self._next = time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
            self._next += self.interval_s
        else:
            self._next = now + self.interval_s


def _to_rgb(image_bgr: np.ndarray) -> np.ndarray:
    if image_bgr.ndim == 2:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2RGB)
    elif image_bgr.shape[2] == 4:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2RGB)
    else:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)
    return rgb


class WebcamSource(FrameSource):
    """A local camera by OpenCV index; the camera paces itself."""

    def __init__(self, index: int = 0, width: int = 640, height: int = 480) -> None:
        self.name = f"webcam {index}"
        if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{index}"):
            # Checked first so that a camera-less server gets one clear line, not OpenCV's warnings.
            raise CameraNotFoundError(f"no camera at index {index} (/dev/video{index} does not exist)")
        self._capture = cv2.VideoCapture(index)
        if not self._capture.isOpened():
            raise CameraNotFoundError(f"no camera at index {index} (OpenCV could not open it)")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest exposure, not a driver backlog
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 30.0

    def grab(self) -> None:
        if not self._capture.grab():
            raise SourceError(f"{self.name} stopped delivering frames")

    def retrieve(self) -> np.ndarray:
        ok, image = self._capture.retrieve()
        if not ok or image is None:
            raise SourceError(f"{self.name} returned an empty frame")
        return _to_rgb(image)

    def close(self) -> None:
        self._capture.release()


class VideoFileSource(FrameSource):
    """A video file played at its own frame rate (or ``fps``), looping at the end."""

    def __init__(self, path: str | os.PathLike, loop: bool = True, fps: float | None = None) -> None:
        fps = None if fps is None else check_fps(fps)
        self.path = Path(path)
        self.name = self.path.name
        self.loop = loop
        if not self.path.is_file():
            raise SourceError(f"no such video file: {self.path}")
        self._capture = self._open()
        if not self._capture.grab():
            self._capture.release()
            raise SourceError(f"cannot decode video file: {self.path}")
        self._grabbed = True  # the check above already holds frame 0
        self.fps = self._capture.get(cv2.CAP_PROP_FPS) or 25.0
        if not 1.0 <= self.fps <= 240.0:
            self.fps = 25.0
        if fps is not None:
            self.fps = fps
        self._pacer = _Pacer(self.fps)

    def _open(self) -> cv2.VideoCapture:
        # FFmpeg's own messages ("moov atom not found") would precede our one-line SourceError; silence
        # them unless the user asked for a level. OpenCV reads this variable when it opens a file.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise SourceError(f"cannot open video file: {self.path}")
        return capture

    def grab(self) -> None:
        self._pacer.wait()
        if self._grabbed:
            self._grabbed = False
            return
        if self._capture.grab():
            return
        if not self.loop:
            raise SourceError(f"{self.name} ended")
        self._capture.release()  # reopening is more robust than seeking across containers
        self._capture = self._open()
        if not self._capture.grab():
            raise SourceError(f"cannot decode video file: {self.path}")

    def retrieve(self) -> np.ndarray:
        ok, image = self._capture.retrieve()
        if not ok or image is None:
            raise SourceError(f"cannot decode a frame of {self.path}")
        return _to_rgb(image)

    def close(self) -> None:
        self._capture.release()


class ImageSource(FrameSource):
    """A still image, delivered `fps` times a second (the pipeline re-renders it for new poses)."""

    def __init__(self, path: str | os.PathLike, fps: float = 30.0) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.fps = fps = check_fps(fps)
        try:
            self._image = read_still(self.path)
        except ImageReadError as error:
            raise SourceError(str(error)) from None
        self._image.setflags(write=False)
        self._pacer = _Pacer(fps)

    def grab(self) -> None:
        self._pacer.wait()

    def retrieve(self) -> np.ndarray:
        return self._image


class SampleSource(VideoFileSource):
    """The embedded sample clip (telepresence/assets/sample.mp4), looping."""

    def __init__(self, fps: float | None = None) -> None:
        self._resources = contextlib.ExitStack()
        resource = importlib.resources.files("telepresence").joinpath("assets/sample.mp4")
        path = self._resources.enter_context(importlib.resources.as_file(resource))
        super().__init__(path, loop=True, fps=fps)
        self.name = "sample"

    def close(self) -> None:
        super().close()
        self._resources.close()


def check_fps(fps: float) -> float:
    """A rate to play a file, a picture or the sample at, frames a second; SourceError outside [1, 240] (or NaN)."""
    if not 1.0 <= fps <= 240.0:
        raise SourceError(f"expected a frame rate in [1, 240], got {fps}")
    return float(fps)


def open_source(spec: str, fps: float | None = None) -> FrameSource:
    """Open a source from its command-line spelling.

    `sample`: the embedded clip. `webcam`: camera 0, or the sample with one
    warning when there is no camera. `INDEX` (digits): that camera, an error
    if missing. Anything else is a path: an image by its suffix, else a video.
    fps: play files, images and the sample at this rate (default: a file's own
    rate, 30 for images); a camera paces itself.
    """
    if fps is not None:
        check_fps(fps)
    if spec == "sample":
        return SampleSource(fps)
    if spec == "webcam":
        try:
            return WebcamSource(0)
        except CameraNotFoundError as error:
            logger.warning("%s; using the embedded sample clip instead (--source sample)", error)
            return SampleSource(fps)
    if spec.isdigit():
        return WebcamSource(int(spec))
    if Path(spec).is_dir():
        raise SourceError(f"cannot read '{spec}': it is a directory (expected a video or image file)")
    if Path(spec).suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(spec, 30.0 if fps is None else fps)
    return VideoFileSource(spec, fps=fps)


def read_still(path: str | os.PathLike) -> np.ndarray:
    """A picture file as the pipeline takes it: RGB uint8 [H, W, 3], at least MIN_SOURCE_SIDE and at
    most MAX_SOURCE_SIDE pixels a side (downscaled on load, said in one log line); ImageReadError
    otherwise, with the message `telepresence render` and `send --source` both print."""
    return read_image(path, min_side=MIN_SOURCE_SIDE, max_side=MAX_SOURCE_SIDE)


def fit_frame(image: np.ndarray) -> np.ndarray:
    """`image` [H, W, 3] within the pipeline's frame sizes: downscaled (INTER_AREA) to MAX_SOURCE_SIDE
    on the longer side if larger; SourceError if its shorter side is under MIN_SOURCE_SIDE."""
    H, W = image.shape[:2]
    if min(H, W) < MIN_SOURCE_SIDE:
        raise SourceError(f"frames of {W}x{H} pixels are too small (expected at least {MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE})")
    if max(H, W) <= MAX_SOURCE_SIDE:
        return image
    scale = MAX_SOURCE_SIDE / max(H, W)
    fitted = cv2.resize(image, (max(MIN_SOURCE_SIDE, round(W * scale)), max(MIN_SOURCE_SIDE, round(H * scale))),
                        interpolation=cv2.INTER_AREA)
    fitted.setflags(write=False)
    return fitted


class CaptureThread:
    """Reads a source on its own thread into a newest-wins slot of CapturedFrame (frames fitted by fit_frame).
    After max_consecutive_errors failures in a row it stops, and calls on_error(error) once."""

    max_consecutive_errors = 30

    def __init__(self, source: FrameSource, slot: LatestSlot[CapturedFrame],
                 on_error: Optional[Callable[[SourceError], None]] = None) -> None:
        self.source = source
        self.slot = slot
        self.on_error = on_error
        self.error: Optional[SourceError] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        frame_id = 0
        errors = 0
        said_downscaled = False
        while not self._stop.is_set():
            try:
                self.source.grab()
                t_capture = time.time()
                t0 = time.perf_counter()
                image = self.source.retrieve()
                t_capture = self.source.frame_time() or t_capture
                fitted = fit_frame(image)
                capture_ms = (time.perf_counter() - t0) * 1e3
            except SourceError as error:
                errors += 1
                if errors >= self.max_consecutive_errors:
                    self.error = error
                    logger.error("capture stopped: %s: %s", self.source.name, error)
                    if self.on_error is not None:
                        self.on_error(error)
                    return
                time.sleep(0.05)
                continue
            if fitted is not image and not said_downscaled:
                said_downscaled = True
                logger.info("downscaling %s's %dx%d frames to %dx%d (longer side capped at %d px)", self.source.name,
                            image.shape[1], image.shape[0], fitted.shape[1], fitted.shape[0], MAX_SOURCE_SIDE)
            image = fitted
            errors = 0
            self.slot.put(CapturedFrame(image, frame_id, t_capture, capture_ms))
            frame_id += 1
