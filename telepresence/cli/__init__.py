"""`telepresence` command line: one entry point, one subcommand per job.

Each subcommand's work lives in its own module and is imported only when that
subcommand runs, so `telepresence --help` stays instant.
"""
from __future__ import annotations

import argparse
import logging
import sys

from models.face.analysis import FaceAnalysisError

log = logging.getLogger("telepresence")


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render",
        help="build the 3D avatar from one picture and render it at other cameras",
        description="Build the avatar from IMAGE and write one PNG per view plus a contact sheet. "
        "Views are every (yaw, pitch) combination. yaw +30 moves the camera 30 degrees to the "
        "viewer's right; pitch +10 raises it. --yaw 0 --pitch 0 reproduces the input camera.",
    )
    p.add_argument("--image", required=True, help="input picture (jpg/png/...)")
    p.add_argument("--yaw", type=float, nargs="+", default=[-30, -15, 0, 15, 30], help="degrees")
    p.add_argument("--pitch", type=float, nargs="+", default=[0], help="degrees")
    p.add_argument("--roll", type=float, default=0.0, help="degrees, clockwise on screen")
    p.add_argument("--dist", type=float, default=1.0, help="camera distance, multiple of the source's")
    p.add_argument("--fov", type=float, default=None, help="vertical field of view of the views (default: source's)")
    p.add_argument("--source-fov", type=float, default=30.0, help="assumed field of view of the input camera")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--size", type=int, default=512, help="output views are SIZE x SIZE pixels")
    p.add_argument("--background", choices=("remove", "far"), default="remove", help="remove it, or keep it as a far layer")
    p.add_argument(
        "--refiner",
        default="default",
        help="refiner weights folder, 'default' (the shipped weights) or 'none' (raw avatar renders)",
    )
    p.set_defaults(func=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from telepresence.cli.render import render_command

    return render_command(args)


def _add_external(sub: argparse._SubParsersAction, name: str, help_text: str, target: str) -> None:
    """Subcommands whose argument parsing lives in their own module (target = 'module:function')."""
    p = sub.add_parser(name, help=help_text, add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _run_external(target, args.rest))


def _run_external(target: str, argv: list[str]) -> int:
    import importlib

    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


EXTERNAL_COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "loopback demo: receiver + sender on the embedded sample; prints the URL", "telepresence.cli.demo:main"),
    ("send", "capture, run the pipeline and stream to the viewers of a room", "telepresence.stream.sender:main"),
    ("receive", "serve the viewer page and the signaling endpoint", "telepresence.stream.receiver:main"),
    ("eval", "score raw and refined novel views on a folder of real clips", "telepresence.cli.eval:eval_main"),
    ("bench", "per-stage pipeline timing (landmarks, avatar, render, refine, encode)", "telepresence.cli.eval:bench_main"),
    ("pairs", "make stage-1 (synthetic) and stage-2 (real) training pairs from indexed clips", "models.training.pairs:pairs_main"),
    ("train", "train the refiner (two stages, variable noise, LoRA or from scratch, GAN)", "telepresence.cli.train:train_main"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telepresence",
        description="Real-time 3D portrait telepresence: one-image head avatar + one-step refiner + WebRTC.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_render(sub)
    for name, help_text, target in EXTERNAL_COMMANDS:
        _add_external(sub, name, help_text, target)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # External subcommands parse their own arguments (their --help included).
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    for name, _, target in EXTERNAL_COMMANDS:
        if rest and rest[0] == name:
            _configure_logging(verbose)
            try:
                return _run_external(target, rest[1:])
            except FaceAnalysisError as exc:
                print(f"telepresence {name}: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FaceAnalysisError as exc:
        print(f"telepresence {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
