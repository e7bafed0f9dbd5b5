"""Where a process's time goes while a benchmark runs: CPU per thread (grouped by the Python thread's
name) and per process, read from /proc (Linux; empty elsewhere), and how late an event loop runs.

    cpu = CpuMeter(); ...; cpu.percent()   -> {"event loop": 41.0, "pipeline": 88.3, ...}  (% of one core)
    lag = LoopLag(); lag.start(); ...; lag.stop() -> timing_stats of the lateness, ms
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from benchmarks.common import timing_stats

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_s(stat_path: Path) -> Optional[float]:
    """utime + stime of a /proc/.../stat, in seconds; None when gone or unreadable."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5), after pid and comm


def thread_groups() -> dict[int, str]:
    """This process's threads by native id: the main thread is "event loop" (the benchmark runs its loop
    there); Python threads go by name, numbers dropped ("asyncio_3" -> "asyncio"); the rest are "native"."""
    groups = {}
    for thread in threading.enumerate():
        if thread.native_id is None:
            continue
        if thread is threading.main_thread():
            groups[thread.native_id] = "event loop"
        else:
            groups[thread.native_id] = thread.name.rstrip("0123456789").rstrip("_-") or thread.name
    return groups


class CpuMeter:
    """CPU seconds of this process's threads and of other processes (by pid), between start() and percent().
    sample() (e.g. once a second) keeps each process's latest reading: one that has exited by percent() (a
    benchmark's client that ended its window first) is counted up to its last sample instead of left out."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = list(pids)
        self._start_s = 0.0
        self._threads: dict[int, float] = {}
        self._processes: dict[int, float] = {}
        self._latest: dict[int, tuple[float, float]] = {}  # pid -> (its CPU seconds, monotonic time read)

    def _sample_threads(self) -> dict[int, float]:
        out = {}
        for task in Path("/proc/self/task").glob("*"):
            if (seconds := _cpu_s(task / "stat")) is not None:
                out[int(task.name)] = seconds
        return out

    def _sample_processes(self) -> dict[int, float]:
        return {pid: s for pid in self.pids if (s := _cpu_s(Path(f"/proc/{pid}/stat"))) is not None}

    def start(self) -> "CpuMeter":
        self._start_s = time.monotonic()
        self._threads = self._sample_threads()
        self._processes = self._sample_processes()
        self._latest = {}
        return self

    def sample(self) -> None:
        """Read the other processes now (their latest reading stands in for one that exits before percent())."""
        now = time.monotonic()
        for pid, seconds in self._sample_processes().items():
            self._latest[pid] = (seconds, now)

    def percent(self, process_names: Optional[dict[int, str]] = None) -> dict[str, float]:
        """% of one core since start(): this process's thread groups (thread_groups()), "this process"
        in all, and each other process (named by process_names, else "pid N"). Linux only: {} elsewhere."""
        wall = time.monotonic() - self._start_s
        if wall <= 0 or not self._threads:
            return {}
        groups = thread_groups()
        used: dict[str, float] = {}
        total = 0.0
        for tid, seconds in self._sample_threads().items():
            delta = seconds - self._threads.get(tid, 0.0)
            total += delta
            name = groups.get(tid, "native")
            used[name] = used.get(name, 0.0) + delta
        out = {name: round(100 * s / wall, 1) for name, s in sorted(used.items(), key=lambda kv: -kv[1])}
        out["this process"] = round(100 * total / wall, 1)
        now = time.monotonic()
        readings = dict(self._latest)
        readings.update({pid: (seconds, now) for pid, seconds in self._sample_processes().items()})
        for pid in self.pids:
            if pid not in readings or pid not in self._processes:
                continue  # never read (gone before start(), or not yet sampled)
            seconds, read_at = readings[pid]
            name = (process_names or {}).get(pid, f"pid {pid}")
            out[name] = round(100 * (seconds - self._processes[pid]) / max(read_at - self._start_s, 1e-9), 1)
        return out


class LoopLag:
    """How late the running event loop wakes a task that sleeps `interval_s` (its backlog, in ms)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self._task: Optional[asyncio.Task] = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.samples_ms.append((time.perf_counter() - start - self.interval_s) * 1e3)

    def start(self) -> "LoopLag":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        stats = timing_stats(self.samples_ms)
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in stats.items() if k in ("median", "p90", "max")}


class StackSampler:
    """Where a thread's wall time goes: its Python stack sampled every interval_s (sys._current_frames, on a thread
    of its own) between start() and stop(). Each sample is charged to the innermost frame in this repository's code
    (``mine``: file:function, what our code was doing or waiting on) and to the innermost frame of all (``leaf``);
    stop() gives each one's share of the samples, largest first. A sample also lands in a thread that waits (a CUDA
    sync, a lock, a slot): it is wall time, not CPU time (CpuMeter has that). Sampling takes Python's lock every
    interval_s (about 7 % of a core at 5 ms, two threads sampled): a small load of its own on what it measures."""

    def __init__(self, thread_name: str, interval_s: float = 0.005, top: int = 15) -> None:
        self.thread_name, self.interval_s, self.top = thread_name, interval_s, top
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mine: dict[str, int] = {}
        self._leaf: dict[str, int] = {}
        self.samples = 0

    def start(self) -> "StackSampler":
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import sys

        root = str(Path(__file__).resolve().parents[1])
        while not self._stop.wait(self.interval_s):
            target = next((t.ident for t in threading.enumerate() if t.name == self.thread_name), None)
            frame = sys._current_frames().get(target) if target is not None else None
            if frame is None:
                continue
            self.samples += 1
            leaf = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
            self._leaf[leaf] = self._leaf.get(leaf, 0) + 1
            while frame is not None and (not frame.f_code.co_filename.startswith(root)
                                         or "site-packages" in frame.f_code.co_filename):  # a venv in the checkout
                frame = frame.f_back
            mine = "outside this repository" if frame is None else \
                f"{os.path.relpath(frame.f_code.co_filename, root)}:{frame.f_code.co_name}:{frame.f_lineno}"
            self._mine[mine] = self._mine.get(mine, 0) + 1

    def stop(self) -> dict:
        """{"thread", "samples", "mine": {where: % of samples}, "leaf": {...}}, the top entries of each."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        share = lambda counts: {k: round(100.0 * n / self.samples, 1) for k, n in  # noqa: E731
                                sorted(counts.items(), key=lambda kv: -kv[1])[: self.top]} if self.samples else {}
        return {"thread": self.thread_name, "samples": self.samples, "mine": share(self._mine), "leaf": share(self._leaf)}
