"""Command-line flags shared by several commands (the pipeline's, the streaming settings'), defined once."""
from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from models.refiner.config import LOCAL_EXPECTED, is_hub_id
from models.refiner.shipped import SD_TURBO_LORA
from telepresence.pipeline import COMPILE_AVATAR, FramePipeline, PipelineConfig, open_pipeline
from telepresence.stream.capture import FrameSource, ImageSource, SourceError, open_source
from telepresence.stream.messages import MAX_NAME_CHARS
from telepresence.stream.rtc import BitrateConfig, IceConfig
from telepresence.stream.sender import ENCODERS, SenderConfig

logger = logging.getLogger("telepresence")

def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when this machine has it, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--size", type=int, default=None,
                        help="views are SIZE x SIZE pixels, a multiple of 8 (default: 512 on cuda, 256 on cpu, "
                        "where 512 would run at a few frames per second)")
    parser.add_argument("--refiner", default="default",
                        help="refiner weights folder, 'default' (the shipped weights), 'none' (raw avatar renders) or "
                        "'sd-turbo-lora:PATH' (our LoRA adapter at PATH on stabilityai/sd-turbo from the model hub's "
                        "cache: HF_HUB_CACHE; TELEPRESENCE_SD_TURBO names a local copy)")
    parser.add_argument("--compile-refiner", action="store_true",
                        help="torch.compile the refiner (faster frames for a large refiner, after a compile of minutes "
                        "at the start, before the sender goes live)")
    parser.add_argument("--compile-avatar", choices=COMPILE_AVATAR, default=PipelineConfig.compile_avatar,
                        help="on CUDA, torch.compile the avatar's graphs (4x faster avatar frames; 2-6 minutes the "
                        "first time on a machine, seconds after), the plain graphs serving meanwhile: prefill (default): "
                        "once the first frame is out a child process compiles them into inductor's disk cache, then "
                        "this one from there, the frames at the camera's pace throughout; background: on a thread of "
                        "this process (the frames slow to a few a second while a first compile runs); wait: before "
                        "the first face is served; or off")
    parser.add_argument("--precompiled-avatar", action=argparse.BooleanOptionalAction,
                        default=PipelineConfig.precompiled_avatar,
                        help="keep the avatar's compiled functions whole on disk, beside inductor's cache, and load "
                        "them at later starts instead of tracing them again (a GPU sender's frames then keep their pace "
                        "within seconds of a start, not after a minute); on by default wherever the avatar compiles "
                        "(CUDA)")
    # On by default (PipelineConfig.memory says why); --no-memory turns it off.
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=PipelineConfig.memory,
                        help="appearance memory (on by default): what the camera saw earlier in the call fills what the "
                        "current frame sees badly (--no-memory: every frame's avatar from that frame alone)")
    parser.add_argument("--smooth-landmarks", action=argparse.BooleanOptionalAction, default=True,
                        help="smooth the face's landmarks over frames: a head at rest does not wobble (about one frame "
                        "of lag in the mouth; --no-smooth-landmarks: each frame's own)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's host threads, and OpenCV's on a GPU (default: on the CPU the cores less one, left "
                        "for face analysis and video encoding; on a GPU 2)")
    # tests and the streaming-only benchmark swap the pipeline for a cheap double ("module:function")
    parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)


def parse_refiner(text: str) -> str | None:
    """--refiner PATH|default|none -> PipelineConfig.refiner (None: no refinement); ValueError for a local folder
    that is not there (checked with the other flags, before the pipeline loads; a hub id is the loader's to find)."""
    if text.lower() == "none":
        return None
    if text == "default" or text.startswith(SD_TURBO_LORA) or is_hub_id(text) or Path(text).expanduser().is_dir():
        return text
    problem = "is a file, not a folder" if Path(text).expanduser().exists() else "no such folder"
    raise ValueError(f"refiner: {problem} ({LOCAL_EXPECTED})")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu' (said by say_device, once the flags are checked)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def say_device(args: argparse.Namespace, config: PipelineConfig) -> None:
    """The device --device auto chose, and why: one line, after every flag was checked (a bad flag is refused
    with nothing said before it)."""
    if args.device == "auto":
        logger.info("device: %s (%s)", config.device,
                    "CUDA available" if config.device == "cuda" else "no CUDA device: the CPU path")


