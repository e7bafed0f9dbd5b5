"""`telepresence eval`: argument parsing and clear one-line errors around models.evaluation.

Returns a process exit status: 0 done, 1 nothing could be evaluated, 2 bad arguments or a
missing component. (The pipeline benchmark is `python -m benchmarks.pipeline`.)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from telepresence.cli.console import EXIT_BAD_INPUT, add_verbosity, configure_logging, flag_message

log = logging.getLogger(__name__)

__all__ = ["eval_main", "load_refiner", "EvalSetupError"]

METHODS = ("baseline", "raw", "refined")


class EvalSetupError(Exception):
    """A component the command needs is missing (avatar, refiner weights, eval extra)."""


def load_refiner(spec: str, device: str = "cpu") -> Any | None:
    """--refiner value -> a prepared refiner, or None (no refined method).

    spec: "none"; "default", the shipped weights (models.refiner.shipped.load_refiner, as the demo
    and `render` load them: with none shipped, None and that loader's one log line); or a folder of
    refiner weights, which must exist and load (EvalSetupError otherwise).
    """
    if spec == "none":
        return None
    try:
        from models.refiner import shipped
    except ImportError as exc:
        raise EvalSetupError(f"the refiner loader (models.refiner.shipped) cannot be imported: {exc}; use --refiner none") from exc
    if spec != "default" and not Path(spec).exists():
        raise EvalSetupError(f"refiner weights not found at '{spec}'; pass --refiner PATH, default or none")
    try:
        return shipped.load_refiner(spec, device)
    except (ImportError, OSError, ValueError) as exc:
        raise EvalSetupError(f"cannot load the refiner from '{spec}': {exc}") from exc


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepresence eval",
        description="Score novel views against real pictures: reenactment pairs of head-turn clips (another frame, "
        "binned by yaw difference) and synchronized multi-camera sets (another camera at the same moment, binned by "
        "the angle between the views); baseline (reference unchanged), raw avatar render and refined render; "
        "PSNR/SSIM in the head and person masks, identity distance, landmark error, orbit flicker (clips). "
        "Writes results.json, results.md (the two kinds in separate tables), sheets/, plots/.",
    )
    p.add_argument("--clips", nargs="+", default=[], metavar="PATH",
                   help="folder(s) of videos (every .mp4/.mov/.avi/.mkv/.webm in them) and/or video files")
    p.add_argument("--multiview", nargs="+", default=[], metavar="DIR",
                   help="multi-camera set folders (pictures of one moment, optional views.json), or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--refiner", default="default", metavar="PATH|default|none",
                   help="refiner weights folder, 'default' (the shipped weights; none shipped: the raw avatar, "
                   "as in the demo) or 'none' (no refined method)")
    p.add_argument("--methods", nargs="+", default=["baseline,raw,refined"], metavar="METHOD",
                   help="subset of baseline raw refined, space- or comma-separated ('baseline' alone needs no avatar; default: all three)")
    p.add_argument("--max-pairs", type=int, default=8, metavar="N", help="at most N pairs per yaw bin per clip (default 8)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="(default cpu)")
    p.add_argument("--size", type=int, default=256, help="side of the scored crop pictures, pixels (default 256)")
    p.add_argument("--stride", type=int, default=1, help="analyse every k-th frame of each clip (default 1)")
    p.add_argument("--max-frames", type=int, default=None, help="analyse at most this many frames per clip")
    p.add_argument("--max-ref-yaw", type=float, default=20.0, metavar="DEG",
                   help="skip clips whose most frontal frame has |yaw| above DEG (default 20)")
    p.add_argument("--seed", type=int, default=None, help="random pairs from this seed (default: evenly spread, deterministic)")
    p.add_argument("--cache-dir", default=None,
                   help="clip-index cache (default $TELEPRESENCE_CACHE_DIR/clips or ~/.cache/telepresence/clips)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the clip-index cache")
    p.add_argument("--no-identity", action="store_true", help="skip the dlib identity metrics")
    p.add_argument("--no-landmarks", action="store_true", help="skip the landmark error")
    p.add_argument("--no-flicker", action="store_true", help="skip the orbit flicker measurement")
    p.add_argument("--memory", action="store_true",
                   help="add the 'memory' method: the raw avatar with the appearance memory of the clip's frames up to "
                   "the reference, one second around each target excluded (issue 20)")
    p.add_argument("--memory-every", type=int, default=1, metavar="N",
                   help="with --memory: feed every N-th analysed frame (default 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_verbosity(p)
    return p


def _print_summary(title: str, n: int, unit: str, methods: Sequence[str], summary: dict[str, Any]) -> None:
    print(f"{title}: {n} {unit}")
    for method in methods:
        cells = []
        for lab, group in summary["per_bin"].items():
            stat = group[method]["psnr_head"]
            cells.append(f"{lab}: {'–' if stat['mean'] is None else format(stat['mean'], '.2f')} (n={stat['n']})")
        print(f"  {method:9s} PSNR head [dB]  " + "  ".join(cells))


def _error(message: str) -> None:
    print(f"telepresence eval: {message}", file=sys.stderr)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """`telepresence eval ...`; returns the exit status."""
    args = _eval_parser().parse_args(argv)
    configure_logging(args.verbose)
    from models.evaluation.clips import ClipIndexConfig, default_cache_dir, find_clips
    from models.evaluation import CallableRunner, EvalConfig, evaluate, write_results
    from models.evaluation.metrics import MissingEvalExtraError
    from models.evaluation.harness import MethodOutputError
    from models.evaluation.multiview import SetReadError, find_sets

    methods = list(dict.fromkeys(m.strip() for arg in args.methods for m in arg.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "baseline" not in methods:
        _error(f"--methods {' '.join(args.methods)}: expected some of {' '.join(METHODS)}, baseline among them (the "
               "score's floor)")
        return 2
    if args.memory and methods == ["baseline"]:
        _error("--memory: expected with the avatar (raw or refined among --methods), got --methods baseline")
        return 2
    if not args.clips and not args.multiview:
        _error("expected --clips PATH ... and/or --multiview DIR ..., got neither")
        return 2
    if args.device == "cuda" and methods != ["baseline"]:
        import torch

        if not torch.cuda.is_available():
            _error("--device cuda: CUDA is not available on this machine (use --device cpu)")
            return 2
    if Path(args.out).exists() and not Path(args.out).is_dir():
        _error(f"--out {args.out}: exists and is not a folder")
        return 2
    try:
        config = EvalConfig(
            size=args.size,
            max_pairs_per_bin=args.max_pairs,
            seed=args.seed,
            max_reference_yaw_deg=args.max_ref_yaw,
            index=ClipIndexConfig(stride=args.stride, max_frames=args.max_frames),
            identity=not args.no_identity,
            landmarks=not args.no_landmarks,
            flicker=not args.no_flicker,
        )
    except ValueError as exc:  # "size: expected ..." -> "--size 10: expected ..."
        _error(flag_message(exc, args))
        return EXIT_BAD_INPUT
    try:
        clips = find_clips(args.clips) if args.clips else []
        sets = find_sets(args.multiview) if args.multiview else []
    except (ValueError, OSError, SetReadError) as exc:
        _error(str(exc))
        return 2
    if args.clips and not clips:
        _error(f"no video files found in {' '.join(args.clips)}")
        return 2
    if args.multiview and not sets:
        _error(f"no multi-camera sets (folders of pictures) found in {' '.join(args.multiview)}")
        return 2

    notes = []
    try:
        refiner = None
        if "refined" in methods:
            refiner = load_refiner(args.refiner, args.device)
            if refiner is None:  # --refiner none, or default with nothing shipped (its loader logged that once)
                methods.remove("refined")
                notes.append("refined: not run (--refiner none)" if args.refiner == "none"
                             else "refined: not run (no refiner weights shipped: the raw avatar, as in the demo)")
        if "raw" in methods or "refined" in methods:
            try:
                from models.evaluation import AvatarRunner
                from models.evaluation.memory import MemoryRunner

                runner = (MemoryRunner(refiner=refiner, device=args.device, every=args.memory_every) if args.memory
                          else AvatarRunner(refiner=refiner, device=args.device))
            except ImportError as exc:
                raise EvalSetupError(f"the avatar (models.avatar) is not available: {exc}; "
                                     "run with --methods baseline") from exc
            if "raw" not in methods:
                notes.append("raw: computed (the refiner's input) but --methods left it out of the tables")
        else:
            runner = CallableRunner()
            notes.append("raw, refined: not run (--methods baseline)")
        cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
        result = evaluate(clips, runner, config, out_dir=args.out, cache_dir=cache_dir, progress=not args.quiet,
                          meta={"argv": list(argv) if argv is not None else sys.argv[1:],
                                "refiner": args.refiner if "refined" in methods else None, "notes": notes},
                          sets=sets)
    except (EvalSetupError, MissingEvalExtraError, MethodOutputError) as exc:
        _error(f"{exc}")
        return 2
    if "raw" not in methods and "raw" in result.methods:
        result.methods = tuple(m for m in result.methods if m != "raw")
    for s in result.skipped:
        print(f"skipped {s['clip']}: {s['reason']}", file=sys.stderr)
    for s in result.set_skipped:
        print(f"skipped set {s['set']}: {s['reason']}", file=sys.stderr)
    if not result.records and not result.set_records:  # nothing written: an earlier run's results in --out stay
        _error(f"no {'clip' if clips else 'set'}{' or set' if clips and sets else ''} could be evaluated "
               f"(nothing written to {args.out})")
        return 1
    paths = write_results(result, args.out)
    print(f"-> {paths['md']}")
    if clips:
        _print_summary("reenactment (other frame of a clip)", len(result.clips), f"clip(s), {len(result.records)} pairs",
                       result.methods, result.summary())
    if sets:
        _print_summary("multi-camera (same moment)", len(result.sets), f"set(s), {len(result.set_records)} targets",
                       result.methods, result.set_summary())
    return 0


main = eval_main  # the dispatcher's entry (telepresence.cli)


if __name__ == "__main__":
    sys.exit(eval_main())
