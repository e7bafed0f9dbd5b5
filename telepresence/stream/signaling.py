"""Signaling: rooms of senders and viewers, and the websocket protocol that joins them.

A viewer (browser) joins a room and learns its senders; for each sender it
sends an SDP offer (ICE gathered, no trickle), which the server relays to
that sender; the sender's answer comes back the same way. The server only
relays between members of the same room, viewer->sender offers and
sender->viewer answers/declines; media never passes through it.

Input safety: each message is parsed by telepresence.stream.messages (JSON only,
type whitelist, size cap, typed finite fields). A bad message gets an
`error` reply naming the problem and the connection stays up; a client that
floods is rate-limited; per-IP caps (connections, viewers per room, rooms),
per-room caps, idle expiry and an optional shared token bound what one client
can take (docs/security.md lists them). Nothing a client sends can raise out of
`SignalingServer.handle`.

No member waits on another: every socket has an `Outbox` written by its own
task, so a relay is a queue append; a member whose socket does not drain
(send_timeout_s, or outbox_bytes queued) is dropped.

Ids survive a dropped socket and a server restart: `joined` carries a secret
`resume` token and the id is derived from it (sha256), so a member that joins
again with its token gets the same id from this or a restarted server, and
nobody can take an id without the token.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from websockets.exceptions import ConnectionClosed

from .call_messages import (
    PublishedMessage,
    PublishMessage,
    UnpublishedMessage,
    UnpublishMessage,
)
from .messages import (
    AnswerMessage,
    DeclineMessage,
    ErrorMessage,
    JoinedMessage,
    JoinMessage,
    MessageError,
    OfferMessage,
    PeerJoinedMessage,
    PeerLeftMessage,
    RelayedAnswerMessage,
    RelayedDeclineMessage,
    RelayedOfferMessage,
    SignalingMessage,
    parse_signaling_message,
)
from .rtc import IceConfig

logger = logging.getLogger(__name__)


class SignalingError(Exception):
    """A well-formed message that cannot be honoured; `code` goes back in the error reply."""

    code = "refused"


class BadTokenError(SignalingError):
    code = "bad-token"


class RoomFullError(SignalingError):
    code = "room-full"


class TooManyRoomsError(SignalingError):
    code = "too-many-rooms"


class NotJoinedError(SignalingError):
    code = "not-joined"


class AlreadyJoinedError(SignalingError):
    code = "already-joined"


class UnknownPeerError(SignalingError):
    code = "unknown-peer"


class WrongRoleError(SignalingError):
    code = "wrong-role"


class RateLimitedError(SignalingError):
    code = "rate-limited"


class CallRefusedError(SignalingError):
    """A participant's camera that the call cannot take, or no longer takes (the reason goes back in
    `unpublished`)."""

    code = "call-refused"


class NoCallsError(SignalingError):
    code = "no-calls"


class AddressLimitError(SignalingError):
    """One address already holds its share of a room, or of the server's rooms."""

    code = "address-limit"


