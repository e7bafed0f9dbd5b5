"""`telepresence` command line: one entry point, one module per command in this package.

Each command module has `build_parser()` and `main(argv) -> exit status`, and is imported only
when its command runs, so `telepresence --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

COMMANDS: dict[str, str] = {
    "demo": "loopback demo: receiver + sender on the embedded sample; prints the URL",
    "send": "capture, run the pipeline and stream to the viewers of a room",
    "receive": "serve the viewer page and the signaling endpoint",
    "serve": "a call: pages, signaling and an avatar per participant, who joins from a browser with a camera",
    "render": "build the 3D avatar from one picture and render it at other cameras",
    "eval": "score raw and refined novel views on real clips and multi-camera sets",
    "compare": "compare two eval runs (or two methods of one) per bin, with a bootstrap interval on each change",
    "pairs": "make stage-1 (synthetic) and stage-2 (real) training pairs from indexed clips",
    "train": "train the refiner (two stages, variable noise, LoRA or from scratch, GAN)",
}
"""Command name -> one line of help; the code is telepresence.cli.<name>."""


def version() -> str:
    try:
        return metadata.version("portrait-telepresence")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence",
        description="Real-time 3D portrait telepresence: one-image head avatar + one-step refiner + WebRTC.",
        epilog="`telepresence COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="same as the command's own -v")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    if not rest or rest[0] not in COMMANDS:
        build_parser().parse_args(argv)  # --help, --version, or a usage error naming the commands
        return 2
    name, args = rest[0], rest[1:] + (["--verbose"] if verbose else [])
    from models.face.analysis import FaceAnalysisError

    try:
        return int(importlib.import_module(f"telepresence.cli.{name}").main(args) or 0)
    except FaceAnalysisError as exc:  # no face, unreadable picture: one line, exit 2
        print(f"telepresence {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `telepresence` program: main(), and its exit at once if the avatar's compile is still running
    (models.avatar.compiling.leave: a finalizing interpreter would crash on the compile's thread)."""
    from models.avatar.compiling import leave

    sys.exit(leave(main()))


if __name__ == "__main__":
    entry()
