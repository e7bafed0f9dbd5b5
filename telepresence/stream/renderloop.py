"""The sender's frame loop: capture thread -> one pipeline worker -> one sink per view.

    capture thread --LatestSlot--> [analysis thread: pipeline.analyze(frame), when the pipeline has it;
                                    just_in_time: only when the worker will want it]
      --LatestSlot--> worker: pipeline.process(frame, newest pose of every view)
                                          -> sink(view) for each view (the tracks)

Newest wins at every hop: the worker takes only the newest captured frame
and renders it at each view's newest pose, with ONE pipeline call for all
views (one refiner batch); poses are overwritten, never queued. No asyncio
here: sinks are called on the worker thread and must hand off themselves
(ViewTrack.deliver does, with call_soon_threadsafe).

The pipeline is duck-typed (telepresence.pipeline.Pipeline or a test double):
`process(frame_rgb [H, W, 3] uint8, poses) -> result` with `result.views`
(one [S, S, 3] uint8 RGB image per pose), `result.status` ("ok" |
"face_lost" | "no_face_yet") and `result.timings_ms` (stage -> ms).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional

import numpy as np

from .capture import CapturedFrame, CaptureThread, FrameSource
from .framecode import capture_stamp, draw_frame_code
from .slot import LatestSlot, SlotClosedError

logger = logging.getLogger(__name__)

PIPELINE_STAGES = ("landmarks", "avatar", "render", "refine")
"""The pipeline's own stages, as named in result.timings_ms."""
STATUS_STARTING = "starting"
STATUS_ERROR = "error"
STATUS_SOURCE_ERROR = "source_error"
"""The capture source stopped (gone, or frames the pipeline cannot use): viewers are told, the sender stays."""
MAX_PACING_WAIT_S = 0.5
"""just_in_time: the longest the analysis thread waits for the worker before analysing the next frame."""


@dataclass(frozen=True)
class RenderedView:
    """One view of one captured frame, ready for a track."""

    image: np.ndarray = field(repr=False)
    """[S, S, 3] uint8 RGB, C-contiguous."""
    frame_id: int
    t_capture: float
    """Wall-clock capture time of the source frame, seconds."""
    status: str


