"""WebRTC settings: ICE servers, video codec choice and encoder bitrates.

aiortc pitfalls handled here (DESIGN.md section 4):
- `iceServers=None` makes aiortc use a public STUN server and stall offline,
  so the configuration always carries an explicit (by default empty) list:
  host candidates only, which is what loopback and LAN need.
- aiortc's encoders start at 500 kbps (VP8) / 1 Mbps (H264) and cap at
  1.5 / 3 Mbps, too low for 512x512 at 30 fps. They read module constants when
  an encoder is made and whenever the receiver's REMB estimate arrives, and
  there is no per-connection setting, so `apply_bitrate` sets those constants
  for the whole process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from aiortc import RTCConfiguration, RTCIceServer, RTCRtpSender
from aiortc.codecs import h264, vpx
from aiortc.rtcrtpparameters import RTCRtpCodecCapability

CODEC_MIME_TYPES = {"vp8": "video/VP8", "h264": "video/H264"}
ICE_URL_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


@dataclass(frozen=True)
class IceConfig:
    """STUN/TURN servers; empty (the default) means host candidates only (loopback, LAN, offline)."""

    urls: tuple[str, ...] = ()
    """stun:/turn: URLs, e.g. ("stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=udp")."""
    username: Optional[str] = None
    """TURN username (applied to turn:/turns: URLs)."""
    credential: Optional[str] = field(default=None, repr=False)
    """TURN password (applied to turn:/turns: URLs)."""

    def __post_init__(self) -> None:
        for url in self.urls:
            if not url.startswith(ICE_URL_SCHEMES):
                raise ValueError(f"expected an ICE server URL starting with {'/'.join(ICE_URL_SCHEMES)}, got {url!r}")

    def _servers(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        out = []
        for url in self.urls:
            is_turn = url.startswith(("turn:", "turns:"))
            out.append((url, self.username if is_turn else None, self.credential if is_turn else None))
        return out

    def rtc_configuration(self) -> RTCConfiguration:
        """For aiortc: always an explicit list, never None."""
        return RTCConfiguration(
            iceServers=[RTCIceServer(urls=url, username=user, credential=cred) for url, user, cred in self._servers()]
        )

    def browser_ice_servers(self) -> list[dict[str, Any]]:
        """For the page's RTCPeerConnection({iceServers})."""
        servers = []
        for url, user, cred in self._servers():
            server: dict[str, Any] = {"urls": url}
            if user is not None:
                server["username"] = user
            if cred is not None:
                server["credential"] = cred
            servers.append(server)
        return servers


@dataclass(frozen=True)
class BitrateConfig:
    """Video encoder bitrate: floor, start and ceiling (the receiver's REMB estimate moves it in between)."""

    min_kbps: int = 800
    """Floor; below about 0.8 Mbps a 512x512 face at 30 fps smears."""
    start_kbps: int = 2500
    """Where each new encoder starts."""
    max_kbps: int = 6000
    """Ceiling."""

    def __post_init__(self) -> None:
        if not 50 <= self.min_kbps <= self.start_kbps <= self.max_kbps <= 100_000:
            raise ValueError(
                f"expected 50 <= min_kbps <= start_kbps <= max_kbps <= 100000, "
                f"got {self.min_kbps}, {self.start_kbps}, {self.max_kbps}"
            )


def apply_bitrate(config: BitrateConfig) -> None:
    """Set aiortc's VP8 and H264 encoder bitrate constants for this process."""
    for codec in (vpx, h264):
        codec.MIN_BITRATE = config.min_kbps * 1000
        codec.DEFAULT_BITRATE = config.start_kbps * 1000
        codec.MAX_BITRATE = config.max_kbps * 1000


def video_codec_preferences(preferred: str) -> list[RTCRtpCodecCapability]:
    """aiortc's video codecs with `preferred` ("vp8" or "h264") first; the other stays as a fallback."""
    if preferred not in CODEC_MIME_TYPES:
        raise ValueError(f"expected a codec in {sorted(CODEC_MIME_TYPES)}, got {preferred!r}")
    codecs = RTCRtpSender.getCapabilities("video").codecs
    first = CODEC_MIME_TYPES[preferred].lower()
    return sorted(codecs, key=lambda c: 0 if c.mimeType.lower() == first else 1)
