"""The sender: one capture and one FramePipeline, answering each viewer with its own track.

    signaling (websocket) --offer--> Sender.answer() --answer--> viewer
    RenderLoop (threads) --newest frame--> ViewTrack per viewer --> RTCPeerConnection
    pose channel --newest pose (by seq)--> RenderLoop.set_pose

Per viewer: one RTCPeerConnection, one ViewTrack and the viewer's "pose"
data channel (unordered, maxRetransmits 0). The viewers' frames are encoded in
an encoder process beside the sender, a thread per viewer there
(telepresence.stream.encoding; `encoder="aiortc"`: in aiortc's thread pool in
this process, as before). The viewer pings once a second;
a viewer silent for `heartbeat_timeout_s` (or whose connection fails, or who
leaves the room) is closed and its track, pose and render slot freed. A
failure in one viewer's connection closes that viewer only, logged with its id.

One offer per viewer is answered at a time (a burst is declined, not stacked
up); a peer is only ever removed by its own object, never by its id, so a
replaced peer's late cleanup cannot touch its successor. An offer is checked
(rtc.check_offer) before aiortc sees it, and an answer that cannot be
delivered closes its peer at once. Calls outlive the signaling socket: media
flows peer to peer, and the sender rejoins the room under the same id
(the server's resume token), so viewers' offers and answers still find it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import websockets
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from models.geometry.camera import OrbitPose
from telepresence.pipeline import FramePipeline

from .capture import FrameSource, SourceError, check_fps, open_source
from .encoding import EncoderPool, EncoderUnavailableError, follow_rtp_sender, shared_pool
from .messages import (
    AnswerMessage,
    DeclineMessage,
    ErrorMessage,
    HelloMessage,
    MessageError,
    PeerLeftMessage,
    PingMessage,
    PongMessage,
    PoseLimits,
    PoseMessage,
    RelayedOfferMessage,
    ResetMemoryMessage,
    StampsMessage,
    StatsMessage,
    StatusMessage,
    check_room,
    check_token,
    parse_channel_message,
)
from .renderloop import PIPELINE_STAGES, RenderLoop
from .rtc import (
    BitrateConfig,
    IceConfig,
    InvalidOfferError,
    apply_bitrate,
    check_offer,
    negotiated_video_codec,
    video_codec_preferences,
)
from .signaling_client import SignalingClient, SignalingRejectedError
from .track import ViewTrack

logger = logging.getLogger(__name__)

PC_CLOSE_TIMEOUT_S = 5.0
WATCHDOG_TICK_S = 0.25
STALL_LOG_S = 1.0
"""A stall of this process's event loop this long or longer is logged (the viewers' silence during it is excused
whatever its length)."""
RESET_MEMORY_EVERY_S = 5.0
"""The appearance memory is reset at most once in this many seconds, whoever asks: it is every viewer's (one viewer's
flood of resets had wiped it for all, 100 times in 5 s, with two log lines each)."""
"""Longest wait for one peer connection to close (viewer gone, sender stopping)."""
ENCODERS = ("process", "aiortc")


class ViewerLimitError(RuntimeError):
    """The sender already serves its maximum number of viewers."""


class ViewerGoneError(RuntimeError):
    """The viewer was closed (it left, or a newer offer replaced it) while its answer was being made."""


@dataclass(frozen=True)
class SenderConfig:
    """How the sender streams (the pipeline's own settings are telepresence.pipeline.PipelineConfig)."""

    signaling_url: str = "ws://127.0.0.1:8080/ws"
    """The receiver's signaling endpoint."""
    room: str = "demo"
    """Room to publish into."""
    name: str = "sender"
    """Label the viewers see."""
    token: Optional[str] = field(default=None, repr=False)
    """Shared room token, if the receiver requires one."""
    source: str = "webcam"
    """webcam | INDEX | FILE.mp4 | IMAGE | sample (see capture.open_source)."""
    source_fps: Optional[float] = None
    """Play files, images and the sample at this rate (None: a file's own, 30 for images)."""
    codec: str = "vp8"
    """Preferred video codec, vp8 or h264 (the other stays as a fallback)."""
    bitrate: BitrateConfig = BitrateConfig()
    encoder: str = "process"
    """Where the viewers' frames are encoded: "process" (an encoder process beside this one, a thread
    per viewer: telepresence.stream.encoding) or "aiortc" (aiortc's thread pool in this process)."""
    ice: IceConfig = IceConfig()
    pose_limits: PoseLimits = PoseLimits()
    max_viewers: int = 8
    """Viewers served at once; further offers are declined."""
    heartbeat_timeout_s: float = 4.0
    """A viewer silent this long is dropped (it pings every second)."""
    connect_timeout_s: float = 15.0
    """A viewer whose pose channel never speaks is dropped after this long."""
    stats_interval_s: float = 1.0
    """How often each viewer gets the stage timing record."""
    stamp_frames: bool = False
    """Paint the capture time into each view's corner (benchmarks/loopback.py reads it)."""

    def __post_init__(self) -> None:
        check_room(self.room)
        if self.token is not None:
            check_token(self.token)
        if self.codec not in ("vp8", "h264"):
            raise ValueError(f"codec: expected vp8 or h264, got {self.codec!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: expected one of {ENCODERS}, got {self.encoder!r}")
        if not self.signaling_url.startswith(("ws://", "wss://")):
            raise ValueError(f"signaling_url: expected ws:// or wss://, got {self.signaling_url!r}")
        if self.max_viewers < 1:
            raise ValueError(f"max_viewers: expected >= 1, got {self.max_viewers}")
        if self.source_fps is not None:
            try:
                check_fps(self.source_fps)
            except SourceError as error:
                raise ValueError(f"source_fps: {error}") from None
        if not 0.5 <= self.heartbeat_timeout_s <= 60.0:
            raise ValueError(f"heartbeat_timeout_s: expected 0.5..60, got {self.heartbeat_timeout_s}")



class ViewerPeer:
    """One viewer: its peer connection, track and pose channel."""

    def __init__(self, viewer_id: str, pc: RTCPeerConnection, track: ViewTrack) -> None:
        self.id = viewer_id
        self.pc = pc
        self.track = track
        self.channel: Optional[RTCDataChannel] = None
        self.created_at = time.monotonic()
        self.last_seen: Optional[float] = None
        self.pose_seq = -1
        self.bad_messages = 0
        self.closing: Optional[asyncio.Future] = None

    def excuse(self, seconds: float) -> None:
        """Do not count `seconds` of silence against this viewer: the sender's own event loop was stalled then
        (its messages waited in our sockets, unread)."""
        self.created_at += seconds
        if self.last_seen is not None:
            self.last_seen += seconds

    def send(self, text: str) -> None:
        """Send on the pose channel if it is open; a closed channel is not an error here."""
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(text)
            except Exception as error:  # aiortc raises InvalidStateError and others when the transport goes away
                logger.debug("viewer %s: send failed: %s", self.id, error)


class Sender:
    """Serves any number of viewers (up to max_viewers) from one capture + pipeline."""

    def __init__(self, config: SenderConfig, pipeline: FramePipeline, source: Optional[FrameSource] = None, *,
                 signaling: Callable[..., SignalingClient] = SignalingClient,
                 on_analysis: Optional[Callable[[Any, Any], None]] = None, just_in_time: bool = False,
                 encoder_pool: Optional[EncoderPool] = None) -> None:
        """signaling: makes the room's client (SignalingClient's arguments); the call's in-process senders
        pass telepresence.stream.signaling_local's. on_analysis, just_in_time: see RenderLoop. encoder_pool:
        the encoder process for config.encoder == "process" (default: this interpreter's shared one)."""
        self.config = config
        self.pipeline = pipeline
        self._signaling_client = signaling
        self._on_analysis = on_analysis
        self._encoder_pool = encoder_pool
        self._just_in_time = just_in_time
        self.viewers: dict[str, ViewerPeer] = {}
        self._source = source
        self.render_loop: Optional[RenderLoop] = None
        self._tasks: set[asyncio.Task] = set()
        self._offering: set[str] = set()
        self._closing_pcs: set[asyncio.Future] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._encoder_unavailable_logged = False
        self._memory_reset_at = -math.inf  # monotonic time of the last reset done

    # -- lifecycle --

    async def start(self) -> None:
        """Open the source (off the event loop) and start the frame loop."""
        self._loop = asyncio.get_running_loop()
        apply_bitrate(self.config.bitrate)
        if self.config.encoder == "process":
            self._start_encoder()
        if self._source is None:
            self._source = await self._loop.run_in_executor(None, open_source, self.config.source, self.config.source_fps)
        logger.info("capture source: %s (%.0f fps)", self._source.name, self._source.fps)
        self.render_loop = RenderLoop(
            self._source, self.pipeline, stamp_frames=self.config.stamp_frames, on_status=self._on_status_threadsafe,
            on_analysis=self._on_analysis, just_in_time=self._just_in_time,
        )
        self.render_loop.start()
        self._spawn(self._watchdog())
        self._spawn(self._stats_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.close_peer(peer, "sender stopping") for peer in list(self.viewers.values())))
        if self._closing_pcs:  # bounded: a peer connection stuck in close() must not hold up Ctrl-C
            await asyncio.wait(list(self._closing_pcs), timeout=PC_CLOSE_TIMEOUT_S)
        if self.render_loop is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.render_loop.stop)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- viewers --

    async def answer(self, viewer_id: str, offer_sdp: str) -> str:
        """Accept one viewer's offer; returns the answer SDP (ICE candidates included).

        Raises InvalidOfferError for an offer aiortc must not see, ViewerLimitError when
        full; any other failure closes this viewer only and propagates. A viewer already
        served under this id is closed first (its peer connection replaced).
        """
        assert self.render_loop is not None, "call start() first"
        check_offer(offer_sdp)
        if (old := self.viewers.get(viewer_id)) is not None:
            await self.close_peer(old, "replaced by a new offer")
        if len(self.viewers) >= self.config.max_viewers:
            raise ViewerLimitError(f"already serving {len(self.viewers)} viewers")
        pc = RTCPeerConnection(self.config.ice.rtc_configuration())
        peer = ViewerPeer(viewer_id, pc, ViewTrack())
        self.viewers[viewer_id] = peer
        try:
            transceiver = pc.addTransceiver(peer.track, direction="sendonly")
            transceiver.setCodecPreferences(video_codec_preferences(self.config.codec))

            @pc.on("datachannel")
            def on_datachannel(channel: RTCDataChannel) -> None:
                if channel.label != "pose" or peer.channel is not None:
                    logger.warning("viewer %s: ignoring extra data channel %r", viewer_id, channel.label)
                    return
                peer.channel = channel
                channel.on("message", lambda message: self._on_channel_message(peer, message))
                channel.on("open", lambda: self._send_hello(peer))
                if channel.readyState == "open":
                    self._send_hello(peer)

            @pc.on("connectionstatechange")
            def on_connectionstatechange() -> None:
                logger.info("viewer %s: connection %s", viewer_id, pc.connectionState)
                if pc.connectionState in ("failed", "closed"):
                    self._spawn(self.close_peer(peer, f"connection {pc.connectionState}"))

            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            if self.viewers.get(viewer_id) is not peer:
                raise ViewerGoneError("closed while its answer was being made")
            if self.config.encoder == "process":
                self._encode_in_process(peer, transceiver.sender, pc.localDescription.sdp)
            self.render_loop.add_view(viewer_id, OrbitPose(), peer.track.deliver)
            logger.info("viewer %s: answered (%d viewers)", viewer_id, len(self.viewers))
            return pc.localDescription.sdp
        except Exception:
            await self.close_peer(peer, "could not answer its offer")
            raise

    def _start_encoder(self) -> None:
        try:
            self._encoders().start()  # ready by the first viewer
        except EncoderUnavailableError as error:
            self._log_encoder_unavailable(error)

    def _encoders(self) -> EncoderPool:
        return self._encoder_pool if self._encoder_pool is not None else shared_pool()

    def _encode_in_process(self, peer: ViewerPeer, rtp_sender: Any, answer_sdp: str) -> None:
        """The viewer's frames to a stream of the encoder process; without one, aiortc encodes them."""
        try:
            stream = self._encoders().open_stream(negotiated_video_codec(answer_sdp), self.pipeline.size ** 2 * 3)
        except EncoderUnavailableError as error:
            self._log_encoder_unavailable(error)
            return
        peer.track.encode_with(stream)
        follow_rtp_sender(stream, rtp_sender)

    def _log_encoder_unavailable(self, error: Exception) -> None:
        if not self._encoder_unavailable_logged:
            self._encoder_unavailable_logged = True
            logger.warning("no encoder process (%s): aiortc encodes the viewers' frames in this process", error)

    async def close_viewer(self, viewer_id: str, reason: str) -> None:
        """Free the viewer served under `viewer_id`, if any (see close_peer)."""
        if (peer := self.viewers.get(viewer_id)) is not None:
            await self.close_peer(peer, reason)

    async def close_peer(self, peer: ViewerPeer, reason: str) -> None:
        """Free one viewer: render slot, track, channel and peer connection. Idempotent: a second
        call waits for the first to finish. Only this peer is touched, never a newer one under its id."""
        if peer.closing is None:
            if self.viewers.get(peer.id) is peer:
                del self.viewers[peer.id]
            if self.render_loop is not None:
                self.render_loop.remove_view(peer.id, peer.track.deliver)
            peer.track.stop()
            # Shielded: aioice swallows a cancellation that lands inside pc.close() (it awaits a task it
            # cancelled and ignores CancelledError), which would leave our caller running after Ctrl-C.
            peer.closing = asyncio.ensure_future(self._close_pc(peer, reason))
            self._closing_pcs.add(peer.closing)
            peer.closing.add_done_callback(self._closing_pcs.discard)
        await asyncio.shield(peer.closing)

    @staticmethod
    async def _close_pc(peer: ViewerPeer, reason: str) -> None:
        # asyncio.wait, not wait_for: a timed-out close is left to finish on its own (cancelling it
        # is what aioice swallows, see close_peer).
        closing = asyncio.ensure_future(peer.pc.close())
        done, _ = await asyncio.wait({closing}, timeout=PC_CLOSE_TIMEOUT_S)
        if not done:
            logger.warning("viewer %s: peer connection still closing after %.0f s; going on", peer.id, PC_CLOSE_TIMEOUT_S)
        elif closing.exception() is not None:
            logger.warning("viewer %s: error while closing: %s", peer.id, closing.exception())
        logger.info("viewer %s: closed (%s)", peer.id, reason)

    def _send_hello(self, peer: ViewerPeer) -> None:
        device_kind = str(self.pipeline.device).split(":")[0]  # "cuda" for cuda:1
        peer.send(HelloMessage(self.config.name, self.pipeline.size, self.config.codec, self.config.pose_limits.to_json(),
                               self.pipeline.refiner_name, device_kind).to_json())
        if self.render_loop is not None:
            self._send_status(peer, self.render_loop.status)

    def _on_channel_message(self, peer: ViewerPeer, raw: Any) -> None:
        peer.last_seen = time.monotonic()
        try:
            message = parse_channel_message(raw)
        except MessageError as error:
            peer.bad_messages += 1
            if peer.bad_messages <= 3 or peer.bad_messages % 100 == 0:
                logger.warning("viewer %s: rejected message (%s): %s", peer.id, error.code, error)
            peer.send(ErrorMessage(error.code, str(error)).to_json())
            return
        if isinstance(message, PingMessage):
            peer.send(PongMessage(message.t, round(time.time() * 1e3, 1)).to_json())
        elif isinstance(message, StampsMessage):
            peer.track.stamp_frames = message.on
        elif isinstance(message, ResetMemoryMessage):
            reset = getattr(self.pipeline, "reset_memory", None)
            since = time.monotonic() - self._memory_reset_at
            if callable(reset) and since < RESET_MEMORY_EVERY_S:
                peer.send(ErrorMessage("rate-limited", f"the appearance memory was reset {since:.1f} s ago; "
                                       f"again in {RESET_MEMORY_EVERY_S - since:.1f} s").to_json())
            elif callable(reset):
                self._memory_reset_at = time.monotonic()
                logger.info("viewer %s: asked to reset the appearance memory", peer.id)
                reset()
            else:
                logger.info("viewer %s: asked to reset the appearance memory, which this pipeline does not have",
                            peer.id)
        elif isinstance(message, PoseMessage):
            if message.seq <= peer.pose_seq:
                return  # reordered or repeated: an older pose than the one in use
            peer.pose_seq = message.seq
            pose = message.clamped(self.config.pose_limits)
            assert self.render_loop is not None
            self.render_loop.set_pose(peer.id, OrbitPose(yaw_deg=pose.yaw, pitch_deg=pose.pitch, dist_scale=pose.dist))

    # -- status and stats --

    def _on_status_threadsafe(self, status: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._broadcast_status, status)
            except RuntimeError:
                pass

    def _broadcast_status(self, status: str) -> None:
        if status in ("face_lost", "error"):
            logger.warning("pipeline status: %s", status)
        else:
            logger.info("pipeline status: %s", status)
        for peer in list(self.viewers.values()):
            self._send_status(peer, status)

    def _send_status(self, peer: ViewerPeer, status: str) -> None:
        peer.send(StatusMessage.of(status).to_json())

    def stats_record(self, peer: ViewerPeer) -> StatsMessage:
        """The once-a-second timing record for one viewer."""
        assert self.render_loop is not None
        fps, stages = self.render_loop.clock.summary()
        stages_ms = {name: round(stages[name], 2) for name in ("capture", *PIPELINE_STAGES) if name in stages}
        if (encode := peer.track.encode_ms) is not None:
            stages_ms["encode"] = round(encode, 2)
        latency = peer.track.capture_to_encoder_ms
        fill = self.render_loop.memory_fill
        return StatsMessage(self.render_loop.status, round(fps, 1), stages_ms, len(self.viewers), peer.track.frames_dropped,
                            None if latency is None else round(latency, 1), None if fill is None else round(fill, 3),
                            self.render_loop.kernels)

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            for peer in list(self.viewers.values()):
                peer.send(self.stats_record(peer).to_json())

    async def _watchdog(self) -> None:
        """Drop viewers silent too long, counting only the time this event loop ran: a thread holding Python's lock
        (a cold torch.compile on the frame thread held a 32-viewer sender's loop off for up to 18 s on an H200) delays
        our reading of the viewers' pings, and those viewers are not gone."""
        tick = time.monotonic()
        while True:
            await asyncio.sleep(WATCHDOG_TICK_S)
            now = time.monotonic()
            stalled, tick = max(0.0, now - tick - WATCHDOG_TICK_S), now
            if stalled > 0.0:
                for peer in self.viewers.values():
                    peer.excuse(stalled)
                if stalled >= STALL_LOG_S:
                    logger.warning("the event loop stalled %.1f s (another thread held Python's lock: a compile?); the "
                                   "viewers' silence meanwhile is not counted against them", stalled)
                    continue  # their messages, read now, get a tick to arrive before anyone is judged
            for peer in list(self.viewers.values()):
                if peer.last_seen is None:
                    if now - peer.created_at > self.config.connect_timeout_s:
                        await self.close_peer(peer, "pose channel never opened")
                elif now - peer.last_seen > self.config.heartbeat_timeout_s:
                    await self.close_peer(peer, f"no heartbeat for {now - peer.last_seen:.1f} s")

    # -- signaling --

    async def run_signaling(self) -> None:
        """Join the room and answer offers; reconnects with backoff, under the same id (calls in
        progress go on meanwhile). Returns only by cancellation, or SignalingRejectedError."""
        config = self.config
        backoff_s = 0.5
        resume: Optional[str] = None
        while True:
            client = self._signaling_client(config.signaling_url, config.room, "sender", config.name, config.token,
                                            resume=resume)
            try:
                joined = await client.connect()
                resume = joined.resume or resume
                logger.info("joined room %r as sender %s", joined.room, joined.id)
                backoff_s = 0.5
                async for message in client.messages():
                    await self._on_server_message(client, message)
                logger.warning("signaling %s closed the connection; rejoining", config.signaling_url)
            except SignalingRejectedError:
                raise
            except (OSError, asyncio.TimeoutError, RuntimeError, websockets.exceptions.WebSocketException) as error:
                logger.warning("signaling %s unavailable (%s); retrying in %.1f s",
                               config.signaling_url, error or type(error).__name__, backoff_s)
            finally:
                await client.close()
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _on_server_message(self, client: SignalingClient, message: Any) -> None:
        if isinstance(message, ErrorMessage):
            logger.warning("signaling error: %s", message.message or message.code)
        elif isinstance(message, RelayedOfferMessage):
            self._spawn(self._answer_offer(client, message.from_id, message.sdp))
        elif isinstance(message, PeerLeftMessage):
            await self.close_viewer(message.id, "left the room")

    async def _answer_offer(self, client: SignalingClient, viewer_id: str, sdp: str) -> None:
        """Answer, or decline with the reason. One offer per viewer at a time: while one is being
        answered, further offers from that viewer are declined (a browser never sends two)."""
        if viewer_id in self._offering:
            await self._decline(client, viewer_id, "an earlier offer from this viewer is still being answered")
            return
        self._offering.add(viewer_id)
        peer: Optional[ViewerPeer] = None
        try:
            answer_sdp = await self.answer(viewer_id, sdp)
            peer = self.viewers.get(viewer_id)
            await client.send(AnswerMessage(to=viewer_id, sdp=answer_sdp))
        except Exception as error:
            if isinstance(error, ViewerLimitError):
                reason = "sender is full"
            elif isinstance(error, InvalidOfferError):
                reason = f"unusable offer: {error}"
            else:
                reason = f"could not answer the offer ({type(error).__name__}: {error})"
            reason = " ".join(reason.split())[:200]  # one printable line, as DeclineMessage wants
            logger.warning("viewer %s: declined: %s", viewer_id, reason)
            if peer is not None:  # an answer was made but cannot be delivered: free its peer now, not after a timeout
                await self.close_peer(peer, "its answer could not be delivered")
            await self._decline(client, viewer_id, reason)
        finally:
            self._offering.discard(viewer_id)

    @staticmethod
    async def _decline(client: SignalingClient, viewer_id: str, reason: str) -> None:
        try:
            await client.send(DeclineMessage(to=viewer_id, reason=reason))
        except Exception as error:  # the signaling socket went away: the viewer will offer again
            logger.debug("viewer %s: could not send the decline: %s", viewer_id, error)


async def serve(sender: Sender) -> None:
    """Start, serve until cancelled, stop."""
    await sender.start()
    try:
        await sender.run_signaling()
    finally:
        await sender.stop()
