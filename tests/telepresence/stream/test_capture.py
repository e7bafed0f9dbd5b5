"""Capture sources, newest-wins slots and the frame stamp."""

import threading
import time

import av
import cv2
import numpy as np
import pytest

from telepresence.stream import capture
from telepresence.stream.capture import (
    CameraNotFoundError,
    CapturedFrame,
    CaptureThread,
    ImageSource,
    SampleSource,
    SourceError,
    VideoFileSource,
    open_source,
)
from telepresence.stream.framecode import (
    ClockOffset,
    capture_stamp,
    draw_frame_code,
    glass_to_glass_ms,
    read_frame_code,
    stamp_age_ms,
)
from telepresence.stream.slot import LatestSlot, SlotClosedError
from tests.helpers import ScriptedSource, card_image


def test_sample_source_is_embedded_and_loops():
    with SampleSource() as source:
        source.fps = 1000.0  # no pacing in the test
        source._pacer.interval_s = 0.0
        shapes = set()
        for _ in range(160):  # the clip has 154 frames
            source.grab()
            frame = source.retrieve()
            shapes.add(frame.shape)
        assert shapes == {(384, 384, 3)}
        assert frame.dtype == np.uint8 and not frame.flags.writeable


def test_image_source_repeats_the_still(tmp_path):
    path = tmp_path / "card.png"
    cv2.imwrite(str(path), cv2.cvtColor(card_image(), cv2.COLOR_RGB2BGR))
    source = open_source(str(path))
    assert isinstance(source, ImageSource)
    source.grab()
    np.testing.assert_array_equal(source.retrieve(), card_image())


@pytest.mark.parametrize("spec, message", [("missing.mp4", "no such video file"), ("missing.png", "cannot read image .*: no such file")])
def test_missing_files_give_a_clear_error(tmp_path, spec, message):
    with pytest.raises(SourceError, match=message):
        open_source(str(tmp_path / spec))


def test_unreadable_files_give_a_clear_error(tmp_path):
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"this is not a video")
    with pytest.raises(SourceError, match="cannot (open|decode) video file"):
        open_source(str(bad_video))
    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"nor an image")
    with pytest.raises(SourceError, match="cannot read image .*: not an image file, or corrupt"):
        open_source(str(bad_image))


def test_missing_camera_index_is_an_error():
    with pytest.raises(CameraNotFoundError, match="no camera at index 57"):
        open_source("57")


def test_webcam_falls_back_to_the_sample_with_one_warning(monkeypatch, caplog):
    def no_camera(index=0, **kwargs):
        raise CameraNotFoundError(f"no camera at index {index}")

    monkeypatch.setattr(capture, "WebcamSource", no_camera)
    with caplog.at_level("WARNING", logger="telepresence.stream.capture"):
        source = open_source("webcam")
    assert isinstance(source, SampleSource)
    assert len(caplog.records) == 1 and "embedded sample" in caplog.records[0].getMessage()
    source.close()


