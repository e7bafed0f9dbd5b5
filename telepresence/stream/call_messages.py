"""Wire messages of the call (`telepresence serve`): a participant's camera to the server, and back.

Signaling, viewer -> server (only a server that takes cameras, `telepresence serve`, answers):
    publish {sdp}        offer of the page's camera: one sendonly video + the "uplink" data channel
    unpublish {}         leave the call: the server stops this participant's avatar and frees it
server -> viewer:
    published {sdp, id}  the answer; `id` is this participant's avatar, a sender in the room
    unpublished {reason} the camera was refused, or dropped (no frames, garbage, silence, left)
Uplink channel (RTCDataChannel "uplink", unordered, maxRetransmits 0):
    page -> server: ping {t}, once a second (a participant silent 4 s is dropped)
    server -> page: pong {t}, head {t, yaw, pitch, dist, tracking}, status {status, message},
                    unpublished {reason}

Built on telepresence.stream.messages (the signaling socket and the pose channel); importing this module adds
`publish`/`unpublish` to the signaling messages a server parses and `published`/`unpublished` to those a client
receives (SIGNALING_TYPES, SERVER_TYPES). The signaling server imports it (a server without cameras answers
`publish` with `no-calls`), and so do the call's participants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from .messages import (
    CHANNEL_MAX_BYTES,
    SERVER_TYPES,
    SIGNALING_MAX_BYTES,
    SIGNALING_TYPES,
    ErrorMessage,
    InvalidFieldError,
    Outgoing,
    PingMessage,
    PongMessage,
    StatusMessage,
    _build,
    _check_sdp,
    _from_wire,
    decode_json_object,
)


@dataclass(frozen=True)
class PublishMessage(Outgoing):
    """A viewer offers its camera to the server, to take part in the call."""

    type: ClassVar[str] = "publish"
    sdp: str

    def __post_init__(self) -> None:
        _check_sdp(self.sdp)


@dataclass(frozen=True)
class UnpublishMessage(Outgoing):
    """The participant leaves the call (its camera stops; its avatar leaves the room)."""

    type: ClassVar[str] = "unpublish"


@dataclass(frozen=True)
class PublishedMessage(Outgoing):
    """Server -> participant: the answer to its camera's offer, and the room id its avatar has."""

    type: ClassVar[str] = "published"
    sdp: str
    id: str


@dataclass(frozen=True)
class UnpublishedMessage(Outgoing):
    """Server -> participant: its camera was refused or dropped, and why (one printable line)."""

    type: ClassVar[str] = "unpublished"
    reason: str


@dataclass(frozen=True)
class HeadMessage(Outgoing):
    """Server -> participant: the camera offset its own head asks for (head-tracked parallax), to add
    to its orbit of every other participant (telepresence.stream.headtrack)."""

    type: ClassVar[str] = "head"
    t: float
    """Capture time of the frame it comes from, ms since the Unix epoch."""
    yaw: float
    """Degrees added to the orbit's yaw."""
    pitch: float
    """Degrees added to the orbit's pitch."""
    dist: float
    """Factor on the orbit's distance."""
    tracking: bool
    """False: no face in the newest frame (the offset is the last one seen)."""


@dataclass(frozen=True)
class CameraRateMessage(Outgoing):
    """Server -> participant: the most camera frames a second worth sending. The server's pipeline keeps
    up with fewer: every frame beyond them would be encoded, sent and decoded for nothing
    (telepresence.stream.uplink.CameraRate)."""

    type: ClassVar[str] = "camera-rate"
    fps: float

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 1.0 <= self.fps <= 120.0:
            raise InvalidFieldError(f"camera-rate: expected fps in 1..120, got {self.fps!r}")


SIGNALING_TYPES.update({cls.type: cls for cls in (PublishMessage, UnpublishMessage)})
SERVER_TYPES.update({cls.type: cls for cls in (PublishedMessage, UnpublishedMessage)})
UPLINK_TYPES: dict[str, type] = {PingMessage.type: PingMessage}
CALL_TYPES: dict[str, type] = {cls.type: cls for cls in (HeadMessage, CameraRateMessage, PongMessage, StatusMessage,
                                                         UnpublishedMessage, ErrorMessage)}


def parse_uplink_message(raw: Union[str, bytes]) -> PingMessage:
    """One message of a participant on its uplink channel -> a validated PingMessage, or MessageError."""
    return _build(decode_json_object(raw, CHANNEL_MAX_BYTES), UPLINK_TYPES)


def parse_call_message(raw: Union[str, bytes]) -> Outgoing:
    """What a participant receives from the server on its uplink channel -> its dataclass."""
    return _build(_from_wire(decode_json_object(raw, SIGNALING_MAX_BYTES)), CALL_TYPES)
