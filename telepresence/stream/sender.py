"""The sender: capture + pipeline, answering each viewer with its own track.

    signaling (websocket) --offer--> Sender.answer() --answer--> viewer
    RenderLoop (threads) --newest frame--> ViewTrack per viewer --> RTCPeerConnection
    pose channel --newest pose (by seq)--> RenderLoop.set_pose

Per viewer: one RTCPeerConnection, one ViewTrack and the viewer's "pose"
data channel (unordered, maxRetransmits 0). The viewer pings once a second;
a viewer silent for `heartbeat_timeout_s` (or whose connection fails, or who
leaves the room) is closed and its track, pose and render slot freed. A
failure in one viewer's connection closes that viewer only, logged with its id.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import websockets
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from .capture import FrameSource, SourceError, open_source
from telepresence.cli.console import configure_logging, run_until_stopped
from .messages import (
    AnswerMessage,
    DeclineMessage,
    MessageError,
    PingMessage,
    PoseLimits,
    PoseMessage,
    encode_message,
    parse_channel_message,
)
from .renderloop import PIPELINE_STAGES, RenderLoop
from .rtc import BitrateConfig, IceConfig, apply_bitrate, video_codec_preferences
from .track import ViewTrack

logger = logging.getLogger(__name__)

PC_CLOSE_TIMEOUT_S = 5.0
"""Longest wait for one peer connection to close (viewer gone, sender stopping)."""

STATUS_MESSAGES = {
    "starting": "Starting the pipeline",
    "ok": "",
    "face_lost": "Face lost: showing the last good avatar",
    "no_face_yet": "No face yet: look at the camera",
    "error": "Pipeline error: see the sender's log",
}


class PipelineUnavailableError(RuntimeError):
    """The pipeline module could not be imported or built."""


class ViewerLimitError(RuntimeError):
    """The sender already serves its maximum number of viewers."""


class SignalingRejectedError(RuntimeError):
    """The signaling server refused to let this sender join (token, room full, ...)."""


@dataclass(frozen=True)
class SenderConfig:
    """Everything run_sender.py's flags set."""

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
    device: str = "cpu"
    """Torch device for the pipeline."""
    size: Optional[int] = None
    """Output side in pixels; None: 512 on CUDA, 256 on CPU."""
    refiner: Optional[str] = "default"
    """Refiner weights: a path, "default" (shipped weights) or None (no refinement)."""
    pipeline_module: str = "telepresence.pipeline"
    """Module providing Pipeline, PipelineConfig and ViewPose."""
    codec: str = "vp8"
    """Preferred video codec, vp8 or h264 (the other stays as a fallback)."""
    bitrate: BitrateConfig = BitrateConfig()
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
        if self.size is not None and self.size not in (256, 512):
            raise ValueError(f"size: expected 256 or 512, got {self.size}")
        if self.codec not in ("vp8", "h264"):
            raise ValueError(f"codec: expected vp8 or h264, got {self.codec!r}")
        if not self.signaling_url.startswith(("ws://", "wss://")):
            raise ValueError(f"signaling_url: expected ws:// or wss://, got {self.signaling_url!r}")
        if self.max_viewers < 1:
            raise ValueError(f"max_viewers: expected >= 1, got {self.max_viewers}")
        if not 0.5 <= self.heartbeat_timeout_s <= 60.0:
            raise ValueError(f"heartbeat_timeout_s: expected 0.5..60, got {self.heartbeat_timeout_s}")

    @property
    def resolved_size(self) -> int:
        if self.size is not None:
            return self.size
        return 512 if self.device.startswith("cuda") else 256


def load_pipeline(config: SenderConfig) -> tuple[Any, type]:
    """Build the pipeline named by config.pipeline_module; returns (pipeline, its ViewPose class)."""
    try:
        module = importlib.import_module(config.pipeline_module)
        pipeline_config = module.PipelineConfig(device=config.device, size=config.resolved_size, refiner=config.refiner)
        return module.Pipeline(pipeline_config), module.ViewPose
    except ImportError as error:
        raise PipelineUnavailableError(f"cannot import the pipeline module {config.pipeline_module!r}: {error}") from error
    except AttributeError as error:
        raise PipelineUnavailableError(f"{config.pipeline_module} lacks Pipeline/PipelineConfig/ViewPose: {error}") from error


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

    def send(self, text: str) -> None:
        """Send on the pose channel if it is open; a closed channel is not an error here."""
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(text)
            except Exception as error:  # aiortc raises InvalidStateError and others when the transport goes away
                logger.debug("viewer %s: send failed: %s", self.id, error)