def pipeline_config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The pipeline's flags -> its config; ValueError naming the field (refuse turns it into the flag)."""
    return PipelineConfig(device=resolve_device(args.device), size=args.size, refiner=parse_refiner(args.refiner),
                          memory=getattr(args, "memory", PipelineConfig.memory), cpu_threads=getattr(args, "threads", None),
                          smooth_landmarks=getattr(args, "smooth_landmarks", True),
                          compile_refiner=getattr(args, "compile_refiner", False),
                          compile_avatar=getattr(args, "compile_avatar", PipelineConfig.compile_avatar),
                          precompiled_avatar=getattr(args, "precompiled_avatar", PipelineConfig.precompiled_avatar))


def open_pipeline_from_args(args: argparse.Namespace, config: PipelineConfig) -> FramePipeline:
    return open_pipeline(config, factory=args.pipeline)


def add_sender_arguments(parser: argparse.ArgumentParser) -> None:
    """How a sender streams: codec, bitrate, ICE, viewers."""
    add_codec_arguments(parser)
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL", help="stun:/turn: URL (repeatable)")
    parser.add_argument("--ice-username", default=None, help="TURN user name")
    parser.add_argument("--ice-credential", default=None, help="TURN password")
    parser.add_argument("--max-viewers", type=int, default=SenderConfig.max_viewers, help="viewers served at once")


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """The video a sender encodes: codec, bitrate and where the encoding runs."""
    parser.add_argument("--codec", choices=("vp8", "h264"), default=SenderConfig.codec, help="preferred video codec")
    parser.add_argument("--encoder", choices=ENCODERS, default=SenderConfig.encoder,
                        help="encode the viewers' frames in an encoder process (a thread per viewer) or in aiortc's threads here")
    parser.add_argument("--min-kbps", type=int, default=BitrateConfig.min_kbps, help="video bitrate floor")
    parser.add_argument("--start-kbps", type=int, default=BitrateConfig.start_kbps, help="video bitrate at the start")
    parser.add_argument("--max-kbps", type=int, default=BitrateConfig.max_kbps, help="video bitrate ceiling")


def sender_config_from_args(args: argparse.Namespace, **overrides) -> SenderConfig:
    values = dict(
        name=(getattr(args, "name", None) or socket.gethostname())[:MAX_NAME_CHARS],
        source=args.source,
        source_fps=args.source_fps,
        codec=args.codec,
        encoder=args.encoder,
        bitrate=BitrateConfig(args.min_kbps, args.start_kbps, args.max_kbps),
        ice=IceConfig(tuple(args.ice_server), args.ice_username, args.ice_credential),
        max_viewers=args.max_viewers,
    )
    values.update(overrides)
    return SenderConfig(**values)


def open_source_from_args(spec: str, fps: float | None = None) -> FrameSource:
    """--source opened (SourceError: one line, exit 2), a still picture checked for a face once here, as
    `render --image` checks it: a still never shows a face later, and a sender without one would sit in its room
    with nothing for its viewers to see. Blocking (a second: the face detector's start): run it off the event loop."""
    from models.face.analysis import FaceAnalyzer, FaceConfig, NoFaceError

    source = open_source(spec, fps)
    if not isinstance(source, ImageSource):
        return source
    try:
        with FaceAnalyzer(FaceConfig(static_image=True, segmentation=False)) as analyzer:
            analyzer.analyze(source.retrieve(), with_mask=False)
    except NoFaceError as error:
        source.close()
        raise SourceError(f"--source {spec}: {error} (a still never shows one later: the viewers would see "
                          "nothing)") from None
    except BaseException:
        source.close()
        raise
    return source
