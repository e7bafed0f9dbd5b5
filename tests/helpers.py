"""Shared test plumbing: run coroutines, in-process receivers and senders, raw signaling sockets,
scripted sources, picture differences, this process's open descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import websockets

from telepresence.stream.capture import FrameSource, SampleSource
from telepresence.pipeline import PipelineConfig
from telepresence.stream.receiver import Receiver, ReceiverConfig
from telepresence.stream.sender import Sender, SenderConfig
from tests import fake_pipeline
from tests.conftest import REPO


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


@contextlib.asynccontextmanager
async def running_receiver(**config: Any) -> AsyncIterator[Receiver]:
    """A started in-process Receiver on a free port (or `port`), serving this checkout's web/."""
    receiver = Receiver(ReceiverConfig(**{"port": 0, "web_dir": REPO / "web", **config}))
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def connect(receiver: Receiver, **options: Any) -> Any:
    """A raw websocket to the receiver's /ws (no Origin header, like a Python client)."""
    return await websockets.connect(receiver.signaling_url, compression=None, max_size=None, **options)


async def recv_json(ws: Any, timeout_s: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def request(ws: Any, message: Any, timeout_s: float = 5.0) -> dict:
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return await recv_json(ws, timeout_s)


async def join(receiver: Receiver, role: str, room: str = "demo", **extra: Any) -> tuple[Any, dict]:
    ws = await connect(receiver)
    reply = await request(ws, {"type": "join", "room": room, "role": role, **extra})
    assert reply["type"] == "joined", reply
    return ws, reply


def open_fds() -> int:
    """File descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def udp_sockets() -> int:
    """UDP sockets (IPv4 and IPv6) this process holds: its socket descriptors found in /proc/net/udp*."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    udp = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                udp.add(line.split()[9])
    return len(inodes & udp)


@contextlib.asynccontextmanager
async def running_call(limits: Any = None, size: int = 256, device: str = "cpu", **call: Any) -> AsyncIterator[Receiver]:
    """A started in-process call server (telepresence serve's Receiver + CallHost, the fake pipeline in each
    participant's process unless `pipeline_factory` names another) on a free port; `receiver.signaling.cameras`
    is its CallHost. limits: the receiver's RoomLimits; device: the pipelines' (the fake one ignores it);
    `call`: CallConfig's other fields."""
    from telepresence.stream.call import CallConfig, CallHost
    from telepresence.stream.signaling import RoomLimits

    call.setdefault("pipeline_factory", "tests.fake_pipeline:build_pipeline")
    host = CallHost(CallConfig(pipeline=PipelineConfig(size=size, device=device), **call))
    receiver = Receiver(ReceiverConfig(port=0, web_dir=REPO / "web", limits=limits or RoomLimits()), cameras=host)
    host.attach(receiver.signaling)
    await receiver.start()
    try:
        yield receiver
    finally:
        await host.close()
        await receiver.stop()