class Sender:
    """Serves any number of viewers (up to max_viewers) from one capture + pipeline."""

    def __init__(
        self,
        config: SenderConfig,
        *,
        pipeline: Any = None,
        view_pose: Optional[type] = None,
        source: Optional[FrameSource] = None,
    ) -> None:
        self.config = config
        self.viewers: dict[str, ViewerPeer] = {}
        self._pipeline = pipeline
        self._view_pose = view_pose
        self._source = source
        self.render_loop: Optional[RenderLoop] = None
        self._tasks: set[asyncio.Task] = set()
        self._closing: set[str] = set()
        self._closing_pcs: set[asyncio.Future] = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- lifecycle --

    async def start(self) -> None:
        """Open the source, build the pipeline (off the event loop) and start the frame loop."""
        self._loop = asyncio.get_running_loop()
        apply_bitrate(self.config.bitrate)
        if self._source is None:
            self._source = await self._loop.run_in_executor(None, open_source, self.config.source, self.config.source_fps)
        logger.info("capture source: %s (%.0f fps)", self._source.name, self._source.fps)
        if self._pipeline is None:
            logger.info("loading the pipeline (%s, device %s, %d px)", self.config.pipeline_module,
                        self.config.device, self.config.resolved_size)
            self._pipeline, self._view_pose = await self._loop.run_in_executor(None, load_pipeline, self.config)
        self.render_loop = RenderLoop(
            self._source, self._pipeline, stamp_frames=self.config.stamp_frames, on_status=self._on_status_threadsafe
        )
        self.render_loop.start()
        self._spawn(self._watchdog())
        self._spawn(self._stats_loop())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.close_viewer(v, "sender stopping") for v in list(self.viewers)))
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

    def _default_pose(self) -> Any:
        assert self._view_pose is not None
        return self._view_pose()

    async def answer(self, viewer_id: str, offer_sdp: str) -> str:
        """Accept one viewer's offer; returns the answer SDP (ICE candidates included).

        Raises ViewerLimitError when full; any other failure closes this
        viewer only and propagates.
        """
        assert self.render_loop is not None, "call start() first"
        if viewer_id in self.viewers:
            await self.close_viewer(viewer_id, "replaced by a new offer")
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
                    self._spawn(self.close_viewer(viewer_id, f"connection {pc.connectionState}"))

            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            self.render_loop.add_view(viewer_id, self._default_pose(), peer.track.deliver)
            logger.info("viewer %s: answered (%d viewers)", viewer_id, len(self.viewers))
            return pc.localDescription.sdp
        except Exception:
            await self.close_viewer(viewer_id, "could not answer its offer")
            raise

    async def close_viewer(self, viewer_id: str, reason: str) -> None:
        """Free one viewer: render slot, track, channel and peer connection. Idempotent."""
        peer = self.viewers.get(viewer_id)
        if peer is None or viewer_id in self._closing:
            return
        self._closing.add(viewer_id)
        try:
            if self.render_loop is not None:
                self.render_loop.remove_view(viewer_id)
            peer.track.stop()
            # Shielded: aioice swallows a cancellation that lands inside pc.close() (it awaits a task it
            # cancelled and ignores CancelledError), which would leave our caller running after Ctrl-C.
            closing = asyncio.ensure_future(self._close_pc(peer))
            self._closing_pcs.add(closing)
            closing.add_done_callback(self._closing_pcs.discard)
            await asyncio.shield(closing)
            logger.info("viewer %s: closed (%s)", viewer_id, reason)
        finally:
            self.viewers.pop(viewer_id, None)
            self._closing.discard(viewer_id)

    @staticmethod
    async def _close_pc(peer: ViewerPeer) -> None:
        # asyncio.wait, not wait_for: a timed-out close is left to finish on its own (cancelling it
        # is what aioice swallows, see close_viewer).
        closing = asyncio.ensure_future(peer.pc.close())
        done, _ = await asyncio.wait({closing}, timeout=PC_CLOSE_TIMEOUT_S)
        if not done:
            logger.warning("viewer %s: peer connection still closing after %.0f s; going on", peer.id, PC_CLOSE_TIMEOUT_S)
        elif closing.exception() is not None:
            logger.warning("viewer %s: error while closing: %s", peer.id, closing.exception())

    def _send_hello(self, peer: ViewerPeer) -> None:
        peer.send(
            encode_message(
                "hello",
                name=self.config.name,
                size=self.config.resolved_size,
                codec=self.config.codec,
                limits=self.config.pose_limits.to_json(),
            )
        )
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
            peer.send(encode_message("error", code=error.code, message=str(error)))
            return
        if isinstance(message, PingMessage):
            peer.send(encode_message("pong", t=message.t))
        elif isinstance(message, PoseMessage):
            if message.seq <= peer.pose_seq:
                return  # reordered or repeated: an older pose than the one in use
            peer.pose_seq = message.seq
            pose = message.clamped(self.config.pose_limits)
            assert self.render_loop is not None and self._view_pose is not None
            self.render_loop.set_pose(peer.id, self._view_pose(yaw_deg=pose.yaw, pitch_deg=pose.pitch, dist_scale=pose.dist))

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
        peer.send(encode_message("status", status=status, message=STATUS_MESSAGES.get(status, status)))

    def stats_record(self, peer: ViewerPeer) -> dict[str, Any]:
        """The once-a-second timing record for one viewer."""
        assert self.render_loop is not None
        fps, stages = self.render_loop.clock.summary()
        stages_ms = {name: round(stages[name], 2) for name in ("capture", *PIPELINE_STAGES) if name in stages}
        if (encode := peer.track.encode_ms) is not None:
            stages_ms["encode"] = round(encode, 2)
        record: dict[str, Any] = {
            "status": self.render_loop.status,
            "fps": round(fps, 1),
            "stages_ms": stages_ms,
            "viewers": len(self.viewers),
            "dropped": peer.track.frames_dropped,
        }
        if (latency := peer.track.capture_to_encoder_ms) is not None:
            record["capture_to_encoder_ms"] = round(latency, 1)
        return record

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            for peer in list(self.viewers.values()):
                peer.send(encode_message("stats", **self.stats_record(peer)))

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for peer in list(self.viewers.values()):
                if peer.last_seen is None:
                    if now - peer.created_at > self.config.connect_timeout_s:
                        await self.close_viewer(peer.id, "pose channel never opened")
                elif now - peer.last_seen > self.config.heartbeat_timeout_s:
                    await self.close_viewer(peer.id, f"no heartbeat for {now - peer.last_seen:.1f} s")

    # -- signaling --

    async def run_signaling(self) -> None:
        """Join the room and answer offers; reconnects with backoff. Returns only by cancellation or error."""
        backoff_s = 0.5
        while True:
            try:
                async with websockets.connect(
                    self.config.signaling_url, open_timeout=5, max_size=2**20, compression=None
                ) as ws:
                    await ws.send(
                        encode_message("join", room=self.config.room, role="sender", name=self.config.name,
                                       **({"token": self.config.token} if self.config.token else {}))
                    )
                    async for raw in ws:
                        if await self._on_signaling_message(ws, raw):
                            backoff_s = 0.5
            except SignalingRejectedError:
                raise
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as error:
                logger.warning("signaling %s unavailable (%s); retrying in %.1f s",
                               self.config.signaling_url, error or type(error).__name__, backoff_s)
            finally:
                # Peer ids are per signaling session: viewers re-offer after both sides rejoin.
                await asyncio.gather(*(self.close_viewer(v, "signaling connection lost") for v in list(self.viewers)))
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    async def _on_signaling_message(self, ws: Any, raw: Any) -> bool:
        """Handle one server message; returns True once joined."""
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            logger.warning("signaling: ignoring a malformed server message")
            return False
        if kind == "joined":
            logger.info("joined room %r as sender %s", message.get("room"), message.get("id"))
            return True
        if kind == "error":
            code = message.get("code")
            if code in ("bad-token", "room-full", "bad-field"):
                raise SignalingRejectedError(f"signaling server refused to join: {message.get('message', code)}")
            logger.warning("signaling error: %s", message.get("message", code))
        elif kind == "offer":
            self._spawn(self._answer_offer(ws, str(message.get("from", "")), message.get("sdp")))
        elif kind == "peer-left":
            viewer_id = str(message.get("id", ""))
            if viewer_id in self.viewers:
                await self.close_viewer(viewer_id, "left the room")
        return False

    async def _answer_offer(self, ws: Any, viewer_id: str, sdp: Any) -> None:
        try:
            if not isinstance(sdp, str):
                raise ValueError("offer without sdp")
            answer_sdp = await self.answer(viewer_id, sdp)
            reply = AnswerMessage(to=viewer_id, sdp=answer_sdp)
            await ws.send(encode_message(reply.type, to=reply.to, sdp=reply.sdp))
        except Exception as error:
            reason = "sender is full" if isinstance(error, ViewerLimitError) else "sender could not answer the offer"
            logger.warning("viewer %s: %s: %s", viewer_id, reason, error)
            try:
                decline = DeclineMessage(to=viewer_id, reason=reason)
                await ws.send(encode_message(decline.type, to=decline.to, reason=decline.reason))
            except Exception:
                pass


