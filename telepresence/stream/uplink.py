"""A participant's camera as it reaches the server: the check of its offer, `TrackSource`, the
FrameSource a received WebRTC track feeds (so the sender's RenderLoop runs on it as on a webcam), and
`CameraRate`, the frame rate worth asking of the camera.

aiortc decodes the track on its own thread and queues every decoded frame without bound; the
drain task here takes each one as it comes and keeps only the newest (newest frame wins, as at
every hop of the sender). Frame sizes are checked as they arrive: a frame too small for face
analysis or too large to be worth decoding is not passed on; `bad_in_a_row` and `last_error` let
the call drop a participant that sends nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any, Optional

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from .capture import MIN_SOURCE_SIDE, FrameSource, SourceError
from .framecode import read_frame_code, stamp_age_ms
from .rtc import InvalidOfferError, check_offer
from .slot import LatestSlot, SlotClosedError

logger = logging.getLogger(__name__)

UPLINK_CODECS = ("vp8", "h264")
"""Video codecs the server decodes (aiortc's)."""
MAX_UPLINK_SIDE = 3840
"""Longest side of a camera frame the server takes, pixels (a 4K camera; fit_frame then scales it down)."""
MAX_UPLINK_PIXELS = 3840 * 2160


def check_uplink_offer(sdp: str) -> None:
    """Refuse (InvalidOfferError, naming the problem) a camera offer the server cannot take: what
    rtc.check_offer refuses, anything but one video section that sends (plus at most one data
    channel), or no VP8/H264 among its video codecs."""
    check_offer(sdp)
    description = SessionDescription.parse(sdp)
    kinds = [media.kind for media in description.media]
    video = [media for media in description.media if media.kind == "video"]
    if len(video) != 1 or kinds.count("application") > 1 or len(kinds) != len(video) + kinds.count("application"):
        raise InvalidOfferError(f"expected one video section and the uplink channel, got {', '.join(kinds)}")
    if video[0].direction not in ("sendonly", "sendrecv"):
        raise InvalidOfferError(f"the video section does not send (direction {video[0].direction})")
    names = sorted({codec.mimeType.split("/")[-1] for codec in video[0].rtp.codecs} - {"rtx", "red", "ulpfec"})
    if not any(name.lower() in UPLINK_CODECS for name in names):
        raise InvalidOfferError(f"no usable video codec in the offer ({', '.join(names) or 'none'}; "
                                f"expected {' or '.join(c.upper() for c in UPLINK_CODECS)})")


def frame_size_error(width: int, height: int) -> Optional[str]:
    """Why a camera frame of width x height cannot be used, or None."""
    if min(width, height) < MIN_SOURCE_SIDE:
        return f"frames of {width}x{height} pixels are too small (expected at least {MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE})"
    if max(width, height) > MAX_UPLINK_SIDE or width * height > MAX_UPLINK_PIXELS:
        return f"frames of {width}x{height} pixels are too large (expected at most 3840x2160)"
    return None


class CameraRate:
    """The camera frame rate worth asking of a participant: a margin over what its pipeline processes.

    Every camera frame is encoded by the participant and decoded by the server (each depends on the one
    before), but only the newest is taken when the pipeline is free: on a CPU server the pipeline takes
    5-7 of 25 frames a second, and the rest cost both ends CPU for nothing (the 2-participant CPU call:
    5.1-5.9 fps each with the cameras at 25 fps, 6.1-7.0 at 10). `frame()` counts the processed frames (any
    thread); `update(now)` measures them over `window_s` and returns the rate to ask for when it moved by
    more than `hysteresis` since the last one asked, else None. The rate is `margin` times the measured one
    plus a frame, within [min_fps, max_fps]: when the pipeline falls behind it settles at the margin over
    what it does. A window in which the pipeline took at least `keeping_up` of the frames asked for goes
    straight back to max_fps (it may do more; at the margin it takes about 0.6 of them), and one with no frame
    processed (a warm-up, a compile) changes nothing, nor does the next one (it only partly worked). On a
    GPU that keeps up the rate stays at max_fps."""

    keeping_up = 0.8

    def __init__(self, min_fps: float = 5.0, max_fps: float = 30.0, margin: float = 1.5, window_s: float = 2.0,
                 hysteresis: float = 0.15) -> None:
        if not 1.0 <= min_fps <= max_fps <= 120.0 or margin < 1.0 or window_s <= 0 or hysteresis < 0:
            raise ValueError(f"expected 1 <= min_fps <= max_fps <= 120, margin >= 1, window_s > 0, hysteresis >= 0, got "
                             f"{min_fps}, {max_fps}, {margin}, {window_s}, {hysteresis}")
        self.min_fps, self.max_fps, self.margin = min_fps, max_fps, margin
        self.window_s, self.hysteresis = window_s, hysteresis
        self.asked: Optional[float] = None
        """The rate asked last (None: none yet)."""
        self._frames = 0
        self._lock = threading.Lock()
        self._since: Optional[float] = None
        self._steady = False  # the window before had frames processed

    def frame(self) -> None:
        """One camera frame processed by the pipeline (any thread)."""
        with self._lock:
            self._frames += 1

    def update(self, now: float) -> Optional[float]:
        """The rate to ask for now (frames a second), or None: no change worth a message."""
        if self._since is None:
            self._since = now
            return None
        if now - self._since < self.window_s:
            return None
        with self._lock:
            frames, self._frames = self._frames, 0
        measured = frames / (now - self._since)
        self._since = now
        if frames == 0:  # warming up (CUDA graphs, a compile) or no camera frames: nothing learnt
            self._steady = False
            return None
        if not self._steady:  # the first frames after none: a window only partly worked, nothing learnt yet
            self._steady = True
            return None
        if measured >= self.keeping_up * (self.asked or self.max_fps):  # it takes (nearly) every frame sent
            rate = self.max_fps
        else:
            rate = float(min(self.max_fps, max(self.min_fps, math.ceil(self.margin * measured + 1.0))))
        if self.asked is not None and abs(rate - self.asked) <= self.hysteresis * self.asked:
            return None
        self.asked = rate
        return rate


class TrackSource(FrameSource):
    """Frames of a received video track, newest first; grab() blocks until a newer one has come.

    Made and fed on the event loop (`attach(track)`); grab()/retrieve() run on the capture thread.
    With `read_stamps`, a capture time painted into the frame by the participant
    (telepresence.stream.framecode) is read back and becomes the frame's capture time, so latency
    measured downstream includes the uplink (benchmarks/call.py).
    """

    def __init__(self, name: str = "uplink", read_stamps: bool = False, fps: float = 30.0) -> None:
        self.name = name
        self.fps = fps
        self.read_stamps = read_stamps
        self.frames_received = 0
        """Frames of a usable size taken from the track."""
        self.bad_in_a_row = 0
        """Frames refused since the last usable one."""
        self.last_error: Optional[str] = None
        """Why the last refused frame was refused."""
        self.last_frame_at: Optional[float] = None
        """time.monotonic() of the last usable frame."""
        self._slot: LatestSlot[av.VideoFrame] = LatestSlot()
        self._version = 0
        self._frame: Optional[av.VideoFrame] = None
        self._frame_time: Optional[float] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- event loop side --

    def attach(self, track: Any) -> None:
        """Start draining `track` (an aiortc video track); a second track is ignored."""
        if self._task is not None:
            logger.warning("%s: ignoring a second video track", self.name)
            return
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(self._drain(track))

    async def _drain(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                error = frame_size_error(frame.width, frame.height)
                if error is not None:
                    self.bad_in_a_row += 1
                    self.last_error = error
                    continue
                self.bad_in_a_row = 0
                self.frames_received += 1
                self.last_frame_at = time.monotonic()
                self._slot.put(frame)
        except (MediaStreamError, SlotClosedError):
            pass

    # -- capture thread side --

    def grab(self) -> None:
        while True:
            try:
                taken = self._slot.wait_newer(self._version, timeout=0.25)
            except SlotClosedError:
                raise SourceError(f"{self.name} closed") from None
            if taken is not None:
                self._version, self._frame = taken
                return

    def retrieve(self) -> np.ndarray:
        frame = self._frame
        if frame is None:
            raise SourceError(f"{self.name}: no frame grabbed")
        self._frame_time = None
        if self.read_stamps:
            plane = frame.planes[0]  # yuv420p luma, padded rows
            luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
            stamp = read_frame_code(luma, size=min(frame.width, frame.height))
            if stamp is not None:
                self._frame_time = time.time() - stamp_age_ms(stamp) / 1e3
        image = frame.to_ndarray(format="rgb24")
        image.setflags(write=False)
        return image

    def frame_time(self) -> Optional[float]:
        return self._frame_time

    def close(self) -> None:
        """Stop draining (any thread: the render loop closes its source from an executor)."""
        self._slot.close()
        if self._task is not None and self._loop is not None and not self._task.done():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the event loop is already closed
                pass
