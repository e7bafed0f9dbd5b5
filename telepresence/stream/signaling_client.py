"""The client side of signaling (telepresence.stream.signaling): one member's websocket to a
receiver's /ws, shared by the sender and the Python viewer. Typed messages both ways."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Optional

import websockets

from .messages import ErrorMessage, JoinedMessage, JoinMessage, MessageError, Outgoing, parse_server_message

logger = logging.getLogger(__name__)

FATAL_JOIN_ERRORS = ("bad-token", "room-full", "bad-field")
"""Join refusals that retrying cannot cure."""


class SignalingRejectedError(RuntimeError):
    """The signaling server refused to let this client join (token, room full, bad field)."""


class SignalingClient:
    """Join `room` as `role`; then `send()` typed messages and iterate `messages()`.

        async with SignalingClient(url, room, "sender", name) as client:
            joined = client.joined
            async for message in client.messages(): ...
    """

    keepalive_s = 5.0
    """Ping the server this often; a server silent keepalive_s longer counts as gone (then rejoin)."""

    def __init__(self, url: str, room: str, role: str, name: str, token: Optional[str] = None,
                 open_timeout_s: float = 5.0, resume: Optional[str] = None) -> None:
        """resume: the `resume` token of an earlier session's `joined`, to rejoin under the same id."""
        self.url = url
        self.join_message = JoinMessage(room=room, role=role, token=token, name=name, resume=resume)
        self.open_timeout_s = open_timeout_s
        self.joined: Optional[JoinedMessage] = None
        self._ws: Any = None

    async def __aenter__(self) -> "SignalingClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> JoinedMessage:
        """Open the socket and join; raises SignalingRejectedError for a refusal that retrying cannot cure,
        RuntimeError for any other refusal, OSError/TimeoutError/WebSocketException when unreachable."""
        self._ws = await self._open()
        await self.send(self.join_message)
        while True:
            message = await self.recv(self.open_timeout_s)
            if isinstance(message, JoinedMessage):
                self.joined = message
                return message
            if isinstance(message, ErrorMessage):
                text = f"signaling server refused to join: {message.message or message.code}"
                if message.code in FATAL_JOIN_ERRORS:
                    raise SignalingRejectedError(text)
                raise RuntimeError(text)

    async def _open(self) -> Any:
        """The connection: something with send(text), recv() and close(), as a websockets client has. A server that
        answers the handshake with an HTTP error of the request's own (404: no such path; 401, 403...) is
        SignalingRejectedError: asking again cannot cure it (a 408, 429 or a 5xx may pass: raised as it is)."""
        try:
            return await websockets.connect(self.url, open_timeout=self.open_timeout_s, max_size=2**20,
                                            compression=None, ping_interval=self.keepalive_s,
                                            ping_timeout=self.keepalive_s, close_timeout=2.0)
        except websockets.exceptions.InvalidHandshake as error:
            status = getattr(getattr(error, "response", None), "status_code", None) or getattr(error, "status_code", None)
            if status is not None and 400 <= int(status) < 500 and int(status) not in (408, 429):
                raise SignalingRejectedError(
                    f"{self.url}: the server answered HTTP {int(status)}"
                    + (": nothing to join at that path (a receiver's signaling is at /ws)" if int(status) == 404 else "")
                ) from None
            raise

    async def send(self, message: Outgoing) -> None:
        await self._ws.send(message.to_json())

    async def recv(self, timeout_s: Optional[float] = None) -> Outgoing:
        """The next well-formed server message (asyncio.TimeoutError after timeout_s; ConnectionClosed at the end).
        A malformed one is logged and skipped."""
        while True:
            raw = await asyncio.wait_for(self._ws.recv(), timeout_s)
            try:
                return parse_server_message(raw)
            except MessageError as error:
                logger.warning("signaling: ignoring a malformed server message (%s)", error)

    async def messages(self) -> AsyncIterator[Outgoing]:
        """Server messages as dataclasses until the socket closes."""
        try:
            while True:
                yield await self.recv()
        except websockets.exceptions.ConnectionClosedOK:
            return

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