async def run(config: SenderConfig) -> None:
    """Start, serve until cancelled, stop."""
    sender = Sender(config)
    await sender.start()
    try:
        await sender.run_signaling()
    finally:
        await sender.stop()


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Capture, build the avatar and stream one view per viewer.")
    parser.add_argument("--signaling", default=SenderConfig.signaling_url, help="receiver's signaling URL")
    parser.add_argument("--room", default=SenderConfig.room)
    parser.add_argument("--name", default=None, help="label shown to viewers (default: this host's name)")
    parser.add_argument("--token", default=None, help="shared room token, if the receiver needs one")
    parser.add_argument("--source", default=SenderConfig.source, help="webcam | INDEX | FILE.mp4 | IMAGE | sample")
    parser.add_argument("--source-fps", type=float, default=None,
                        help="play a file, image or the sample at this rate (default: a file's own, 30 for images)")
    parser.add_argument("--device", default=SenderConfig.device, help="cuda | cpu")
    parser.add_argument("--size", type=int, choices=(256, 512), default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--pipeline", default=SenderConfig.pipeline_module, help="module with Pipeline/PipelineConfig/ViewPose")
    parser.add_argument("--codec", choices=("vp8", "h264"), default=SenderConfig.codec)
    parser.add_argument("--min-kbps", type=int, default=BitrateConfig.min_kbps)
    parser.add_argument("--start-kbps", type=int, default=BitrateConfig.start_kbps)
    parser.add_argument("--max-kbps", type=int, default=BitrateConfig.max_kbps)
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL", help="stun:/turn: URL (repeatable)")
    parser.add_argument("--ice-username", default=None)
    parser.add_argument("--ice-credential", default=None)
    parser.add_argument("--max-viewers", type=int, default=SenderConfig.max_viewers)
    parser.add_argument("--stamp-frames", action="store_true", help="paint capture time into each view (latency tests)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_refiner(text: str) -> Optional[str]:
    """--refiner PATH|default|none -> PipelineConfig.refiner (None: no refinement)."""
    return None if text.lower() == "none" else text


def config_from_args(args: argparse.Namespace) -> SenderConfig:
    return SenderConfig(
        signaling_url=args.signaling,
        room=args.room,
        name=(args.name or socket.gethostname())[:40],
        token=args.token,
        source=args.source,
        source_fps=args.source_fps,
        device=args.device,
        size=args.size,
        refiner=parse_refiner(args.refiner),
        pipeline_module=args.pipeline,
        codec=args.codec,
        bitrate=BitrateConfig(args.min_kbps, args.start_kbps, args.max_kbps),
        ice=IceConfig(tuple(args.ice_server), args.ice_username, args.ice_credential),
        max_viewers=args.max_viewers,
        stamp_frames=args.stamp_frames,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return run_until_stopped(run(config), expected=(SourceError, PipelineUnavailableError, SignalingRejectedError))
