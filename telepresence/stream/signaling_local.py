"""An in-process member of a SignalingServer: SignalingClient's interface without a socket.

The call's per-participant senders (telepresence.stream.call) live in the server's own process and
join their room through the server's own code (validation, limits, relays, peer-joined/left), under
the address of the participant they stand for, so per-address limits count them where they belong.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Optional

from websockets.exceptions import ConnectionClosedOK

from .signaling_client import SignalingClient

if TYPE_CHECKING:
    from .signaling import SignalingServer


class _Pipe:
    """Two queues of texts, one each way; closing puts an end mark (None) in both."""

    def __init__(self) -> None:
        self.to_server: asyncio.Queue[Optional[str]] = asyncio.Queue()
        self.to_client: asyncio.Queue[Optional[str]] = asyncio.Queue()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.to_server.put_nowait(None)
            self.to_client.put_nowait(None)

    async def get(self, queue: asyncio.Queue) -> str:
        text = await queue.get()
        if text is None:
            queue.put_nowait(None)  # the mark stays for any later reader
            raise ConnectionClosedOK(None, None)
        return text

    def put(self, queue: asyncio.Queue, text: str) -> None:
        if self.closed:
            raise ConnectionClosedOK(None, None)
        queue.put_nowait(text)


class _ServerEnd:
    """What SignalingServer.handle and its Outbox use of a websocket."""

    def __init__(self, pipe: _Pipe, ip: str) -> None:
        self.pipe = pipe
        self.remote_address = (ip, 0)
        self.transport = self  # Outbox.drop aborts through ws.transport

    def __aiter__(self) -> "_ServerEnd":
        return self

    async def __anext__(self) -> str:
        try:
            return await self.pipe.get(self.pipe.to_server)
        except ConnectionClosedOK:
            raise StopAsyncIteration from None

    async def send(self, text: str) -> None:
        self.pipe.put(self.pipe.to_client, text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.pipe.close()

    def abort(self) -> None:
        self.pipe.close()


class _ClientEnd:
    """What SignalingClient uses of a websockets client connection."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    async def send(self, text: str) -> None:
        self.pipe.put(self.pipe.to_server, text)

    async def recv(self) -> str:
        return await self.pipe.get(self.pipe.to_client)

    async def close(self) -> None:
        self.pipe.close()


class LocalSignalingClient(SignalingClient):
    """Joins `server` in process, as a client from `ip` would over /ws."""

    def __init__(self, server: "SignalingServer", ip: str, room: str, role: str, name: str,
                 token: Optional[str] = None, open_timeout_s: float = 5.0, resume: Optional[str] = None) -> None:
        super().__init__("local", room, role, name, token, open_timeout_s=open_timeout_s, resume=resume)
        self.server = server
        self.ip = ip
        self._handler: Optional[asyncio.Task] = None

    async def _open(self) -> Any:
        pipe = _Pipe()
        self._handler = asyncio.ensure_future(self.server.handle(_ServerEnd(pipe, self.ip)))
        return _ClientEnd(pipe)

    async def close(self) -> None:
        await super().close()
        if self._handler is not None:
            await asyncio.gather(self._handler, return_exceptions=True)


def local_clients(server: "SignalingServer", ip: str, resume: Optional[str] = None) -> Callable[..., SignalingClient]:
    """A maker with SignalingClient's arguments (its URL unused) for Sender(signaling=...): clients that
    join `server` in process from `ip`; `resume` seeds the first join, so its id is known beforehand
    (signaling.session_id(resume))."""

    def make(url: str, room: str, role: str, name: str, token: Optional[str] = None, **options: Any) -> SignalingClient:
        options["resume"] = options.get("resume") or resume
        return LocalSignalingClient(server, ip, room, role, name, token, **options)

    return make
