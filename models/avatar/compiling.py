"""torch.compile of the avatar engine's graphs, done on a worker thread while the plain graphs serve.

Compiled before the CUDA-graph capture, the build and the render fuse their ~2,000 small kernels: on an H200
at 512 with 4 views the two replays take 1.27 ms instead of 5.35 ms (docs/avatar.md). Compiling them takes
about two minutes the first time on a machine and about 10 s once inductor's cache on disk holds them: too
long to hold a sender's frames. So :class:`BackgroundCompiler` runs each compiled function once on a worker
thread, on copies of its inputs and on a stream of its own, while the engine keeps replaying its plain graphs;
when a function is ready, the engine captures it in place of the plain graph on its own thread (the guards
hit: nothing compiles there). If a compile fails, the log says why and the plain graphs stay.

A compiler made ``held`` queues what is submitted and starts compiling at :meth:`BackgroundCompiler.release`: a
sender holds it until its first frame with a face is out, so that the first frame's captures (the build, the
render and the refiner at each warmed view count, the memory's update) do not wait on the compile for Python's
lock (on a fresh H200, beside the compile, viewers got no frame for the first 15-20 s).

Keys name what is compiled (a build plan and its raster capacity, a view count...): the engine submits a key
once, asks whether it is ready, and swaps only while the worker is idle, since the capture runs under
``torch.compiler.set_stance("fail_on_recompile")``, which is global.

A CUDA-graph capture on the engine's thread and the worker's first run of a compiled function may meet: an
allocation or a device-wide sync (inductor's autotuning) in one thread while the other captures makes CUDA
refuse one or both. Neither is lasting: the worker runs such a job again (:data:`CAPTURE_RETRIES` times), and
the engine runs that frame eagerly and captures at the next one (:func:`clashed_with_a_capture`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from typing import Callable, Hashable, TypeVar

import torch

from models.compile_threads import allow_compiles_beside_traces

log = logging.getLogger(__name__)

__all__ = ["BackgroundCompiler", "CAPTURE_RETRIES", "SWITCH_INTERVAL_S", "capture_compiled", "clashed_with_a_capture",
           "compile_fixed", "compiling_now", "leave"]

_running = 0  # jobs running on the workers of this process (under _running_lock)
_running_lock = threading.Lock()


def compiling_now() -> bool:
    """Whether a worker of this process is running a compile job now."""
    return _running > 0


def leave(code: int) -> int:
    """A program's exit status, for ``sys.exit(leave(main()))``: returned as it is, unless a worker is inside a
    compile; then the process ends here with it (``os._exit``, after the logs and the standard streams are
    flushed). A daemon thread inside torch.compile's C++ when the interpreter finalizes takes the process down:
    "terminate called without an active exception" (rc 134) on the CPU, a segmentation fault (rc 139) when a GPU
    loopback benchmark ended during a compile (H200, 2026-12-01). Nothing a compile was writing is lost: inductor's
    and the store's files are written whole or not at all."""
    if not compiling_now():
        return code
    log.info("exiting while the avatar's compile runs: not waited for")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader is gone
            pass
    os._exit(code)

G = TypeVar("G")

SWITCH_INTERVAL_S = 0.00005
"""Python's thread switch interval while a compile runs (its default is 5 ms). Each time a frame's thread takes the
GIL back after a call that let go of it, it waits up to this long for the compile to drop it, and a sender's frame
does that hundreds of times: `benchmarks/switch_interval.py` (CPU) gives a 30 fps thread of 300 such calls a frame
4.7 frames/s at 0.5 ms and 15.1 at 0.05 ms, the Python beside it at 86-90 % of its rate either way; on an H200 the
soak's viewers got 6.5 fps during a 28 s compile from the cache at 0.5 ms."""

CAPTURE_RETRIES = 3
"""Runs of a compile job that met a CUDA-graph capture on another thread, after the first."""


def clashed_with_a_capture(error: BaseException) -> bool:
    """Whether a CUDA error says that a stream capture was under way ("operation not permitted when stream is
    capturing", "operation failed due to a previous error during capture", "capture ... invalidated"...)."""
    text = str(error).lower()
    return "captur" in text and ("not permitted" in text or "invalidated" in text or "during capture" in text
                                 or "unsupported" in text or "unjoined" in text)


