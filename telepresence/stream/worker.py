"""A FramePipeline in a process of its own (a call participant's): the frames go in and the views come
out through shared memory, the requests through two pipes, one per thread of the RenderLoop.

    server process (RenderLoop)                          worker process (forked from a fork server)
    analysis thread: analyze(frame) ---- pipe A --->     analysis thread: pipeline.analyze(frame)
         frame -> shared block A  -------------------^     keeps (frame, analysis) under a token
    pipeline thread: process(poses, analysis) - pipe B ->  main thread: pipeline.process(kept frame, poses, analysis)
         views <- shared block B  <------------------------ views written there

Why a process: the participants' pipelines on threads of one interpreter wait for the GIL, on each
other and on the event loop (RTP, SRTP, the data channels of every connection): each torch call gives
the GIL up and must win it back (docs/call.md, "One process per participant", measured). A process
each has its own interpreter and, on CUDA, its own context, so one pipeline's CUDA graph capture
cannot be broken by another's work.

The server owns the shared blocks (makes, grows, unlinks them); the worker maps them by name.
Faults: a worker that exits (a crash, a kill) fails the call in progress and every later one at once;
one that does not answer a call in `timeout_s` is killed. Either way `error` says why (the call
drops the participant with it) and the call raises WorkerError. A process() that waits for the avatar's
GPU kernels to compile (compile_avatar "wait": minutes) says so every BUSY_EVERY_S, and each word restarts
the wait, up to COMPILE_WAIT_S.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Optional, Sequence

import numpy as np

from telepresence.pipeline import Analysis, FrameResult, PipelineConfig, PipelineUnavailableError, open_pipeline

logger = logging.getLogger(__name__)

PRELOAD = ("telepresence.stream.worker", "models.face.analysis", "models.avatar.engine", "models.refiner.shipped")
"""Modules the process that forks the workers imports once (torch and the models' code: seconds)."""
KEPT_ANALYSES = 4
"""Analysed frames a worker keeps for process() (the RenderLoop processes the newest, one behind at most)."""
CLOSE_TIMEOUT_S = 10.0
"""How long a worker may take to close its pipeline before it is killed."""
BUSY_EVERY_S = 2.0
"""How often a worker whose process() is held up by its GPU kernels' compile says so (the pipeline's
kernels() is "compiling"); the server's timeout_s restarts at each word."""
COMPILE_WAIT_S = 1800.0
"""How long the server waits, word after word, for one process() call held up by a compile (the pipeline
itself waits as long: Pipeline._compile_now)."""


class WorkerError(RuntimeError):
    """The pipeline's process is gone or does not answer (PipelineProcess.error says which)."""


class PipelineRaisedError(RuntimeError):
    """The pipeline raised in its process: this call failed, the process goes on."""


@dataclass(frozen=True)
class RemoteAnalysis(Analysis):
    """An Analysis made in the worker. The face observation stays there with its frame, under `token`
    (`observation` here: True when a face was found, None when not)."""

    token: int = 0


# -- the server side -------------------------------------------------------------------------------


class _Block:
    """A shared-memory block the server makes and owns; replaced by a larger one when a request needs it."""

    def __init__(self) -> None:
        self.shm: Optional[SharedMemory] = None

    def fit(self, nbytes: int) -> SharedMemory:
        if self.shm is None or self.shm.size < nbytes:
            self.free()
            self.shm = SharedMemory(create=True, size=max(1, nbytes))
        return self.shm

    def free(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None


class _Channel:
    """One pipe to the worker, one request at a time, and the blocks its requests use."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.frames = _Block()
        self.views = _Block()


def _put_frame(block: _Block, frame_rgb: np.ndarray) -> tuple[str, tuple[int, ...], bool]:
    """Copy the frame into the block: (block name, shape, writeable) for the worker."""
    shm = block.fit(frame_rgb.nbytes)
    np.copyto(np.ndarray(frame_rgb.shape, np.uint8, buffer=shm.buf), frame_rgb, casting="no")
    return shm.name, frame_rgb.shape, bool(frame_rgb.flags.writeable)


def _take_views(block: _Block, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Copies of the views the worker wrote one after the other into the block."""
    assert block.shm is not None
    views, offset = [], 0
    for shape in shapes:
        view = np.ndarray(shape, np.uint8, buffer=block.shm.buf, offset=offset)
        views.append(view.copy())
        offset += view.nbytes
    return views


class PipelineProcess:
    """A FramePipeline (telepresence.pipeline) whose analyze() and process() run in a process of its
    own; made by open_pipeline_process. analyze() and process() may run on two threads at once (the
    RenderLoop's), as with an in-process pipeline; each is one request at a time."""

    def __init__(self, process: Any, analysis: Connection, frames: Connection, name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.size: int = 0
        self.device: str = ""
        self.refiner_name: Optional[str] = None
        self.error: Optional[str] = None
        """Why the process can no longer be used (it exited, or stopped answering), None while it can."""
        self.closed = False
        """True once the pipeline was closed in its process."""
        self.views_per_call: collections.deque[int] = collections.deque(maxlen=100)
        """Views asked for by each of the last 100 process() calls (each one pipeline call, one refiner batch)."""
        self.pid: Optional[int] = process.pid
        self._process = process
        self._analysis = _Channel(analysis)
        self._frames = _Channel(frames)
        self._tokens = 0
        self._closing = threading.Lock()
        self._reset_memory = False  # asked for by a viewer: sent with the next process() call

    def __repr__(self) -> str:
        return f"pipeline process of {self.name} (pid {self.pid})"

    # -- the FramePipeline --

    def analyze(self, frame_rgb: np.ndarray, t_s: Optional[float] = None) -> RemoteAnalysis:
        """Face analysis in the worker, which keeps the frame and the observation for process()."""
        with self._analysis.lock:
            self._check()
            self._tokens += 1
            token = self._tokens
            reply = self._call(self._analysis, ("analyze", token, _put_frame(self._analysis.frames, frame_rgb), t_s))
        landmarks_ms, eyes_m, found = reply
        return RemoteAnalysis(True if found else None, landmarks_ms, eyes_m, token=token)

    def process(self, frame_rgb: np.ndarray, poses: Sequence[Any], analysis: Optional[Analysis] = None) -> FrameResult:
        """Views at `poses`: of the frame the worker kept with `analysis` (a RemoteAnalysis of this
        process), else of `frame_rgb`, sent now."""
        channel = self._frames
        self.views_per_call.append(len(poses))
        with channel.lock:
            self._check()
            token = analysis.token if isinstance(analysis, RemoteAnalysis) else None
            frame = None if token is not None else _put_frame(channel.frames, frame_rgb)
            views = channel.views.fit(len(poses) * self.size * self.size * 3)
            reset, self._reset_memory = self._reset_memory, False
            shapes, found, status, timings_ms, memory_fill, kernels = self._call(
                channel, ("process", token, frame, list(poses), views.name, views.size, reset))
            pictures = _take_views(channel.views, shapes)
        return FrameResult(pictures, found, status, timings_ms, memory_fill, fresh=True,  # copies out of the block
                           kernels=kernels)

    def reset_memory(self) -> None:
        """The pipeline's appearance memory forgets what it has seen (a viewer's reset button): asked with the next
        process() call, so that the event loop that asks never waits for a call in progress (as in this process, the
        pipeline's own reset takes effect at its next frame)."""
        self._reset_memory = True

    def describe(self) -> dict[str, Any]:
        """What the process runs (telepresence.stream.worker.describe_pipeline): the benchmark's `path`."""
        with self._frames.lock:
            return self._call(self._frames, ("describe",))

    def close(self) -> None:
        """Close the pipeline in its process and end the process (killed if it does not end in
        CLOSE_TIMEOUT_S); free the shared blocks. A call in progress fails (WorkerError)."""
        with self._closing:
            if self._process is None:
                return
            if self.error is None and self._frames.lock.acquire(timeout=2.0):
                try:
                    self._call(self._frames, ("close",), timeout_s=CLOSE_TIMEOUT_S)
                    self.closed = True
                except (WorkerError, PipelineRaisedError) as error:
                    logger.warning("%s: closing: %s", self, error)
                finally:
                    self._frames.lock.release()
                self._process.join(timeout=5.0)
            self._fail("it was closed")
            for channel in (self._analysis, self._frames):
                with channel.lock:  # a call in progress has returned: the process is gone
                    channel.conn.close()
                    channel.frames.free()
                    channel.views.free()
            if self._process.exitcode is None:
                logger.warning("%s: still ending after it was killed; going on", self)
            else:
                self._process.close()
            self._process = None

    # -- requests --

    def poll(self) -> Optional[str]:
        """:attr:`error`, after noticing a process that exited between calls (a sender with no viewer makes none)."""
        process = self._process
        if self.error is None and process is not None and process.exitcode is not None:
            self._fail(self._exit_reason())
        return self.error

    def _check(self) -> None:
        if self.error is not None:
            raise WorkerError(self.error)

    def _call(self, channel: _Channel, request: tuple, timeout_s: Optional[float] = None) -> Any:
        """Send one request on `channel` (its lock held) and return the reply's value."""
        self._check()
        try:
            channel.conn.send(request)
        except OSError:
            self._fail(self._exit_reason())
            raise WorkerError(self.error) from None
        kind, value = self._reply(channel, self.timeout_s if timeout_s is None else timeout_s)
        if kind == "raised":
            raise PipelineRaisedError(value)
        return value

    def _reply(self, channel: _Channel, timeout_s: float) -> tuple[str, Any]:
        """The next reply on `channel`; "busy" words (a compile holds the call up) restart the wait."""
        busy_since: Optional[float] = None
        try:
            while True:
                if not channel.conn.poll(timeout_s):
                    self._fail(f"its pipeline did not answer in {timeout_s:g} s (its process was stopped)")
                    raise WorkerError(self.error)
                kind, value = channel.conn.recv()
                if kind != "busy":
                    return kind, value
                if busy_since is None:
                    busy_since = time.monotonic()
                    logger.info("%s: %s; waiting for it (at most %g s)", self, value, COMPILE_WAIT_S)
                elif time.monotonic() - busy_since > COMPILE_WAIT_S:
                    self._fail(f"its pipeline was still {value} after {COMPILE_WAIT_S:g} s (its process was stopped)")
                    raise WorkerError(self.error)
        except (EOFError, OSError):
            self._fail(self._exit_reason())
            raise WorkerError(self.error) from None

    def _exit_reason(self) -> str:
        process = self._process
        if process is None:
            return "it was closed"
        process.join(timeout=5.0)  # its pipe closes as it exits: its memory may take a moment to go
        code = process.exitcode
        if code is None:
            return "its pipeline process stopped answering (its pipe closed)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"its pipeline process was killed ({name})"
        return f"its pipeline process exited (code {code})"

    def _fail(self, reason: str) -> None:
        """The process is no longer usable: remember the first reason, end it."""
        if self.error is None:
            self.error = reason
            if reason != "it was closed":
                logger.warning("%s: %s", self, reason)
        process = self._process
        if process is not None and process.exitcode is None:
            process.kill()
            process.join(timeout=5.0)


def _context() -> Any:
    """Workers are forked from a fork server (a fresh process that imported PRELOAD and nothing else: no
    CUDA, no event loop, no threads of ours), or spawned where there is none (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def prepare_workers() -> None:
    """Start the fork server now (it imports PRELOAD: seconds), so that a participant's pipeline starts in
    the time its models take to load. Optional: the first open_pipeline_process starts it otherwise."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def open_pipeline_process(config: PipelineConfig, factory: Optional[str] = None, *, name: str = "pipeline",
                          timeout_s: float = 20.0, start_timeout_s: float = 300.0,
                          env: Optional[dict[str, str]] = None) -> PipelineProcess:
    """open_pipeline(config, factory) in a new process (forked from the fork server, prepare_workers);
    blocks until it is loaded. `env`: set in the process before it loads anything (CUDA MPS's pipe folder).
    PipelineUnavailableError when it cannot be (the reason from the process), or takes start_timeout_s."""
    context = _context()
    analysis, analysis_end = context.Pipe()
    frames, frames_end = context.Pipe()
    process = context.Process(target=_serve, name=f"pipeline {name}", daemon=True,
                              args=(config, factory, analysis_end, frames_end, _logging_setup(), name, dict(env or {})))
    process.start()
    analysis_end.close()  # the worker holds the other ends: EOF here when it is gone
    frames_end.close()
    worker = PipelineProcess(process, analysis, frames, name, timeout_s)
    try:
        with worker._frames.lock:
            kind, value = worker._reply(worker._frames, start_timeout_s)  # the process speaks first, once loaded
    except WorkerError as error:
        worker.close()
        raise PipelineUnavailableError(f"the pipeline process did not start: {error}") from None
    if kind != "ready":
        worker._fail("it was closed")  # it said why and ends itself: nothing more to ask it, nothing to warn of
        worker.close()
        raise PipelineUnavailableError(value)
    worker.size, worker.device, worker.refiner_name = value
    return worker


# -- the worker side -------------------------------------------------------------------------------


def describe_pipeline(pipeline: Any) -> dict[str, Any]:
    """What a pipeline runs on: its class, device, refiner and dtype, whether the avatar replays CUDA
    graphs (or fell back to eager after a failed capture), and where its avatar's compile stands (kernels)."""
    engine, refiner = getattr(pipeline, "engine", None), getattr(pipeline, "refiner", None)
    return {
        "pipeline": f"{type(pipeline).__module__}.{type(pipeline).__qualname__}",
        "device": str(getattr(pipeline, "device", None)),
        "refiner": getattr(pipeline, "refiner_name", None),
        "refiner_dtype": None if refiner is None else str(refiner.dtype),
        "avatar_cuda_graphs": getattr(engine, "cuda_graphs", None),
        "avatar_fell_back": getattr(engine, "fell_back", None),
        "kernels": pipeline.kernels() if callable(getattr(pipeline, "kernels", None)) else None,
    }


class _Mapped:
    """The worker's mapping of the server's current block of one role."""

    def __init__(self) -> None:
        self.shm: Optional[SharedMemory] = None

    def get(self, name: str) -> SharedMemory:
        if self.shm is None or self.shm.name != name:
            if self.shm is not None:
                self.shm.close()
            self.shm = SharedMemory(name=name)
        return self.shm


def _take_frame(mapped: _Mapped, frame: tuple[str, tuple[int, ...], bool]) -> np.ndarray:
    """The worker's own copy of a frame the server put in a block (the block is reused for the next)."""
    name, shape, writeable = frame
    image = np.ndarray(shape, np.uint8, buffer=mapped.get(name).buf).copy()
    image.setflags(write=writeable)
    return image


class _Worker:
    """Serves one pipeline's requests, one pipe per thread."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.kept: collections.OrderedDict[int, tuple[np.ndarray, Analysis]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def serve(self, conn: Connection) -> bool:
        """Answer requests until the server closes this pipe (False) or asks to close (True)."""
        frames, views = _Mapped(), _Mapped()
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return False
            done = threading.Event()
            beat = None
            if request[0] == "process":
                beat = threading.Thread(target=self._say_busy, args=(conn, done), name="busy", daemon=True)
                beat.start()
            try:
                reply = self.answer(request, frames, views)
            except Exception:
                reply = ("raised", traceback.format_exc().rstrip())
            finally:
                done.set()
                if beat is not None:
                    beat.join()  # its last word is out before the reply
            if request[0] == "close":
                conn.send(reply)
                return True
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return False

    def _say_busy(self, conn: Connection, done: threading.Event) -> None:
        """While a process() call runs: every BUSY_EVERY_S that the pipeline's GPU kernels are compiling
        (compile_avatar "wait" holds the first face's call until they are), say so to the server."""
        kernels = getattr(self.pipeline, "kernels", None)
        while not done.wait(BUSY_EVERY_S):
            if kernels is not None and kernels() == "compiling":
                try:
                    conn.send(("busy", "compiling its GPU kernels"))
                except (EOFError, OSError):
                    return

    def answer(self, request: tuple, frames: _Mapped, views: _Mapped) -> tuple[str, Any]:
        kind = request[0]
        if kind == "close":
            self.pipeline.close()
            return "closed", None
        if kind == "describe":
            return "described", describe_pipeline(self.pipeline)
        if kind == "analyze":
            _, token, frame, t_s = request
            image = _take_frame(frames, frame)
            analysis = self.pipeline.analyze(image, t_s)
            with self.lock:
                self.kept[token] = (image, analysis)
                while len(self.kept) > KEPT_ANALYSES:
                    self.kept.popitem(last=False)
            eyes = None if analysis.eyes_m is None else np.asarray(analysis.eyes_m)
            return "analysis", (analysis.landmarks_ms, eyes, analysis.observation is not None)
        if kind == "process":
            _, token, frame, poses, views_name, views_size, reset = request
            if reset and callable(getattr(self.pipeline, "reset_memory", None)):
                self.pipeline.reset_memory()
            if token is None:
                result = self.pipeline.process(_take_frame(frames, frame), poses)
            else:
                with self.lock:
                    kept = self.kept.get(token)
                if kept is None:
                    raise RuntimeError(f"analysis {token} is no longer kept (the last {KEPT_ANALYSES} are)")
                result = self.pipeline.process(kept[0], poses, analysis=kept[1])
            return "result", (_put_views(views.get(views_name), views_size, self.pipeline.size, result.views),
                              result.face_found, result.status, dict(result.timings_ms), result.memory_fill,
                              getattr(result, "kernels", None))
        raise ValueError(f"unknown request {kind!r}")


def _put_views(shm: SharedMemory, capacity: int, size: int, views: list[np.ndarray]) -> list[tuple[int, ...]]:
    """Write the views one after the other into the block; their shapes."""
    for image in views:
        if not isinstance(image, np.ndarray) or image.shape != (size, size, 3) or image.dtype != np.uint8:
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise RuntimeError(f"expected [{size}, {size}, 3] uint8 views, got {got}")
    if len(views) * size * size * 3 > capacity:
        raise RuntimeError(f"{len(views)} views do not fit the {capacity} bytes given for them")
    offset = 0
    for image in views:
        np.copyto(np.ndarray(image.shape, np.uint8, buffer=shm.buf, offset=offset), image)
        offset += image.nbytes
    return [image.shape for image in views]


def _logging_setup() -> tuple[int, Optional[str], Optional[str], dict[str, int], bool]:
    """The server's logging (root level, format, the levels set on named loggers, whether Python's
    warnings go through it), for its workers: their lines read like the server's."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET}
    captured = getattr(logging, "_warnings_showwarning", None) is not None
    return root.level, getattr(formatter, "_fmt", None), getattr(formatter, "datefmt", None), levels, captured


def _serve(config: PipelineConfig, factory: Optional[str], analysis: Connection, frames: Connection,
           logging_setup: tuple, name: str, env: dict[str, str]) -> None:
    """The worker process: load the pipeline, say so, answer on `frames` (this thread) and `analysis` (another)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server closes us
    os.environ.update(env)  # before CUDA starts (the fork server that made us has not started it)
    level, fmt, datefmt, levels, captured = logging_setup
    logging.basicConfig(level=level, format=(fmt or "%(levelname)s %(name)s: %(message)s").replace(
        "%(message)s", f"[{name}] %(message)s"), datefmt=datefmt)
    for logger_name, logger_level in levels.items():
        logging.getLogger(logger_name).setLevel(logger_level)
    logging.captureWarnings(captured)
    try:
        pipeline = open_pipeline(config, factory)
    except Exception as error:
        reason = str(error) if isinstance(error, PipelineUnavailableError) else f"{type(error).__name__}: {error}"
        frames.send(("unavailable", reason))
        return
    worker = _Worker(pipeline)
    frames.send(("ready", (int(pipeline.size), str(pipeline.device), pipeline.refiner_name)))
    threading.Thread(target=worker.serve, args=(analysis,), name="analysis", daemon=True).start()
    if not worker.serve(frames):
        pipeline.close()  # the server is gone
