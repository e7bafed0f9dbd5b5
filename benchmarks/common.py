"""The benchmark method every script here shares (kornia's habit): warm-up, repeats, device
sync, one set of timing statistics, and one JSON layout:

    {"meta": models.runinfo.run_metadata(...), "config": what was asked, "results": what was measured}
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["timing_stats", "sync", "time_ms", "document", "write_json"]


def timing_stats(samples_ms: Sequence[float | None]) -> dict[str, float | int | None]:
    """{median, p90, p95, mean, min, max, n} of timings in milliseconds; percentiles interpolate
    linearly (numpy's default); None samples are left out, and every value is None when none is left."""
    x = np.asarray([s for s in samples_ms if s is not None], np.float64)
    if x.size == 0:
        return {"median": None, "p90": None, "p95": None, "mean": None, "min": None, "max": None, "n": 0}
    return {
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "p95": float(np.percentile(x, 95)),
        "mean": float(x.mean()),
        "min": float(x.min()),
        "max": float(x.max()),
        "n": int(x.size),
    }


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(str(device)))


def time_ms(fn: Callable[[], object], device: Any, warmup: int = 3, repeats: int = 20) -> dict[str, float | int | None]:
    """Call fn ``warmup`` times, then time ``repeats`` calls, each synchronised: timing_stats in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    return timing_stats(samples)


def document(meta: Mapping[str, Any], config: Mapping[str, Any], results: Any) -> dict[str, Any]:
    """One benchmark's JSON document in the shared layout (see the module doc)."""
    return {"meta": dict(meta), "config": dict(config), "results": results}


def dumps(doc: Any) -> str:
    """``doc`` as indented JSON, except that a list of plain values (a series: numbers, strings) stays on one line:
    a run's samples take a line, not a line each (the repository travels to the GPU machine within 64 MiB)."""
    series: dict[str, str] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, (list, tuple)) and x and all(v is None or isinstance(v, (bool, int, float, str)) for v in x):
            key = f"\x00series{len(series)}\x00"
            series[key] = json.dumps(x, default=str)
            return key
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    text = json.dumps(walk(doc), indent=2, default=str)
    for key, value in series.items():
        text = text.replace(json.dumps(key), value, 1)
    return text


def write_json(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` to ``path`` (:func:`dumps`; parents created; replaced whole, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(doc) + "\n")
    tmp.replace(path)
    return path


def child_result(argv: list[str], what: str, **run: Any) -> tuple[dict | None, Any]:
    """Run a benchmark's child process (subprocess.run keywords in ``run``: env, cwd, timeout) and read the JSON of
    its "RESULT " line. Returns (result, the finished process); result None after saying on stderr why there is none."""
    import subprocess
    import sys

    child = subprocess.run(argv, capture_output=True, text=True, **run)
    line = next((ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"error: the {what} ended without a result (exit {child.returncode}):\n{child.stderr[-2000:]}",
              file=sys.stderr)
        return None, child
    return json.loads(line[len("RESULT "):]), child
