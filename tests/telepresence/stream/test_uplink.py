"""A participant's camera at the server: which offers are refused and why, which frame sizes, and the
capture stamps a benchmark paints into its camera."""

import asyncio
import time

import av
import numpy as np
import pytest

from telepresence.stream.capture import SourceError
from telepresence.stream.framecode import WRAP, draw_frame_code
from telepresence.stream.participant import CallParticipant, FramePacer
from telepresence.stream.rtc import InvalidOfferError
from telepresence.stream.uplink import CameraRate, TrackSource, check_uplink_offer, frame_size_error
from telepresence.stream.viewer import Viewer
from tests.fake_camera import head_frame
from tests.helpers import ScriptedSource, async_test


async def camera_offer() -> str:
    """The offer a participant makes: one sendonly video section and the uplink channel."""
    participant = CallParticipant(ScriptedSource(lambda i: head_frame(0.0)), "offer")
    await participant.uplink.setLocalDescription(await participant.uplink.createOffer())
    sdp = participant.uplink.localDescription.sdp
    await participant.leave()
    return sdp


@async_test(timeout_s=60)
async def test_a_participants_offer_is_taken_and_others_are_refused_with_the_reason():
    offer = await camera_offer()
    check_uplink_offer(offer)
    with pytest.raises(InvalidOfferError, match=r"no usable video codec in the offer \(AV1, VP9; expected VP8 or H264\)"):
        check_uplink_offer(offer.replace("VP8/90000", "VP9/90000").replace("H264/90000", "AV1/90000"))
    with pytest.raises(InvalidOfferError, match="does not send"):
        check_uplink_offer(offer.replace("a=sendonly", "a=recvonly"))
    viewer = Viewer()  # a viewer's offer receives video: it is no camera
    try:
        with pytest.raises(InvalidOfferError, match="does not send"):
            check_uplink_offer(await viewer.create_offer())
    finally:
        await viewer.close()
    with pytest.raises(InvalidOfferError, match="no DTLS fingerprint"):  # rtc.check_offer's checks come first
        check_uplink_offer("\r\n".join(line for line in offer.split("\r\n") if not line.startswith("a=fingerprint")))


def test_frame_sizes_outside_what_face_analysis_can_use_are_named():
    assert frame_size_error(640, 480) is None and frame_size_error(3840, 2160) is None
    assert frame_size_error(1, 1) == "frames of 1x1 pixels are too small (expected at least 16x16)"
    assert "4000x32 pixels are too large" in frame_size_error(4000, 32)
    assert "3000x3000 pixels are too large" in frame_size_error(3000, 3000)


class FakeTrack:
    """Hands out the given frames, then raises as a stopped track does."""

    def __init__(self, frames):
        self.frames = list(frames)

    async def recv(self):
        from aiortc.mediastreams import MediaStreamError

        await asyncio.sleep(0.01)
        if not self.frames:
            raise MediaStreamError
        return self.frames.pop(0)


@async_test(timeout_s=30)
async def test_the_track_source_keeps_the_newest_usable_frame_and_reads_capture_stamps():
    picture = np.full((240, 320, 3), 90, np.uint8)
    t_capture = time.time() - 0.25
    draw_frame_code(picture, int(t_capture * 1e3) % WRAP)
    tiny = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), np.uint8), format="rgb24")
    stamped = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
    source = TrackSource("test", read_stamps=True)
    source.attach(FakeTrack([tiny, tiny, stamped]))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, source.grab)  # blocks until a usable frame has come: the tiny ones are not
    assert source.frames_received == 1 and source.bad_in_a_row == 0
    image = await loop.run_in_executor(None, source.retrieve)
    assert image.shape == (240, 320, 3) and not image.flags.writeable
    assert source.frame_time() == pytest.approx(t_capture, abs=0.005)
    source.close()
    with pytest.raises(SourceError):
        await loop.run_in_executor(None, source.grab)


def _rates(camera_rate, windows):
    """Feed CameraRate `windows` of (frames processed, seconds): the rates it asks for (None: no message)."""
    t, asked = 0.0, []
    camera_rate.update(t)
    for frames, seconds in windows:
        for _ in range(frames):
            camera_rate.frame()
        t += seconds
        asked.append(camera_rate.update(t))
    return asked


def test_the_camera_is_asked_for_a_margin_over_what_the_pipeline_processes():
    # The first window with frames may have only partly worked: nothing yet. Then a CPU pipeline taking 6 of the
    # camera's frames a second: 1.5 x 6 + 1 = 10, then no message while it stays.
    assert _rates(CameraRate(), [(3, 2.0), (12, 2.0), (12, 2.0), (13, 2.0)]) == [None, 10.0, None, None]
    # Slower (3 a second): down to 5.5 -> 6; never below min_fps.
    assert _rates(CameraRate(), [(3, 2.0), (12, 2.0), (6, 2.0), (1, 2.0)]) == [None, 10.0, 6.0, 5.0]
    # Within the window nothing is decided; a window with no frame (a warm-up, a compile, a new viewer's graphs)
    # changes nothing, nor does the partly worked one after it.
    assert _rates(CameraRate(), [(1, 2.0), (5, 1.0), (7, 1.0), (0, 2.0), (2, 2.0), (12, 2.0)]) == \
        [None, None, 10.0, None, None, None]


def test_a_pipeline_that_keeps_up_gets_the_full_rate_back():
    # Asked for 10, it then takes 9 of them (at least 0.8): it may do more, so the full rate again; then it
    # falls behind at 7 (1.5 x 7 + 1).
    assert _rates(CameraRate(max_fps=30.0), [(1, 2.0), (12, 2.0), (18, 2.0), (14, 2.0)]) == [None, 10.0, 30.0, 12.0]
    # A GPU that keeps up with a 30 fps camera: asked once for 30 and left there.
    assert _rates(CameraRate(max_fps=30.0), [(20, 2.0), (60, 2.0), (59, 2.0), (60, 2.0)]) == [None, 30.0, None, None]


def test_camera_rate_settings_are_checked():
    with pytest.raises(ValueError, match="min_fps <= max_fps"):
        CameraRate(min_fps=20.0, max_fps=10.0)


def test_the_python_camera_sends_at_most_the_rate_asked():
    pacer = FramePacer()
    times = [i / 25.0 for i in range(250)]  # a 25 fps camera for 10 s
    assert sum(pacer.take(t) for t in times) == 250  # nothing asked: every frame
    pacer.max_fps = 10.0
    taken = [t for t in times if pacer.take(t)]
    assert 99 <= len(taken) <= 101  # 10 a second on average, not every third frame (83)
    assert min(b - a for a, b in zip(taken, taken[1:])) >= 0.08 - 1e-9  # never two frames of one period
