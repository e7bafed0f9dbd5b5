"""`telepresence compare`: two `telepresence eval` runs, or two methods of one run, paired over the pictures they
share, with a bootstrap interval on each bin's change (models.evaluation.compare does the work)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.evaluation.compare import DEFAULT_METRICS, HIGHER_IS_BETTER, compare, comparison_markdown, pictures
from telepresence.cli.console import HelpFormatter


class CompareInputError(ValueError):
    """A side of the comparison that cannot be read: one line for the user."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepresence compare",
        description="Compare two `telepresence eval` runs (e.g. before and after a change), or two methods of one run, "
        "on the pictures both scored: per bin, both means, the mean per-picture change with a bootstrap interval, and "
        "how many pictures moved each way. Each side is an eval output folder or its results.json, with :METHOD to "
        "pick a method (default --method), e.g. `telepresence compare out/main out/branch` or "
        "`telepresence compare out/run:raw out/run:memory`.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("before", metavar="BEFORE[:METHOD]", help="the run compared against")
    p.add_argument("after", metavar="AFTER[:METHOD]", help="the run whose change is measured")
    p.add_argument("--method", default="raw", help="the method of a side that names none")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=sorted(HIGHER_IS_BETTER),
                   metavar="METRIC", help=f"metrics to compare, among {', '.join(sorted(HIGHER_IS_BETTER))}")
    p.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="the interval's coverage, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="the resampling's seed")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    return p


def _side(spec: str, default_method: str) -> tuple[Path, str]:
    """'PATH' or 'PATH:METHOD' -> (results.json path, method)."""
    path, method = Path(spec), default_method
    if not path.exists() and ":" in spec:
        head, tail = spec.rsplit(":", 1)
        path, method = Path(head), tail or default_method
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise CompareInputError(f"no eval results at '{path}' (expected an eval output folder or its results.json)")
    return path, method


def _load(path: Path, method: str) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareInputError(f"cannot read '{path}' as eval results: {exc}") from None
    if not isinstance(results, dict) or not ("pairs" in results or "multiview" in results):
        raise CompareInputError(f"'{path}' is not the results.json of `telepresence eval` (no pairs, no multiview)")
    found = pictures(results, method)
    if not found:
        methods = sorted({m for rec in (results.get("pairs") or []) + ((results.get("multiview") or {}).get("targets") or [])
                          for m in (rec.get("methods") or {})})
        raise CompareInputError(f"no picture scored with method '{method}' in '{path}' "
                                f"(methods there: {', '.join(methods) or 'none'})")
    return found


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0.0 < args.level < 1.0:
        p.error(f"--level: expected a value in (0, 1), got {args.level}")
    if args.samples < 1:
        p.error(f"--samples: expected at least 1, got {args.samples}")
    try:
        (b_path, b_method), (a_path, a_method) = _side(args.before, args.method), _side(args.after, args.method)
        before, after = _load(b_path, b_method), _load(a_path, a_method)
    except CompareInputError as exc:
        print(f"telepresence compare: {exc}", file=sys.stderr)
        return 2
    comp = compare(before, after, args.metrics, samples=args.samples, level=args.level, seed=args.seed)
    name = lambda path, method: f"{path.parent.name or path.name}:{method}"  # noqa: E731
    text = comparison_markdown(comp, name(b_path, b_method), name(a_path, a_method))
    if not comp.rows:
        print(text)
        shared = len(before.keys() & after.keys())
        why = (f"none of the {shared} picture(s) both sides scored has {' or '.join(args.metrics)} on both sides "
               "(eval run with --no-identity or --no-landmarks?)" if shared else
               "the two sides share no picture (other clips, sets or pair choices?)")
        print(f"telepresence compare: {why}", file=sys.stderr)
        return 1
    print(text)
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        except OSError as exc:  # a folder named so, no room, no right to write: the table is printed above
            reason = exc.strerror or exc
            if isinstance(exc, (FileExistsError, NotADirectoryError)):  # a file where a folder of the path should be
                reason = f"{next(p for p in args.out.absolute().parents if p.exists())} is not a folder"
            print(f"telepresence compare: --out {args.out}: {reason}", file=sys.stderr)
            return 2
    return 0