def test_video_file_plays_at_its_frame_rate(tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=50)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(10):
            image = np.full((64, 64, 3), i * 20, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    source = VideoFileSource(path)
    assert source.fps == pytest.approx(50)
    t0 = time.monotonic()
    for _ in range(25):  # loops past the end (10 frames)
        source.grab()
        assert source.retrieve().shape == (64, 64, 3)
    assert 0.4 <= time.monotonic() - t0 < 1.5  # 25 frames at 50 fps
    source.close()


def test_capture_thread_keeps_only_the_newest_frame():
    slot: LatestSlot[CapturedFrame] = LatestSlot()
    source = ScriptedSource(lambda i: np.full((16, 16, 3), i % 256, np.uint8), fps=200)
    thread = CaptureThread(source, slot)
    thread.start()
    time.sleep(0.3)  # nobody reads: frames pile onto the one slot
    version, frame = slot.wait_newer(0, timeout=1.0)
    thread.stop()
    assert frame.frame_id == version - 1 and frame.frame_id > 20
    assert slot.dropped >= frame.frame_id - 1
    assert abs(frame.t_capture - time.time()) < 1.0


def test_latest_slot_wait_and_close():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.wait_newer(0, timeout=0.01) is None
    slot.put(1)
    slot.put(2)
    assert slot.wait_newer(0) == (2, 2) and slot.dropped == 1
    threading.Timer(0.05, slot.close).start()
    with pytest.raises(SlotClosedError):
        slot.wait_newer(2, timeout=2.0)


def test_latest_slot_says_when_a_value_was_taken():
    slot: LatestSlot[int] = LatestSlot()
    version = slot.put(1)
    assert not slot.wait_taken(version, timeout=0.01)
    threading.Timer(0.05, lambda: slot.wait_newer(0)).start()
    assert slot.wait_taken(version, timeout=2.0)  # a reader took it
    version = slot.put(2)
    slot.put(3)
    assert slot.wait_taken(version, timeout=0.01)  # replaced: nobody will take it
    threading.Timer(0.05, slot.close).start()
    with pytest.raises(SlotClosedError):
        slot.wait_taken(slot.version, timeout=2.0)


@pytest.mark.parametrize("size", [256, 512])
def test_frame_code_round_trips_through_vp8(size):
    image = card_image(size)
    stamps = [0, 1, 0xABCDEF, (1 << 24) - 1, 123456]
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width = encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.bit_rate = 800_000  # the floor of BitrateConfig
    decoder = av.CodecContext.create("libvpx", "r")
    decoded = []
    for i, stamp in enumerate(stamps + [None]):
        if stamp is not None:
            frame_image = image.copy()
            draw_frame_code(frame_image, stamp)
            assert read_frame_code(frame_image) == stamp
            frame = av.VideoFrame.from_ndarray(frame_image, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
        for packet in encoder.encode(frame if stamp is not None else None):
            decoded += decoder.decode(packet)
    assert [read_frame_code(d.to_ndarray(format="rgb24")) for d in decoded] == stamps
    # the benchmark reads the luma plane directly (rows padded to line_size)
    luma = [np.frombuffer(d.planes[0], np.uint8).reshape(d.height, d.planes[0].line_size) for d in decoded]
    assert [read_frame_code(y[:64, :128], size=size) for y in luma] == stamps


@pytest.mark.parametrize("size", [128, 512, 300])
def test_frame_code_paints_each_cell_of_the_word(size):
    from telepresence.stream.framecode import CHECK_BITS, COLS, ROWS, _checksum, cell_px

    cell = cell_px(size)
    for stamp in (0, 1, 0xABCDEF, (1 << 24) - 1):
        image = card_image(size) if size != 300 else np.full((300, 400, 3), 77, np.uint8)
        before = image.copy()
        draw_frame_code(image, stamp)
        draw_frame_code(again := before.copy(), stamp)  # a second picture of the same frame: the same cells
        word = (stamp << CHECK_BITS) | _checksum(stamp)
        for i in range(COLS * ROWS):  # cell i holds bit i of the word, most significant first, row by row
            r, c = divmod(i, COLS)
            painted = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            assert (painted == (255 if (word >> (COLS * ROWS - 1 - i)) & 1 else 0)).all()
        rest = np.ones(image.shape[:2], bool)
        rest[: ROWS * cell, : COLS * cell] = False
        assert (image[rest] == before[rest]).all() and (again == image).all()
    gray = np.zeros((256, 256), np.uint8)  # a luma plane
    draw_frame_code(gray, 0xABCDEF)
    assert read_frame_code(gray) == 0xABCDEF


def test_plain_pictures_do_not_decode_as_stamps():
    for value in (0, 255, 128):
        assert read_frame_code(np.full((256, 256, 3), value, np.uint8)) is None
    assert read_frame_code(card_image()) is None
    assert stamp_age_ms(5, now_stamp=2) == (1 << 24) - 3  # across the wrap


def test_source_fps_overrides_the_pacing(tmp_path):
    """--source-fps plays the sample, a file or a still at another rate (a 30 fps webcam's, say)."""
    with open_source("sample", fps=50.0) as source:
        assert source.fps == 50.0
        t0 = time.monotonic()
        for _ in range(26):
            source.grab()
        assert 0.4 <= time.monotonic() - t0 < 1.5  # 25 intervals at 50 fps, not at the clip's 25
    path = tmp_path / "still.png"
    cv2.imwrite(str(path), np.zeros((16, 16, 3), np.uint8))
    assert open_source(str(path), fps=12.0).fps == 12.0
    assert open_source(str(path)).fps == 30.0
    with pytest.raises(SourceError, match="frame rate"):
        open_source("sample", fps=0.0)


def test_capture_thread_fits_frames_and_stops_on_frames_too_small(caplog):
    big = ScriptedSource(lambda i: np.full((2400, 3000, 3), 80, np.uint8), fps=100)
    slot: LatestSlot[CapturedFrame] = LatestSlot()
    thread = CaptureThread(big, slot)
    with caplog.at_level("INFO", logger="telepresence.stream.capture"):
        thread.start()
        _, frame = slot.wait_newer(0, timeout=5.0)
        slot.wait_newer(1, timeout=5.0)
        thread.stop()
    assert frame.image.shape == (1536, 1920, 3)
    assert len([r for r in caplog.records if "downscaling" in r.getMessage()]) == 1

    errors = []
    tiny = ScriptedSource(lambda i: np.zeros((8, 8, 3), np.uint8), fps=500)
    thread = CaptureThread(tiny, LatestSlot(), on_error=errors.append)
    thread.max_consecutive_errors = 3
    thread.start()
    time.sleep(0.5)
    assert len(errors) == 1 and "too small" in str(errors[0]) and not thread._thread.is_alive()


def test_clock_offset_takes_the_least_delayed_ping():
    clock = ClockOffset()
    assert clock.offset_ms is None
    true_offset = 5_000.0  # the sender's clock runs 5 s ahead
    for sent, out_ms, back_ms in [(0, 40, 2), (100, 1, 1), (200, 3, 30)]:  # one-way delays, ms
        clock.add(sent, sent + out_ms + back_ms, sent + out_ms + true_offset)
    assert clock.offset_ms == 5_000.0  # the symmetric 1 ms + 1 ms ping; the others are off by 19 and 13.5 ms
    clock.add(300, 299, 0)  # a reply "before" its ping (clock stepped): ignored
    assert clock.offset_ms == 5_000.0


def test_glass_to_glass_is_measured_on_the_senders_clock():
    t_capture_s = 1_700_000_000.123
    stamp = capture_stamp(t_capture_s)
    shown_on_viewer_ms = t_capture_s * 1e3 + 62 - 5_000  # 62 ms later, on a clock 5 s behind
    assert glass_to_glass_ms(stamp, shown_on_viewer_ms, offset_ms=5_000) == 62
    assert glass_to_glass_ms((1 << 24) - 10, 5.0) == 15  # across the wrap
