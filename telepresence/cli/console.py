"""Process plumbing shared by every command: the one --help style, the one logging setup, running one coroutine
until it ends, Ctrl-C or SIGTERM, with the expected failures turned into one line and an exit status, and the one
place that turns a config's complaint about a field into one about the flag the user typed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import signal
import sys
from typing import Any, Coroutine

logger = logging.getLogger("telepresence")

PROJECT_LOGGERS = ("telepresence", "models", "benchmarks", "__main__")
"""Loggers whose INFO lines a user sees by default; everything else speaks from WARNING, or with -v."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: defaults shown, except where there is none to show (None, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action, argparse._StoreFalseAction):  # --no-X: "(default: True)" would read as X off
            return action.help
        return super()._get_help_string(action)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug lines, and the libraries' own (MediaPipe/TFLite, aiortc, warnings)")


def configure_logging(verbose: bool = False) -> None:
    """One line per event. By default only the project's own lines (INFO and up) and other libraries'
    warnings; the native libraries' chatter (TFLite/absl `W0000` lines, FFmpeg's) and Python warnings are quiet."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if verbose:
        return
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # glog / TFLite inside MediaPipe read these before their first line (set before mediapipe is imported)
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # FFmpeg inside OpenCV reads this at its first VideoCapture (a corrupt clip: "[mov,mp4,...] moov atom not found"
    # above the one clear line); -8 is AV_LOG_QUIET
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


_STOPPED = object()
"""What _cancel_on_sigterm returns when SIGTERM stopped the coroutine."""


async def _cancel_on_sigterm(coro: Coroutine[Any, Any, Any]) -> Any:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals (Windows)
        pass
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
            return _STOPPED
        raise


EXIT_FAILED = 1
"""The command could not do its work (port taken, pipeline unavailable, refused by the receiver)."""
EXIT_BAD_INPUT = 2
"""What the user gave cannot be used (a bad picture or video, a bad flag): the same for every command."""


def run_until_stopped(coro: Coroutine[Any, Any, Any], expected: tuple[type[BaseException], ...] = (),
                      bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """Run `coro` to the end; Ctrl-C and SIGTERM stop it cleanly (exit 0); `expected` errors log one
    line (exit EXIT_FAILED), `bad_input` errors too (exit EXIT_BAD_INPUT)."""
    try:
        if asyncio.run(_cancel_on_sigterm(coro)) is _STOPPED:
            logger.info("stopped (SIGTERM)")  # as after Ctrl-C: a service manager's stop reads the same
    except KeyboardInterrupt:
        logger.info("stopped")
        return 0
    except bad_input as error:
        logger.error("%s", error)
        return EXIT_BAD_INPUT
    except expected as error:
        logger.error("%s", error)
        return EXIT_FAILED
    return 0


FLAGS: dict[str, str] = {
    # telepresence.pipeline.PipelineConfig
    "size": "--size", "cpu_threads": "--threads", "refiner": "--refiner",
    # telepresence.stream.sender.SenderConfig, its BitrateConfig and IceConfig
    "signaling_url": "--signaling", "room": "--room", "token": "--token", "source_fps": "--source-fps",
    "max_viewers": "--max-viewers", "min_kbps": "--min-kbps", "start_kbps": "--start-kbps", "max_kbps": "--max-kbps",
    "urls": "--ice-server",
    # telepresence.stream.receiver.ReceiverConfig and its RoomLimits
    "port": "--port", "web_dir": "--web-dir", "allowed_origins": "--allow-origin",
    "max_viewers_per_room": "--max-viewers", "max_senders_per_room": "--max-senders",
    "max_connections_per_ip": "--max-per-ip", "max_viewers_per_ip": "--max-viewers-per-ip",
    "max_rooms_per_ip": "--max-rooms-per-ip",
    # telepresence.stream.call.CallConfig and its HeadTrackingConfig
    "max_participants": "--max-participants", "gpus": "--gpus", "gain": "--head-gain",
    # models.evaluation: EvalConfig and its ClipIndexConfig
    "max_pairs_per_bin": "--max-pairs", "stride": "--stride", "max_frames": "--max-frames",
}
"""Config field -> the command-line flag that sets it: a config's ValueError names its field ("size: expected ..."),
the user is told about the flag they typed (flag_message)."""
SECRET_FLAGS = ("--token", "--ice-credential")
"""Flags whose value is never repeated back (it would land in terminals and logs)."""


def flag_message(error: Exception, args: argparse.Namespace) -> str:
    """A config's "FIELD[, FIELD...]: expected X, got Y" -> "--FLAG VALUE: expected X, got Y", naming the flag and
    value the user typed (where several fields are named, their names in X become their flags too). A message that
    names no known field is returned as it is."""
    text = str(error)
    head, sep, rest = text.partition(": ")
    fields = [name.strip() for name in head.split(",")]
    if not sep or not all(name in FLAGS for name in fields):
        return text
    if len(fields) > 1:  # "a, b: expected a <= b": the names in what is expected too (not in the value got)
        expected, got, value = rest.rpartition(", got ") if ", got " in rest else (rest, "", "")
        for name in fields:
            expected = re.sub(rf"(?<![\w.-]){name}(?![\w.-])", FLAGS[name], expected)
        rest = expected + got + value
    return f"{', '.join(_typed(FLAGS[name], args) for name in fields)}: {rest}"


def _typed(flag: str, args: argparse.Namespace) -> str:
    """"--flag VALUE" as the user would type it again; the flag alone for a secret, a repeatable flag or no value."""
    value = getattr(args, flag[2:].replace("-", "_"), None)
    if flag in SECRET_FLAGS or value is None or isinstance(value, (bool, list, tuple)):
        return flag
    return f"{flag} {shlex.quote(format(value, 'g') if isinstance(value, float) else str(value))}"


def refuse(parser: argparse.ArgumentParser, error: Exception, args: argparse.Namespace) -> int:
    """A flag no config takes: one line naming it ("telepresence send: --size 63: expected ..."), EXIT_BAD_INPUT."""
    print(f"{parser.prog}: {flag_message(error, args)}", file=sys.stderr)
    return EXIT_BAD_INPUT
