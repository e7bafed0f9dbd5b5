"""WebRTC settings: ICE servers, video codec choice and encoder bitrates; the sanity check of an offer.

aiortc pitfalls handled here (DESIGN.md section 4):
- `iceServers=None` makes aiortc use a public STUN server and stall offline,
  so the configuration always carries an explicit (by default empty) list:
  host candidates only, which is what loopback and LAN need.
- aiortc's encoders start at 500 kbps (VP8) / 1 Mbps (H264) and cap at
  1.5 / 3 Mbps, too low for 512x512 at 30 fps. They read module constants when
  an encoder is made and whenever the receiver's REMB estimate arrives, and
  there is no per-connection setting, so `apply_bitrate` sets those constants
  for the whole process.
- aiortc accepts some broken offers and fails later inside its own tasks
  ("Task exception was never retrieved"): no DTLS fingerprint (an assert in its
  DTLS transport), a candidate port beyond 65535 (OverflowError in sendto).
  `check_offer` refuses those before aiortc sees them, naming what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from aiortc import RTCConfiguration, RTCIceServer, RTCRtpSender
from aiortc.codecs import h264, vpx
from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription

CODEC_MIME_TYPES = {"vp8": "video/VP8", "h264": "video/H264"}
ICE_URL_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
MAX_MEDIA_SECTIONS = 4
"""An offer carries video and the pose channel; a few more sections are tolerated, not dozens."""
MAX_CANDIDATES = 64
"""ICE candidates in one offer."""
MDNS_HOST = re.compile(r"[A-Za-z0-9-]{1,63}\.local")
"""A browser's obfuscated host candidate (RFC 8828)."""
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")


class InvalidOfferError(ValueError):
    """An offer that aiortc would accept and then fail on inside its own tasks."""


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
                raise ValueError(f"urls: expected an ICE server URL starting with {'/'.join(ICE_URL_SCHEMES)}, got {url!r}")

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
                f"min_kbps, start_kbps, max_kbps: expected 50 <= min_kbps <= start_kbps <= max_kbps <= 100000, "
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


def negotiated_video_codec(sdp: str) -> str:
    """The codec ("vp8" | "h264") listed first in the description's video section: for our answer,
    the one RTCRtpSender sends with."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "video" and media.rtp.codecs:
            mime = media.rtp.codecs[0].mimeType.lower()
            for name, mime_type in CODEC_MIME_TYPES.items():
                if mime_type.lower() == mime:
                    return name
            raise ValueError(f"expected a video codec of {sorted(CODEC_MIME_TYPES)}, got {mime}")
    raise ValueError("expected a video section with codecs")


def check_offer(sdp: str) -> None:
    """Refuse an offer aiortc would fail on later (InvalidOfferError, naming the problem): malformed
    candidates or ports, no ICE credentials or DTLS fingerprint in a section, too many sections."""
    if not isinstance(sdp, str):
        raise InvalidOfferError(f"expected the offer's SDP text, got {type(sdp).__name__}")
    lines = sdp.splitlines()
    candidates = [line[len("a=candidate:"):] for line in lines if line.startswith("a=candidate:")]
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidOfferError(f"{len(candidates)} ICE candidates, expected at most {MAX_CANDIDATES}")
    for candidate in candidates:
        _check_candidate(candidate)
    sections = sum(line.startswith("m=") for line in lines)
    if not 1 <= sections <= MAX_MEDIA_SECTIONS:
        raise InvalidOfferError(f"{sections} media sections, expected 1 to {MAX_MEDIA_SECTIONS}")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as error:  # aiortc's parser asserts, or raises ValueError/IndexError/KeyError on odd lines
        detail = " ".join(str(error).split())[:80]  # an assertion's is often empty: no class name in its place
        raise InvalidOfferError("malformed session description" + (f": {detail}" if detail else "")) from None
    for media in description.media:
        if not media.ice.usernameFragment or not media.ice.password:
            raise InvalidOfferError(f"media section {media.kind!r} has no ICE credentials (ice-ufrag, ice-pwd)")
        if not any(f.algorithm.lower() in X509_DIGEST_ALGORITHMS for f in media.dtls.fingerprints):
            raise InvalidOfferError(f"media section {media.kind!r} has no DTLS fingerprint of "
                                    f"{'/'.join(X509_DIGEST_ALGORITHMS)}")


def _check_candidate(text: str) -> None:
    """`foundation component transport priority address port typ type [raddr A rport P ...]`"""
    bits = text.split()
    short = " ".join(bits)[:60]
    if len(bits) < 8 or bits[6] != "typ" or bits[7] not in CANDIDATE_TYPES or bits[2].lower() not in ("udp", "tcp") \
            or not bits[1].isdigit() or not bits[3].isdigit():
        raise InvalidOfferError(f"malformed ICE candidate {short!r}")
    _check_address(bits[4], short)
    _check_port(bits[5], short)
    extras = dict(zip(bits[8::2], bits[9::2]))
    if "raddr" in extras:
        _check_address(extras["raddr"], short)
    if "rport" in extras:
        _check_port(extras["rport"], short)


def _check_address(address: str, candidate: str) -> None:
    if MDNS_HOST.fullmatch(address):
        return
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise InvalidOfferError(f"ICE candidate address {address[:40]!r} is neither an IP nor an mDNS name "
                                f"(candidate {candidate!r})") from None


def _check_port(port: str, candidate: str) -> None:
    if not port.isdigit() or not 0 <= int(port) <= 65535:  # 0 and 9 are placeholders (tcp active, m= lines)
        raise InvalidOfferError(f"ICE candidate port {port[:12]} outside 0..65535 (candidate {candidate!r})")
