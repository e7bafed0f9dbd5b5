"""A capture timestamp drawn into the picture, for glass-to-glass latency.

The sender paints the frame's capture time into the top-left corner of a view
after refinement (every view with `stamp_frames`, one viewer's after that
viewer's `stamps {on: true}`); the viewer reads it back from the decoded or
displayed picture and subtracts it from its own clock (corrected by the clock
offset measured over ping/pong on another host), so the measured delay covers
capture, pipeline, encode, network, jitter buffer and decode without any side
channel. web/latency.js reads it the same way (readFrameCode).

Layout: 28 cells in a 7x4 grid of `cell = max(4, S // 32)` pixels (8 px at
256, 16 px at 512, aligned to the codec's 8x8 blocks), row-major, most
significant bit first, white = 1:

    value    = t_capture_ms mod 2**24                 (24 bits, wraps every 4.66 h)
    checksum = xor of value's six nibbles xor 0b1010  (4 bits; a black or white
                                                        corner does not decode)
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Optional

import numpy as np

VALUE_BITS = 24
CHECK_BITS = 4
COLS, ROWS = 7, 4
WRAP = 1 << VALUE_BITS


def cell_px(size: int) -> int:
    """Cell side in pixels for an image of side `size`."""
    return max(4, size // 32)


def _checksum(value: int) -> int:
    check = 0b1010
    for shift in range(0, VALUE_BITS, 4):
        check ^= (value >> shift) & 0xF
    return check


def capture_stamp(t_s: float) -> int:
    """The stamp of wall-clock time `t_s` (seconds since the epoch): ms modulo 2**24."""
    return int(t_s * 1e3) % WRAP


def now_stamp_ms() -> int:
    """The current wall-clock time in ms, modulo 2**24."""
    return capture_stamp(time.time())


def stamp_age_ms(stamp: int, now_stamp: Optional[int] = None) -> int:
    """Milliseconds from `stamp` to `now_stamp` (default: now), across the wrap."""
    now = now_stamp if now_stamp is not None else now_stamp_ms()
    return (now - stamp) % WRAP


def glass_to_glass_ms(stamp: int, t_shown_ms: float, offset_ms: float = 0.0) -> int:
    """Milliseconds from the capture `stamp` to `t_shown_ms` on this side's wall clock, whose
    difference to the sender's clock is `offset_ms` (ClockOffset.offset_ms; 0 on the sender's host)."""
    return stamp_age_ms(stamp, int(round(t_shown_ms + offset_ms)) % WRAP)


class ClockOffset:
    """The sender's wall clock minus this side's, from ping/pong pairs (NTP's clock filter: the
    sample with the lowest round trip among the last `window` is the least disturbed by queueing):

        offset = t_sender - (t_sent + t_received) / 2        error <= rtt / 2

    web/latency.js keeps the same estimate (class ClockOffset).
    """

    def __init__(self, window: int = 16) -> None:
        self._samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)  # (rtt, offset) ms

    def add(self, t_sent_ms: float, t_received_ms: float, t_sender_ms: float) -> None:
        """One ping sent at t_sent_ms, its pong received at t_received_ms (this side's wall clock),
        stamped t_sender_ms by the sender."""
        rtt = t_received_ms - t_sent_ms
        if rtt >= 0:
            self._samples.append((rtt, t_sender_ms - (t_sent_ms + t_received_ms) / 2))

    @property
    def offset_ms(self) -> Optional[float]:
        """Sender clock minus this clock, ms; None before the first pong."""
        return min(self._samples)[1] if self._samples else None


def draw_frame_code(image: np.ndarray, stamp: int) -> None:
    """Paint `stamp` (0 <= stamp < 2**24) into the top-left corner of image [H, W, 3] (or [H, W]) uint8, in place."""
    if not 0 <= stamp < WRAP:
        raise ValueError(f"expected 0 <= stamp < {WRAP}, got {stamp}")
    block = _code_block((stamp << CHECK_BITS) | _checksum(stamp), cell_px(min(image.shape[:2])), image.shape[2:])
    image[: block.shape[0], : block.shape[1]] = block


@functools.lru_cache(maxsize=4)
def _code_block(word: int, cell: int, channels: tuple[int, ...]) -> np.ndarray:
    """The painted cells of `word`, [ROWS * cell, COLS * cell, *channels] uint8, made once for all the views of a
    frame and copied whole into each (2 us a view at 512 here; cell by cell, 28 assignments, 61 us, and the stamp
    took 37 % of the pipeline thread's wall time at 32 viewers on an H200 host: benchmarks/loopback.py --stacks)."""
    bits = (word >> np.arange(COLS * ROWS - 1, -1, -1)) & 1
    block = np.kron(bits.reshape(ROWS, COLS) * 255, np.ones((cell, cell), dtype=np.int64)).astype(np.uint8)
    block = np.ascontiguousarray(np.broadcast_to(block.reshape(block.shape + (1,) * len(channels)),
                                                 block.shape + channels))
    block.flags.writeable = False  # shared by the calls that hit the cache
    return block


def read_frame_code(image: np.ndarray, size: Optional[int] = None) -> Optional[int]:
    """The stamp painted by draw_frame_code, or None if none decodes.

    image: [H, W, 3] RGB or [H, W] luma (a decoded frame's Y plane; its row
    padding is harmless), uint8. size: the picture's side, if image is only
    a crop or padded (default: min(H, W)).
    """
    cell = cell_px(size if size is not None else min(image.shape[:2]))
    lo, hi = cell // 4, cell - cell // 4  # centre of each cell: codec ringing stays at the edges
    corner = image[: ROWS * cell, : COLS * cell].astype(np.float32)
    if corner.ndim == 3:
        corner = corner.mean(axis=2)
    if corner.shape != (ROWS * cell, COLS * cell):
        return None
    cells = corner.reshape(ROWS, cell, COLS, cell)[:, lo:hi, :, lo:hi].mean(axis=(1, 3))  # [ROWS, COLS]
    word = 0
    for bit in (cells.reshape(-1) > 127.5):
        word = (word << 1) | int(bit)
    stamp, check = word >> CHECK_BITS, word & ((1 << CHECK_BITS) - 1)
    return stamp if _checksum(stamp) == check else None
