"""Wire messages: the JSON schema of the signaling socket and the pose channel, both ways (the call's own, a
participant's camera and its uplink channel: telepresence.stream.call_messages).

Every message that crosses a wire, in or out, is a frozen dataclass here. Every
inbound message is a JSON object with a whitelisted `type`, at most a fixed
number of bytes, with typed, finite, range-checked fields. Parsing either
returns a dataclass or raises a `MessageError` whose `code` goes back to the
peer in an `error` reply; the connection stays up. Outbound messages are built
as dataclasses and written with `to_json()`.

Signaling (websocket /ws), client -> server:
    join    {room, role: "viewer"|"sender", token?, name?, resume?}   resume: the token of an earlier `joined`
    offer   {to, sdp}          viewer -> sender (the browser offers, the sender answers)
    answer  {to, sdp}          sender -> viewer
    decline {to, reason}       sender -> viewer (full, or the offer could not be answered)
server -> client:
    joined {id, room, role, peers: [{id, role, name}], iceServers, resume}   rejoining with `resume` keeps `id`
    peer-joined {peer: {id, role, name}}, peer-left {id}
    offer/answer/decline relayed with `from` instead of `to`; error {code, message}

Pose channel (RTCDataChannel "pose", unordered, maxRetransmits 0), viewer -> sender:
    pose {seq, t, yaw, pitch, dist}     degrees, degrees, distance scale (1 = source camera)
    ping {t}                            heartbeat, once a second
    stamps {on}                         paint the capture time into this viewer's frames (framecode.py)
    reset_memory {}                     forget what the sender's appearance memory has seen
sender -> viewer:
    hello {name, size, codec, limits, refiner, device}, pong {t, wall_ms}, status {status, message},
    stats {status, fps, stages_ms: {capture, landmarks, avatar, render, refine, encode}, memory}, error
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Optional, Union

SIGNALING_MAX_BYTES = 64 * 1024
"""Largest accepted signaling message (a browser offer is 3-8 kB)."""
CHANNEL_MAX_BYTES = 1024
"""Largest accepted pose-channel message."""

ROOM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ROOM_RULE = "1-64 letters, digits, '_', '.' or '-', the first a letter or digit"  # ROOM_PATTERN in words
PEER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
RESUME_PATTERN = re.compile(r"[0-9a-f]{32}")
MAX_NAME_CHARS = 40
MAX_TOKEN_CHARS = 256
MAX_SDP_CHARS = 60_000
MAX_SEQ = 2**53 - 1  # largest integer a browser's Number holds exactly


class MessageError(ValueError):
    """An inbound message was rejected; `code` names the reason for the error reply."""

    code = "bad-message"


class MalformedMessageError(MessageError):
    """Not a JSON object (binary frame, syntax error, NaN literal, not an object, no type)."""

    code = "bad-json"


class MessageTooLargeError(MessageError):
    """More bytes than the channel's cap."""

    code = "too-large"


class UnknownMessageTypeError(MessageError):
    """`type` is not on this channel's whitelist."""

    code = "unknown-type"


class InvalidFieldError(MessageError):
    """A field is missing, of the wrong type, non-finite or out of range."""

    code = "bad-field"


def _reject_constant(name: str) -> Any:
    raise MalformedMessageError(f"{name} is not valid JSON")


def decode_json_object(raw: Union[str, bytes], max_bytes: int) -> dict[str, Any]:
    """Parse one text message into a dict that has a string `type`."""
    if not isinstance(raw, str):
        raise MalformedMessageError("expected a JSON text message, got binary data")
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise MessageTooLargeError(f"message exceeds {max_bytes} bytes")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except MessageError:
        raise
    except (ValueError, RecursionError) as error:  # JSONDecodeError, huge integer literals, deep nesting
        raise MalformedMessageError(f"invalid JSON: {str(error)[:80]}") from None
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("type"), str):
        raise MalformedMessageError("expected a string field 'type'")
    return obj


def encode_message(type_: str, **fields_: Any) -> str:
    """Serialise an outbound message; refuses NaN and infinities."""
    return json.dumps({"type": type_, **fields_}, allow_nan=False, separators=(",", ":"))


# -- field checks (used in __post_init__) -----------------------------------------------------


def check_room(room: Any) -> None:
    """A room's name as `join` takes it, else InvalidFieldError (configs check theirs at their start)."""
    _check_str("room", room, max_chars=64, pattern=ROOM_PATTERN, rule=ROOM_RULE)


