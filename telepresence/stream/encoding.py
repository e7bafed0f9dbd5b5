"""Where the viewers' frames are encoded: one encoder process beside the sender (EncoderPool), one
EncoderStream per viewer in it, and the link to aiortc's RTCRtpSender (follow_rtp_sender).

Why not aiortc's own way (docs/streaming.md, "Encoding many viewers"): aiortc encodes each track in
the event loop's default thread pool, and PyAV lets go of the GIL inside libvpx, but every encode takes
the GIL back three or four times; while the event loop (or any Python thread) is busy, each of those
waits lasts up to the interpreter's 5 ms switch interval. Out of process, the sender's interpreter
only copies each frame into shared memory and reads the bitstream back:

    pipeline thread --copy into the stream's slot, REQUEST--> encoder process (a thread per stream)
    event loop <--REPLY + bitstream-- ; ViewTrack --av.Packet--> RTCRtpSender packs and sends it

Newest wins: a stream encodes one frame at a time; the newest frame delivered meanwhile waits in the
other slot, and an older one waiting there is dropped. A paced stream (ViewTrack's) also waits until
its consumer has taken the last encoded frame (consumed()): encoded frames are never dropped (the
next would not decode) and never pile up behind a slow sender; frames wait before the encoder instead.

aiortc link (pinned to aiortc 1.16 in pyproject.toml; tests/telepresence/stream/test_encoding.py fails
loudly if any of this moves):
- a track may hand RTCRtpSender `av.Packet`s instead of frames; it packetizes them with its codec's
  Encoder.pack (aiortc's way of sending pre-encoded media);
- keyframe requests (PLI, FIR) call RTCRtpSender._send_keyframe, wrapped per sender here;
- the receiver's bitrate estimate (REMB) is set on the sender's own encoder object, which packs our
  bitstream: read back from `_RTCRtpSender__encoder.target_bitrate` (clamped by rtc.apply_bitrate's
  limits) for every frame.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from aiortc import RTCRtpSender
from aiortc.codecs import h264, vpx

from .encoder_worker import CODECS, OK, OPEN, REPLY, REQUEST, SLOTS

logger = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000
WORKER_MODULE = "telepresence.stream.encoder_worker"
BROKEN_WITHIN_S = 5.0
"""An encoder process that ends this soon after it starts is not started again (the default of EncoderPool.broken_within_s)."""
READ_CHUNK = 1 << 16


class EncoderUnavailableError(RuntimeError):
    """No encoder process can run here (it failed at start, or descriptors cannot be passed)."""


@dataclass(frozen=True)
class EncodedFrame:
    """One frame's bitstream, as the encoder process returned it."""

    data: bytes
    """VP8 frame or H264 Annex B."""
    pts: int
    """Presentation time, 1/90000 s (what RTCRtpSender turns into the RTP timestamp)."""
    meta: Any
    """What the frame was submitted with (ViewTrack: its RenderedView)."""
    keyframe_requested: bool
    """Encoded as a keyframe on request (request_keyframe)."""
    t_submit: float
    """Wall-clock time (time.time()) the frame was handed to the encoder."""
    encode_ms: float
    """Submit to bitstream back on the event loop."""


@dataclass(frozen=True)
class _Submitted:
    seq: int
    slot: int
    pts: int
    meta: Any
    keyframe: bool
    t_submit: float
    t_submit_mono: float


