"""`telepresence pairs`: stage-1 (synthetic) and stage-2 (real) training pairs from indexed clips,
written as .safetensors files (models.training.pairs does the work)."""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from models.training.data import TensorPairDataset
from models.training.pairs import VALIDATION_CLIPS, PairConfig, generate_pairs, plan_tasks
from telepresence.cli.console import HelpFormatter, add_verbosity, configure_logging

log = logging.getLogger("telepresence.pairs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepresence pairs",
        description="Make stage-1 (synthetic) and stage-2 (real) training pairs from clips indexed with "
        "models.evaluation.clips (landmarks, poses, masks; MediaPipe is not needed here).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--index", type=Path, required=True, help="folder of <clip>.npz clip indexes")
    p.add_argument("--videos", type=Path, required=True, help="folder of the <clip>.mp4 videos")
    p.add_argument("--val-clips", nargs="*", default=list(VALIDATION_CLIPS), help="clip names kept out of training")
    p.add_argument("--stage1", type=int, default=2000, help="synthetic pairs (training clips)")
    p.add_argument("--stage2", type=int, default=2000, help="real pairs (training clips)")
    p.add_argument("--val", type=int, default=64, help="real pairs from the validation clips")
    p.add_argument("--size", type=int, default=256, help="pairs are SIZE x SIZE pixels")
    p.add_argument("--workers", type=int, default=1, help="processes making pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    p.add_argument("--out", type=Path, required=True, help="output folder (stage1/, stage2/, val/ .safetensors)")
    add_verbosity(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    configure_logging(args.verbose)

    clips = []
    for npz in sorted(args.index.glob("*.npz")):
        video = args.videos / f"{npz.stem}.mp4"
        if not video.exists():
            p.error(f"no video {video} for the clip index {npz}")
        clips.append((npz.stem, str(npz), str(video)))
    if not clips:
        p.error(f"no clip indexes (*.npz) in {args.index}")
    unknown = [v for v in args.val_clips if v not in {c[0] for c in clips}]
    if unknown:
        p.error(f"validation clips not among the indexed clips: {unknown}")
    train = [(i, v) for n, i, v in clips if n not in args.val_clips]
    val = [(i, v) for n, i, v in clips if n in args.val_clips]
    log.info("pairs: %d training clips, %d validation clips (%s)", len(train), len(val), ", ".join(args.val_clips))
    config = PairConfig(size=args.size)
    jobs = [("stage1", plan_tasks(train, 1, args.stage1, config, seed=args.seed)),
            ("stage2", plan_tasks(train, 2, args.stage2, config, seed=args.seed + 1))]
    if val and args.val:
        # Validation pairs weigh the target's head region only: model selection then scores
        # what `telepresence eval` scores (DESIGN.md section 7: head-turn clips move the head only).
        val_config = replace(config, person_weight=0.0, background_weight=0.0)
        jobs.append(("val", plan_tasks(val, 2, args.val, val_config, chunk=8, seed=args.seed + 2)))
    for name, tasks in jobs:
        if not tasks or sum(t.count for t in tasks) == 0:
            continue
        start = time.perf_counter()
        arrays = generate_pairs(tasks, workers=args.workers)
        data = TensorPairDataset(**{k: torch.from_numpy(v) for k, v in arrays.items()}, augment=False)
        path = args.out / name / f"{name}.safetensors"
        data.save(path)
        print(f"{name}: {len(data)} pairs of {args.size}x{args.size} -> {path} ({time.perf_counter() - start:.0f} s)")
    return 0
