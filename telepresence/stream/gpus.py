"""Which GPU each participant's pipeline runs on when the server has several (`telepresence serve`).

The server asks no CUDA of its own (a CUDA context there would hold memory on a GPU it computes nothing on), so
the GPUs are counted from ``CUDA_VISIBLE_DEVICES`` when it is set (the pipelines'
``cuda:N`` then number those), else from ``nvidia-smi``; each new participant's pipeline goes to the GPU with the
fewest pipelines on it (the lowest number of a tie), as ``cuda:N``.
"""
from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Iterable, Mapping

__all__ = ["gpu_count", "least_loaded"]


def gpu_count(env: Mapping[str, str] = os.environ, smi: str = "nvidia-smi") -> int:
    """GPUs this host's CUDA processes see: the entries of CUDA_VISIBLE_DEVICES when it is set, else the GPUs
    nvidia-smi lists; 0 when neither can say (no NVIDIA driver here)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip()])
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.strip())


def least_loaded(count: int, in_use: Iterable[int]) -> int:
    """The GPU (0 .. count - 1) with the fewest of ``in_use`` (the GPUs of the pipelines running now) on it."""
    if count < 1:
        raise ValueError(f"expected at least one GPU, got {count}")
    load = collections.Counter(in_use)
    return min(range(count), key=lambda k: (load[k], k))
