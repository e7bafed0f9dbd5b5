"""The call (`telepresence serve`): participants' cameras in, their avatars out, through the sender's machinery.

    page --publish {sdp}--> SignalingServer --> CallHost.publish --> Participant
    Participant: uplink RTCPeerConnection --video--> TrackSource (newest frame wins)
                 --> Sender (one RenderLoop + one FramePipeline), joined to the room in process
                     (signaling_local) as a sender named after the person: every watcher offers to it
                     as to any sender and gets its own track; all views of this person, for everyone
                     who watches, in one pipeline call per frame
                 RenderLoop analysis --> HeadTracker --> head {yaw, pitch, dist} on the "uplink" channel
                 --> the page adds it to its orbit of every tile (head-tracked parallax)

The camera picture never leaves the server: watchers get renders of the avatar only. Each
participant's face analysis and pipeline run in a process of their own (telepresence.stream.worker:
models are not shared, and the pipelines do not wait on each other or on the event loop for one
interpreter; docs/call.md); the uplink, the sender's tracks and the signaling stay in this process.

A participant is dropped, with the reason sent back in `unpublished`, when it leaves (`unpublish`),
goes silent on its uplink channel for heartbeat_timeout_s, its connection fails, it sends no usable
frame for no_frames_s (first_frame_s for the first), or only frames of unusable size (max_bad_frames
in a row), or its pipeline's process exits or does not answer a frame in pipeline_timeout_s. One
participant's failure closes that participant only, logged with its id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from telepresence.pipeline import PipelineConfig, PipelineUnavailableError

from .headtrack import HeadTracker, HeadTrackingConfig
from .call_messages import (
    CameraRateMessage,
    HeadMessage,
    UnpublishedMessage,
    parse_uplink_message,
)
from .messages import (
    ErrorMessage,
    MessageError,
    PingMessage,
    PongMessage,
)
from .gpus import gpu_count, least_loaded
from .mps import MpsDaemon, share_gpu
from .rtc import InvalidOfferError
from .sender import PC_CLOSE_TIMEOUT_S, Sender, SenderConfig
from .signaling import CallRefusedError, Member, SignalingServer, session_id
from .signaling_client import SignalingRejectedError
from .signaling_local import local_clients
from .uplink import CameraRate, TrackSource, check_uplink_offer
from .worker import PipelineProcess, open_pipeline_process

logger = logging.getLogger(__name__)

UPLINK_CHANNEL = "uplink"


@dataclass(frozen=True)
class CallConfig:
    """How the server runs a call (the page and signaling are telepresence.stream.receiver's)."""

    sender: SenderConfig = field(default_factory=lambda: SenderConfig(source="uplink"))
    """Each participant's sender: codec, bitrates, ICE, pose limits, viewers, stamps (name and room are theirs)."""
    pipeline: PipelineConfig = PipelineConfig()
    pipeline_factory: Optional[str] = None
    """open_pipeline's factory ("module:function"), None: the real Pipeline."""
    head: HeadTrackingConfig = HeadTrackingConfig()
    max_participants: int = 8
    """Cameras the server takes at once, over all rooms (each one is a pipeline)."""
    heartbeat_timeout_s: float = 4.0
    """A participant silent this long on its uplink channel is dropped (the page pings every second)."""
    first_frame_s: float = 10.0
    """A participant whose camera sends no usable frame this long after its answer is dropped."""
    no_frames_s: float = 5.0
    """A participant whose camera stops sending usable frames this long is dropped."""
    max_bad_frames: int = 10
    """A participant whose camera sends this many frames of unusable size in a row is dropped."""
    mps: bool = True
    """On a GPU, the participants' pipeline processes share it through CUDA MPS (telepresence.stream.mps: a
    daemon of the server's own) instead of taking turns; a warning says so when MPS cannot be had."""
    camera_rate: bool = True
    """Ask each participant's camera for no more frames a second than a margin over what its pipeline processes
    (telepresence.stream.uplink.CameraRate; a `camera-rate` message on the uplink channel): a CPU server's pipelines
    take a few frames a second, and each frame more costs both ends an encode and a decode."""
    pipeline_timeout_s: float = 20.0
    """A participant whose pipeline (its own process) does not answer one frame in this long is dropped
    and the process stopped (a frame takes milliseconds on a GPU, a second on a busy CPU)."""
    gpus: Optional[int] = None
    """GPUs the participants' pipelines are spread over, each new one on the GPU with the fewest
    (telepresence.stream.gpus), when pipeline.device is "cuda": None, every GPU the host has; 1, all on the first.
    A device with a number ("cuda:1") keeps every pipeline on it."""

    def __post_init__(self) -> None:
        if self.max_participants < 1:
            raise ValueError(f"max_participants: expected >= 1, got {self.max_participants}")
        for name in ("heartbeat_timeout_s", "first_frame_s", "no_frames_s", "pipeline_timeout_s"):
            if not 0.5 <= getattr(self, name) <= 120.0:
                raise ValueError(f"{name}: expected 0.5..120, got {getattr(self, name)}")
        if self.max_bad_frames < 1:
            raise ValueError(f"max_bad_frames: expected >= 1, got {self.max_bad_frames}")
        if self.gpus is not None and self.gpus < 1:
            raise ValueError(f"gpus: expected >= 1 (left out: every GPU the host has), got {self.gpus}")


class Participant:
    """One person in the call: the uplink of their camera, their sender (avatar) and head tracker."""

    def __init__(self, host: "CallHost", member: Member) -> None:
        self.host = host
        self.id = member.id
        """The participant's own (page's) id in the room."""
        self.room = member.room
        self.name = member.name
        self.ip = member.ip
        self.resume = secrets.token_hex(16)
        self.avatar_id = session_id(self.resume)
        """The room id of this participant's avatar (its sender), known before it joins."""
        config = host.config
        self.source = TrackSource(f"camera of {self.id}", read_stamps=config.sender.stamp_frames)
        self.camera_rate: Optional[CameraRate] = CameraRate() if config.camera_rate else None
        self.tracker = HeadTracker(config.head, config.sender.pose_limits)
        self.pipeline: Optional[PipelineProcess] = None
        self.gpu: Optional[int] = None
        """The GPU its pipeline runs on when the server spreads them over several (CallHost.device_for)."""
        self.pc: Optional[RTCPeerConnection] = None
        self.channel: Optional[RTCDataChannel] = None
        self.sender: Optional[Sender] = None
        self.answered_at: Optional[float] = None
        self.last_ping: Optional[float] = None
        self.closing: Optional[asyncio.Future] = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"participant {self.id} ({self.name})"

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- start --

    async def start(self, offer_sdp: str) -> str:
        """Load a pipeline, answer the camera's offer and start the avatar's sender, which joins the room
        on the next turn of the event loop: after the caller has sent `published`, so the page knows its
        own avatar before it hears of it. Returns the answer SDP; CallRefusedError when no avatar can be made."""
        config = self.host.config
        env = await self.host.gpu_env()
        device = await self.host.device_for(self)
        opening = self._open_pipeline(env, device)
        try:
            try:
                self.pipeline = await asyncio.shield(opening)
            except PipelineUnavailableError as error:
                if not env:
                    raise
                opening = self._open_pipeline({}, device)  # without MPS: if that starts, MPS was the cause
                self.pipeline = await asyncio.shield(opening)
                self.host.mps_failed(error)  # the next ones start without MPS too, by turns
        except PipelineUnavailableError as error:
            raise CallRefusedError(f"the server cannot make an avatar: {error}") from None
        except asyncio.CancelledError:  # the participant went while its process was loading: end that too
            opening.add_done_callback(self._close_unused)
            raise
        pc = self.pc = RTCPeerConnection(config.sender.ice.rtc_configuration())

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "video":
                self.source.attach(track)

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != UPLINK_CHANNEL or self.channel is not None:
                logger.warning("%s: ignoring data channel %r", self, channel.label)
                return
            self.channel = channel
            channel.on("message", self._on_message)

        @pc.on("connectionstatechange")
        def on_connectionstatechange() -> None:
            if pc.connectionState in ("failed", "closed"):
                self.host.drop_soon(self, f"its connection {pc.connectionState}")

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        server = self.host.server
        sender_config = dataclasses.replace(config.sender, name=self.name, room=self.room, token=server.token)
        self.sender = Sender(sender_config, self.pipeline, source=self.source,
                             signaling=local_clients(server, self.ip, self.resume), on_analysis=self._on_analysis,
                             just_in_time=True)
        await self.sender.start()
        self.answered_at = time.monotonic()
        self._spawn(self._join_room())
        self._spawn(self._watchdog())
        return pc.localDescription.sdp

    def _open_pipeline(self, env: dict[str, str], device: str) -> asyncio.Future:
        config = self.host.config
        pipeline = config.pipeline if device == config.pipeline.device else dataclasses.replace(config.pipeline, device=device)
        return self._loop.run_in_executor(None, functools.partial(
            open_pipeline_process, pipeline, config.pipeline_factory, name=repr(self),
            timeout_s=config.pipeline_timeout_s, env=env))

    def _close_unused(self, opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._loop.run_in_executor(None, opening.result().close)

    async def _join_room(self) -> None:
        assert self.sender is not None
        logger.info("%s: joining room %r as avatar %s", self, self.room, self.avatar_id)
        try:
            await self.sender.run_signaling()
        except SignalingRejectedError as error:  # a full room (the check in publish raced another join)
            self.host.drop_soon(self, f"the avatar cannot join: {str(error).replace('signaling server refused to join: ', '')}")

    # -- uplink channel and head tracking --

    def _send(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(text)
            except Exception as error:  # the transport went away
                logger.debug("%s: send failed: %s", self, error)

    def _on_message(self, raw: Any) -> None:
        self.last_ping = time.monotonic()
        try:
            message = parse_uplink_message(raw)
        except MessageError as error:
            self._send(ErrorMessage(error.code, str(error)).to_json())
            return
        if isinstance(message, PingMessage):
            self._send(PongMessage(message.t).to_json())

    def _on_analysis(self, frame: Any, analysis: Any) -> None:
        """On the render loop's analysis thread: this frame's eyes -> the head offset, to the page."""
        if self.camera_rate is not None:
            self.camera_rate.frame()
        offset = self.tracker.update(frame.t_capture, getattr(analysis, "eyes_m", None))
        text = HeadMessage(round(frame.t_capture * 1e3, 1), round(offset.yaw_deg, 2), round(offset.pitch_deg, 2),
                           round(offset.dist_scale, 4), offset.tracking).to_json()
        try:
            self._loop.call_soon_threadsafe(self._send, text)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    # -- faults --

    def fault(self, now: float) -> Optional[str]:
        """Why this participant must be dropped now, or None."""
        config = self.host.config
        if self.answered_at is None:
            return None
        if self.last_ping is None:
            if now - self.answered_at > config.first_frame_s:
                return f"its uplink channel did not open in {config.first_frame_s:g} s"
        elif now - self.last_ping > config.heartbeat_timeout_s:
            return f"no heartbeat for {now - self.last_ping:.1f} s"
        if self.source.bad_in_a_row >= config.max_bad_frames:
            return f"its camera sends unusable frames: {self.source.last_error}"
        last = self.source.last_frame_at
        if last is None and now - self.answered_at > config.first_frame_s:
            return f"no frames from its camera in {config.first_frame_s:g} s"
        if last is not None and now - last > config.no_frames_s:
            return f"no frames from its camera for {now - last:.1f} s"
        capture = self.sender.render_loop.capture if self.sender and self.sender.render_loop else None
        if capture is not None and capture.error is not None:
            return f"its camera's frames cannot be used: {capture.error}"
        if self.pipeline is not None and self.pipeline.poll() is not None:
            return self.pipeline.error  # its process exited (noticed between calls too), was killed, or stopped answering
        return None

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            reason = self.fault(now)
            if reason is not None:
                self.host.drop_soon(self, reason)
                return
            if self.camera_rate is not None and self.last_ping is not None:  # the channel is open
                rate = self.camera_rate.update(now)
                if rate is not None:
                    logger.info("%s: asking its camera for at most %g frames a second", self, rate)
                    self._send(CameraRateMessage(rate).to_json())

    # -- close --

    async def close(self, reason: str) -> None:
        """Free everything: tasks, sender (its watchers' connections and its place in the room), source,
        pipeline, uplink. Idempotent: a second call waits for the first."""
        if self.closing is None:
            self.closing = asyncio.ensure_future(self._close(reason))
        await asyncio.shield(self.closing)

    async def _close(self, reason: str) -> None:
        self._send(UnpublishedMessage(reason).to_json())
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()  # the sender's signaling task leaves the room on the way out (peer-left to all)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.source.close()  # first, so the capture thread's grab() returns at once
        if self.sender is not None:
            await self.sender.stop()
        if self.pipeline is not None:
            await self._loop.run_in_executor(None, self.pipeline.close)
        if self.pc is not None:
            closing = asyncio.ensure_future(self.pc.close())
            done, _ = await asyncio.wait({closing}, timeout=PC_CLOSE_TIMEOUT_S)
            if not done:
                logger.warning("%s: uplink still closing after %.0f s; going on", self, PC_CLOSE_TIMEOUT_S)
        logger.info("%s: left the call (%s)", self, reason)


class CallHost:
    """Takes participants' cameras for a SignalingServer (its `cameras`); attach(server) before use."""

    def __init__(self, config: CallConfig = CallConfig()) -> None:
        self.config = config
        self.participants: dict[str, Participant] = {}
        self._server: Optional[SignalingServer] = None
        self._tasks: set[asyncio.Task] = set()
        self._mps: Optional[MpsDaemon] = None
        self._gpu_env: Optional[asyncio.Future] = None
        self.gpu_sharing: Optional[str] = None
        """How the participants' pipelines share a GPU, in words, once the first one has started on one."""
        self._mps_failed: Optional[str] = None
        self._gpus: Optional[asyncio.Future] = None  # how many GPUs the pipelines are spread over (asked once)

    def mps_failed(self, error: BaseException) -> None:
        """A pipeline process did not start under MPS (its server could not be had: another user's MPS on the GPU,
        a GPU in exclusive mode, ...): it and every later one start without MPS, by turns; said once."""
        if self._mps_failed is None:
            self._mps_failed = " ".join(str(error).split())[:200]
            self.gpu_sharing = f"by turns (a pipeline did not start under MPS: {self._mps_failed})"
            logger.warning("a participant's pipeline did not start under CUDA MPS (%s); it and the next ones start "
                           "without MPS: the pipelines take turns on the GPU", self._mps_failed)

    async def gpu_env(self) -> dict[str, str]:
        """What each pipeline process sets before it starts CUDA: on a GPU with config.mps, the MPS daemon's pipe
        folder (started for the first participant, once); else {}."""
        if not self.config.pipeline.device.startswith("cuda"):
            return {}
        if not self.config.mps:
            self.gpu_sharing = "by turns (--no-mps)"
            return {}
        if self._mps_failed is not None:
            self.gpu_sharing = f"by turns (a pipeline did not start under MPS: {self._mps_failed})"
            return {}
        if self._gpu_env is None:
            self._mps = MpsDaemon()
            self._gpu_env = asyncio.get_running_loop().run_in_executor(None, share_gpu, self._mps)
        env, self.gpu_sharing = await asyncio.shield(self._gpu_env)
        return env

    async def device_for(self, participant: Participant) -> str:
        """The device of `participant`'s pipeline: with several GPUs and pipeline.device "cuda", the GPU with the
        fewest pipelines now (noted as participant.gpu); else pipeline.device as given."""
        device = self.config.pipeline.device
        if device != "cuda":
            return device
        if self._gpus is None:
            self._gpus = asyncio.ensure_future(self._count_gpus())
        count = await asyncio.shield(self._gpus)
        if count <= 1:
            return device
        participant.gpu = least_loaded(count, [p.gpu for p in self.participants.values()
                                               if p is not participant and p.gpu is not None])
        logger.info("%s: its pipeline on cuda:%d", participant, participant.gpu)
        return f"cuda:{participant.gpu}"

    async def _count_gpus(self) -> int:
        """config.gpus, else the GPUs this host has (telepresence.stream.gpus.gpu_count); said once when several."""
        count = self.config.gpus or await asyncio.get_running_loop().run_in_executor(None, gpu_count)
        if count > 1:
            logger.info("the participants' pipelines are spread over %d GPUs, each new one on the GPU with the fewest%s",
                        count, "" if self.config.gpus else " (--gpus 1: all on the first)")
        return count

    def attach(self, server: SignalingServer) -> None:
        """The server whose rooms the avatars join (the one that hands this host its `publish`es)."""
        self._server = server

    @property
    def server(self) -> SignalingServer:
        assert self._server is not None, "call attach(server) first"
        return self._server

    async def publish(self, member: Member, sdp: str) -> tuple[str, str]:
        """Answer `member`'s camera: (answer SDP, its avatar's id); CallRefusedError with the reason."""
        if (old := self.participants.get(member.id)) is not None:
            await self.drop(old, "replaced by a new publish")
        if len(self.participants) >= self.config.max_participants:
            raise CallRefusedError(f"the server is full ({len(self.participants)} participants)")
        try:
            check_uplink_offer(sdp)
        except InvalidOfferError as error:
            raise CallRefusedError(f"unusable camera offer: {error}") from None
        room = self.server.registry.rooms.get(member.room, {})
        cap = self.server.limits.max_senders_per_room
        if sum(m.role == "sender" for m in room.values()) >= cap:
            raise CallRefusedError(f"room {member.room!r} is full ({cap} people)")
        participant = Participant(self, member)
        self.participants[member.id] = participant
        try:
            answer = await participant.start(sdp)
        except BaseException as error:  # refused (the server says why) or cancelled: free what was made
            if self.participants.get(member.id) is participant:
                del self.participants[member.id]
            await participant.close(f"could not start ({type(error).__name__}: {error})")
            raise
        return answer, participant.avatar_id

    async def unpublish(self, member_id: str, reason: str) -> None:
        if (participant := self.participants.get(member_id)) is not None:
            await self.drop(participant, reason, fault=False)

    async def drop(self, participant: Participant, reason: str, fault: bool = True) -> None:
        """Close `participant` (this very object), telling its page why; `fault`: logged as a warning."""
        if self.participants.get(participant.id) is participant:
            del self.participants[participant.id]
        if participant.closing is None:
            reason = " ".join(reason.split())[:200]  # one printable line, as UnpublishedMessage wants
            if fault:
                logger.warning("%s: dropped (%s)", participant, reason)
            if self._server is not None:
                self._server.send_to(participant.id, UnpublishedMessage(reason).to_json())
        await participant.close(reason)

    def drop_soon(self, participant: Participant, reason: str) -> None:
        """drop() from a callback or from the participant's own task (which drop cancels)."""
        task = asyncio.ensure_future(self.drop(participant, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Drop every participant (the server is stopping)."""
        await asyncio.gather(*(self.drop(p, "the server is stopping", fault=False) for p in list(self.participants.values())),
                             return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._gpus is not None:
            await asyncio.gather(self._gpus, return_exceptions=True)
        if self._gpu_env is not None:
            await asyncio.gather(self._gpu_env, return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, self._mps.stop)
