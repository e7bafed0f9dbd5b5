"""Per-stage pipeline timing (landmarks, avatar, render, refine, VP8 encode).

    python benchmarks/pipeline.py --device cuda --size 512 --viewers 1 4 --out bench/cuda-512.json --readme README.md

Same as `telepresence bench`; the timing code lives in telepresence/benchmark.py
so that the installed command has it too. Prints median / p95 per stage and
writes JSON with metadata (commit, versions, device).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from telepresence.cli.eval import bench_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