def capture_compiled(capture: Callable[[], G], what: str, on_failure: Callable[[], None]) -> G | None:
    """capture(): the CUDA graph of a function the worker compiled, made where compiling is forbidden (the guards
    must hit). Its ``compiled`` set; None if it would compile again or its capture failed (said once, and
    on_failure() cleans up: the plain graph stays)."""
    try:
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            graph = capture()
    except Exception as error:  # noqa: BLE001 - the plain graph still works
        log.warning("%s: could not capture its compiled form (%s: %s); the plain graph stays",
                    what, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        log.debug("where the compiled capture failed", exc_info=error)
        on_failure()
        return None
    graph.compiled = True
    log.info("%s: the compiled form is in use", what)
    return graph


def compile_fixed(fn: Callable) -> Callable:
    """torch.compile for fixed shapes (the engine's graphs never change shape within a key)."""
    return torch.compile(fn, dynamic=False)


class _CompiledOnFirstCall:
    """compile_fn(fn), made when first called (by whichever thread comes first) and used from then on."""

    def __init__(self, compile_fn: Callable[[Callable], Callable], fn: Callable):
        self._compile_fn, self._fn = compile_fn, fn
        self._compiled: Callable | None = None
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            with self._lock:
                if self._compiled is None:
                    self._compiled = self._compile_fn(self._fn)
        return self._compiled(*args, **kwargs)


@contextlib.contextmanager
def _counted():
    """A job running (:func:`compiling_now`)."""
    global _running
    with _running_lock:
        _running += 1
    try:
        yield
    finally:
        with _running_lock:
            _running -= 1


class BackgroundCompiler:
    """One worker thread that runs submitted compile jobs in order.

    compile_fn turns a function into its compiled form (:func:`compile_fixed`; tests pass their own)."""

    def __init__(self, device: torch.device, compile_fn: Callable[[Callable], Callable] = compile_fixed,
                 held: bool = False):
        self.device = torch.device(device)
        allow_compiles_beside_traces()  # the engine's thread runs compiled code while this worker compiles
        self._go = threading.Event()  # cleared while held: the worker waits before its first job
        if not held:
            self._go.set()
        self._compile_fn = compile_fn
        self._compiled: dict[str, Callable] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[Hashable] = set()
        self._ready: set[Hashable] = set()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        """The first compile that failed: nothing more is compiled (the plain graphs stay)."""
        self.seconds = 0.0
        """Time spent compiling so far."""

    @property
    def compile_fn(self) -> Callable[[Callable], Callable]:
        """What turns a function into its compiled form (torch.compile, or a models.avatar.precompiled store)."""
        return self._compile_fn

    def function(self, name: str, fn: Callable) -> Callable:
        """The compiled form of fn, made once per name: one cache of compiled code per function. It is made at its
        first call, on the worker: ``torch.compile`` imports dynamo and inductor (4-12 s), which on the engine's
        thread held a sender's first frame (first frame 11.7 s after the camera's on a fresh H200, 1.4 s without)."""
        if name not in self._compiled:
            self._compiled[name] = _CompiledOnFirstCall(self._compile_fn, fn)
        return self._compiled[name]

    def submit(self, key: Hashable, job: Callable[[], object], what: str) -> None:
        """Run job() (a call of a compiled function on inputs of its own) on the worker, once per key."""
        with self._lock:
            if self.failed is not None or key in self._pending or key in self._ready:
                return
            self._pending.add(key)
            self._idle.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="avatar-compile", daemon=True)
            self._thread.start()
        self._queue.put((key, job, what, 0))

    @property
    def held(self) -> bool:
        """Made held and not yet released: submitted jobs wait."""
        return not self._go.is_set()

    def release(self) -> None:
        """Let the worker start on what is queued (and on what comes later)."""
        self._go.set()

    def hold(self) -> None:
        """Let queued and later jobs wait until :meth:`release` (a job already running ends first)."""
        self._go.clear()

    def ready(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._ready

    def idle(self) -> bool:
        """No compile is queued or running."""
        return self._idle.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no compile is queued or running (releasing a held compiler first: waiting asks for the
        compiles); False if timeout seconds passed first."""
        self.release()
        return self._idle.wait(timeout)

    def _work(self) -> None:
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's current device: what the jobs' own streams start on
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        while True:
            key, job, what, attempt = self._queue.get()
            self._go.wait()
            t0 = time.perf_counter()
            switch = sys.getswitchinterval()
            again = False
            try:
                if self.failed is None:
                    # A compile holds Python's lock most of the time: hand it over more often, so that the threads
                    # serving frames wait less (a probe on an H200 beside a cached compile: 13-16 -> 19 frames/s of
                    # 30, p90 frame 131-136 -> 67-73 ms, the compile no slower).
                    sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
                    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
                            _counted():
                        job()
                    if stream is not None:
                        stream.synchronize()
                    dt = time.perf_counter() - t0
                    self.seconds += dt
                    log.info("avatar: compiled the %s (%.1f s)", what, dt)
                    with self._lock:
                        self._ready.add(key)
            except Exception as error:  # noqa: BLE001 - any compile failure: the plain graphs stay, said once
                if clashed_with_a_capture(error) and attempt < CAPTURE_RETRIES:
                    log.info("avatar: the compile of the %s met a CUDA-graph capture; running it again", what)
                    again = True
                    time.sleep(0.5)
                    self._queue.put((key, job, what, attempt + 1))
                    continue
                self.failed = error
                log.warning("avatar: could not compile the %s (%s: %s); its plain CUDA graphs stay",
                            what, type(error).__name__, error)
                log.debug("where the compile failed", exc_info=error)
            finally:
                sys.setswitchinterval(switch)
                if not again:
                    with self._lock:
                        self._pending.discard(key)
                        if not self._pending:
                            self._idle.set()
