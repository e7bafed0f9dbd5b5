"""`telepresence demo` (what `make demo` runs): receiver and sender in one process, on the
embedded sample clip by default. Prints the URL to open; Ctrl-C (or SIGTERM) stops both cleanly."""

from __future__ import annotations

import argparse
import asyncio
import logging

from telepresence.cli.console import HelpFormatter, add_verbosity, configure_logging, refuse, run_until_stopped
from telepresence.cli.options import (
    add_pipeline_arguments,
    add_sender_arguments,
    open_pipeline_from_args,
    open_source_from_args,
    pipeline_config_from_args,
    say_device,
    sender_config_from_args,
)
from telepresence.pipeline import PipelineConfig, PipelineUnavailableError
from telepresence.stream.capture import SourceError
from telepresence.stream.receiver import Receiver, ReceiverConfig, ReceiverError
from telepresence.stream.sender import Sender
from telepresence.stream.signaling_client import SignalingRejectedError

logger = logging.getLogger("telepresence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence demo", description="Receiver + sender on this machine; open the printed URL.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--host", default=ReceiverConfig.host, help="0.0.0.0 to let the LAN watch")
    parser.add_argument("--port", type=int, default=ReceiverConfig.port, help="0 picks a free port")
    parser.add_argument("--room", default=ReceiverConfig.room, help="room named in the URL")
    parser.add_argument("--token", default=None, help="require this token to join")
    parser.add_argument("--source", default="sample",
                        help="sample (the embedded clip) | webcam | camera INDEX | FILE.mp4 | IMAGE")
    parser.add_argument("--source-fps", type=float, default=None, help="play a file, image or the sample at this rate")
    add_pipeline_arguments(parser)
    add_sender_arguments(parser)
    add_verbosity(parser)
    return parser


async def _run(args: argparse.Namespace, receiver_config: ReceiverConfig, pipeline_config: PipelineConfig) -> None:
    loop = asyncio.get_running_loop()
    # a bad --source fails fast, as send's: opened after the URL was printed, it said "Demo running" first
    source = await loop.run_in_executor(None, open_source_from_args, args.source, args.source_fps)
    receiver = Receiver(receiver_config)
    try:
        await receiver.start()
    except BaseException:
        source.close()
        raise
    try:
        logger.info("loading the pipeline (device %s, %d px)", pipeline_config.device, pipeline_config.size)
        try:
            pipeline = await loop.run_in_executor(None, open_pipeline_from_args, args, pipeline_config)
        except BaseException:
            source.close()
            raise
        try:
            sender = Sender(sender_config_from_args(args, name="demo", signaling_url=receiver.signaling_url,
                                                    room=receiver_config.room, token=receiver_config.token), pipeline,
                            source=source)
            print(f"Demo running. Open {receiver.url}   (Ctrl-C to stop)", flush=True)
            await sender.start()
            try:
                await sender.run_signaling()
            finally:
                await sender.stop()
        finally:
            pipeline.close()
    finally:
        await receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        receiver_config = ReceiverConfig(host=args.host, port=args.port, room=args.room, token=args.token)
        sender_config_from_args(args, name="demo")
        pipeline_config = pipeline_config_from_args(args)
    except ValueError as error:
        return refuse(parser, error, args)
    say_device(args, pipeline_config)
    return run_until_stopped(
        _run(args, receiver_config, pipeline_config),
        expected=(ReceiverError, PipelineUnavailableError, SignalingRejectedError),
        bad_input=(SourceError,),
    )
