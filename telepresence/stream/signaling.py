"""Signaling: rooms of senders and viewers, and the websocket protocol that joins them.

A viewer (browser) joins a room and learns its senders; for each sender it
sends an SDP offer (ICE gathered, no trickle), which the server relays to
that sender; the sender's answer comes back the same way. The server only
relays between members of the same room, viewer->sender offers and
sender->viewer answers/declines; media never passes through it.

Input safety: each message is parsed by telepresence.stream.messages (JSON only,
type whitelist, size cap, typed finite fields). A bad message gets an
`error` reply naming the problem and the connection stays up; a client that
floods is rate-limited; a per-IP connection cap, per-room peer caps and an
optional shared token bound what one client can take. Nothing a client sends
can raise out of `SignalingServer.handle`.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from websockets.exceptions import ConnectionClosed

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
    messages_per_s: float = 20.0
    """Sustained messages per second per socket (burst: 2 s worth)."""

    def __post_init__(self) -> None:
        for name in ("max_viewers_per_room", "max_senders_per_room", "max_rooms", "max_connections_per_ip"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.messages_per_s <= 0:
            raise ValueError(f"messages_per_s: expected > 0, got {self.messages_per_s}")


@dataclass(eq=False)
class Member:
    """One joined socket."""

    id: str
    room: str
    role: str
    name: str
    send: Callable[[str], Awaitable[None]]

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role, "name": self.name}


class RoomRegistry:
    """Rooms by name; a room exists while it has members. Not thread-safe (one event loop)."""

    def __init__(self, limits: RoomLimits = RoomLimits()) -> None:
        self.limits = limits
        self.rooms: dict[str, dict[str, Member]] = {}

    def join(self, room: str, role: str, name: str, send: Callable[[str], Awaitable[None]]) -> Member:
        members = self.rooms.get(room)
        if members is None:
            if len(self.rooms) >= self.limits.max_rooms:
                raise TooManyRoomsError(f"the server already holds {len(self.rooms)} rooms")
            members = {}
        cap = self.limits.max_viewers_per_room if role == "viewer" else self.limits.max_senders_per_room
        if sum(m.role == role for m in members.values()) >= cap:
            raise RoomFullError(f"room {room!r} already has {cap} {role}s")
        member = Member(secrets.token_hex(6), room, role, name, send)
        members[member.id] = member
        self.rooms[room] = members
        return member

    def leave(self, member: Member) -> list[Member]:
        """Remove `member`; returns the members left in its room."""
        members = self.rooms.get(member.room, {})
        members.pop(member.id, None)
        if not members:
            self.rooms.pop(member.room, None)
        return list(members.values())

    def peers(self, member: Member) -> list[Member]:
        """The other role's members in `member`'s room (a viewer's senders, a sender's viewers)."""
        return [m for m in self.rooms.get(member.room, {}).values() if m.role != member.role]

    def find(self, member: Member, peer_id: str, role: str) -> Member:
        peer = self.rooms.get(member.room, {}).get(peer_id)
        if peer is None or peer.role != role:
            raise UnknownPeerError(f"no {role} {peer_id!r} in room {member.room!r}")
        return peer


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
    """The /ws endpoint: `await server.handle(websocket)` per connection."""

    send_timeout_s = 5.0

    def __init__(
        self, limits: RoomLimits = RoomLimits(), token: Optional[str] = None, ice: IceConfig = IceConfig()
    ) -> None:
        self.registry = RoomRegistry(limits)
        self.limits = limits
        self.token = token
        self.ice = ice
        self.connections_per_ip: collections.Counter[str] = collections.Counter()

    async def handle(self, ws: Any) -> None:
        """Serve one websocket until it closes."""
        ip = _remote_ip(ws)
        if self.connections_per_ip[ip] >= self.limits.max_connections_per_ip:
            logger.warning("refusing a signaling connection from %s: %d already open", ip, self.connections_per_ip[ip])
            await self._send_quietly(ws, ErrorMessage("too-many-connections", "too many connections from your address").to_json())
            await ws.close(1008, "too many connections")
            return
        self.connections_per_ip[ip] += 1
        member: Optional[Member] = None
        bucket = _TokenBucket(self.limits.messages_per_s, 2 * self.limits.messages_per_s)
        last_rate_error = 0.0
        try:
            async for raw in ws:
                if not bucket.take():
                    if time.monotonic() - last_rate_error >= 1.0:  # one reply per flooded second, not per message
                        last_rate_error = time.monotonic()
                        error = RateLimitedError(f"more than {self.limits.messages_per_s:g} messages per second")
                        await self._send_quietly(ws, ErrorMessage(error.code, str(error)).to_json())
                    continue
                try:
                    message = parse_signaling_message(raw)
                    member = await self._dispatch(ws, member, message)
                except (MessageError, SignalingError) as error:
                    await self._send_quietly(ws, ErrorMessage(error.code, str(error)).to_json())
                except ConnectionClosed:
                    raise
                except Exception:
                    logger.exception("peer %s: unexpected error handling a message", member.id if member else ip)
                    await self._send_quietly(ws, ErrorMessage("internal", "internal error").to_json())
        except ConnectionClosed:
            pass
        finally:
            self.connections_per_ip[ip] -= 1
            if self.connections_per_ip[ip] <= 0:
                del self.connections_per_ip[ip]
            if member is not None:
                await self._leave(member)

    async def _dispatch(self, ws: Any, member: Optional[Member], message: SignalingMessage) -> Optional[Member]:
        if isinstance(message, JoinMessage):
            if member is not None:
                raise AlreadyJoinedError(f"already joined room {member.room!r} as {member.id}")
            return await self._join(ws, message)
        if member is None:
            raise NotJoinedError(f"send join before {message.type}")
        if isinstance(message, OfferMessage):
            self._require_role(member, "viewer", message.type)
            peer = self.registry.find(member, message.to, "sender")
            await self._relay(peer, RelayedOfferMessage(member.id, message.sdp).to_json())
        elif isinstance(message, AnswerMessage):
            self._require_role(member, "sender", message.type)
            peer = self.registry.find(member, message.to, "viewer")
            await self._relay(peer, RelayedAnswerMessage(member.id, message.sdp).to_json())
        elif isinstance(message, DeclineMessage):
            self._require_role(member, "sender", message.type)
            peer = self.registry.find(member, message.to, "viewer")
            await self._relay(peer, RelayedDeclineMessage(member.id, message.reason).to_json())
        return member

    @staticmethod
    def _require_role(member: Member, role: str, what: str) -> None:
        if member.role != role:
            raise WrongRoleError(f"only a {role} may send {what}")

    async def _join(self, ws: Any, message: JoinMessage) -> Member:
        if self.token is not None and not hmac.compare_digest((message.token or "").encode(), self.token.encode()):
            raise BadTokenError("wrong or missing room token")
        name = message.name or message.role
        member = self.registry.join(message.room, message.role, name, lambda text: ws.send(text))
        logger.info("%s %s (%s) joined room %r from %s", member.role, member.id, name, member.room, _remote_ip(ws))
        peers = self.registry.peers(member)
        joined = JoinedMessage(member.id, member.room, member.role, [p.describe() for p in peers],
                               self.ice.browser_ice_servers())
        await self._send_quietly(ws, joined.to_json())
        text = PeerJoinedMessage(member.describe()).to_json()
        await asyncio.gather(*(self._relay(p, text) for p in peers))
        return member

    async def _leave(self, member: Member) -> None:
        self.registry.leave(member)
        logger.info("%s %s left room %r", member.role, member.id, member.room)
        text = PeerLeftMessage(member.id, member.role).to_json()
        await asyncio.gather(*(self._relay(p, text) for p in self.registry.peers(member)))

    async def _relay(self, peer: Member, text: str) -> None:
        """Send to another member; a slow or gone peer does not hold up this one."""
        try:
            await asyncio.wait_for(peer.send(text), self.send_timeout_s)
        except (ConnectionClosed, asyncio.TimeoutError, OSError) as error:
            logger.info("peer %s: could not deliver a message (%s)", peer.id, type(error).__name__)

    async def _send_quietly(self, ws: Any, text: str) -> None:
        try:
            await asyncio.wait_for(ws.send(text), self.send_timeout_s)
        except (ConnectionClosed, asyncio.TimeoutError, OSError):
            pass


def _remote_ip(ws: Any) -> str:
    address = getattr(ws, "remote_address", None)
    if isinstance(address, (tuple, list)) and address:
        return str(address[0])
    return "unknown"