@dataclass(frozen=True)
class RoomLimits:
    """Caps that bound what clients can take from the server."""

    max_viewers_per_room: int = 8
    """Browsers in one room."""
    max_senders_per_room: int = 4
    """Senders (people) in one room."""
    max_rooms: int = 100
    """Rooms at once."""
    max_connections_per_ip: int = 16
    """Open signaling sockets from one IP address."""
    max_viewers_per_ip: int = 4
    """Viewers from one IP address in one room (so one address cannot fill a room)."""
    max_rooms_per_ip: int = 4
    """Rooms one IP address is a member of at once (so a few addresses cannot take every room)."""
    messages_per_s: float = 20.0
    """Sustained messages per second per socket (burst: 2 s worth)."""
    idle_viewer_s: float = 60.0
    """A viewer that completes no call in this long while its room has a sender is dropped."""
    keepalive_s: float = 3.0
    """Ping every member this often; one that has not answered keepalive_s later is dropped
    (a frozen member loses its place within 2 x keepalive_s + 1 s)."""
    outbox_bytes: int = 1 << 20
    """Messages queued for one member before it counts as not reading and is dropped."""

    def __post_init__(self) -> None:
        for name in ("max_viewers_per_room", "max_senders_per_room", "max_rooms", "max_connections_per_ip",
                     "max_viewers_per_ip", "max_rooms_per_ip"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("messages_per_s", "idle_viewer_s", "keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if self.outbox_bytes < 2 * 64 * 1024:
            raise ValueError(f"outbox_bytes: expected at least two messages' worth (128 KiB), got {self.outbox_bytes}")


class Outbox:
    """One socket's outgoing messages, written in order by their own task: putting never waits.

    A send that does not complete within `timeout_s`, or more than `max_bytes` queued,
    means the client is not reading: the socket is aborted (its handler then leaves the room).
    """

    def __init__(self, ws: Any, timeout_s: float, max_bytes: int, label: str) -> None:
        self.ws = ws
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.label = label
        self._queue: collections.deque[str] = collections.deque()
        self._queued_bytes = 0
        self._ready = asyncio.Event()
        self._dropped = False
        self._close_with: Optional[tuple[int, str]] = None
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    def put(self, text: str) -> None:
        if self._dropped or self._close_with is not None:
            return
        if self._queued_bytes + len(text) > self.max_bytes:
            self.drop(f"not reading its socket: {self._queued_bytes} bytes wait unread")
            return
        self._queue.append(text)
        self._queued_bytes += len(text)
        self._ready.set()

    def finish(self, code: int, reason: str) -> None:
        """Close the socket once what is queued has been sent."""
        if self._close_with is None:
            self._close_with = (code, reason)
            self._ready.set()

    def drop(self, why: Optional[str] = None) -> None:
        """Abort the socket now (logged with `why`, if given)."""
        if self._dropped:
            return
        self._dropped = True
        self._queue.clear()
        if why:
            logger.warning("%s: dropped (%s)", self.label, why)
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        # The flag as well as the cancel: Python 3.11's asyncio.wait_for swallows a cancel that lands
        # just as its send completes (an in-process socket's always does), and _run would wait for ever.
        self._closed = True
        self._ready.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._closed:
            await self._ready.wait()
            self._ready.clear()
            while self._queue and not self._closed:
                text = self._queue.popleft()
                self._queued_bytes -= len(text)
                try:
                    await asyncio.wait_for(self.ws.send(text), self.timeout_s)
                except asyncio.TimeoutError:
                    self.drop(f"not reading its socket: a send took over {self.timeout_s:g} s")
                    return
                except (ConnectionClosed, OSError):
                    return
            if self._close_with is not None:
                try:
                    await asyncio.wait_for(self.ws.close(*self._close_with), self.timeout_s)
                except asyncio.TimeoutError:
                    self.drop()
                return


def session_id(resume: str) -> str:
    """A member's id, derived from its secret resume token (the token cannot be read back from the id)."""
    return hashlib.sha256(resume.encode("ascii")).hexdigest()[:12]


@dataclass(eq=False)
class Member:
    """One joined socket."""

    id: str
    room: str
    role: str
    name: str
    ip: str
    outbox: Outbox = field(repr=False)
    resume: str = field(repr=False, default="")
    called: bool = False
    """A viewer that has had an answer: it completed a call, and never expires as idle."""
    expired: bool = False
    waiting_since: Optional[float] = None
    """Since when this viewer, not yet called, has had a sender in its room (idle expiry)."""

    def send(self, text: str) -> None:
        self.outbox.put(text)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "name": self.name}


class RoomRegistry:
    """Rooms by name; a room exists while it has members. Not thread-safe (one event loop)."""

    def __init__(self, limits: RoomLimits = RoomLimits()) -> None:
        self.limits = limits
        self.rooms: dict[str, dict[str, Member]] = {}
        self.members: dict[str, Member] = {}

    def join(self, room: str, role: str, name: str, ip: str, outbox: Outbox, resume: Optional[str] = None) -> Member:
        """A new member; with `resume`, under the id of that earlier session (whose stale member, if
        still here, is replaced and its socket closed)."""
        resume = resume or secrets.token_hex(16)
        member_id = session_id(resume)
        stale = self.members.get(member_id)
        if stale is not None:
            self.leave(stale)
            stale.outbox.drop()
            logger.info("%s %s: replaced by its own rejoin", stale.role, stale.id)
        members = self.rooms.get(room)
        if members is None:
            if len(self.rooms) >= self.limits.max_rooms:
                raise TooManyRoomsError(f"the server already holds {len(self.rooms)} rooms")
            members = {}
        cap = self.limits.max_viewers_per_room if role == "viewer" else self.limits.max_senders_per_room
        if sum(m.role == role for m in members.values()) >= cap:
            raise RoomFullError(f"room {room!r} already has {cap} {role}s")
        if role == "viewer" and sum(m.role == "viewer" and m.ip == ip for m in members.values()) >= self.limits.max_viewers_per_ip:
            raise AddressLimitError(f"room {room!r} already has {self.limits.max_viewers_per_ip} viewers from your address")
        rooms_of_ip = {m.room for m in self.members.values() if m.ip == ip}
        if room not in rooms_of_ip and len(rooms_of_ip) >= self.limits.max_rooms_per_ip:
            raise AddressLimitError(f"your address is already in {len(rooms_of_ip)} rooms")
        member = Member(member_id, room, role, name, ip, outbox, resume)
        members[member.id] = member
        self.rooms[room] = members
        self.members[member.id] = member
        return member

    def leave(self, member: Member) -> bool:
        """Remove `member` (this very object: a rejoin under its id may have replaced it already).
        Returns whether it was still here."""
        if self.members.get(member.id) is not member:
            return False
        del self.members[member.id]
        members = self.rooms.get(member.room, {})
        members.pop(member.id, None)
        if not members:
            self.rooms.pop(member.room, None)
        return True

    def peers(self, member: Member) -> list[Member]:
        """The other role's members in `member`'s room (a viewer's senders, a sender's viewers)."""
        return [m for m in self.rooms.get(member.room, {}).values() if m.role != member.role]

    def find(self, member: Member, peer_id: str, role: str) -> Member:
        peer = self.rooms.get(member.room, {}).get(peer_id)
        if peer is None or peer.role != role:
            raise UnknownPeerError(f"no {role} {peer_id!r} in room {member.room!r}")
        return peer


class CameraHost(Protocol):
    """What takes participants' cameras (telepresence.stream.call.CallHost, `telepresence serve`)."""

    async def publish(self, member: Member, sdp: str) -> tuple[str, str]:
        """Answer `member`'s camera offer: (answer SDP, the room id of its avatar); CallRefusedError with the reason."""

    async def unpublish(self, member_id: str, reason: str) -> None:
        """The participant leaves: stop its avatar and free what it holds (nothing if none)."""


class _TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SignalingServer:
    """The /ws endpoint: `await server.handle(websocket)` per connection; `start()` before, `close()` after."""

    send_timeout_s = 5.0

    def __init__(
        self, limits: RoomLimits = RoomLimits(), token: Optional[str] = None, ice: IceConfig = IceConfig(),
        cameras: Optional[CameraHost] = None,
    ) -> None:
        """cameras: takes `publish` (participants' cameras, `telepresence serve`); None: refused."""
        self.registry = RoomRegistry(limits)
        self.cameras = cameras
        self._publishing: dict[str, asyncio.Task] = {}  # member id -> its publish being answered
        self._tasks: set[asyncio.Task] = set()
        self.limits = limits
        self.token = token
        self.ice = ice
        self.connections_per_ip: collections.Counter[str] = collections.Counter()
        self.closing = False
        self._sweeper: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Begin expiring idle viewers."""
        self._sweeper = asyncio.ensure_future(self._expire_idle())

    async def close(self) -> None:
        """The server is going away: members' leaving is no longer announced (their calls go on,
        and they rejoin a restarted server under the same ids)."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def handle(self, ws: Any) -> None:
        """Serve one websocket until it closes."""
        ip = remote_ip(ws)
        if self.connections_per_ip[ip] >= self.limits.max_connections_per_ip:
            logger.warning("refusing a signaling connection from %s: %d already open", ip, self.connections_per_ip[ip])
            await self._send_quietly(ws, ErrorMessage("too-many-connections", "too many connections from your address").to_json())
            await ws.close(1008, "too many connections")
            return
        self.connections_per_ip[ip] += 1
        outbox = Outbox(ws, self.send_timeout_s, self.limits.outbox_bytes, label=f"signaling client {ip}")
        member: Optional[Member] = None
        bucket = _TokenBucket(self.limits.messages_per_s, 2 * self.limits.messages_per_s)
        last_rate_error = 0.0
        try:
            async for raw in ws:
                if not bucket.take():
                    if time.monotonic() - last_rate_error >= 1.0:  # one reply per flooded second, not per message
                        last_rate_error = time.monotonic()
                        error = RateLimitedError(f"more than {self.limits.messages_per_s:g} messages per second")
                        outbox.put(ErrorMessage(error.code, str(error)).to_json())
                    continue
                try:
                    message = parse_signaling_message(raw)
                    member = self._dispatch(ws, outbox, member, message)
                except (MessageError, SignalingError) as error:
                    outbox.put(ErrorMessage(error.code, str(error)).to_json())
                except Exception:
                    logger.exception("peer %s: unexpected error handling a message", member.id if member else ip)
                    outbox.put(ErrorMessage("internal", "internal error").to_json())
        except ConnectionClosed:
            pass
        finally:
            self.connections_per_ip[ip] -= 1
            if self.connections_per_ip[ip] <= 0:
                del self.connections_per_ip[ip]
            if member is not None:
                self._leave(member)
            await outbox.close()

    def _dispatch(self, ws: Any, outbox: Outbox, member: Optional[Member], message: SignalingMessage) -> Optional[Member]:
        if isinstance(message, JoinMessage):
            if member is not None:
                raise AlreadyJoinedError(f"already joined room {member.room!r} as {member.id}")
            return self._join(ws, outbox, message)
        if member is None:
            raise NotJoinedError(f"send join before {message.type}")
        if isinstance(message, OfferMessage):
            self._require_role(member, "viewer", message.type)
            peer = self.registry.find(member, message.to, "sender")
            peer.send(RelayedOfferMessage(member.id, message.sdp).to_json())
        elif isinstance(message, AnswerMessage):
            self._require_role(member, "sender", message.type)
            peer = self.registry.find(member, message.to, "viewer")
            peer.called = True
            peer.send(RelayedAnswerMessage(member.id, message.sdp).to_json())
        elif isinstance(message, DeclineMessage):
            self._require_role(member, "sender", message.type)
            peer = self.registry.find(member, message.to, "viewer")
            peer.send(RelayedDeclineMessage(member.id, message.reason).to_json())
        elif isinstance(message, (PublishMessage, UnpublishMessage)):
            self._on_camera_message(member, message)
        return member

    # -- participants' cameras (the call) --

    def _on_camera_message(self, member: Member, message: PublishMessage | UnpublishMessage) -> None:
        self._require_role(member, "viewer", message.type)
        if self.cameras is None:
            raise NoCallsError("this server takes no cameras (a call needs `telepresence serve`)")
        if isinstance(message, UnpublishMessage):
            task = asyncio.ensure_future(self.cameras.unpublish(member.id, "left the call"))
        elif member.id in self._publishing:
            raise CallRefusedError("an earlier publish from you is still being answered")
        else:
            task = self._publishing[member.id] = asyncio.ensure_future(self._publish(member, message.sdp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, member: Member, sdp: str) -> None:
        assert self.cameras is not None
        try:
            answer, avatar_id = await self.cameras.publish(member, sdp)
            reply: PublishedMessage | UnpublishedMessage = PublishedMessage(answer, avatar_id)
        except CallRefusedError as error:
            reply = UnpublishedMessage(str(error))
        except Exception as error:
            logger.exception("viewer %s: publish failed", member.id)
            reply = UnpublishedMessage(f"the server could not take the camera ({type(error).__name__})")
        finally:
            if self._publishing.get(member.id) is asyncio.current_task():
                del self._publishing[member.id]
        current = self.registry.members.get(member.id, member)  # it may have rejoined meanwhile
        current.called = current.called or isinstance(reply, PublishedMessage)  # in the call: never idle
        current.send(reply.to_json())

    def send_to(self, member_id: str, text: str) -> bool:
        """Queue `text` for the member now joined under `member_id`; False if there is none."""
        member = self.registry.members.get(member_id)
        if member is not None:
            member.send(text)
        return member is not None

    @staticmethod
    def _require_role(member: Member, role: str, what: str) -> None:
        if member.role != role:
            raise WrongRoleError(f"only a {role} may send {what}")

    def _join(self, ws: Any, outbox: Outbox, message: JoinMessage) -> Member:
        if self.token is not None and not hmac.compare_digest((message.token or "").encode(), self.token.encode()):
            raise BadTokenError("wrong or missing room token")
        name = message.name or message.role
        ip = remote_ip(ws)
        member = self.registry.join(message.room, message.role, name, ip, outbox, message.resume)
        outbox.label = f"{member.role} {member.id} ({ip})"
        logger.info("%s %s (%s) %s room %r from %s", member.role, member.id, name,
                    "rejoined" if message.resume else "joined", member.room, ip)
        peers = self.registry.peers(member)
        member.send(JoinedMessage(member.id, member.room, member.role, [p.describe() for p in peers],
                                  self.ice.browser_ice_servers(), member.resume).to_json())
        text = PeerJoinedMessage(member.describe()).to_json()
        for peer in peers:
            peer.send(text)
        return member

    def _leave(self, member: Member) -> None:
        if not self.registry.leave(member):
            return  # replaced by its own rejoin: its id lives on
        logger.info("%s %s left room %r", member.role, member.id, member.room)
        if self.closing:
            return  # the server is stopping, not the member leaving: calls go on
        if (publishing := self._publishing.pop(member.id, None)) is not None:
            # Its answer has nowhere to go (a page that comes back publishes again): the avatar it was starting
            # would hold a place in the call, and in its room, until its uplink timed out.
            logger.info("viewer %s left while its camera was being answered: not started", member.id)
            publishing.cancel()
        text = PeerLeftMessage(member.id, member.role).to_json()
        for peer in self.registry.peers(member):
            peer.send(text)

    async def _expire_idle(self) -> None:
        """Drop viewers that hold a room place without ever completing a call while a sender was there."""
        period_s = min(1.0, self.limits.idle_viewer_s / 4)
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for member in list(self.registry.members.values()):
                if member.role != "viewer" or member.called or member.expired:
                    continue
                if not self.registry.peers(member):
                    member.waiting_since = None
                elif member.waiting_since is None:
                    member.waiting_since = now
                elif now - member.waiting_since > self.limits.idle_viewer_s:
                    logger.info("viewer %s: no call in %.0f s with a sender present; dropped", member.id,
                                self.limits.idle_viewer_s)
                    member.expired = True
                    member.send(ErrorMessage("idle", f"no call completed in {self.limits.idle_viewer_s:g} s").to_json())
                    member.outbox.finish(1008, "idle")

    async def _send_quietly(self, ws: Any, text: str) -> None:
        try:
            await asyncio.wait_for(ws.send(text), self.send_timeout_s)
        except (ConnectionClosed, asyncio.TimeoutError, OSError):
            pass


def remote_ip(ws: Any) -> str:
    """The peer address of a websocket connection ("unknown" if it has none)."""
    address = getattr(ws, "remote_address", None)
    if isinstance(address, (tuple, list)) and address:
        return str(address[0])
    return "unknown"
