"""The encoder process: every viewer's video encoded outside the sender's interpreter, a thread per stream.

    python -m telepresence.stream.encoder_worker FD      (started by telepresence.stream.encoding.EncoderPool)

FD is a Unix socket to the sender. Each message on it opens one stream: the
OPEN record (codec, slot size, bitrates) with two descriptors, the stream's
own socket and its shared memory (two slots of `slot_bytes`, the frames as
[H, W, 3] uint8 RGB). On the stream's socket the sender sends REQUEST
records (which slot, size, pts, bitrate, keyframe) and gets one REPLY each,
followed by the encoded frame: the codec's raw bitstream (VP8 frame, H264
Annex B), which aiortc packetizes itself (RTCRtpSender packs av.Packet). An
end of file on a stream's socket ends that stream; on FD, the process.

The encode is aiortc's own (Vp8Encoder / H264Encoder: the same settings,
bitrate clamping and keyframe forcing), with RGB -> I420 done by OpenCV
(BT.601 limited range like swscale; 6x faster at 512, chroma within a few
levels) and without aiortc's RTP packetizing. A frame that fails to encode is
answered with an error and its stream's encoder made anew (the next frame is a
keyframe); the other streams go on. Imports stay light (no torch): this
process starts in about a second.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import struct
import sys
import threading
from typing import Optional

import av
import cv2
import numpy as np
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import VIDEO_TIME_BASE

logger = logging.getLogger(__name__)

OPEN = struct.Struct("<8sIIII")
"""codec (b"vp8" | b"h264"), slot_bytes, min / start / max bitrate (bit/s); with the stream socket and shm fds."""
REQUEST = struct.Struct("<IqIHHBB")
"""seq, pts (1/90000 s), bitrate (bit/s), width, height, slot (0 | 1), keyframe (0 | 1)."""
REPLY = struct.Struct("<IBI")
"""seq, status (OK | FAILED), length of what follows: the bitstream, or the error's UTF-8 text."""
OK, FAILED = 0, 1
SLOTS = 2
"""Frames per stream's shared memory: the one being encoded and the newest waiting."""
CODECS = ("vp8", "h264")


class RawVp8Encoder(vpx.Vp8Encoder):
    """aiortc's VP8 encoder returning the frame's bitstream whole (aiortc's Vp8Encoder.pack packetizes it)."""

    @classmethod
    def _packetize(cls, buffer: bytes, picture_id: int) -> list[bytes]:
        return [buffer] if buffer else []


class RawH264Encoder(h264.H264Encoder):
    """aiortc's H264 encoder returning Annex B (aiortc's H264Encoder.pack splits and packetizes it)."""

    @classmethod
    def _packetize(cls, packages) -> list[bytes]:
        data = b"".join(b"\x00\x00\x00\x01" + nal for nal in packages)
        return [data] if data else []


def new_encoder(codec: str):
    """A fresh raw encoder for `codec` ("vp8" | "h264"); its first frame is a keyframe."""
    if codec not in CODECS:
        raise ValueError(f"expected a codec in {CODECS}, got {codec!r}")
    return RawVp8Encoder() if codec == "vp8" else RawH264Encoder()


def rgb_frame_to_i420(image: np.ndarray, pts: int) -> av.VideoFrame:
    """[H, W, 3] uint8 RGB (H, W even) -> a yuv420p av.VideoFrame stamped with pts (1/90000 s)."""
    height, width = image.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"expected an even width and height (4:2:0), got {width}x{height}")
    frame = av.VideoFrame.from_numpy_buffer(cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
    frame.pts = pts
    frame.time_base = VIDEO_TIME_BASE
    return frame


def encode_request(encoder, shm: mmap.mmap, slot_bytes: int, request: tuple) -> bytes:
    """Encode the frame a REQUEST names; the raw bitstream (b"" when the encoder held it back)."""
    _, pts, bitrate, width, height, slot, keyframe = request
    if slot >= SLOTS or width * height * 3 > slot_bytes:
        raise ValueError(f"expected a frame in a slot of {slot_bytes} bytes, got slot {slot}, {width}x{height}")
    image = np.frombuffer(shm, np.uint8, count=width * height * 3, offset=slot * slot_bytes).reshape(height, width, 3)
    frame = rgb_frame_to_i420(image, pts)
    del image  # no view of the shared memory outlives the request (shm.close() refuses while one exists)
    encoder.target_bitrate = bitrate
    payloads, _ = encoder.encode(frame, bool(keyframe))
    return payloads[0] if payloads else b""


def recv_exact(sock: socket.socket, size: int) -> Optional[bytes]:
    """`size` bytes, or None at the end of the stream."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_stream(sock: socket.socket, shm: mmap.mmap, slot_bytes: int, codec: str) -> None:
    """One stream: encode each request in turn until the sender closes the socket."""
    encoder = new_encoder(codec)
    failures = 0
    try:
        while (data := recv_exact(sock, REQUEST.size)) is not None:
            request = REQUEST.unpack(data)
            try:
                body, status = encode_request(encoder, shm, slot_bytes, request), OK
            except Exception as error:  # one frame of one stream: answered, the encoder renewed
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.debug("stream encode failed (%d so far): %s", failures, error)
                encoder = new_encoder(codec)
                body, status = f"{type(error).__name__}: {error}"[:500].encode(), FAILED
            sock.sendall(REPLY.pack(request[0], status, len(body)) + body)
    except OSError:
        pass  # the sender went away mid-reply
    finally:
        sock.close()
        try:
            shm.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass


def apply_bitrates(min_bps: int, start_bps: int, max_bps: int) -> None:
    """aiortc's encoder bitrate constants in this process, as the sender set them (rtc.apply_bitrate)."""
    for module in (vpx, h264):
        module.MIN_BITRATE, module.DEFAULT_BITRATE, module.MAX_BITRATE = min_bps, start_bps, max_bps


def serve(control: socket.socket) -> None:
    """Open a stream thread for every OPEN record until the sender closes `control`."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(control, OPEN.size, 2)
        except OSError:
            return
        if not data:
            return
        if len(data) < OPEN.size:
            data += recv_exact(control, OPEN.size - len(data)) or b""
        if len(data) != OPEN.size or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            logger.error("encoder process: malformed stream record (%d bytes, %d fds); stopping", len(data), len(fds))
            return
        name, slot_bytes, min_bps, start_bps, max_bps = OPEN.unpack(data)
        apply_bitrates(min_bps, start_bps, max_bps)
        sock = socket.socket(fileno=fds[0])
        shm = mmap.mmap(fds[1], SLOTS * slot_bytes)
        os.close(fds[1])  # the mapping holds its own reference
        codec = name.rstrip(b"\0").decode()
        threading.Thread(target=serve_stream, args=(sock, shm, slot_bytes, codec), name=f"encode-{codec}",
                         daemon=True).start()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the sender ends us
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m telepresence.stream.encoder_worker FD", file=sys.stderr)
        return 2
    # Each stream converts its own frames on its own thread: OpenCV's pool (a thread a core) only made the
    # streams' conversions wait and spin on each other (the H200 call at 512: this process took 3.1 cores
    # for 12 streams with the pool, 1.5 with OMP_NUM_THREADS=2 OPENCV_FOR_THREADS_NUM=2 for the whole call).
    cv2.setNumThreads(1)
    serve(socket.socket(fileno=int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
