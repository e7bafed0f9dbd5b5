"""`telepresence send`: capture, run the pipeline, stream one view per viewer of a room."""
from __future__ import annotations

import argparse
import functools
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
from telepresence.stream.sender import Sender, SenderConfig, serve
from telepresence.stream.signaling_client import SignalingRejectedError
from telepresence.stream.worker import open_pipeline_process

logger = logging.getLogger("telepresence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence send", description="Capture, build the avatar and stream one view per viewer.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--signaling", default=SenderConfig.signaling_url, help="the receiver's signaling URL")
    parser.add_argument("--room", default=SenderConfig.room, help="room to publish into")
    parser.add_argument("--name", default=None, help="label shown to viewers (default: this host's name)")
    parser.add_argument("--token", default=None, help="shared room token, if the receiver needs one")
    parser.add_argument("--source", default=SenderConfig.source,
                        help="webcam | camera INDEX (0, 1, ...) | FILE.mp4 | IMAGE | sample (the embedded clip)")
    parser.add_argument("--source-fps", type=float, default=None,
                        help="play a file, image or the sample at this rate (default: a file's own, 30 for images)")
    add_pipeline_arguments(parser)
    add_sender_arguments(parser)
    parser.add_argument("--pipeline-process", action="store_true",
                        help="run the pipeline in a process of its own, as serve does for each participant (frames and "
                             "views through shared memory): its compiles and Python work no longer hold the WebRTC "
                             "event loop's interpreter lock")
    parser.add_argument("--stamp-frames", action="store_true", help="paint capture time into each view (latency tests)")
    add_verbosity(parser)
    return parser


async def _run(args: argparse.Namespace, config: SenderConfig, pipeline_config: PipelineConfig) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    # a bad source (a still without a face too) fails fast, before the pipeline loads and the sender joins
    source = await loop.run_in_executor(None, open_source_from_args, config.source, config.source_fps)
    try:
        logger.info("loading the pipeline (device %s, %d px%s)", pipeline_config.device, pipeline_config.size,
                    ", in a process of its own" if args.pipeline_process else "")
        if args.pipeline_process:
            pipeline = await loop.run_in_executor(None, functools.partial(
                open_pipeline_process, pipeline_config, args.pipeline, name="send"))
            logger.info("the pipeline runs in process %d", pipeline.pid)
        else:
            pipeline = await loop.run_in_executor(None, open_pipeline_from_args, args, pipeline_config)
    except BaseException:
        source.close()
        raise
    try:
        sending = asyncio.ensure_future(serve(Sender(config, pipeline, source=source)))
        if args.pipeline_process:  # a pipeline process that dies or stops answering ends the sender, with why
            watch = asyncio.ensure_future(_watch_process(pipeline))
            try:
                await asyncio.wait([sending, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sending, watch):
                    task.cancel()
                await asyncio.gather(sending, watch, return_exceptions=True)
            if watch.done() and not watch.cancelled() and watch.exception() is not None:
                raise watch.exception()
        await sending
    finally:
        pipeline.close()


async def _watch_process(pipeline) -> None:
    import asyncio

    while pipeline.poll() is None:
        await asyncio.sleep(0.5)
    raise PipelineUnavailableError(f"the pipeline process can no longer be used: {pipeline.error}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = sender_config_from_args(args, signaling_url=args.signaling, room=args.room, token=args.token,
                                         stamp_frames=args.stamp_frames)
        pipeline_config = pipeline_config_from_args(args)
    except ValueError as error:
        return refuse(parser, error, args)
    say_device(args, pipeline_config)
    return run_until_stopped(_run(args, config, pipeline_config),
                             expected=(PipelineUnavailableError, SignalingRejectedError),
                             bad_input=(SourceError,))
