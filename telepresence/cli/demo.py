"""The loopback demo: receiver and sender (embedded sample by default) in one process.

    python -m telepresence.cli.demo [--port 8080] [--source sample]   (the CLI wires `telepresence demo`)

Prints the URL to open; Ctrl-C (or SIGTERM) stops both cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional

from telepresence.stream.capture import SourceError
from telepresence.cli.console import configure_logging, run_until_stopped
from telepresence.stream.receiver import Receiver, ReceiverConfig, ReceiverError
from telepresence.stream.sender import PipelineUnavailableError, Sender, SenderConfig, SignalingRejectedError, parse_refiner

logger = logging.getLogger(__name__)


async def run(receiver_config: ReceiverConfig, sender_config: SenderConfig) -> None:
    receiver = Receiver(receiver_config)
    await receiver.start()
    print(f"Demo running. Open {receiver.url}   (Ctrl-C to stop)", flush=True)
    sender = Sender(
        dataclasses.replace(
            sender_config, signaling_url=receiver.signaling_url, room=receiver_config.room, token=receiver_config.token
        )
    )
    try:
        await sender.start()
        await sender.run_signaling()
    finally:
        await sender.stop()
        await receiver.stop()


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Receiver + sender on this machine; open the printed URL.")
    parser.add_argument("--host", default=ReceiverConfig.host, help="0.0.0.0 to let the LAN watch")
    parser.add_argument("--port", type=int, default=ReceiverConfig.port, help="0 picks a free port")
    parser.add_argument("--room", default=ReceiverConfig.room)
    parser.add_argument("--token", default=None, help="require this token to join")
    parser.add_argument("--source", default="sample", help="sample | webcam | INDEX | FILE.mp4 | IMAGE")
    parser.add_argument("--device", default=SenderConfig.device, help="cuda | cpu")
    parser.add_argument("--size", type=int, choices=(256, 512), default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--pipeline", default=SenderConfig.pipeline_module, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        receiver_config = ReceiverConfig(host=args.host, port=args.port, room=args.room, token=args.token)
        sender_config = SenderConfig(
            name="demo",
            source=args.source,
            device=args.device,
            size=args.size,
            refiner=parse_refiner(args.refiner),
            pipeline_module=args.pipeline,
        )
    except ValueError as error:
        logger.error("%s", error)
        return 2
    return run_until_stopped(
        run(receiver_config, sender_config),
        expected=(ReceiverError, SourceError, PipelineUnavailableError, SignalingRejectedError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
