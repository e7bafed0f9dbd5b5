"""Shared test plumbing: run coroutines, in-process senders, scripted sources, picture differences."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any, AsyncIterator, Callable

import numpy as np

from telepresence.stream.capture import FrameSource, SampleSource
from telepresence.pipeline import PipelineConfig
from telepresence.stream.sender import Sender, SenderConfig
from tests import fake_pipeline


def async_test(timeout_s: float = 30.0) -> Callable:
    """Run an `async def` test in a fresh event loop, failing after timeout_s."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout_s))

        return run

    return wrap


class ScriptedSource(FrameSource):
    """Frames drawn by `draw(index) -> [H, W, 3] uint8` at `fps`."""

    def __init__(self, draw: Callable[[int], np.ndarray], fps: float = 30.0) -> None:
        self.name = "scripted"
        self.fps = fps
        self.draw = draw
        self.index = -1
        self._next = time.monotonic()

    def grab(self) -> None:
        self._next += 1.0 / self.fps
        time.sleep(max(0.0, self._next - time.monotonic()))
        self.index += 1

    def retrieve(self) -> np.ndarray:
        return self.draw(self.index)


def card_image(size: int = 256) -> np.ndarray:
    """A still picture with structure everywhere (gradients, bars, a disc)."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, ((x // 32 + y // 32) % 2) * 200 + 30], axis=-1).astype(np.uint8)
    image[size // 3 : size // 3 + 20, :] = (250, 250, 250)
    return image


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@contextlib.asynccontextmanager
async def running_sender(source: FrameSource | None = None, **config: Any) -> AsyncIterator[Sender]:
    """A started in-process Sender with the fake pipeline (views of `size`=256 px unless given)."""
    size = config.pop("size", 256)
    pipeline = fake_pipeline.Pipeline(PipelineConfig(size=size))
    sender = Sender(SenderConfig(**config), pipeline, source=source if source is not None else SampleSource())
    await sender.start()
    try:
        yield sender
    finally:
        await sender.stop()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
