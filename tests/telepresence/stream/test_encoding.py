"""The encoder process (telepresence.stream.encoding): streams encode side by side, their frames decode in
order, one stream's failure stays its own; and the parts of aiortc 1.16 it leans on still behave."""

import asyncio
import logging

import av
import numpy as np
import pytest
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import VIDEO_TIME_BASE
from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket, pack_remb_fci

from telepresence.pipeline import PipelineConfig
from telepresence.stream.encoder_worker import new_encoder, rgb_frame_to_i420
from telepresence.stream.encoding import EncoderPool
from telepresence.stream.sender import Sender, SenderConfig
from telepresence.stream.viewer import Viewer
from tests import fake_pipeline
from tests.helpers import ScriptedSource, async_test, card_image, mean_abs_diff, running_sender, wait_until

SIZE = 128


def picture(index: int, size: int = SIZE) -> np.ndarray:
    """A frame that says which it is: a bar whose position is the index."""
    image = np.full((size, size, 3), 40, np.uint8)
    x = (index * 8) % (size - 16)
    image[:, x:x + 16] = (230, 200, 60)
    return image


class Collected:
    """A stream's encoded frames, as they come back on the event loop."""

    def __init__(self, stream):
        self.frames = []
        stream.on_frame = self.frames.append

    def decoded(self, codec: str = "vp8") -> list[np.ndarray]:
        decoder = av.CodecContext.create(codec, "r")
        return [f.to_ndarray(format="rgb24") for frame in self.frames for f in decoder.decode(av.Packet(frame.data))]


@pytest.fixture
def pool():
    pool = EncoderPool()
    yield pool
    pool.close()


async def submit_in_turn(stream, collected: Collected, images: list[np.ndarray], first: int = 0) -> None:
    """Each image (meta: first, first + 1, ...) once the one before it is back (none waits, none is dropped)."""
    for index, image in enumerate(images, first):
        answered = len(collected.frames) + stream.errors
        stream.submit(image, meta=index)
        await wait_until(lambda: len(collected.frames) + stream.errors > answered, timeout_s=30)


@async_test(timeout_s=90)
async def test_streams_encode_side_by_side_and_each_decodes_in_order(pool):
    slow, fast = pool.open_stream("vp8", 2160 * 3840 * 3), pool.open_stream("vp8", SIZE * SIZE * 3)
    slow_frames, fast_frames = Collected(slow), Collected(fast)
    await submit_in_turn(fast, fast_frames, [picture(0)])  # the encoder process is up

    # A 4K frame of noise keeps one encoder thread busy for a long while; the other stream's frames
    # come back meanwhile. One thread for both would answer them only after the 4K frame.
    slow.submit(np.random.default_rng(0).integers(0, 256, (2160, 3840, 3), np.uint8), meta="4k")
    await submit_in_turn(fast, fast_frames, [picture(i) for i in range(1, 6)], first=1)
    assert not slow_frames.frames, "the small stream waited for the big one"
    await wait_until(lambda: slow_frames.frames, timeout_s=30)

    assert [f.meta for f in fast_frames.frames] == list(range(6))
    pts = [f.pts for f in fast_frames.frames]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    decoded = fast_frames.decoded()
    assert len(decoded) == 6
    assert all(mean_abs_diff(image, picture(i)) < 8 for i, image in enumerate(decoded))
    assert slow_frames.decoded()[0].shape == (2160, 3840, 3)
    slow.close()
    fast.close()


@async_test(timeout_s=60)
async def test_a_failing_frame_of_one_stream_drops_that_frame_only(pool, caplog):
    streams = [pool.open_stream("vp8", SIZE * SIZE * 3) for _ in range(3)]
    collected = [Collected(stream) for stream in streams]
    odd = np.zeros((SIZE - 2, SIZE - 1, 3), np.uint8)  # 4:2:0 needs an even width: the encode fails
    with caplog.at_level(logging.WARNING, logger="telepresence.stream.encoding"):
        for index in range(8):
            for which, stream in enumerate(streams):
                image = odd if which == 1 and 2 <= index < 5 else picture(index + which)
                stream.submit(image, meta=index)
            await wait_until(lambda: all(len(c.frames) + s.errors > index for c, s in zip(collected, streams)),
                             timeout_s=30)

    assert [s.errors for s in streams] == [0, 3, 0]
    assert "even width and height" in caplog.text
    for which, frames in enumerate(collected):
        expected = [i for i in range(8) if not (which == 1 and 2 <= i < 5)]
        assert [f.meta for f in frames.frames] == expected
        decoded = frames.decoded()  # the failing stream goes on from a fresh encoder's keyframe
        assert len(decoded) == len(expected)
        assert all(mean_abs_diff(image, picture(i + which)) < 8 for i, image in zip(expected, decoded))
    for stream in streams:
        stream.close()


@async_test(timeout_s=60)
async def test_newest_frame_wins_while_the_stream_is_busy(pool):
    stream = pool.open_stream("vp8", SIZE * SIZE * 3)
    collected = Collected(stream)
    await submit_in_turn(stream, collected, [picture(0)])
    for index in range(1, 6):  # all at once: the first is encoded, the last waits, the rest are dropped
        stream.submit(picture(index), meta=index)
    await wait_until(lambda: len(collected.frames) == 3, timeout_s=30)
    assert [f.meta for f in collected.frames] == [0, 1, 5] and stream.frames_dropped == 3
    assert len(collected.decoded()) == 3
    stream.close()