def check_token(token: Any) -> None:
    """A room token as `join` carries it, and not empty (an unset shell variable would open a closed server)."""
    _check_str("token", token, max_chars=MAX_TOKEN_CHARS)
    if not token:
        raise InvalidFieldError("token: expected a non-empty string (leave the option out for an open server)")


def _check_str(name: str, value: Any, *, max_chars: int, pattern: Optional[re.Pattern] = None,
               rule: Optional[str] = None) -> None:
    if not isinstance(value, str):
        raise InvalidFieldError(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidFieldError(f"{name}: expected at most {max_chars} characters, got {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800"): valid JSON, not valid text
        raise InvalidFieldError(f"{name}: expected valid Unicode text, got a lone surrogate") from None
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidFieldError(f"{name}: expected {rule or pattern.pattern}, got {value[:40]!r}")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidFieldError(f"{name}: expected a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer literal beyond float range
        raise InvalidFieldError(f"{name}: expected a finite number, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(value):
        raise InvalidFieldError(f"{name}: expected a finite number, got {value}")
    return value


def _check_printable(name: str, value: str) -> None:
    if not value.isprintable():
        raise InvalidFieldError(f"{name}: expected printable characters only")


def _check_sdp(value: Any) -> None:
    _check_str("sdp", value, max_chars=MAX_SDP_CHARS)
    if not value.startswith("v=0"):
        raise InvalidFieldError("sdp: expected a session description starting with 'v=0'")


# -- signaling messages ---------------------------------------------------------------------------


class Outgoing:
    """A message this side writes: `to_json()` is its wire text. Fields that are None are left out;
    `_WIRE_NAMES` maps a Python field name to its wire name (`from` is a keyword)."""

    type: ClassVar[str]
    _WIRE_NAMES: ClassVar[dict[str, str]] = {"from_id": "from", "ice_servers": "iceServers"}

    def to_json(self) -> str:
        values = {self._WIRE_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return encode_message(self.type, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class JoinMessage(Outgoing):
    """Enter a room as a viewer (browser) or a sender."""

    type: ClassVar[str] = "join"
    room: str
    role: str
    token: Optional[str] = None
    name: Optional[str] = None
    resume: Optional[str] = None
    """The `resume` token of this client's earlier `joined`: rejoin under the same id."""

    def __post_init__(self) -> None:
        check_room(self.room)
        if self.role not in ("viewer", "sender"):
            raise InvalidFieldError(f"role: expected 'viewer' or 'sender', got {str(self.role)[:20]!r}")
        if self.token is not None:
            _check_str("token", self.token, max_chars=MAX_TOKEN_CHARS)
        if self.name is not None:
            _check_str("name", self.name, max_chars=MAX_NAME_CHARS)
            _check_printable("name", self.name)
        if self.resume is not None:
            _check_str("resume", self.resume, max_chars=32, pattern=RESUME_PATTERN)


@dataclass(frozen=True)
class _SessionDescriptionMessage(Outgoing):
    to: str
    sdp: str

    def __post_init__(self) -> None:
        _check_str("to", self.to, max_chars=32, pattern=PEER_ID_PATTERN)
        _check_sdp(self.sdp)


@dataclass(frozen=True)
class OfferMessage(_SessionDescriptionMessage):
    """A viewer's SDP offer for one sender (ICE candidates included: no trickle)."""

    type: ClassVar[str] = "offer"


@dataclass(frozen=True)
class AnswerMessage(_SessionDescriptionMessage):
    """A sender's SDP answer for one viewer."""

    type: ClassVar[str] = "answer"


@dataclass(frozen=True)
class DeclineMessage(Outgoing):
    """A sender cannot serve a viewer's offer."""

    type: ClassVar[str] = "decline"
    to: str
    reason: str

    def __post_init__(self) -> None:
        _check_str("to", self.to, max_chars=32, pattern=PEER_ID_PATTERN)
        _check_str("reason", self.reason, max_chars=200)
        _check_printable("reason", self.reason)


# -- pose channel messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseLimits:
    """The orbit a viewer may ask for; poses outside it are clamped."""

    yaw_deg: float = 40.0
    """Largest |yaw| of the camera orbit, degrees."""
    pitch_deg: float = 25.0
    """Largest |pitch| of the camera orbit, degrees."""
    dist_min: float = 0.6
    """Closest camera distance, as a fraction of the source camera's distance."""
    dist_max: float = 1.6
    """Farthest camera distance, same unit."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.yaw_deg <= 180.0:
            raise ValueError(f"yaw_deg: expected 0..180, got {self.yaw_deg}")
        if not 0.0 <= self.pitch_deg <= 89.0:
            raise ValueError(f"pitch_deg: expected 0..89, got {self.pitch_deg}")
        if not 0.0 < self.dist_min <= 1.0 <= self.dist_max:
            raise ValueError(f"expected 0 < dist_min <= 1 <= dist_max, got {self.dist_min}, {self.dist_max}")

    def to_json(self) -> dict[str, float]:
        return {"yaw": self.yaw_deg, "pitch": self.pitch_deg, "distMin": self.dist_min, "distMax": self.dist_max}


@dataclass(frozen=True)
class PoseMessage(Outgoing):
    """A viewer's newest camera request; seq orders it against reordered older ones."""

    type: ClassVar[str] = "pose"
    seq: int
    t: float
    yaw: float
    pitch: float
    dist: float

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 0 <= self.seq <= MAX_SEQ:
            raise InvalidFieldError(f"seq: expected an integer in 0..{MAX_SEQ}, got {str(self.seq)[:24]}")
        for name in ("t", "yaw", "pitch", "dist"):
            object.__setattr__(self, name, _check_number(name, getattr(self, name)))

    def clamped(self, limits: PoseLimits) -> "PoseMessage":
        """This pose moved inside `limits` (finite values only ever reach here)."""
        return PoseMessage(
            seq=self.seq,
            t=self.t,
            yaw=min(max(self.yaw, -limits.yaw_deg), limits.yaw_deg),
            pitch=min(max(self.pitch, -limits.pitch_deg), limits.pitch_deg),
            dist=min(max(self.dist, limits.dist_min), limits.dist_max),
        )


@dataclass(frozen=True)
class PingMessage(Outgoing):
    """Viewer heartbeat; answered with pong {t, wall_ms}."""

    type: ClassVar[str] = "ping"
    t: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", _check_number("t", self.t))


@dataclass(frozen=True)
class StampsMessage(Outgoing):
    """A viewer asks for (or stops) capture-time codes in its own frames, to measure glass to glass.

    Idempotent: the page repeats it with every ping, as the channel may lose it."""

    type: ClassVar[str] = "stamps"
    on: bool

    def __post_init__(self) -> None:
        if not isinstance(self.on, bool):
            raise InvalidFieldError(f"on: expected true or false, got {type(self.on).__name__}")


@dataclass(frozen=True)
class ResetMemoryMessage(Outgoing):
    """A viewer asks the sender to forget what its appearance memory has seen (models.avatar.memory):
    the sides of the head are invented again until the camera sees them anew."""

    type: ClassVar[str] = "reset_memory"


# -- server -> client, sender -> viewer ---------------------------------------------------------------


@dataclass(frozen=True)
class ErrorMessage(Outgoing):
    """Why a message or request was refused (either channel)."""

    type: ClassVar[str] = "error"
    code: str
    message: str = ""


@dataclass(frozen=True)
class JoinedMessage(Outgoing):
    """Server -> the member who joined: its id, the other role's members, the ICE servers to use."""

    type: ClassVar[str] = "joined"
    id: str
    room: str
    role: str
    peers: list
    """[{id, role, name}] of the other role in the room."""
    ice_servers: list
    resume: Optional[str] = None
    """Secret token to rejoin under this id after the socket drops (or the server restarts)."""


@dataclass(frozen=True)
class PeerJoinedMessage(Outgoing):
    type: ClassVar[str] = "peer-joined"
    peer: dict
    """{id, role, name}"""


@dataclass(frozen=True)
class PeerLeftMessage(Outgoing):
    type: ClassVar[str] = "peer-left"
    id: str
    role: str


@dataclass(frozen=True)
class RelayedOfferMessage(Outgoing):
    """A viewer's offer as the server hands it to the sender."""

    type: ClassVar[str] = "offer"
    from_id: str
    sdp: str


@dataclass(frozen=True)
class RelayedAnswerMessage(Outgoing):
    type: ClassVar[str] = "answer"
    from_id: str
    sdp: str


@dataclass(frozen=True)
class RelayedDeclineMessage(Outgoing):
    type: ClassVar[str] = "decline"
    from_id: str
    reason: str


STATUS_TEXT: dict[str, str] = {
    "starting": "Sender is starting its pipeline…",
    "ok": "",
    "no_face_yet": "No face yet: waiting for the sender to look at the camera",
    "face_lost": "Face lost: showing the last good avatar",
    "error": "The sender's pipeline reported an error (see its log)",
    "source_error": "The sender's camera or video source cannot be used (see its log)",
}
"""What a viewer is told for each pipeline status (the page shows the text it receives)."""


@dataclass(frozen=True)
class HelloMessage(Outgoing):
    """Sender -> viewer once its pose channel opens: who is sending, what, and the orbit allowed."""

    type: ClassVar[str] = "hello"
    name: str
    size: int
    """Side of the video in pixels."""
    codec: str
    limits: dict
    """PoseLimits.to_json()"""
    refiner: Optional[str] = None
    """What refines the views, None: raw avatar renders."""
    device: Optional[str] = None
    """Kind of device the pipeline runs on ("cpu", "cuda"): why `size` is what it is."""


@dataclass(frozen=True)
class StatusMessage(Outgoing):
    type: ClassVar[str] = "status"
    status: str
    message: str = ""

    @classmethod
    def of(cls, status: str) -> "StatusMessage":
        return cls(status, STATUS_TEXT.get(status, status))


@dataclass(frozen=True)
class StatsMessage(Outgoing):
    """Once a second per viewer: frame rate and per-stage milliseconds of the sender."""

    type: ClassVar[str] = "stats"
    status: str
    fps: float
    stages_ms: dict
    viewers: int
    dropped: int
    capture_to_encoder_ms: Optional[float] = None
    memory: Optional[float] = None
    """Share of the head the appearance memory holds, 0..1; None: the memory is off."""
    kernels: Optional[str] = None
    """The sender's GPU kernels (telepresence.pipeline.FrameResult.kernels): "compiling" (frames slower until
    done), "compiled", "failed" (the plain ones), "off"; None: a CPU sender."""


@dataclass(frozen=True)
class PongMessage(Outgoing):
    """The answer to ping {t}: its `t` back, and the sender's clock for the viewer's clock offset."""

    type: ClassVar[str] = "pong"
    t: float
    wall_ms: Optional[float] = None
    """The sender's wall clock when it answered, ms since the Unix epoch."""


SignalingMessage = Union[JoinMessage, OfferMessage, AnswerMessage, DeclineMessage]
ChannelMessage = Union[PoseMessage, PingMessage, StampsMessage, ResetMemoryMessage]

SIGNALING_TYPES: dict[str, type] = {cls.type: cls for cls in (JoinMessage, OfferMessage, AnswerMessage, DeclineMessage)}
CHANNEL_TYPES: dict[str, type] = {cls.type: cls for cls in (PoseMessage, PingMessage, StampsMessage, ResetMemoryMessage)}


def _build(obj: dict[str, Any], types: dict[str, type]) -> Any:
    cls = types.get(obj["type"])
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {obj['type'][:32]!r}; expected one of {sorted(types)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in obj:
            kwargs[f.name] = obj[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise InvalidFieldError(f"{cls.type}: missing field '{f.name}'")
    return cls(**kwargs)


def parse_signaling_message(raw: Union[str, bytes]) -> SignalingMessage:
    """One websocket message -> a validated signaling message, or MessageError."""
    return _build(decode_json_object(raw, SIGNALING_MAX_BYTES), SIGNALING_TYPES)


def parse_channel_message(raw: Union[str, bytes]) -> ChannelMessage:
    """One pose-channel message -> a validated PoseMessage, PingMessage, StampsMessage or ResetMemoryMessage,
    or MessageError."""
    return _build(decode_json_object(raw, CHANNEL_MAX_BYTES), CHANNEL_TYPES)


SERVER_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (JoinedMessage, PeerJoinedMessage, PeerLeftMessage, RelayedOfferMessage, RelayedAnswerMessage,
                RelayedDeclineMessage, ErrorMessage)
}
SENDER_TYPES: dict[str, type] = {cls.type: cls for cls in (HelloMessage, StatusMessage, StatsMessage, PongMessage, ErrorMessage)}


def _from_wire(obj: dict[str, Any]) -> dict[str, Any]:
    names = {wire: name for name, wire in Outgoing._WIRE_NAMES.items()}
    return {names.get(k, k): v for k, v in obj.items()}


def parse_server_message(raw: Union[str, bytes]) -> Outgoing:
    """What a signaling client (sender, Python viewer) receives from the server -> its dataclass."""
    return _build(_from_wire(decode_json_object(raw, SIGNALING_MAX_BYTES)), SERVER_TYPES)


def parse_sender_message(raw: Union[str, bytes]) -> Outgoing:
    """What a viewer receives on the pose channel from its sender -> its dataclass."""
    return _build(_from_wire(decode_json_object(raw, SIGNALING_MAX_BYTES)), SENDER_TYPES)
