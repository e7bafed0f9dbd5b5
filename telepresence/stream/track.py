"""ViewTrack: one viewer's video, fed by the render loop, newest frame wins.

aiortc's RTCRtpSender loop is `frame = await track.recv(); encode(frame) in an
executor; send packets; repeat`. So the time from `recv()` returning to the
next `recv()` call is this track's encode + packetise + send time, which is
what the stats report as "encode", measured without touching aiortc.

`stamp_frames` (set from the viewer's `stamps` message) paints each frame's
capture time into this track's pictures only (framecode.py).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import time
from typing import Optional

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .framecode import capture_stamp, draw_frame_code
from .renderloop import RenderedView

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class ViewTrack(MediaStreamTrack):
    """A video MediaStreamTrack whose frames are pushed from another thread."""

    kind = "video"

    def __init__(self, window_s: float = 1.0) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._pending: Optional[tuple[av.VideoFrame, RenderedView]] = None
        self._ready = asyncio.Event()
        self._t0 = time.monotonic()
        self._last_pts = -1
        self._handed_at: Optional[float] = None
        self._window_s = window_s
        self._encode_ms: collections.deque[tuple[float, float]] = collections.deque()
        self._latency_ms: collections.deque[tuple[float, float]] = collections.deque()
        self.frames_sent = 0
        self.frames_dropped = 0
        self.last_view: Optional[RenderedView] = None
        self.stamp_frames = False
        """Paint the capture time into this viewer's frames (its `stamps` request)."""

    # -- producer side (render-loop worker thread) --

    def deliver(self, view: RenderedView) -> None:
        """Offer a new frame (thread-safe); an unsent older one is dropped."""
        if self.readyState != "live":
            return
        image = view.image
        if self.stamp_frames:
            image = image.copy()  # the other viewers' frames stay clean
            draw_frame_code(image, capture_stamp(view.t_capture))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")  # the copy happens off the event loop
        try:
            self._loop.call_soon_threadsafe(self._set_pending, frame, view)
        except RuntimeError:  # event loop already closed: the sender is shutting down
            pass

    def _set_pending(self, frame: av.VideoFrame, view: RenderedView) -> None:
        if self._pending is not None:
            self.frames_dropped += 1
        self._pending = (frame, view)
        self._ready.set()

    # -- consumer side (aiortc's RTCRtpSender) --

    async def recv(self) -> av.VideoFrame:
        now = time.monotonic()
        if self._handed_at is not None:
            self._record(self._encode_ms, now, (now - self._handed_at) * 1e3)
            self._handed_at = None
        while self._pending is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        frame, view = self._pending
        self._pending = None
        now = time.monotonic()
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)  # real-time clock, strictly increasing
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self._handed_at = now
        self._record(self._latency_ms, now, (time.time() - view.t_capture) * 1e3)
        self.frames_sent += 1
        self.last_view = view
        return frame

    def stop(self) -> None:
        super().stop()
        self._pending = None
        self._ready.set()  # wake a waiting recv() so it raises MediaStreamError

    # -- stats --

    def _record(self, records: collections.deque, now: float, value: float) -> None:
        records.append((now, value))
        while records and records[0][0] < now - self._window_s:
            records.popleft()

    def _mean(self, records: collections.deque) -> Optional[float]:
        now = time.monotonic()
        values = [v for t, v in records if t >= now - self._window_s]
        return sum(values) / len(values) if values else None

    @property
    def encode_ms(self) -> Optional[float]:
        """Mean encode + send time over the last window, or None."""
        return self._mean(self._encode_ms)

    @property
    def capture_to_encoder_ms(self) -> Optional[float]:
        """Mean time from capture to the frame being handed to the encoder, over the last window."""
        return self._mean(self._latency_ms)
