"""A headless viewer: the browser's role, in Python (tests, benchmarks, monitoring).

Same protocol as web/tile.js: recvonly video transceiver plus an unordered,
no-retransmit "pose" data channel, offer with ICE gathered, pose messages
{seq, t, yaw, pitch, dist}, a ping every second (with `stamps {on}` repeated
once asked for), the sender's clock offset from the pongs. Decoded frames
are drained as they arrive (aiortc's receive queue is unbounded) and only
the newest is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .framecode import ClockOffset, glass_to_glass_ms, read_frame_code
from .messages import (
    ErrorMessage,
    HelloMessage,
    MessageError,
    OfferMessage,
    PeerJoinedMessage,
    PingMessage,
    PongMessage,
    PoseMessage,
    RelayedAnswerMessage,
    RelayedDeclineMessage,
    StampsMessage,
    StatsMessage,
    StatusMessage,
    parse_sender_message,
)
from .rtc import IceConfig
from .signaling_client import SignalingClient

logger = logging.getLogger(__name__)


class ViewerError(RuntimeError):
    """The viewer could not connect (declined, no sender, signaling refused)."""


class Viewer:
    """One peer connection to one sender."""

    heartbeat_interval_s = 1.0

    def __init__(
        self,
        ice: IceConfig = IceConfig(),
        on_frame: Optional[Callable[[av.VideoFrame, float], None]] = None,
        heartbeat: bool = True,
    ) -> None:
        self.pc = RTCPeerConnection(ice.rtc_configuration())
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("pose", ordered=False, maxRetransmits=0)
        self.channel.on("message", self._on_message)
        self.channel.on("open", self._on_open)
        self.pc.on("track", self._on_track)
        self.on_frame = on_frame
        self.heartbeat = heartbeat
        self.frames_received = 0
        self.hello: Optional[HelloMessage] = None
        self.status: Optional[str] = None
        self.status_text = ""
        """What the sender says about its status (shown by the page)."""
        self.stats: Optional[StatsMessage] = None
        self.errors: list[ErrorMessage] = []
        self.clock = ClockOffset()
        self._stamps: Optional[bool] = None
        self._latest: Optional[av.VideoFrame] = None
        self._new_frame = asyncio.Event()
        self._channel_open = asyncio.Event()
        self._seq = 0
        self._tasks: set[asyncio.Task] = set()
        self._signaling: Optional[SignalingClient] = None

    # -- connection --

    async def create_offer(self) -> str:
        """The offer SDP, ICE candidates included."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def connect(self, sender: Any, viewer_id: str) -> None:
        """In-process: hand the offer straight to a telepresence.stream.sender.Sender."""
        await self.accept_answer(await sender.answer(viewer_id, await self.create_offer()))

    async def join(self, signaling_url: str, room: str, token: Optional[str] = None, timeout_s: float = 20.0) -> str:
        """Through a receiver: join `room`, offer to its first sender; returns that sender's id.

        The signaling socket stays open until close(): leaving the room ends the session.
        """
        deadline = time.monotonic() + timeout_s
        client = self._signaling = SignalingClient(signaling_url, room, "viewer", "python-viewer", token,
                                                   open_timeout_s=timeout_s)
        try:
            joined = await client.connect()
        except RuntimeError as error:
            raise ViewerError(str(error)) from error
        sender_id: Optional[str] = None
        if joined.peers:
            sender_id = joined.peers[0]["id"]
            await client.send(OfferMessage(to=sender_id, sdp=await self.create_offer()))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ViewerError(f"no answer from a sender in room {room!r} within {timeout_s:.0f} s")
            message = await client.recv(remaining)
            if isinstance(message, ErrorMessage):
                raise ViewerError(f"signaling error {message.code}: {message.message}")
            if isinstance(message, RelayedDeclineMessage):
                raise ViewerError(f"sender declined: {message.reason}")
            if sender_id is None:
                if isinstance(message, PeerJoinedMessage) and message.peer.get("role") == "sender":
                    sender_id = message.peer["id"]
                    await client.send(OfferMessage(to=sender_id, sdp=await self.create_offer()))
            elif isinstance(message, RelayedAnswerMessage) and message.from_id == sender_id:
                await self.accept_answer(message.sdp)
                self._spawn(self._drain_signaling())
                return sender_id

    async def _drain_signaling(self) -> None:
        assert self._signaling is not None
        try:
            async for _ in self._signaling.messages():
                pass
        except websockets.exceptions.ConnectionClosed:
            pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._signaling is not None:
            await self._signaling.close()
        await self.pc.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- pose channel --

    def _on_open(self) -> None:
        self._channel_open.set()
        if self.heartbeat:
            self._spawn(self._heartbeat())

    async def wait_channel_open(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._channel_open.wait(), timeout_s)

    async def _heartbeat(self) -> None:
        while self.channel.readyState == "open":
            self.send_raw(PingMessage(t=time.time() * 1e3).to_json())
            if self._stamps is not None:  # repeated: the channel may lose a message
                self.send_raw(StampsMessage(self._stamps).to_json())
            await asyncio.sleep(self.heartbeat_interval_s)

    def send_raw(self, text: str) -> None:
        """Send one message as-is on the pose channel (tests use it for malformed input)."""
        if self.channel.readyState == "open":
            self.channel.send(text)

    def set_pose(self, yaw: float, pitch: float = 0.0, dist: float = 1.0) -> None:
        """Ask for a camera orbit: degrees, degrees, distance scale."""
        self._seq += 1
        self.send_raw(PoseMessage(seq=self._seq, t=time.time() * 1e3, yaw=yaw, pitch=pitch, dist=dist).to_json())

    def set_stamps(self, on: bool) -> None:
        """Ask the sender to paint (or stop painting) the capture time into this viewer's frames."""
        self._stamps = on
        self.send_raw(StampsMessage(on).to_json())

    def glass_to_glass_ms(self, image: np.ndarray, t_received_s: float) -> Optional[int]:
        """Capture to `t_received_s` (this host's wall clock) of a decoded frame [H, W, 3] uint8 that
        carries a stamp, on the sender's clock; None without a stamp or a pong yet."""
        stamp, offset = read_frame_code(image), self.clock.offset_ms
        return None if stamp is None or offset is None else glass_to_glass_ms(stamp, t_received_s * 1e3, offset)

    def _on_message(self, raw: Any) -> None:
        try:
            message = parse_sender_message(raw)
        except MessageError as error:
            logger.warning("viewer: ignoring a malformed message from the sender (%s)", error)
            return
        if isinstance(message, HelloMessage):
            self.hello = message
        elif isinstance(message, StatusMessage):
            self.status = message.status
            self.status_text = message.message
        elif isinstance(message, StatsMessage):
            self.stats = message
            self.status = message.status
        elif isinstance(message, PongMessage):
            if message.wall_ms is not None:
                self.clock.add(message.t, time.time() * 1e3, message.wall_ms)
        elif isinstance(message, ErrorMessage):
            self.errors.append(message)

    # -- video --

    def _on_track(self, track: Any) -> None:
        if track.kind == "video":
            self._spawn(self._consume(track))

    async def _consume(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                t_received = time.time()
                self.frames_received += 1
                self._latest = frame
                self._new_frame.set()
                if self.on_frame is not None:
                    self.on_frame(frame, t_received)
        except MediaStreamError:
            pass

    async def next_frame(self, timeout_s: float = 10.0) -> np.ndarray:
        """The next newly decoded frame as [H, W, 3] uint8 RGB (skipping any older ones)."""
        self._new_frame.clear()
        await asyncio.wait_for(self._new_frame.wait(), timeout_s)
        assert self._latest is not None
        return self._latest.to_ndarray(format="rgb24")
