"""Inductor's disk cache filled by a child process, so that a sender's own compile of the avatar takes seconds.

A cold torch.compile of the avatar's graphs takes minutes, and on the sender's worker thread it holds Python's
lock most of that time: on a fresh H200 the frames came at 4-5 a second for 2-6 minutes (docs/avatar.md). A
child process that compiles the same graphs holds no lock of the sender's, and leaves what it compiled in
inductor's cache on disk, which the sender's own compile then finds. The same graphs means the same first frame,
framing, picture size, view counts and memory settings: the raster capacities that torch.compile bakes in follow
from them. Measured on this project's 2-core CPU (`abtest/cache_probe.py`, not in the repo: the engine's build
and one view at 128 px, compiled by two processes in turn): 226 s in the first, 8.4 s in the second.

:class:`CachePrefill` runs :func:`compile_like_the_sender` in a child process and says when it has ended and how; a sender starts it at its first frame with a face and releases its own held compiler once it
is done (telepresence.pipeline, ``--compile-avatar prefill``). A child that fails or is killed only costs the
time: the sender then compiles from scratch, as without it, and the log says so.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.avatar.compiling import CAPTURE_RETRIES
from models.avatar.precompiled import compile_fn_for

log = logging.getLogger(__name__)

__all__ = ["CachePrefill", "PrefillJob", "compile_like_the_sender", "view_counts_to_prefill"]


@dataclass(frozen=True)
class PrefillJob:
    """What the child compiles: the sender's avatar settings, its first frame with a face and that frame's
    framing, and the view counts to render (plus the memory's update when the sender has one)."""

    config: object  # models.avatar.AvatarConfig
    device: str
    render_size: int
    image: np.ndarray  # RGB uint8 [H, W, 3]
    obs: object  # models.face.FaceObservation
    crop: tuple[float, float, float]
    view_counts: tuple[int, ...]
    memory: object | None = None  # models.avatar.memory.MemoryConfig, None: no memory
    timeout_s: float = 3600.0
    capacities: tuple[int | None, dict[int, int]] | None = None
    """The sender engine's raster capacities (AvatarEngine.capacities): the child's graphs then bake in the same
    numbers, whatever poses it renders (None: sized from the child's own first frame of each shape)."""
    precompiled: bool = False
    """Compile through models.avatar.precompiled's store, as the sender does with --precompiled-avatar: the sender
    then loads what the child saved instead of tracing it again."""
    host_threads: int | None = None
    """The sender's torch threads (None: 1): the child runs with as many, since compiled code guards on the count
    (a store's file saved by a child with one thread failed its guards in a sender with two)."""


def compile_like_the_sender(job: PrefillJob) -> float:
    """Build, observe (memory) and render as a sender does at its first frame, with every graph compiled, and wait
    for the compiles. Returns the seconds spent compiling; raises if a compile failed or timed out."""
    from models.avatar.engine import AvatarEngine
    from models.geometry.camera import OrbitPose

    device = torch.device(job.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the sender's GPU (cuda:N): graphs capture on the current device
    # Held: the worker starts once this frame's captures are done (wait_compiled releases it), so that none meets it.
    engine = AvatarEngine(job.config, job.device, job.render_size, fixed_shapes=True, compile=True, compile_held=True,
                          compile_fn=compile_fn_for(job.precompiled))
    if job.capacities is not None:
        engine.preset_capacities(*job.capacities)
    memory = None
    if job.memory is not None:
        from models.avatar.memory import AppearanceMemory

        memory = AppearanceMemory(job.memory, job.device)
        memory.compiler = engine.compiler
    # A capture that meets a compile makes its frame eager, and an eager frame captures no render, so asks for no
    # render's compile (a child for a fifth viewer, before the hold above, compiled the build alone so, and the
    # sender then compiled that render cold itself): frame again until one captures.
    for _ in range(CAPTURE_RETRIES + 1):
        avatar = engine.build(job.image, job.obs, crop=job.crop)
        if memory is not None:
            memory.cuda_graphs = engine.cuda_graphs and not engine.eager_frame
            engine.avatar = memory.observe(avatar, job.image, job.obs)
        for n in job.view_counts:
            engine.render([OrbitPose()] * n)
        if not engine.eager_frame:
            break
    else:
        raise RuntimeError(f"every capture of the build met the compile ({CAPTURE_RETRIES + 1} frames)")
    if not engine.wait_compiled(job.timeout_s):
        raise TimeoutError(f"the compiles took more than {job.timeout_s:.0f} s")
    if engine.compiler.failed is not None:
        raise RuntimeError(f"a compile failed: {engine.compiler.failed}")
    return engine.compiler.seconds


class CachePrefill:
    """:func:`compile_like_the_sender` in a child process of its own: start(), then poll finished().

    A subprocess (``python -m models.avatar.prefill JOB PARENT_PID``), not a multiprocessing child: the sender's
    pipeline may itself run in a daemonic process, which may not have those. The child's log lines go to the
    sender's stderr; it ends itself when the sender's process is gone."""

    def __init__(self, job: PrefillJob):
        self.job = job
        self._popen: subprocess.Popen | None = None
        self._t0: float | None = None
        self._job_path: str | None = None
        self.seconds: float | None = None
        """How long the child ran, once it has ended."""

    def start(self) -> CachePrefill:
        with tempfile.NamedTemporaryFile("wb", suffix=".prefill", delete=False) as f:
            pickle.dump(self.job, f)
            self._job_path = f.name
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._t0 = time.perf_counter()
        self._popen = subprocess.Popen([sys.executable, "-m", "models.avatar.prefill", self._job_path, str(os.getpid())],
                                       env=env, cwd=root, stdin=subprocess.DEVNULL)
        return self

    def finished(self) -> bool:
        """The child has ended (either way); :attr:`ok` says how."""
        if self._popen is None or self._popen.poll() is None:
            return False
        if self.seconds is None:
            self.seconds = time.perf_counter() - self._t0
            self._forget_job()
        return True

    @property
    def ok(self) -> bool:
        """The child ended having compiled everything it was given."""
        return self.finished() and self._popen.returncode == 0

    @property
    def exitcode(self) -> int | None:
        return None if self._popen is None else self._popen.returncode

    def stop(self) -> None:
        """End the child if it still runs (the sender is closing)."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(10)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._forget_job()

    def _forget_job(self) -> None:
        if self._job_path is not None:
            Path(self._job_path).unlink(missing_ok=True)
            self._job_path = None


def view_counts_to_prefill(warm_views: int, current: int) -> tuple[int, ...]:
    """The view counts a sender captures at its start: 1..warm_views, and the count it serves now."""
    return tuple(sorted(set(range(1, max(1, warm_views) + 1)) | {max(1, current)}))


def _lower_priority() -> str:
    """This process (and the compile workers it starts) below the sender's CPU priority: Linux's SCHED_IDLE (it runs
    on cores no one else wants), else the lowest niceness; returns the priority it runs at, in words. In a call every
    participant's sender starts a child; four of them compiling at the senders' priority took the cores the calls
    needed (H200, 4 participants: 26.6 fps each and p50 189 ms while they compiled, against 30 fps and 115 ms once
    compiled), at niceness 10 still 27.6 fps and 165 ms, under SCHED_IDLE 29.5 fps and 142 ms."""
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as error:
            log.debug("SCHED_IDLE refused: %s", error)
    try:
        return f"niceness {os.nice(19 - os.nice(0))}"
    except OSError as error:  # not allowed here: compile at the sender's priority, and say so
        log.warning("cannot lower the compile's CPU priority (%s): it competes with the frames for the cores", error)
        return f"niceness {os.nice(0)}"


def _watch_parent(parent_pid: int) -> None:
    """End this process once the sender that started it is gone (an orphan would compile on for minutes)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            log.warning("the sender that started this compile is gone: stopping")
            logging.shutdown()
            os._exit(3)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s prefill %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    path, parent = argv
    log.info("compiling at CPU priority %s: the sender's frames get the cores first", _lower_priority())
    threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    with open(path, "rb") as f:
        job = pickle.load(f)
    torch.set_num_threads(job.host_threads or 1)  # at the idle priority: its threads take no core the frames want
    log.info("torch threads: %d, as the sender's (compiled code guards on the count)", torch.get_num_threads())
    try:
        seconds = compile_like_the_sender(job)
    except Exception as error:  # noqa: BLE001 - said in one line; the sender compiles from scratch
        log.warning("the prefill compile failed: %s: %s", type(error).__name__, error)
        log.debug("where", exc_info=error)
        return 1
    log.info("compiled the avatar's kernels for %s view(s) in %.1f s", ", ".join(map(str, job.view_counts)), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