class EncoderStream:
    """One viewer's encoder in the encoder process. Made on the event loop (EncoderPool.open_stream);
    submit() from any thread; on_frame / on_failed are called on the event loop."""

    def __init__(self, sock: socket.socket, shm: mmap.mmap, slot_bytes: int, codec: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.codec = codec
        self.on_frame: Callable[[EncodedFrame], None] = lambda frame: None
        self.on_failed: Callable[[str], None] = lambda reason: None
        self.bitrate: Callable[[], Optional[int]] = lambda: None
        """The target bitrate (bit/s) for the next frame; None: the codec's start (follow_rtp_sender sets it)."""
        self.paced = False
        """Start an encode only once the last encoded frame is consumed() (see the module doc)."""
        self.frames_dropped = 0
        """Frames replaced by a newer one while waiting for the encoder."""
        self.errors = 0
        """Frames the encoder process failed on (each dropped; the stream goes on with a fresh encoder)."""
        self.failed: Optional[str] = None
        """Why the stream stopped for good (its process ended), or None."""
        self.closed = False
        self._sock = sock
        self._shm = shm
        self._slot_bytes = slot_bytes
        self._loop = loop
        self._lock = threading.Lock()
        self._in_flight: Optional[_Submitted] = None
        self._waiting: Optional[tuple[int, tuple[int, ...], Any]] = None
        self._keyframe = False
        self._unconsumed = 0
        self._seq = 0
        self._t0 = time.monotonic()
        self._last_pts = -1
        self._buffer = bytearray()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    # -- any thread --

    def submit(self, image: np.ndarray, meta: Any = None) -> None:
        """Encode `image` ([H, W, 3] uint8 RGB, H and W even) as this stream's next frame. While one is
        being encoded (or, paced, not yet consumed), the newest waits (an older one waiting is dropped).
        A closed or failed stream ignores it."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
        if image.nbytes > self._slot_bytes:
            raise ValueError(f"expected a frame of at most {self._slot_bytes} bytes, got {image.shape}")
        with self._lock:
            if self.closed or self.failed:
                return
            slot = 0 if self._in_flight is None else 1 - self._in_flight.slot
            start = slot * self._slot_bytes
            # mmap's slice assignment copies holding the GIL (0.04 ms at 512): numpy would let go of it,
            # and getting it back can wait up to the 5 ms switch interval while the event loop runs.
            self._shm[start:start + image.nbytes] = memoryview(np.ascontiguousarray(image)).cast("B")
            if self._waiting is not None:
                self.frames_dropped += 1
            self._waiting = (slot, image.shape, meta)
            self._send_waiting_locked()

    def consumed(self) -> None:
        """The consumer has taken an encoded frame: a paced stream may encode the next (thread-safe)."""
        with self._lock:
            self._unconsumed = max(0, self._unconsumed - 1)
            self._send_waiting_locked()

    def request_keyframe(self) -> None:
        """Make the next frame submitted to the encoder a keyframe."""
        self._keyframe = True

    def _send_waiting_locked(self) -> None:
        if self._waiting is None or self._in_flight is not None or (self.paced and self._unconsumed > 0) \
                or self.closed or self.failed:
            return
        slot, shape, meta = self._waiting
        self._waiting = None
        self._send_locked(slot, shape, meta)

    def _send_locked(self, slot: int, shape: tuple[int, ...], meta: Any) -> None:
        now = time.monotonic()
        pts = max(int((now - self._t0) * VIDEO_CLOCK_RATE), self._last_pts + 1)  # real-time clock, strictly increasing
        self._last_pts = pts
        keyframe, self._keyframe = self._keyframe, False
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        bitrate = self.bitrate() or (vpx if self.codec == "vp8" else h264).DEFAULT_BITRATE
        request = REQUEST.pack(self._seq, pts, bitrate, shape[1], shape[0], slot, keyframe)
        try:
            sent = self._sock.send(request)
        except OSError as error:
            sent, reason = 0, f"cannot reach the encoder process ({error})"
        else:
            reason = "the encoder process is not reading"
        if sent != len(request):
            self._fail_soon(reason)
            return
        self._in_flight = _Submitted(self._seq, slot, pts, meta, keyframe, time.time(), now)

    def _fail_soon(self, reason: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._fail, reason)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    # -- event loop --

    def _on_readable(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                self._fail(f"lost the encoder process ({error})")
                return
            if not chunk:
                self._fail("the encoder process ended")
                return
            self._buffer += chunk
            if len(chunk) < READ_CHUNK:
                break
        while len(self._buffer) >= REPLY.size:
            seq, status, length = REPLY.unpack_from(self._buffer)
            if len(self._buffer) < REPLY.size + length:
                break
            body = bytes(self._buffer[REPLY.size:REPLY.size + length])
            del self._buffer[:REPLY.size + length]
            self._on_reply(seq, status, body)
            if self.closed or self.failed:
                return

    def _on_reply(self, seq: int, status: int, body: bytes) -> None:
        with self._lock:
            done = self._in_flight
            if done is not None and done.seq == seq:
                self._in_flight = None
                if status == OK and body:
                    self._unconsumed += 1
                self._send_waiting_locked()
        if done is None or done.seq != seq:
            self._fail(f"reply {seq} from the encoder process, expected {None if done is None else done.seq}")
            return
        if status == OK:
            if body:
                self.on_frame(EncodedFrame(body, done.pts, done.meta, done.keyframe, done.t_submit,
                                           (time.monotonic() - done.t_submit_mono) * 1e3))
            return
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            logger.warning("%s encoder: frame dropped (%d so far): %s", self.codec, self.errors, body.decode(errors="replace"))

    def _fail(self, reason: str) -> None:
        if self.failed or self.closed:
            return
        self.failed = reason
        self._release()
        logger.warning("%s encoder stream stopped: %s", self.codec, reason)
        self.on_failed(reason)

    def close(self) -> None:
        """Stop encoding (on the event loop); the encoder process drops this stream. Idempotent."""
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._in_flight = self._waiting = None
            if self._sock.fileno() < 0:  # released already (failed, then closed)
                return
            if not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self.bitrate = lambda: None  # no reference to aiortc's sender outlives the stream
            self._shm.close()


class EncoderPool:
    """The encoder process this interpreter's senders share (shared_pool()): started on demand,
    started again when it has ended, given up on if it ends within `broken_within_s` of starting."""

    def __init__(self) -> None:
        self.broken_within_s = BROKEN_WITHIN_S
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self._control: Optional[socket.socket] = None
        self._started_at = 0.0
        self._broken: Optional[str] = None

    @property
    def pid(self) -> Optional[int]:
        """The encoder process's id while it runs, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the encoder process now if it is not running (it is ready about a second later)."""
        with self._lock:
            self._running_locked()

    def open_stream(self, codec: str, frame_bytes: int, loop: Optional[asyncio.AbstractEventLoop] = None) -> EncoderStream:
        """A new stream for frames of up to `frame_bytes` (H * W * 3), encoded with `codec` ("vp8" | "h264")
        at the bitrates rtc.apply_bitrate set. Call on the event loop the stream reports to.
        Raises EncoderUnavailableError when no encoder process can run."""
        if codec not in CODECS:
            raise ValueError(f"expected a codec in {CODECS}, got {codec!r}")
        if frame_bytes <= 0:
            raise ValueError(f"expected frame_bytes > 0, got {frame_bytes}")
        loop = loop or asyncio.get_running_loop()
        module = vpx if codec == "vp8" else h264
        record = OPEN.pack(codec.encode(), frame_bytes, module.MIN_BITRATE, module.DEFAULT_BITRATE, module.MAX_BITRATE)
        ours, theirs = socket.socketpair()
        shm_fd = _shared_memory(SLOTS * frame_bytes)
        try:
            with self._lock:
                for attempt in range(2):
                    control = self._running_locked()
                    try:
                        socket.send_fds(control, [record], [theirs.fileno(), shm_fd])
                        break
                    except OSError as error:  # the process ended since: once more with a new one
                        self._stop_locked()
                        if attempt:
                            raise EncoderUnavailableError(f"cannot reach the encoder process ({error})") from error
            shm = mmap.mmap(shm_fd, SLOTS * frame_bytes)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(shm_fd)
        return EncoderStream(ours, shm, frame_bytes, codec, loop)

    def close(self) -> None:
        """End the encoder process (its streams fail over to whatever their owners do next)."""
        with self._lock:
            self._stop_locked()

    def _running_locked(self) -> socket.socket:
        if self._broken is not None:
            raise EncoderUnavailableError(self._broken)
        if self._control is not None and self._process is not None:
            if self._process.poll() is None:
                return self._control
            if time.monotonic() - self._started_at < self.broken_within_s:
                self._broken = f"the encoder process ended {self._process.returncode} right after starting"
                self._stop_locked()
                raise EncoderUnavailableError(self._broken)
            logger.warning("the encoder process ended (%s); starting another", self._process.returncode)
            self._stop_locked()
        if not hasattr(socket, "send_fds"):
            self._broken = "this platform cannot pass descriptors to another process"
            raise EncoderUnavailableError(self._broken)
        parent, child = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(child.fileno())], pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL, env=_worker_env(),
            )
        except OSError as error:
            parent.close()
            self._broken = f"cannot start the encoder process ({error})"
            raise EncoderUnavailableError(self._broken) from error
        finally:
            child.close()
        self._control = parent
        self._started_at = time.monotonic()
        return parent

    def _stop_locked(self) -> None:
        if self._control is not None:
            self._control.close()  # the process ends at the end of its control socket
            self._control = None
        if self._process is not None:
            try:
                self._process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def follow_rtp_sender(stream: EncoderStream, rtp_sender: RTCRtpSender) -> None:
    """Pass aiortc's keyframe requests and bitrate estimate for `rtp_sender`'s track on to `stream`
    (private parts of aiortc 1.16, see the module doc)."""
    send_keyframe = rtp_sender._send_keyframe

    def send_keyframe_too() -> None:
        send_keyframe()  # aiortc's own encoder too, should the track fall back to frames
        stream.request_keyframe()

    rtp_sender._send_keyframe = send_keyframe_too
    stream.bitrate = lambda: getattr(getattr(rtp_sender, "_RTCRtpSender__encoder", None), "target_bitrate", None)


_shared: Optional[EncoderPool] = None
_shared_lock = threading.Lock()


def shared_pool() -> EncoderPool:
    """This interpreter's encoder pool (ended at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EncoderPool()
            atexit.register(_shared.close)
        return _shared


def _shared_memory(size: int) -> int:
    """A descriptor of `size` bytes of anonymous shared memory."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("telepresence-frames", os.MFD_CLOEXEC)
    else:
        with tempfile.TemporaryFile() as file:  # unlinked at once: nothing to clean up after a crash
            fd = os.dup(file.fileno())
    os.ftruncate(fd, size)
    return fd


def _worker_env() -> dict[str, str]:
    """This environment, with this checkout's packages importable (benchmarks extend sys.path themselves)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else root
    return env
