"""`telepresence serve`: the call in one command: the pages, the signaling, and an avatar pipeline per
participant (in a process of its own), who joins from a browser at /call?room=R with their camera (docs/call.md)."""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from telepresence.cli.console import (
    EXIT_BAD_INPUT,
    HelpFormatter,
    add_verbosity,
    configure_logging,
    refuse,
    run_until_stopped,
)
from telepresence.cli.options import add_codec_arguments, add_pipeline_arguments, pipeline_config_from_args, say_device
from telepresence.cli.receive import add_receiver_arguments, config_from_args
from telepresence.stream.call import CallConfig, CallHost
from telepresence.stream.headtrack import HeadTrackingConfig
from telepresence.stream.receiver import Receiver, ReceiverConfig, ReceiverError
from telepresence.stream.rtc import BitrateConfig
from telepresence.stream.sender import SenderConfig
from telepresence.stream.worker import prepare_workers

logger = logging.getLogger("telepresence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence serve",
        description="A call: open the printed /call URL in two browsers (or tabs), share the cameras, see each other in 3D.",
        formatter_class=HelpFormatter,
    )
    add_receiver_arguments(parser)
    add_pipeline_arguments(parser)
    add_codec_arguments(parser)
    parser.add_argument("--max-participants", type=int, default=CallConfig.max_participants,
                        help="cameras taken at once over all rooms (each is a pipeline)")
    parser.add_argument("--head-gain", type=float, default=HeadTrackingConfig.gain,
                        help="head-tracked parallax: multiple of a true window's angles (0: off for everyone)")
    parser.add_argument("--camera-rate", action=argparse.BooleanOptionalAction, default=CallConfig.camera_rate,
                        help="ask each camera for no more frames a second than its pipeline uses (--no-camera-rate: "
                        "the cameras send at their own rate)")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=CallConfig.mps,
                        help="on a GPU, run the participants' pipelines side by side through CUDA MPS (a daemon of the "
                        "server's own, stopped with it) instead of by turns")
    parser.add_argument("--gpus", type=int, default=CallConfig.gpus, metavar="N",
                        help="with --device cuda, spread the participants' pipelines over N GPUs, each new one on the GPU "
                        "with the fewest (default: every GPU the host has; 1: all on the first; --device cuda:K: all on K)")
    parser.add_argument("--stamp-frames", action="store_true",
                        help="read capture stamps from the cameras and paint them into the avatars (benchmarks/call.py)")
    add_verbosity(parser)
    return parser


def call_config_from_args(args: argparse.Namespace, receiver: ReceiverConfig) -> CallConfig:
    # Every viewer of a room may watch each participant; the server's side of ICE uses the browsers' servers.
    sender = SenderConfig(source="uplink", codec=args.codec, encoder=args.encoder, bitrate=BitrateConfig(args.min_kbps, args.start_kbps, args.max_kbps),
                          ice=receiver.ice, max_viewers=receiver.limits.max_viewers_per_room, stamp_frames=args.stamp_frames)
    return CallConfig(sender=sender, pipeline=pipeline_config_from_args(args), pipeline_factory=args.pipeline,
                      head=HeadTrackingConfig(gain=args.head_gain), max_participants=args.max_participants, mps=args.mps,
                      camera_rate=args.camera_rate, gpus=args.gpus)


async def _run(receiver_config: ReceiverConfig, call_config: CallConfig) -> None:
    prepare_workers()  # the participants' pipeline processes fork from it: its imports happen while we start
    host = CallHost(call_config)
    receiver = Receiver(receiver_config, cameras=host)
    host.attach(receiver.signaling)
    await receiver.start()
    try:
        pipeline = call_config.pipeline
        logger.info("each participant gets a pipeline in a process of its own, on %s at %d px (%s)", pipeline.device,
                    pipeline.size, call_config.pipeline_factory or "telepresence.pipeline")
        print(f"Call server ready. Open {receiver.page_url('/call')}   (Ctrl-C to stop)", flush=True)
        await asyncio.Future()
    finally:
        await host.close()
        await receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        receiver_config = config_from_args(args)
        call_config = call_config_from_args(args, receiver_config)
    except ValueError as error:
        return refuse(parser, error, args)
    if not (Path(receiver_config.web_dir) / "call.html").is_file():
        logger.error("the call page is missing: %s", Path(receiver_config.web_dir) / "call.html")
        return EXIT_BAD_INPUT
    say_device(args, call_config.pipeline)
    return run_until_stopped(_run(receiver_config, call_config), expected=(ReceiverError,))
