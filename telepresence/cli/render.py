"""`telepresence render`: one picture (or one frame of a clip, with the appearance memory of the frames
before it) in, novel views and a contact sheet out."""
from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import torch

from models.geometry.camera import OrbitPose
from models.face.analysis import FaceAnalyzer, FaceConfig
from models.evaluation.figures import contact_sheet
from models.pictures import to_rgb_uint8, write_rgb
from telepresence.cli.console import EXIT_BAD_INPUT, HelpFormatter, add_verbosity, configure_logging
from telepresence.cli.options import parse_refiner
from telepresence.stream.capture import read_still

log = logging.getLogger(__name__)

VIEW_NAME = re.compile(r"view_yaw[+-][0-9.e+-]+_pitch[+-][0-9.e+-]+\.png")
"""The names the views are written under (view_yaw{yaw:+g}_pitch{pitch:+g}.png): an earlier run's, left in --out, are
removed so that only this run's views are there; no other file is touched."""


class StageTimer:
    """Wall-clock milliseconds per named stage (synchronising CUDA before reading the clock)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.ms: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

    def summary(self) -> str:
        return "  ".join(f"{k} {v:.1f} ms" for k, v in self.ms.items())


class RenderInputError(Exception):
    """What the user asked for cannot be rendered on this machine or from this clip, found once the work began (no
    CUDA for --device cuda, --at past the clip's end or on a frame without a face): one line, EXIT_BAD_INPUT."""


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RenderInputError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _sheet_rows(source: np.ndarray, poses: list[OrbitPose], views: list[np.ndarray], raw: list[np.ndarray] | None,
                per_row: int) -> tuple[list[list[np.ndarray]], list[list[str]]]:
    """One row per pitch (views in yaw order), the source picture first in the first row; with a refiner,
    each refined row is followed by the raw avatar's. Returns (rows, labels) for contact_sheet."""
    blank = np.full_like(source, 255)
    rows, labels = [], []
    for start in range(0, len(poses), per_row):
        chunk = range(start, start + per_row)
        first = start == 0
        rows.append([source if first else blank] + [views[i] for i in chunk])
        labels.append(["source" if first else ""] + [f"yaw {poses[i].yaw_deg:+g}  pitch {poses[i].pitch_deg:+g}" for i in chunk])
        if raw is not None:
            rows.append([blank] + [raw[i] for i in chunk])
            labels.append([""] + ["raw avatar"] * per_row)
    return rows, labels


def _parse_span(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END in seconds, got '{text}'") from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise argparse.ArgumentTypeError(f"expected finite seconds, got '{text}'")
    if end < start:
        raise argparse.ArgumentTypeError(f"expected START <= END, got '{text}'")
    return start, end


def _clip_frame(args: argparse.Namespace, timer: StageTimer, device: torch.device):
    """--video: the frame at --at seconds, its observation and (unless --no-memory) the appearance memory fed the
    clip's frames before it minus the --memory-exclude spans. Returns (image, obs, memory or None)."""
    from models.evaluation.clips import ClipIndexConfig, default_cache_dir, index_clip
    from models.evaluation.memory import clip_memory, memory_frame_ids

    with timer.stage("landmarks"):
        index = index_clip(args.video, ClipIndexConfig(fov_deg=args.source_fov), cache_dir=default_cache_dir(),
                           progress=False)
    fps = index.fps or 30.0
    frame = int(round(args.at * fps))
    ids = index.frame_ids.tolist()
    if not ids or frame > max(ids):
        end = (max(ids) + 1) / fps if ids else 0.0
        raise RenderInputError(f"--at {args.at:g}: past the end of '{args.video}' ({end:.1f} s at {fps:g} fps)")
    if frame not in set(ids) or not index.found[index.position(frame)]:
        faces = [i for i, found in zip(ids, index.found) if found]
        nearest = (f"; the nearest frame with a face is at {min(faces, key=lambda i: abs(i - frame)) / fps:.2f} s"
                   if faces else "; none of its frames has one")
        raise RenderInputError(f"--at {args.at:g}: no face found in frame {frame} of '{args.video}'{nearest}")
    with timer.stage("read"):
        image = index.read_frames([frame])[frame]
    obs = index.observation(frame)
    if not args.memory:
        return image, obs, None
    ids = memory_frame_ids(index, frame, args.memory_exclude, args.memory_every)[:-1]  # the frame itself: below
    with timer.stage("memory"):
        memory = clip_memory(index, ids, device=device, size=args.size)
    print(f"appearance memory: {len(ids)} frames before {args.at:g} s fed "
          f"({', '.join(f'{a:g}-{b:g} s' for a, b in args.memory_exclude) or 'none'} excluded), "
          f"{100 * float(memory.fill_fraction()):.0f} % of the head filled")
    return image, obs, memory


def _write(out_dir: Path, poses: list[OrbitPose], views, reference, raw, per_row: int, timer: StageTimer) -> None:
    """One PNG per view (an earlier run's other views removed) and contact_sheet.png into out_dir, made here.
    views, raw: [V, 3, S, S] in [0, 1] (raw: the unrefined renders, None without a refiner); reference: [3, S, S].
    Raises OSError when a file cannot be written (models.pictures.write_rgb)."""
    with timer.stage("write"):
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [f"view_yaw{pose.yaw_deg:+g}_pitch{pose.pitch_deg:+g}.png" for pose in poses]
        stale = [f for f in out_dir.iterdir() if VIEW_NAME.fullmatch(f.name) and f.name not in names and f.is_file()]
        for f in stale:
            f.unlink()
        if stale:
            log.info("removed %d view(s) of an earlier run from %s", len(stale), out_dir)
        for name, view in zip(names, views):
            write_rgb(out_dir / name, to_rgb_uint8(view))
        sheet = contact_sheet(*_sheet_rows(to_rgb_uint8(reference), poses, [to_rgb_uint8(v) for v in views],
                                           None if raw is None else [to_rgb_uint8(v) for v in raw], per_row))
        write_rgb(out_dir / "contact_sheet.png", sheet)


def render_command(args: argparse.Namespace) -> int:
    from models.avatar import AvatarConfig, build_avatar, render_views
    from models.refiner import refine_views
    from models.refiner.shipped import load_refiner

    device = resolve_device(args.device)
    out_dir = Path(args.out)  # made only once there is something to write: a failed run leaves nothing behind
    timer = StageTimer(device)
    memory = None
    if args.video is not None:
        image, obs, memory = _clip_frame(args, timer, device)
    else:
        with timer.stage("read"):
            image = read_still(args.image)  # the checks and size cap `send --source IMAGE` applies
        with timer.stage("landmarks"):
            with FaceAnalyzer(FaceConfig(static_image=True, fov_deg=args.source_fov)) as analyzer:
                obs = analyzer.analyze(image)
    try:
        refiner = load_refiner(args.refiner, device)
    except (OSError, ValueError) as error:  # models.refiner.MissingModelError is a FileNotFoundError
        print(f"telepresence render: --refiner {args.refiner}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    poses = [
        OrbitPose(yaw_deg=y, pitch_deg=p, roll_deg=args.roll, dist_scale=args.dist, fov_deg=args.fov)
        for p, y in itertools.product(args.pitch, args.yaw)
    ]
    config = AvatarConfig(background=args.background)
    with timer.stage("avatar"):
        avatar = build_avatar(image, obs, config, device=device, render_size=args.size)
        if memory is not None:
            memory.update(avatar, obs.pose.yaw_deg)  # the frame itself, as the sender's memory has it, and lit as now
            avatar = memory.attach(avatar)
    with timer.stage("render"):
        out = render_views(avatar, poses, args.size)
        reference = avatar.source_view(args.size)
    views = out.rgb
    if refiner is not None:
        with timer.stage("refine"):
            views = refine_views(refiner, reference, out.rgb[None], out.seen[None])[0]
    try:
        _write(out_dir, poses, views, reference, None if refiner is None else out.rgb, len(args.yaw), timer)
    except OSError as error:  # checked before the work (check_args), but the folder can change meanwhile
        print(f"telepresence render: --out {out_dir}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{len(poses)} views of {args.size}x{args.size} written to {out_dir} (contact_sheet.png)")
    print(f"head pose yaw {obs.pose.yaw_deg:+.1f}  pitch {obs.pose.pitch_deg:+.1f}  roll {obs.pose.roll_deg:+.1f}")
    print(f"timings ({device.type}): {timer.summary()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepresence render",
        description="Build the avatar from IMAGE and write one PNG per view plus a contact sheet. "
        "Views are every (yaw, pitch) combination. yaw +30 moves the camera 30 degrees to the "
        "viewer's right; pitch +10 raises it. --yaw 0 --pitch 0 reproduces the input camera.",
        formatter_class=HelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="input picture (jpg/png/...)")
    source.add_argument("--video", help="input clip: the avatar of the frame at --at, with the appearance memory of "
                        "the frames before it (issue 20's reproducible entry)")
    p.add_argument("--at", type=float, default=0.0, help="with --video: seconds into the clip")
    p.add_argument("--memory-exclude", type=_parse_span, nargs="+", default=[], metavar="START:END",
                   help="with --video: spans (seconds) of the clip the memory is not fed")
    p.add_argument("--memory-every", type=int, default=1, metavar="N", help="with --video: feed every N-th frame")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="with --video: the frame's avatar alone (the single-frame avatar)")
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
    p.add_argument("--refiner", default="default",
                   help="refiner weights folder, 'default' (the shipped weights) or 'none' (raw avatar renders)")
    add_verbosity(p)
    return p


VIDEO_ONLY = {"at": 0.0, "memory_exclude": [], "memory_every": 1, "memory": True}
"""The options that go with --video, at their defaults."""


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every option's value checked before any work (parser.error: one line, exit status 2): a bad number used to
    surface as a traceback from deep in the avatar, some only after the face analysis had run."""
    def finite(flag: str, values) -> None:
        for v in values if isinstance(values, list) else [values]:
            if not math.isfinite(v):
                parser.error(f"{flag}: expected a finite number, got {v}")

    finite("--yaw", args.yaw)
    finite("--pitch", args.pitch)
    finite("--roll", args.roll)
    finite("--at", args.at)
    if any(not -89.0 <= p <= 89.0 for p in args.pitch):
        parser.error(f"--pitch: expected degrees in [-89, 89], got {' '.join(f'{p:g}' for p in args.pitch)}")
    if not (math.isfinite(args.dist) and args.dist > 0.05):
        parser.error(f"--dist: expected a multiple of the source's distance above 0.05, got {args.dist:g}")
    for flag, fov in (("--fov", args.fov), ("--source-fov", args.source_fov)):
        if fov is not None and not (math.isfinite(fov) and 1.0 <= fov <= 150.0):
            parser.error(f"{flag}: expected degrees in [1, 150], got {fov:g}")
    if not 16 <= args.size <= 4096:
        parser.error(f"--size: expected pixels in [16, 4096], got {args.size}")
    if args.video is None:
        given = [f"--{name.replace('_', '-')}" if name != "memory" else "--no-memory"
                 for name, default in VIDEO_ONLY.items() if getattr(args, name) != default]
        if given:
            parser.error(f"{', '.join(given)}: only with --video")
    elif args.at < 0:
        parser.error(f"--at: expected seconds from the start of the clip (0 or more), got {args.at:g}")
    if args.memory_every < 1:
        parser.error(f"--memory-every: expected 1 or more, got {args.memory_every}")
    try:
        parse_refiner(args.refiner)  # a local folder that is not there: said now, not after the face analysis
    except ValueError as error:
        parser.error(f"--refiner {args.refiner}: {str(error).removeprefix('refiner: ')}")
    if not args.out.strip():
        parser.error("--out: expected a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    made_in = out if out.exists() else next(p for p in out.absolute().parents if p.exists())  # the folder, or its maker's
    if not made_in.is_dir():
        parser.error(f"--out {args.out}: {made_in} is not a folder")
    if not os.access(made_in, os.W_OK):
        parser.error(f"--out {args.out}: no permission to write in {made_in}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    configure_logging(args.verbose)
    try:
        return render_command(args)
    except RenderInputError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