class StageClock:
    """Per-stage milliseconds of the last `window_s` seconds; thread-safe."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._records: collections.deque[tuple[float, dict[str, float]]] = collections.deque()
        self._lock = threading.Lock()
        self._last: Optional[dict[str, float]] = None

    def record(self, stages_ms: dict[str, float]) -> None:
        now = time.monotonic()
        with self._lock:
            self._records.append((now, stages_ms))
            self._last = stages_ms
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._records and self._records[0][0] < now - self.window_s:
            self._records.popleft()

    def summary(self) -> tuple[float, dict[str, float]]:
        """(records per second, mean ms per stage) over the window."""
        with self._lock:
            self._trim(time.monotonic())
            records = [stages for _, stages in self._records]
            last = self._last
        rate = len(records) / self.window_s
        # A pipeline slower than the window still reports its latest stage times.
        records = records or ([last] if last is not None else [])
        means: dict[str, float] = {}
        for name in {key for stages in records for key in stages}:
            values = [stages[name] for stages in records if name in stages]
            means[name] = sum(values) / len(values)
        return rate, means


class RenderLoop:
    """Owns the capture thread and the pipeline worker thread."""

    def __init__(
        self,
        source: FrameSource,
        pipeline: Any,
        *,
        stamp_frames: bool = False,
        on_status: Optional[Callable[[str], None]] = None,
        on_analysis: Optional[Callable[[CapturedFrame, Any], None]] = None,
        just_in_time: bool = False,
    ) -> None:
        """on_analysis(frame, analysis): called on the analysis thread with every frame's analysis, even
        while nobody watches (a call's head tracking, telepresence.stream.call).
        just_in_time: analyse a frame only when the worker will want it (after the worker took the last
        analysis, about one analysis before it is done with that frame, from the recent durations of
        both), not every captured frame: when the pipeline is slower than the camera, the analyses of
        frames that are never rendered cost CPU the pipeline needs (a call on a CPU machine: as much
        as the avatar, docs/call.md); the frame rendered is as fresh."""
        self.pipeline = pipeline
        self.stamp_frames = stamp_frames
        self.on_status = on_status
        self.on_analysis = on_analysis
        self.just_in_time = just_in_time
        self._analysis_s = RecentDurations()  # of an analysis and of a pipeline call (just_in_time's pacing)
        self._process_s = RecentDurations(skip_first=True)  # the first call warms up (CUDA graphs: seconds)
        self.frames: LatestSlot[CapturedFrame] = LatestSlot()
        self.capture = CaptureThread(source, self.frames, on_error=lambda error: self._set_status(STATUS_SOURCE_ERROR))
        # A pipeline that can analyse frames on its own (CPU face analysis) gets an
        # analysis thread between capture and the worker: frame k+1 is analysed while
        # frame k is on the device. Newest frame wins at both hand-offs.
        self._analyzed: LatestSlot[tuple[CapturedFrame, Any]] | None = None
        self._analysis_thread: threading.Thread | None = None
        if callable(getattr(pipeline, "analyze", None)):
            self._analyzed = LatestSlot()
            self._analysis_thread = threading.Thread(target=self._analyse, name="analysis", daemon=True)
        self.clock = StageClock()
        self.status = STATUS_STARTING
        self.memory_fill: Optional[float] = None  # the newest frame's appearance-memory fill (None: memory off)
        self.kernels: Optional[str] = None  # the newest frame's FrameResult.kernels (the avatar's compile)
        self._views: dict[Hashable, tuple[Any, Callable[[RenderedView], None]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="pipeline", daemon=True)
        self._errors = 0
        self._analysis_errors = 0

    # -- views (any thread) --

    def add_view(self, view_id: Hashable, pose: Any, sink: Callable[[RenderedView], None]) -> None:
        """Render for `view_id` at `pose` from the next frame on, handing each result to `sink`."""
        with self._lock:
            self._views[view_id] = (pose, sink)

    def set_pose(self, view_id: Hashable, pose: Any) -> None:
        """Replace the view's pose; the next processed frame uses it. Unknown ids are ignored."""
        with self._lock:
            if view_id in self._views:
                self._views[view_id] = (pose, self._views[view_id][1])

    def remove_view(self, view_id: Hashable, sink: Optional[Callable[[RenderedView], None]] = None) -> None:
        """Stop rendering for `view_id` (only if it still feeds `sink`, when given: a view added again
        under the same id by someone else stays)."""
        with self._lock:
            if view_id in self._views and (sink is None or self._views[view_id][1] == sink):
                del self._views[view_id]

    @property
    def view_count(self) -> int:
        with self._lock:
            return len(self._views)

    # -- lifecycle --

    def start(self) -> None:
        self.capture.start()
        if self._analysis_thread is not None:
            self._analysis_thread.start()
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self.capture.stop()
        self.frames.close()
        if self._analyzed is not None:
            self._analyzed.close()
        for thread in (self._analysis_thread, self._worker):
            if thread is not None and thread.is_alive():
                thread.join(timeout=5.0)
        self.capture.source.close()

    # -- worker --

    def _set_status(self, status: str) -> None:
        if self.status == STATUS_SOURCE_ERROR:
            return  # final: no frame will come to change it
        if status != self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)

    def _analyse(self) -> None:
        version = 0
        while not self._stop.is_set():
            try:
                taken = self.frames.wait_newer(version, timeout=0.25)
            except SlotClosedError:
                return
            if taken is None:
                continue
            version, frame = taken
            if self.view_count == 0 and self.on_analysis is None:
                continue  # nobody watching: no work
            t0 = time.perf_counter()
            try:
                analysis = self.pipeline.analyze(frame.image, frame.t_capture)
            except Exception:
                self._analysis_errors += 1
                if self._analysis_errors == 1 or self._analysis_errors % 100 == 0:
                    logger.exception("face analysis failed on frame %d (%d failures so far)", frame.frame_id,
                                     self._analysis_errors)
                self._set_status(STATUS_ERROR)
                continue
            self._analysis_s.add(time.perf_counter() - t0)
            if self.on_analysis is not None:
                try:
                    self.on_analysis(frame, analysis)
                except Exception:
                    logger.exception("on_analysis failed on frame %d", frame.frame_id)
            try:
                put = self._analyzed.put((frame, analysis))
                if self.just_in_time:
                    self._wait_until_wanted(put)
            except SlotClosedError:
                return

    def _wait_until_wanted(self, version: int) -> None:
        """Until the worker has taken analysis `version`, then until about one analysis before it is done."""
        while not self._stop.is_set() and not self._analyzed.wait_taken(version, timeout=0.25):
            pass
        if self.view_count:  # nobody watching: the worker takes analyses without a pipeline call
            lead = self._process_s.typical() - self._analysis_s.typical()
            self._stop.wait(min(max(0.0, lead), MAX_PACING_WAIT_S))

    def _run(self) -> None:
        version = 0
        source = self._analyzed if self._analyzed is not None else self.frames
        while not self._stop.is_set():
            try:
                taken = source.wait_newer(version, timeout=0.25)
            except SlotClosedError:
                return
            if taken is None:
                continue
            version, item = taken
            frame, analysis = item if self._analyzed is not None else (item, None)
            with self._lock:
                views = list(self._views.values())
            if views:
                self._process(frame, [pose for pose, _ in views], [sink for _, sink in views], analysis)

    def _process(
        self, frame: CapturedFrame, poses: list[Any], sinks: list[Callable[[RenderedView], None]], analysis: Any = None
    ) -> None:
        t0 = time.perf_counter()
        try:
            if analysis is None:
                result = self.pipeline.process(frame.image, poses)
            else:
                result = self.pipeline.process(frame.image, poses, analysis=analysis)
            self._process_s.add(time.perf_counter() - t0)
            if len(result.views) != len(poses):
                raise RuntimeError(f"pipeline returned {len(result.views)} views for {len(poses)} poses")
            for image in result.views:
                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise RuntimeError(f"expected [S, S, 3] uint8 views, got {image.shape} {image.dtype}")
        except Exception:
            self._errors += 1
            if self._errors == 1 or self._errors % 100 == 0:
                logger.exception("pipeline failed on frame %d (%d failures so far)", frame.frame_id, self._errors)
            self._set_status(STATUS_ERROR)
            return
        self._set_status(result.status)
        self.memory_fill = getattr(result, "memory_fill", None)
        self.kernels = getattr(result, "kernels", None)
        stages = {"capture": frame.capture_ms}
        stages.update({k: float(v) for k, v in result.timings_ms.items()})
        self.clock.record(stages)
        stamp = capture_stamp(frame.t_capture)
        for image, sink in zip(result.views, sinks):
            if self.stamp_frames:
                if not (getattr(result, "fresh", False) and image.flags.writeable and image.flags.c_contiguous):
                    image = image.copy()  # never paint into an array the pipeline may keep
                draw_frame_code(image, stamp)  # else in place: a copy a view cost about 1 ms at 512 (16 viewers: 37 %
                # of the pipeline thread on an H200 host, benchmarks/loopback.py, a stack sampler)
            else:
                image = np.ascontiguousarray(image)
            sink(RenderedView(image, frame.frame_id, frame.t_capture, result.status))


class RecentDurations:
    """The typical duration of the last few runs of a step: their median, so that one slow run (a first
    call that captures CUDA graphs, a stall) does not set the pace of the next ones. One thread adds,
    another reads."""

    def __init__(self, keep: int = 9, skip_first: bool = False) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=keep)
        self._skip = skip_first
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            if self._skip:
                self._skip = False
                return
            self._recent.append(seconds)

    def typical(self) -> float:
        """Seconds; 0.0 before the first run counted."""
        with self._lock:
            recent = sorted(self._recent)
        return recent[len(recent) // 2] if recent else 0.0
