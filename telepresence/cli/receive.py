"""`telepresence receive`: serve the viewer page and the signaling endpoint on one port."""
from __future__ import annotations

import argparse
from pathlib import Path

from telepresence.cli.console import HelpFormatter, add_verbosity, configure_logging, refuse, run_until_stopped
from telepresence.stream.receiver import ReceiverConfig, ReceiverError, default_web_dir, run, web_dir_problem
from telepresence.stream.rtc import IceConfig
from telepresence.stream.signaling import RoomLimits



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence receive", description="Serve the viewer page and the signaling endpoint on one port.",
        formatter_class=HelpFormatter,
    )
    add_receiver_arguments(parser)
    add_verbosity(parser)
    return parser


def add_receiver_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the pages and /ws listen, their limits, and the ICE servers handed to browsers."""
    parser.add_argument("--host", default=ReceiverConfig.host, help="0.0.0.0 to accept the LAN")
    parser.add_argument("--port", type=int, default=ReceiverConfig.port, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="shared token required to join rooms")
    parser.add_argument("--room", default=ReceiverConfig.room, help="room named in the printed URL")
    parser.add_argument("--web-dir", type=Path, default=None, help="the page files (default: this checkout's web/)")
    parser.add_argument("--max-viewers", type=int, default=RoomLimits.max_viewers_per_room, help="browsers per room")
    parser.add_argument("--max-senders", type=int, default=RoomLimits.max_senders_per_room, help="senders per room")
    parser.add_argument("--max-per-ip", type=int, default=RoomLimits.max_connections_per_ip, help="sockets per IP")
    parser.add_argument("--max-viewers-per-ip", type=int, default=RoomLimits.max_viewers_per_ip,
                        help="viewers from one IP in one room")
    parser.add_argument("--max-rooms-per-ip", type=int, default=RoomLimits.max_rooms_per_ip, help="rooms one IP may be in")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                        help="another web origin (https://host[:port]) whose pages may join rooms; repeatable "
                        "(this server's own page always may; see docs/security.md)")
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL", help="stun:/turn: URL for browsers")
    parser.add_argument("--ice-username", default=None, help="TURN user name for browsers")
    parser.add_argument("--ice-credential", default=None, help="TURN password for browsers")


def config_from_args(args: argparse.Namespace) -> ReceiverConfig:
    """The receiver's flags -> its config; ValueError naming the field (console.refuse turns it into the flag)."""
    if args.web_dir is not None and web_dir_problem(args.web_dir) is not None:
        raise ValueError(f"web_dir: {web_dir_problem(args.web_dir)}")
    return ReceiverConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        room=args.room,
        web_dir=args.web_dir if args.web_dir is not None else default_web_dir(),
        limits=RoomLimits(
            max_viewers_per_room=args.max_viewers,
            max_senders_per_room=args.max_senders,
            max_connections_per_ip=args.max_per_ip,
            max_viewers_per_ip=args.max_viewers_per_ip,
            max_rooms_per_ip=args.max_rooms_per_ip,
        ),
        ice=IceConfig(tuple(args.ice_server), args.ice_username, args.ice_credential),
        allowed_origins=tuple(args.allow_origin),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as error:
        return refuse(parser, error, args)
    return run_until_stopped(
        run(config, on_ready=lambda receiver: print(f"Receiver ready. Open {receiver.url}", flush=True)),
        expected=(ReceiverError,),
    )
