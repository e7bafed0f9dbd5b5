"""The receiver: one port serving the web page (web/) and the signaling socket (/ws).

websockets answers the plain HTTP GETs through its `process_request` hook,
so the page and the socket share one origin and one port with no web
framework. Only regular files under the web directory are served, to GET and
HEAD (405 otherwise). The /ws handshake is refused (403) to a browser page of
another origin: an Origin header must name this server (the Host the request
came to) or one of `allowed_origins`; clients that send none (Python) pass.
See docs/security.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import http
import logging
import os
import mimetypes
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .messages import check_room, check_token
from .rtc import IceConfig
from .signaling import CameraHost, RoomLimits, SignalingServer, remote_ip

logger = logging.getLogger(__name__)

SIGNALING_PATH = "/ws"
PAGES = {"/call": "call.html"}
"""Pages served under a name without a suffix (the call page: /call?room=R)."""
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; media-src 'self' blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


ALLOWED_METHODS = ("GET", "HEAD")


class ReceiverError(RuntimeError):
    """The receiver cannot start (port taken, web directory missing)."""


def parse_origin(url: str) -> str:
    """An --allow-origin value -> its normalised origin "scheme://host[:port]" (no path, no query)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"allowed_origins: expected http(s)://HOST[:PORT], got {url!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def web_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be the pages' folder ("no such folder", "is a file, not a folder", "holds no index.html"),
    or None."""
    if (path / "index.html").is_file():
        return None
    if not path.exists():
        return "no such folder"
    return "is a file, not a folder" if not path.is_dir() else "holds no index.html"


def default_web_dir() -> Path:
    """$TELEPRESENCE_WEB_DIR, else ./web, else the web/ folder of this checkout
    (the project is installed in editable mode from its repository)."""
    env = os.environ.get("TELEPRESENCE_WEB_DIR")
    if env:
        return Path(env)
    here = Path("web")
    if (here / "index.html").is_file():
        return here
    return Path(__file__).resolve().parents[2] / "web"


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything run_receiver.py's flags set."""

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for the LAN)."""
    port: int = 8080
    """TCP port for the page and the signaling socket; 0 picks a free one."""
    token: Optional[str] = field(default=None, repr=False)
    """Shared token required to join rooms; None: open."""
    room: str = "demo"
    """Room named in the printed URL."""
    web_dir: Path = field(default_factory=lambda: default_web_dir())
    """The pages' files (index.html, call.html, their modules, style.css)."""
    limits: RoomLimits = RoomLimits()
    ice: IceConfig = IceConfig()
    """STUN/TURN servers handed to browsers."""
    allowed_origins: tuple[str, ...] = ()
    """Other web origins ("https://host[:port]") whose pages may use /ws, besides this server's own page."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        check_room(self.room)
        if self.token is not None:
            check_token(self.token)
        object.__setattr__(self, "allowed_origins", tuple(parse_origin(o) for o in self.allowed_origins))


class Receiver:
    """Serves web/ and /ws until stopped."""

    def __init__(self, config: ReceiverConfig, cameras: Optional[CameraHost] = None) -> None:
        """cameras: takes participants' cameras (telepresence serve's call); None: a viewing-only receiver."""
        self.config = config
        self.web_root = config.web_dir.resolve()
        self.signaling = SignalingServer(config.limits, config.token, config.ice, cameras)
        self.server: Optional[Server] = None

    @property
    def port(self) -> int:
        assert self.server is not None, "call start() first"
        return self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The page to open, with room (and token) in the query."""
        return self.page_url("/")

    def page_url(self, page: str) -> str:
        """`page` ("/", "/call") of this receiver, with room (and token) in the query."""
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        query = {"room": self.config.room}
        if self.config.token:
            query["token"] = self.config.token
        return f"http://{host}:{self.port}{page}?{urllib.parse.urlencode(query)}"

    @property
    def signaling_url(self) -> str:
        return self.url.replace("http://", "ws://", 1).split("/?", 1)[0] + SIGNALING_PATH

    async def start(self) -> None:
        if not (self.web_root / "index.html").is_file():
            raise ReceiverError(f"web directory {self.web_root}: {web_dir_problem(self.web_root)} (run from the "
                                "repository root or pass --web-dir)")
        keepalive_s = self.config.limits.keepalive_s
        try:
            self.server = await serve(
                self._handle,
                self.config.host,
                self.config.port,
                process_request=self._process_request,
                compression=None,
                max_size=2**20,  # above this websockets closes the socket (1009); below, messages.py caps at 64 kB with an error reply
                ping_interval=keepalive_s,  # a frozen member: no pong within keepalive_s, then 1 s to close
                ping_timeout=keepalive_s,
                close_timeout=1.0,
                server_header="telepresence",
            )
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ReceiverError(
                    f"cannot listen on {self.config.host}:{self.config.port}: address already in use "
                    f"(another program has that port: pick another with --port, e.g. --port {self.config.port + 1}, "
                    f"or `make demo ARGS=\"--port {self.config.port + 1}\"`)"
                ) from None
            raise ReceiverError(f"cannot listen on {self.config.host}:{self.config.port}: {error.strerror}") from None
        self.signaling.start()
        logger.info("serving %s and %s on port %d", self.web_root, SIGNALING_PATH, self.port)

    async def stop(self) -> None:
        await self.signaling.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        await self.signaling.handle(ws)

    def _process_request(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        if request.method not in ALLOWED_METHODS:
            return _response(http.HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain; charset=utf-8",
                             {"Allow": ", ".join(ALLOWED_METHODS)})
        path = urllib.parse.urlsplit(request.path).path
        if path == SIGNALING_PATH:
            if not self._origin_allowed(request.headers):
                logger.warning("refusing a signaling handshake from %s: origin %.80r is not this server's",
                               remote_ip(connection), request.headers.get("Origin"))
                return _response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n", "text/plain; charset=utf-8")
            return None  # go on with the websocket handshake
        response = self._static_response(path)
        if request.method == "HEAD":  # the GET's headers, Content-Length included, and no body
            response = dataclasses.replace(response, body=b"")
        return response

    def _origin_allowed(self, headers: Headers) -> bool:
        """No Origin (not a browser), the page's own origin (same host:port as the request's Host), or listed."""
        origin = headers.get("Origin")
        if origin is None:
            return True
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme in ("http", "https") and parts.netloc and f"{parts.scheme}://{parts.netloc.lower()}" in self.config.allowed_origins:
            return True
        host = headers.get("Host")
        return bool(host) and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def _static_response(self, url_path: str) -> Response:
        not_found = _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        relative = PAGES.get(url_path) or urllib.parse.unquote(url_path).lstrip("/") or "index.html"
        if "\x00" in relative or "\\" in relative or any(part in ("..", ".") for part in relative.split("/")):
            return not_found
        try:
            path = (self.web_root / relative).resolve()
            if not path.is_relative_to(self.web_root) or not path.is_file():
                return not_found
            body = path.read_bytes()
        except OSError:  # a name too long, a path too deep: not one of ours
            return not_found
        content_type = CONTENT_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return _response(http.HTTPStatus.OK, body, content_type)


def _response(status: http.HTTPStatus, body: bytes, content_type: str, extra: Optional[dict[str, str]] = None) -> Response:
    headers = Headers(
        {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-cache",
            "Connection": "close",
            **SECURITY_HEADERS,
            **(extra or {}),
        }
    )
    return Response(status.value, status.phrase, headers, body)


async def run(config: ReceiverConfig, on_ready: Optional[Callable[[Receiver], None]] = None) -> None:
    """Serve until cancelled; `on_ready(receiver)` once listening."""
    receiver = Receiver(config)
    await receiver.start()
    if on_ready is not None:
        on_ready(receiver)
    try:
        await asyncio.Future()
    finally:
        await receiver.stop()