@async_test(timeout_s=60)
async def test_a_paced_stream_encodes_the_next_frame_once_the_last_is_consumed(pool):
    stream = pool.open_stream("vp8", SIZE * SIZE * 3)
    stream.paced = True
    collected = Collected(stream)
    await submit_in_turn(stream, collected, [picture(0)])
    for index in range(1, 4):  # none goes to the encoder: frame 0 is not consumed; each replaces the last
        stream.submit(picture(index), meta=index)
    assert stream.frames_dropped == 2
    stream.consumed()
    await wait_until(lambda: len(collected.frames) == 2, timeout_s=30)
    assert [f.meta for f in collected.frames] == [0, 3] and len(collected.decoded()) == 2
    stream.close()


@async_test(timeout_s=60)
async def test_an_ended_encoder_process_fails_its_streams_and_a_new_one_serves_the_next(pool):
    pool.broken_within_s = 0.0
    stream = pool.open_stream("vp8", SIZE * SIZE * 3)
    collected = Collected(stream)
    reasons = []
    stream.on_failed = reasons.append
    await submit_in_turn(stream, collected, [picture(0)])
    pool._process.kill()
    await wait_until(lambda: reasons, timeout_s=10)
    assert stream.failed and "ended" in reasons[0]
    stream.submit(picture(1))  # ignored, not an error
    stream.close()  # after failing: nothing left to release, not an error

    again = pool.open_stream("vp8", SIZE * SIZE * 3)
    frames = Collected(again)
    await submit_in_turn(again, frames, [picture(2)], first=2)
    assert len(frames.decoded()) == 1
    again.close()


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_the_bitstream_goes_through_aiortcs_packetizer_and_decodes(codec):
    """What the encoder process returns, packed by aiortc's own encoder (RTCRtpSender's way with an
    av.Packet) and depacketized as a receiver does, decodes to the pictures. The raw encoders override
    aiortc's _packetize: a change there breaks this."""
    encoder, packer = new_encoder(codec), (vpx.Vp8Encoder if codec == "vp8" else h264.H264Encoder)()
    depayload = vpx.vp8_depayload if codec == "vp8" else h264.h264_depayload
    decoder = av.CodecContext.create(codec, "r")
    decoded = []
    for index in range(5):
        payloads, _ = encoder.encode(rgb_frame_to_i420(picture(index), pts=index * 3000), index == 3)
        assert len(payloads) == 1
        packet = av.Packet(payloads[0])
        packet.pts, packet.time_base = index * 3000, VIDEO_TIME_BASE
        rtp_payloads, timestamp = packer.pack(packet)
        assert timestamp == index * 3000 and all(len(p) <= 1300 for p in rtp_payloads)
        data = b"".join(depayload(p) for p in rtp_payloads)
        decoded += [f.to_ndarray(format="rgb24") for f in decoder.decode(av.Packet(data))]
    assert len(decoded) == 5
    assert all(mean_abs_diff(image, picture(i)) < 8 for i, image in enumerate(decoded))


def still_source():
    image = card_image()
    return ScriptedSource(lambda i: image, fps=30)


@pytest.mark.parametrize("codec", ["vp8", "h264"])
@async_test(timeout_s=60)
async def test_the_sender_encodes_in_the_encoder_process_and_keeps_aiortc_in_the_loop(codec):
    async with running_sender(source=still_source(), codec=codec) as sender:
        viewer = Viewer()
        await viewer.connect(sender, "v1")
        first = await viewer.next_frame(timeout_s=20)
        assert mean_abs_diff(first, card_image()) < 12
        peer = sender.viewers["v1"]
        stream, rtp_sender = peer.track.encoder, peer.pc.getTransceivers()[0].sender
        assert stream is not None and stream.codec == codec and not stream.failed

        # A picture-loss report makes the next frame a keyframe (RTCRtpSender._send_keyframe).
        requested = []
        on_frame = stream.on_frame
        stream.on_frame = lambda frame: (requested.append(frame.keyframe_requested), on_frame(frame))
        await rtp_sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=rtp_sender._ssrc))
        await wait_until(lambda: any(requested), timeout_s=10)
        # The receiver's estimate lands on aiortc's encoder for the sender, and from there in ours.
        remb = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=pack_remb_fci(1_234_000, [rtp_sender._ssrc]))
        await rtp_sender._handle_rtcp_packet(remb)
        assert stream.bitrate() == 1_234_000
        remb = RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=pack_remb_fci(1_000, [rtp_sender._ssrc]))
        await rtp_sender._handle_rtcp_packet(remb)
        assert stream.bitrate() == sender.config.bitrate.min_kbps * 1000  # clamped by rtc.apply_bitrate's floor
        await viewer.next_frame(timeout_s=10)
        await viewer.close()


@async_test(timeout_s=90)
async def test_a_viewer_whose_encoder_process_ends_keeps_its_video(pool):
    pool.broken_within_s = 0.0
    sender = Sender(SenderConfig(), fake_pipeline.Pipeline(PipelineConfig(size=256)), source=still_source(),
                    encoder_pool=pool)
    await sender.start()
    try:
        viewer = Viewer()
        await viewer.connect(sender, "v1")
        await viewer.next_frame(timeout_s=20)
        track = sender.viewers["v1"].track
        stream = track.encoder
        assert stream is not None
        pool._process.kill()
        await wait_until(lambda: stream.failed is not None, timeout_s=10)
        assert track.encoder is None
        received = viewer.frames_received
        await wait_until(lambda: viewer.frames_received > received + 10, timeout_s=10)  # aiortc encodes now
        assert mean_abs_diff(await viewer.next_frame(), card_image()) < 12
        await viewer.close()
    finally:
        await sender.stop()
