"""A call participant in Python: the call page's role (tests, benchmarks/call.py).

Same protocol as web/call.js: join a room as a viewer; `publish` a camera (one sendonly video track
and the "uplink" channel, pinged every second); watch every sender in the room but one's own avatar
with a telepresence.stream.viewer.Viewer each, its pose the server's head offset (as the page's
orbit at rest plus the offset). The camera is a FrameSource played by `CameraTrack`, which can paint
each frame's capture time into it (framecode) so the other side measures glass to glass, uplink included.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Optional

import av
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription

from .capture import FrameSource, SourceError
from .framecode import WRAP, draw_frame_code
from .call_messages import (
    CameraRateMessage,
    HeadMessage,
    PublishedMessage,
    PublishMessage,
    UnpublishedMessage,
    UnpublishMessage,
    parse_call_message,
)
from .messages import (
    ErrorMessage,
    MessageError,
    OfferMessage,
    PeerJoinedMessage,
    PeerLeftMessage,
    PingMessage,
    RelayedAnswerMessage,
    RelayedDeclineMessage,
)
from .renderloop import RenderedView
from .rtc import IceConfig
from .signaling_client import SignalingClient
from .track import ViewTrack
from .viewer import Viewer, ViewerError

logger = logging.getLogger(__name__)


class FramePacer:
    """Which camera frames go when at most `max_fps` may (None: all): `take(t)` for each frame's time, in
    seconds. On average max_fps go, not fewer: the next one is due a period after the last one was due,
    not after it came (a 25 fps camera at 10 gives 10, not every third frame's 8.3)."""

    def __init__(self) -> None:
        self.max_fps: Optional[float] = None
        self._due: Optional[float] = None

    def take(self, t: float) -> bool:
        max_fps = self.max_fps
        if not max_fps:
            return True
        period = 1.0 / max_fps
        if self._due is not None and t < self._due:
            return False
        self._due = t + period if self._due is None else max(self._due + period, t - period)
        return True


class CameraTrack(ViewTrack):
    """A FrameSource played as an outgoing video track: a thread grabs its frames at the source's own
    pace and hands each to the track (newest wins); `stamp` paints the capture time into each;
    its `pacer` (the server's `camera-rate`, as the page sets its sender's maxFramerate) leaves out the
    frames that would come sooner than that rate allows."""

    def __init__(self, source: FrameSource, stamp: bool = False) -> None:
        super().__init__()
        self.source = source
        self.stamp = stamp
        self.pacer = FramePacer()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="camera", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        frame_id = 0
        while not self._stop.is_set() and self.readyState == "live":
            try:
                self.source.grab()
                t_capture = time.time()
                if not self.pacer.take(t_capture):
                    continue
                image = self.source.retrieve()
            except SourceError as error:
                logger.error("camera %s stopped: %s", self.source.name, error)
                return
            if self.stamp:
                image = image.copy()
                draw_frame_code(image, int(t_capture * 1e3) % WRAP)
            self.deliver(RenderedView(image, frame_id, t_capture, "ok"))
            frame_id += 1

    def stop(self) -> None:
        super().stop()
        self._stop.set()

    def close(self) -> None:
        """Stop the track and its thread, and close the source."""
        self.stop()
        self._thread.join(timeout=2.0)
        self.source.close()


class CallParticipant:
    """One person in a call, in Python: their camera up, everyone else's avatar down."""

    heartbeat_interval_s = 1.0

    def __init__(self, source: FrameSource, name: str = "python", stamp: bool = False, ice: IceConfig = IceConfig(),
                 on_frame: Optional[Callable[[str, av.VideoFrame, float], None]] = None) -> None:
        """on_frame(sender_id, frame, t_received): every decoded frame of every watched sender."""
        self.name = name
        self.ice = ice
        self.on_frame = on_frame
        self.camera = CameraTrack(source, stamp)
        self.uplink = RTCPeerConnection(ice.rtc_configuration())
        self.uplink.addTransceiver(self.camera, direction="sendonly")
        self.channel = self.uplink.createDataChannel("uplink", ordered=False, maxRetransmits=0)
        self.channel.on("message", self._on_uplink_message)
        self.channel.on("open", lambda: self._spawn(self._heartbeat()))
        self.viewers: dict[str, Viewer] = {}
        """Sender id -> the Viewer watching it."""
        self.names: dict[str, str] = {}
        self.id: Optional[str] = None
        """This participant's own (viewer) id in the room."""
        self.avatar_id: Optional[str] = None
        """The room id of this participant's own avatar (from `published`)."""
        self.head: Optional[HeadMessage] = None
        self.unpublished: Optional[str] = None
        """Why the server refused or dropped this camera, once it has."""
        self._client: Optional[SignalingClient] = None
        self._published = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- joining --

    async def join(self, signaling_url: str, room: str, token: Optional[str] = None, timeout_s: float = 60.0) -> str:
        """Join `room`, publish the camera and watch the senders there; returns this avatar's id.
        ViewerError when the server refuses the camera (its reason) or does not answer in timeout_s."""
        client = self._client = SignalingClient(signaling_url, room, "viewer", self.name, token, open_timeout_s=timeout_s)
        try:
            joined = await client.connect()
        except RuntimeError as error:
            raise ViewerError(str(error)) from error
        self.id = joined.id
        await self.uplink.setLocalDescription(await self.uplink.createOffer())
        await client.send(PublishMessage(self.uplink.localDescription.sdp))
        self._spawn(self._signaling(client))
        for peer in joined.peers:
            self._spawn(self._watch(peer))
        try:
            await asyncio.wait_for(self._published.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise ViewerError(f"the server did not answer the camera in {timeout_s:.0f} s") from None
        if self.avatar_id is None:
            raise ViewerError(f"the server refused the camera: {self.unpublished}")
        return self.avatar_id

    async def _signaling(self, client: SignalingClient) -> None:
        try:
            async for message in client.messages():
                await self._on_server_message(message)
        except websockets.exceptions.ConnectionClosed:
            pass

    async def _on_server_message(self, message: Any) -> None:
        if isinstance(message, PublishedMessage):
            await self.uplink.setRemoteDescription(RTCSessionDescription(sdp=message.sdp, type="answer"))
            self.avatar_id = message.id
            self._published.set()
        elif isinstance(message, UnpublishedMessage):
            self.unpublished = message.reason
            self._published.set()
        elif isinstance(message, PeerJoinedMessage):
            self._spawn(self._watch(message.peer))
        elif isinstance(message, PeerLeftMessage):
            if (viewer := self.viewers.pop(message.id, None)) is not None:
                await viewer.close()
        elif isinstance(message, RelayedAnswerMessage):
            if (viewer := self.viewers.get(message.from_id)) is not None:
                await viewer.accept_answer(message.sdp)
        elif isinstance(message, RelayedDeclineMessage):
            logger.warning("%s: sender %s declined: %s", self.name, message.from_id, message.reason)
        elif isinstance(message, ErrorMessage):
            logger.warning("%s: signaling error %s: %s", self.name, message.code, message.message)

    async def _watch(self, peer: dict) -> None:
        """Offer to one sender of the room (not one's own avatar, which joins after `published`)."""
        sender_id = peer.get("id")
        if peer.get("role") != "sender" or sender_id in self.viewers or sender_id == self.avatar_id:
            return
        self.names[sender_id] = peer.get("name", "")
        on_frame = None if self.on_frame is None else (lambda frame, t, sid=sender_id: self.on_frame(sid, frame, t))
        viewer = self.viewers[sender_id] = Viewer(self.ice, on_frame=on_frame)
        assert self._client is not None
        await self._client.send(OfferMessage(to=sender_id, sdp=await viewer.create_offer()))

    # -- uplink channel --

    async def _heartbeat(self) -> None:
        while self.channel.readyState == "open":
            self.channel.send(PingMessage(t=time.time() * 1e3).to_json())
            await asyncio.sleep(self.heartbeat_interval_s)

    def _on_uplink_message(self, raw: Any) -> None:
        try:
            message = parse_call_message(raw)
        except MessageError as error:
            logger.warning("%s: ignoring a malformed uplink message (%s)", self.name, error)
            return
        if isinstance(message, HeadMessage):
            self.head = message
            for viewer in self.viewers.values():
                if viewer.channel.readyState == "open":
                    viewer.set_pose(message.yaw, message.pitch, message.dist)
        elif isinstance(message, CameraRateMessage):
            self.camera.pacer.max_fps = message.fps
        elif isinstance(message, UnpublishedMessage):
            self.unpublished = message.reason

    # -- leaving --

    async def leave(self) -> None:
        """Unpublish, stop the camera, close every connection."""
        if self._client is not None and self.avatar_id is not None and self.unpublished is None:
            try:
                await self._client.send(UnpublishMessage())
            except Exception as error:  # the socket is gone: the server's heartbeat check drops us
                logger.debug("%s: could not unpublish: %s", self.name, error)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for viewer in list(self.viewers.values()):
            await viewer.close()
        self.viewers.clear()
        if self._client is not None:
            await self._client.close()
        await self.uplink.close()
        await asyncio.get_running_loop().run_in_executor(None, self.camera.close)
