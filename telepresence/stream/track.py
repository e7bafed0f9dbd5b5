"""ViewTrack: one viewer's video, fed by the render loop, newest frame wins.

Two ways to the encoder:
- with an EncoderStream (encode_with; the sender's default, telepresence.stream.encoding), each
  frame goes to the encoder process as soon as it is delivered, and recv() hands aiortc the
  encoded frames as av.Packet, in order (aiortc packetizes and sends them). The stream is paced
  by recv(): it encodes the next frame once aiortc has taken the last one, the newest frame
  waiting meanwhile, so nothing piles up behind a slow sender. Before aiortc's first recv() only
  the newest frame is kept, and the first recv() sends that one. "encode" in the stats is submit
  to bitstream back. If the stream stops (its process ended), the track goes on the second way.
- without one, recv() hands aiortc frames (av.VideoFrame), and aiortc's RTCRtpSender loop is
  `frame = await track.recv(); encode(frame) in an executor; send packets; repeat`. The time
  from `recv()` returning to the next `recv()` call is this track's encode + packetise + send
  time, which is what the stats report as "encode", measured without touching aiortc.

`stamp_frames` (set from the viewer's `stamps` message) paints each frame's
capture time into this track's pictures only (framecode.py).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import time
from typing import Optional, Union

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .encoding import EncodedFrame, EncoderStream
from .framecode import capture_stamp, draw_frame_code
from .renderloop import RenderedView

logger = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class ViewTrack(MediaStreamTrack):
    """A video MediaStreamTrack whose frames are pushed from another thread."""

    kind = "video"

    def __init__(self, window_s: float = 1.0) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._pending: Optional[tuple[Union[av.VideoFrame, np.ndarray], RenderedView]] = None
        self._encoded: collections.deque[tuple[av.Packet, RenderedView]] = collections.deque()
        self._encoder: Optional[EncoderStream] = None
        self._consuming = False
        self._ready = asyncio.Event()
        self._t0 = time.monotonic()
        self._last_pts = -1
        self._handed_at: Optional[float] = None
        self._window_s = window_s
        self._encode_ms: collections.deque[tuple[float, float]] = collections.deque()
        self._latency_ms: collections.deque[tuple[float, float]] = collections.deque()
        self._dropped = 0
        self.frames_sent = 0
        self.last_view: Optional[RenderedView] = None
        self.stamp_frames = False
        """Paint the capture time into this viewer's frames (its `stamps` request)."""

    def encode_with(self, stream: EncoderStream) -> None:
        """Encode this track's frames in `stream` from now on (call on the event loop, before frames flow)."""
        stream.on_frame = self._on_encoded
        stream.on_failed = self._on_encoder_failed
        stream.paced = True
        self._encoder = stream

    @property
    def encoder(self) -> Optional[EncoderStream]:
        """The stream encoding this track's frames, or None (aiortc encodes them)."""
        return self._encoder

    @property
    def frames_dropped(self) -> int:
        """Frames replaced by newer ones before they were encoded."""
        return self._dropped + (self._encoder.frames_dropped if self._encoder is not None else 0)

    # -- producer side (render-loop worker thread) --

    def deliver(self, view: RenderedView) -> None:
        """Offer a new frame (thread-safe); an unsent older one is dropped."""
        if self.readyState != "live":
            return
        image = view.image
        if self.stamp_frames:
            image = image.copy()  # the other viewers' frames stay clean
            draw_frame_code(image, capture_stamp(view.t_capture))
        encoder = self._encoder
        if encoder is not None:
            if self._consuming:
                self._submit(encoder, image, view)
                return
            item: Union[av.VideoFrame, np.ndarray] = np.array(image)  # held until aiortc's first recv()
        else:
            item = av.VideoFrame.from_ndarray(image, format="rgb24")  # the copy happens off the event loop
        try:
            self._loop.call_soon_threadsafe(self._set_pending, item, view)
        except RuntimeError:  # event loop already closed: the sender is shutting down
            pass

    def _submit(self, encoder: EncoderStream, image: np.ndarray, view: RenderedView) -> None:
        try:
            encoder.submit(image, view)  # copied into the stream's shared memory
        except ValueError as error:  # a picture the stream cannot take: this frame only
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                logger.warning("frame %d not encoded: %s", view.frame_id, error)

    def _set_pending(self, item: Union[av.VideoFrame, np.ndarray], view: RenderedView) -> None:
        if self._pending is not None:
            self._dropped += 1
        self._pending = (item, view)
        self._ready.set()

    # -- the encoder stream (event loop) --

    def _on_encoded(self, frame: EncodedFrame) -> None:
        if self.readyState != "live":
            return
        packet = av.Packet(frame.data)
        packet.pts = frame.pts
        packet.time_base = VIDEO_TIME_BASE
        self._encoded.append((packet, frame.meta))
        now = time.monotonic()
        self._record(self._encode_ms, now, frame.encode_ms)
        self._record(self._latency_ms, now, (frame.t_submit - frame.meta.t_capture) * 1e3)
        self._ready.set()

    def _on_encoder_failed(self, reason: str) -> None:
        logger.warning("a viewer's encoder stream stopped (%s); aiortc encodes its frames from now on", reason)
        self._encoder = None

    # -- consumer side (aiortc's RTCRtpSender) --

    async def recv(self) -> Union[av.VideoFrame, av.Packet]:
        now = time.monotonic()
        if self._handed_at is not None:
            self._record(self._encode_ms, now, (now - self._handed_at) * 1e3)
            self._handed_at = None
        self._consuming = True
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._encoded:
                packet, view = self._encoded.popleft()
                if self._encoder is not None:
                    self._encoder.consumed()  # the next frame may be encoded
                return self._handed(packet, view)
            if self._pending is not None:
                item, view = self._pending
                self._pending = None
                if isinstance(item, np.ndarray):  # the newest frame from before the first recv()
                    if self._encoder is not None:
                        self._submit(self._encoder, item, view)
                        continue
                    item = av.VideoFrame.from_ndarray(item, format="rgb24")
                return self._handed_frame(item, view)
            self._ready.clear()
            await self._ready.wait()

    def _handed_frame(self, frame: av.VideoFrame, view: RenderedView) -> av.VideoFrame:
        now = time.monotonic()
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)  # real-time clock, strictly increasing
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        self._handed_at = now
        self._record(self._latency_ms, now, (time.time() - view.t_capture) * 1e3)
        return self._handed(frame, view)

    def _handed(self, item: Union[av.VideoFrame, av.Packet], view: RenderedView) -> Union[av.VideoFrame, av.Packet]:
        self.frames_sent += 1
        self.last_view = view
        return item

    def stop(self) -> None:
        super().stop()
        self._pending = None
        self._encoded.clear()
        if self._encoder is not None:
            self._encoder.close()
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
        """Mean encode time over the last window, or None: submit to bitstream back with an encoder
        stream, else aiortc's encode + packetise + send."""
        return self._mean(self._encode_ms)

    @property
    def capture_to_encoder_ms(self) -> Optional[float]:
        """Mean time from capture to the frame being handed to the encoder, over the last window."""
        return self._mean(self._latency_ms)
