"""Process plumbing shared by every command: the one --help style, the one logging setup, and running one coroutine
until it ends, Ctrl-C or SIGTERM, with the expected failures turned into one line and an exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
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
