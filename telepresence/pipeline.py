"""The per-frame pipeline and its contract with the streaming code: face analysis ->
avatar -> renders at every viewer's pose -> ONE refiner call over all views.

Synchronous and network-free: telepresence.stream runs any :class:`FramePipeline`
on its worker threads and keeps only the newest frame and poses. This module owns
the output size (one check, one default per device).
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import cv2
import numpy as np
import torch

from models.geometry.camera import OrbitPose
from models.face.analysis import LEFT_IRIS, RIGHT_IRIS, FaceAnalyzer, FaceConfig, NoFaceError
from models.avatar.engine import graph_views
from models.avatar.precompiled import compile_fn_for
from models.face.smoothing import LandmarkSmoother
from models.pictures import to_uint8
from models.refiner import compile_views, refine_views

log = logging.getLogger(__name__)

__all__ = [
    "ViewPose", "PipelineConfig", "Analysis", "FrameResult", "FramePipeline", "Pipeline", "PipelineUnavailableError",
    "default_size", "open_pipeline", "STATUS_OK", "STATUS_FACE_LOST", "STATUS_NO_FACE_YET",
]

# One viewer's camera request is an orbit pose (yaw, pitch, dist_scale, ...).
ViewPose = OrbitPose

STATUS_OK = "ok"
STATUS_FACE_LOST = "face_lost"
STATUS_NO_FACE_YET = "no_face_yet"
SIZE_MIN, SIZE_MAX = 64, 2048


def default_size(device: str) -> int:
    """Views' side in pixels when none is asked for: 512 on CUDA, 256 on the CPU (4x fewer pixels)."""
    return 512 if str(device).startswith("cuda") else 256


COMPILE_AVATAR = ("background", "prefill", "wait", "off")
"""PipelineConfig.compile_avatar's choices."""


class PipelineUnavailableError(RuntimeError):
    """The pipeline could not be built (no CUDA, weights unreadable, a test double missing)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of :class:`Pipeline`."""

    device: str = "cpu"
    """Torch device for avatar, renders and refiner ("cpu", "cuda", "cuda:1")."""
    size: int | None = None
    """Views are size x size pixels, a multiple of 8 in [64, 2048]; None: default_size(device)."""
    refiner: str | None = "default"
    """Refiner weights folder, "default" (shipped weights) or None (raw avatar renders)."""
    background: str = "remove"
    """Avatar background: "remove" or "far"."""
    source_fov_deg: float = 30.0
    """Assumed vertical field of view of the capture camera."""
    crop_follow: float = 0.35
    """How fast the framing follows the head (0 = frozen, 1 = no smoothing)."""
    noise_level: float | None = None
    """Refiner noise level (None: the value the refiner was trained with)."""
    compile_refiner: bool = False
    """torch.compile the refiner's step (fused kernels: the SD-Turbo-size refiner's reference + 4 views took 21 ms
    compiled against 32 ms in CUDA graphs alone on an H200). Costs a compile for one and two views when the pipeline
    opens, before a sender joins a room (about 80 s each for that U-Net, 35 + 52 s for the small refiner on an H200;
    seconds once inductor's cache holds them); off by default so that a start takes seconds."""
    compile_avatar: str = "prefill"
    """On CUDA, torch.compile the avatar's build and render graphs (models.avatar.compiling): a build + 4 views at 512
    in 1.3 ms instead of 5.4 ms on an H200. "prefill" (the default since the eleventh session): once the first frame
    is out, a child process compiles the same graphs (models.avatar.prefill), filling inductor's disk cache while the
    plain graphs serve at the camera's pace, then the worker compiles from that cache and swaps them in (a fresh
    H200, 4 views at 512: 29.6 fps throughout, the compiled graphs in use 4.3 minutes in;
    benchmarks/results/first_frame_cuda_512_prefill.json). "background": compiled on this process's worker
    thread while the plain graphs serve (2-6 minutes the first time on a machine, the frames slowed to 3-13 fps
    meanwhile by the compile's hold on Python's lock; about 10 s once inductor's cache on disk holds them).
    "wait": compiled at the first frame with a face, before it is served (benchmarks: they time the compiled path
    from their first frame). "off": the plain graphs. No effect on the CPU."""
    precompiled_avatar: bool | None = None
    """With compile_avatar: keep the avatar's compiled functions whole on disk (models.avatar.precompiled, beside
    inductor's cache) and load them at later starts instead of tracing them again. None (the default): on wherever
    the avatar compiles (CUDA); True asks for it (a warning where nothing compiles); False: off. Measured on H200s
    (4 viewers at 512, benchmarks/results/): at a start with warm caches (--compile-avatar background) the traced
    compile held the frames to 13.1 and 17.4 fps for the first 50 s, still compiling at the end; loaded, 24.4-25.7,
    29.1-30.0 and 30.0 fps in three 15 s cases, p50 67-69 ms (loopback_cuda_512_cachestart_*.json). The first start
    on a fresh machine (the default --compile-avatar prefill, whose child compiles whole and saves): the sender loaded
    all six functions in 5 s, the compiled graphs in use 230 s in, 29.1-29.9 fps throughout
    (first_frame_cuda_512_prefill_precompiled.json; another loan 290 s and 23-27 fps while the child compiled,
    _loan1.json); the plain prefill's 258 s and 27.9-29.6 fps."""
    memory: bool = True
    """Appearance memory (models.avatar.memory): what the camera saw of the person earlier in the call
    fills what the current frame sees badly (the sides of the head when turned). On by default: on the shared
    head-turn clips it gains 0.86-0.96 dB head PSNR at 10-45 degrees, with no clip below -0.01 dB at 0-20 and a
    lower identity distance from 10 degrees; the GPU sender serves 4 viewers at 512 at 30 fps with it
    (benchmarks/results/loopback_cuda_512_memory.json, p50 68 ms), the CPU costs 4-8 ms a frame
    at 256 (docs/memory.md). send --no-memory: every frame's avatar from that frame alone."""
    cpu_threads: int | None = None
    """Host threads of torch (and on a GPU of OpenCV) in this pipeline's process. None: on "cpu" one less
    than the machine's cores (at least 1): face analysis and the video encoder run beside the avatar work, and on
    2 cores two torch threads stall on each other's barriers whenever one core is busy with them (the
    demo on this project's 2-core machine: 4.9 fps with 2 threads, 7.9 with 1; benchmarks/loopback.py).
    On a GPU 2 (fewer if the machine has fewer cores): the avatar and refiner run on the device, the host
    threads only launch them and do small work, and the call runs one pipeline process per participant:
    each library's default of a thread per core made 4 processes spin 4 x 16 threads on 16 cores (the
    H200 call at 512: 10 fps each with the defaults, 27.7 with 2 threads, 30 with MPS too; docs/call.md)."""
    smooth_landmarks: bool = True
    """Smooth the face's landmarks over frames (models.face.smoothing.LandmarkSmoother): the avatar's head stops
    wobbling at rest (the orbit views' flicker 7 % lower) for about one frame of lag in the mouth's opening.
    Head tracking reads the eyes before it (it smooths them itself)."""
    warm_views: int = 4
    """On CUDA, capture the render and refiner graphs for 1..warm_views views on the first
    frame with a face (about 0.4 s each), so a viewer joining later does not stall the others."""

    def __post_init__(self) -> None:
        if self.size is None:
            object.__setattr__(self, "size", default_size(self.device))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not SIZE_MIN <= self.size <= SIZE_MAX \
                or self.size % 8:
            raise ValueError(f"size: expected a multiple of 8 in [{SIZE_MIN}, {SIZE_MAX}], got {self.size}")
        if not 0.0 < self.crop_follow <= 1.0:
            raise ValueError(f"expected crop_follow in (0, 1], got {self.crop_follow}")
        if self.compile_avatar not in COMPILE_AVATAR:
            raise ValueError(f"compile_avatar: expected one of {COMPILE_AVATAR}, got {self.compile_avatar!r}")
        if self.warm_views < 0:
            raise ValueError(f"expected warm_views >= 0, got {self.warm_views}")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or not isinstance(self.cpu_threads, int)
                                             or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads: expected a whole number >= 1 or None, got {self.cpu_threads!r}")


@dataclass(frozen=True)
class Analysis:
    """Face analysis of one frame, made by :meth:`Pipeline.analyze` (possibly on another thread)."""

    observation: object | None  # models.face.analysis.FaceObservation, None: no face in the frame
    landmarks_ms: float
    eyes_m: np.ndarray | None = None  # [3] midpoint of the irises in the capture camera's frame, metres (head tracking)
    avatar: object | None = None  # CPU: this frame's models.avatar.Avatar, built where the analysis ran
    avatar_ms: float = 0.0


@dataclass
class FrameResult:
    views: list[np.ndarray]  # one RGB uint8 [S, S, 3] per requested pose, same order
    face_found: bool  # False: this frame had no face (views come from the last good avatar)
    status: str  # STATUS_OK | STATUS_FACE_LOST | STATUS_NO_FACE_YET
    timings_ms: dict[str, float] = field(default_factory=dict)  # landmarks, avatar, render, refine
    memory_fill: float | None = None  # share of the head the appearance memory holds, None: memory off
    kernels: str | None = None  # the avatar's GPU kernels: "compiling" | "compiled" | "failed" | "off"; None: the CPU
    fresh: bool = False  # the views are new arrays nobody else holds: the caller may write into them


@runtime_checkable
class FramePipeline(Protocol):
    """What the streaming code runs (telepresence.stream.renderloop): :class:`Pipeline`, or a test double.

    analyze() may run on its own thread, one frame ahead of process() (CPU work overlapping device work).
    """

    size: int
    """Side of every view, pixels."""
    device: torch.device | str
    """Where the views are computed (viewers are told its kind: why `size` is what it is)."""
    refiner_name: str | None
    """What refines the views (shown to viewers), None: raw avatar renders."""

    def analyze(self, frame_rgb: np.ndarray, t_s: float | None = None) -> Analysis:
        """Face analysis of one frame: RGB uint8 [H, W, 3], captured at t_s seconds (None: now)."""

    def process(self, frame_rgb: np.ndarray, poses: Sequence[OrbitPose], analysis: Analysis | None = None) -> FrameResult:
        """One RGB uint8 [size, size, 3] view of the frame's person per pose."""

    def close(self) -> None:
        """Free what the pipeline holds (threads, device memory)."""


def open_pipeline(config: PipelineConfig, factory: str | None = None) -> FramePipeline:
    """Pipeline(config); or, for tests and for benchmarks of the streaming path alone, the pipeline
    made by ``factory`` ("module:function", called with the config)."""
    if factory is None:
        try:
            return Pipeline(config)
        except (RuntimeError, OSError, ValueError) as error:
            raise PipelineUnavailableError(str(error)) from error
    module_name, _, function = factory.partition(":")
    try:
        make = getattr(importlib.import_module(module_name), function or "build_pipeline")
    except (ImportError, AttributeError) as error:
        raise PipelineUnavailableError(f"cannot load the pipeline factory {factory!r}: {error}") from error
    return make(config)


class Pipeline:
    """One sender's models, prepared once; ``process`` is the per-frame hot path."""

    def __init__(self, config: PipelineConfig = PipelineConfig()):
        from models.avatar import AvatarConfig
        from models.avatar.engine import AvatarEngine
        from models.refiner.shipped import load_refiner

        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {config.device!r} asked for, but CUDA is not available")
        if self.device.type == "cuda" and self.device.index is not None:
            if self.device.index >= torch.cuda.device_count():
                raise RuntimeError(f"device {config.device!r} asked for, but this machine has "
                                   f"{torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(self.device)  # CUDA graphs capture, and streams start, on the current device:
            # this thread's; process() and render() make it current on theirs (a sender calls them from its own)
        _set_host_threads(config.cpu_threads, self.device.type)
        if self.device.type == "cuda":  # the refiner's convolutions: cuDNN times its algorithms once per shape, keeps the fastest
            torch.backends.cudnn.benchmark = True
        self.analyzer = FaceAnalyzer(FaceConfig(static_image=False, fov_deg=config.source_fov_deg))
        self.avatar_config = AvatarConfig(background=config.background)
        # On CUDA the avatar build and render replay CUDA graphs (models.avatar.engine).
        compile_avatar = config.compile_avatar != "off" and self.device.type == "cuda"
        # The compiles are held until the first frame's captures are done: in the background until that frame is out
        # (its captures first, at full speed); with a prefill, until the child process has compiled the same graphs
        # (models.avatar.prefill); with "wait", until every warmed view count is captured (_compile_now). A capture
        # that meets the worker's CUDA work fails, and its frame runs eagerly and captures no render, so asks for no
        # render's compile: unheld, a GPU loopback's "wait" compiled the build alone and the renders while measured.
        self._precompiled = compile_avatar and config.precompiled_avatar is not False  # None: on where it compiles
        self.engine = AvatarEngine(self.avatar_config, self.device, config.size, compile=compile_avatar,
                                   compile_held=compile_avatar, compile_fn=compile_fn_for(self._precompiled))
        if config.precompiled_avatar and not compile_avatar:  # asked for, where nothing compiles
            log.warning("avatar: --precompiled-avatar has no effect here: %s", "nothing compiles on the CPU"
                        if self.device.type != "cuda" else "--compile-avatar off")
        self._compile_first = compile_avatar and config.compile_avatar == "wait"  # compile at the first face
        if compile_avatar:
            log.info("avatar: its CUDA graphs get compiled %s (torch.compile: 2-6 minutes the first time on this "
                     "machine, about 40 s of it for each viewer count, seconds once cached; --compile-avatar off: the "
                     "plain graphs only)",
                     {"background": "in the background once the first frame with a face is out, the plain graphs "
                                    "serving meanwhile",
                      "prefill": "in a child process first (it fills inductor's disk cache while the plain graphs "
                                 "serve), then here from that cache",
                      "wait": "at the first frame with a face, before it is served"}[config.compile_avatar])
        self.refiner = load_refiner(config.refiner, self.device, cuda_graphs=True, compile=config.compile_refiner)
        if self.refiner is not None and config.compile_refiner:
            self._compile_refiner_now()
        elif config.compile_refiner:  # asked for, with nothing to compile: said, as --precompiled-avatar's is
            log.warning("refiner: --compile-refiner has no effect here: %s", "--refiner none (raw avatar renders)"
                        if config.refiner is None else "no refiner weights loaded (raw avatar renders)")
        self.size: int = config.size
        self.refiner_name: str | None = None if self.refiner is None else str(config.refiner)
        self._avatar = None
        self._reference: torch.Tensor | None = None  # the refiner's reference view of the current avatar
        self._warm = self.device.type != "cuda" or config.warm_views == 0  # graphs to capture ahead?
        self._crop: np.ndarray | None = None
        self._prefill_mode = compile_avatar and config.compile_avatar == "prefill"
        self._prefill_asked = self._prefill_mode  # the first child: at the first frame with a face
        self._prefill = None  # models.avatar.prefill.CachePrefill while its child runs
        self._prefilled: set[int] = set()  # view counts a child has compiled (or compiles now)
        self._prefill_wanted: set[int] = set()  # view counts served since, waiting for a child of their own
        self.memory = _open_memory(config, self.device)
        if self.memory is not None:  # its update compiles on the avatar's worker (None: no compiling)
            self.memory.compiler = self.engine.compiler
        self._smoother = LandmarkSmoother() if config.smooth_landmarks else None
        self._reset_memory = False  # asked by a viewer (any thread); done by the next process()

    def reset_memory(self) -> None:
        """Forget what the appearance memory has seen (a viewer's reset button): done on the worker's
        thread at the start of the next :meth:`process` (any thread may call this). No memory: nothing."""
        self._reset_memory = self.memory is not None

    def close(self) -> None:
        if self._prefill is not None:
            self._prefill.stop()
        self.analyzer.close()

    def _make_current(self) -> None:
        """On a numbered GPU (cuda:N), make it this thread's current device: CUDA graphs capture, and streams start,
        on the current device, and each host thread has its own (the sender's worker is not the thread that made
        the pipeline)."""
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _follow(self, crop: tuple[float, float, float]) -> tuple[float, float, float]:
        """Smooth the framing over time: the head may move, the picture should not jitter."""
        new = np.array(crop, np.float64)
        if self._crop is None or abs(new[2] / self._crop[2] - 1) > 0.5:
            self._crop = new
        else:
            a = self.config.crop_follow
            self._crop = (1 - a) * self._crop + a * new
        return tuple(float(v) for v in self._crop)

    def analyze(self, frame_rgb: np.ndarray, t_s: float | None = None) -> Analysis:
        """Landmarks, pose and mask of the frame captured at t_s seconds (None: now; the landmarks' smoothing
        over frames goes by it); on the CPU, the frame's avatar too. Safe to run
        on a thread of its own, one frame ahead of :meth:`process`, so analysis overlaps the
        device work. On the CPU the build runs here as well: the render of one frame and the
        build of the next then keep both of two cores busy (the worker alone used to do
        build + render while this thread waited for the next frame)."""
        t0 = time.perf_counter()
        try:
            obs = self.analyzer.analyze(frame_rgb)
        except NoFaceError:
            obs = None
        eyes = None if obs is None else obs.points_cam[[RIGHT_IRIS, LEFT_IRIS]].mean(axis=0)
        if obs is not None and self._smoother is not None:  # the analysis thread's frames come in capture order
            obs = self._smoother(time.time() if t_s is None else t_s, obs)
        landmarks_ms = (time.perf_counter() - t0) * 1000.0
        if obs is None or self.device.type != "cpu":
            return Analysis(obs, landmarks_ms, eyes)
        t0 = time.perf_counter()
        avatar = self._build(frame_rgb, obs)
        return Analysis(obs, landmarks_ms, eyes, avatar, (time.perf_counter() - t0) * 1000.0)

    def _build(self, frame_rgb: np.ndarray, obs):
        """This frame's avatar (the framing follows the head smoothly). On the CPU the eager build
        keeps no state in the engine, so it may run beside a render of the previous avatar."""
        from models.avatar import build_avatar, crop_box

        crop = self._follow(crop_box(obs, self.avatar_config))
        if self.device.type == "cpu":
            return build_avatar(frame_rgb, obs, self.avatar_config, self.device, crop=crop, render_size=self.config.size)
        return self.engine.build(frame_rgb, obs, crop=crop)

    def process(
        self, frame_rgb: np.ndarray, poses: Sequence[OrbitPose], analysis: Analysis | None = None
    ) -> FrameResult:
        """Views of the person in ``frame_rgb`` (RGB uint8 [H, W, 3]) at every pose.
        analysis: this frame's :meth:`analyze` result if already made (else made here)."""
        timings: dict[str, float] = {}
        self._make_current()
        if analysis is None:
            analysis = self.analyze(frame_rgb)
        if self._reset_memory:
            self._reset_memory = False
            self.memory.reset()
            log.info("appearance memory reset (asked by a viewer)")
        obs, found = analysis.observation, analysis.observation is not None
        timings["landmarks"] = analysis.landmarks_ms
        if found:
            t0 = time.perf_counter()
            if analysis.avatar is not None:  # built with the analysis (CPU)
                self._avatar = self.engine.avatar = analysis.avatar
            else:
                self._avatar = self._build(frame_rgb, obs)
            if self.memory is not None:  # the engine renders the avatar with the memory attached
                # its update a graph beside the engine's (not after a fallback, nor for an avatar built eagerly)
                self.memory.cuda_graphs = self.engine.cuda_graphs and not self.engine.eager_frame
                self._avatar = self.engine.avatar = self.memory.observe(self._avatar, frame_rgb, obs)
            if self._compile_first:
                self._avatar = self._compile_now(frame_rgb, obs)
            self._reference = None
            self._sync()
            timings["avatar"] = analysis.avatar_ms + (time.perf_counter() - t0) * 1000.0
            if not self._warm:
                self._warm_up()
        elif self.memory is not None:
            self.memory.missed()
        status = STATUS_OK if found else (STATUS_FACE_LOST if self._avatar is not None else STATUS_NO_FACE_YET)
        if not poses:
            return FrameResult([], found, status, timings, fresh=True, kernels=self.kernels())
        if self._avatar is None:
            blank = np.full((self.config.size, self.config.size, 3), 128, np.uint8)
            return FrameResult([blank.copy() for _ in poses], found, status, timings, fresh=True, kernels=self.kernels())
        if self._prefill_mode and not self._prefill_asked:
            self._hold_for_prefill(graph_views(len(poses)))  # the view count whose graph serves them
        views = self.render(poses, timings)
        if found and self._prefill_asked:
            self._prefill_asked = False
            from models.avatar.prefill import view_counts_to_prefill

            self._start_prefill(frame_rgb, obs, view_counts_to_prefill(self.config.warm_views, graph_views(len(poses))))
            log.info("avatar: the first frame is out; a child process compiles its kernels for %s view(s) into "
                     "inductor's disk cache (the frames keep their pace), then this process compiles from there",
                     ", ".join(map(str, self._prefill.job.view_counts)))
        elif self._prefill_mode and not self._prefill_asked:
            self._next_prefill(frame_rgb, obs)
        elif found and self.engine.release_compiles():
            log.info("avatar: the first frame is out; its background compile starts")
        fill = None if self.memory is None else float(self.memory.fill_fraction())  # the views are read: no wait
        return FrameResult(views, found, status, timings, fill, fresh=True, kernels=self.kernels())

    def _start_prefill(self, frame_rgb: np.ndarray, obs, view_counts: tuple[int, ...]) -> None:
        """compile_avatar "prefill": a child process compiles this frame's graphs for these view counts (the same
        framing, raster capacities and memory), filling inductor's disk cache; the compiler here stays held until
        it has ended."""
        from models.avatar.memory import MemoryConfig
        from models.avatar.prefill import CachePrefill, PrefillJob

        job = PrefillJob(self.avatar_config, str(self.device), self.config.size, np.ascontiguousarray(frame_rgb), obs,
                         tuple(float(v) for v in self._crop), view_counts,
                         None if self.memory is None else MemoryConfig.for_sender(self.config.size, self.device),
                         capacities=self.engine.capacities(),
                         precompiled=self._precompiled, host_threads=torch.get_num_threads())
        self._prefill = CachePrefill(job).start()
        self._prefilled |= set(view_counts)
        self._prefill_wanted -= set(view_counts)

    def _hold_for_prefill(self, n_views: int) -> None:
        """Before a render: a view count no child has compiled yet (a viewer more than the warmed counts) waits for
        a child of its own instead of compiling cold here, where a compile holds Python's lock for tens of seconds
        (a fifth viewer in the H200 soak: 3-5 frames a second for a minute)."""
        if n_views and n_views not in self._prefilled and n_views not in self._prefill_wanted:
            if self.engine.hold_compiles():
                self._prefill_wanted.add(n_views)
            else:  # nothing compiles here any more (failed or fell back): nothing to prefill
                self._prefill_mode = False

    def _next_prefill(self, frame_rgb: np.ndarray, obs) -> None:
        """After a render: note a child's end, start one for the view counts waiting (at a frame with a face), or,
        with none left, let this process compile from the disk cache."""
        if self._prefill is not None:
            if not self._prefill.finished():
                return
            prefill, self._prefill = self._prefill, None
            if not prefill.ok:
                log.warning("avatar: the child process's compile ended with exit status %s after %.0f s (its log is "
                            "above); compiling here from scratch, the frames slower meanwhile", prefill.exitcode,
                            prefill.seconds)
                self._prefill_mode = False
                self._prefill_wanted.clear()
                self.engine.release_compiles()
                return
            log.info("avatar: the child process compiled the kernels for %s view(s) in %.0f s",
                     ", ".join(map(str, prefill.job.view_counts)), prefill.seconds)
        if self._prefill_wanted:
            if obs is not None:
                self._start_prefill(frame_rgb, obs, tuple(sorted(self._prefill_wanted)))
                log.info("avatar: the render graph of %s view(s) is not compiled yet: a child process compiles it first "
                         "(the frames keep their pace on the plain graphs)", ", ".join(map(str, self._prefill.job.view_counts)))
        elif self.engine.release_compiles():
            log.info("avatar: compiling here from the disk cache")

    def kernels(self) -> str | None:
        """Where the avatar's torch.compile stands, for viewers ("compiling": frames are slower until it is done;
        "failed": the plain graphs, the log says why; "off"); None on the CPU."""
        if self.device.type != "cuda":
            return None
        state = self.engine.compile_state
        return None if state == "waiting" else "compiling" if state == "swapping" else state

    def precompiled_events(self) -> list[dict] | None:
        """With --precompiled-avatar: what the store did so far (models.avatar.precompiled.PrecompiledStore.events:
        each function loaded, compiled whole and saved, or compiled the usual way); None without a store."""
        compiler = self.engine.compiler
        return None if compiler is None else getattr(compiler.compile_fn, "events", None)

    def _compile_now(self, frame_rgb: np.ndarray, obs):
        """compile_avatar "wait": render the view counts a sender warms (their compiles asked for with the
        build's), wait for the compiles, and build this frame again, now through the compiled graphs."""
        self._compile_first = False
        t0 = time.perf_counter()
        for n in range(1, max(1, self.config.warm_views) + 1):
            self.engine.render([OrbitPose()] * n)
        log.info("avatar: compiling its CUDA graphs before the first frame is served ...")
        if not self.engine.wait_compiled(timeout=1800):
            log.warning("avatar: its compile took more than 30 minutes; serving with the plain graphs meanwhile")
        avatar = self._build(frame_rgb, obs)
        if self.memory is not None:  # what it holds is this frame's already
            avatar = self.engine.avatar = self.memory.attach(avatar)
        for n in range(1, max(1, self.config.warm_views) + 1):
            self.engine.render([OrbitPose()] * n)
        log.info("avatar: graphs %s (%.0f s)", self.engine.compile_state, time.perf_counter() - t0)
        return avatar

    def _compile_refiner_now(self) -> None:
        """compile_refiner: compile the refiner's step for 1 and 2 views (the view count symbolic from the second:
        models.refiner.shipped) now, before the sender joins a room. Compiled at the first frame instead, in front
        of viewers, the compile's hold on Python's lock starved the event loop: a cold compile of the small refiner
        (87 s on an H200) dropped 30 of 32 viewers of a loopback for "no heartbeat". A later view count is a CUDA
        graph's capture (0.3-0.4 s there)."""
        t0 = time.perf_counter()
        log.info("refiner: compiling its step for 1 and 2 views before going live (torch.compile: about 90 s for the "
                 "small refiner on an H200, minutes for an SD-Turbo-size U-Net, seconds once inductor's cache holds it)")
        compile_views(self.refiner, self.config.size, (1, 2), self.config.noise_level)
        log.info("refiner: compiled in %.0f s", time.perf_counter() - t0)

    def _warm_up(self) -> None:
        """Capture the graphs of every view count up to warm_views now, while nobody waits
        on a second viewer (a first render at a new view count captures them otherwise)."""
        t0 = time.perf_counter()
        for n in range(1, self.config.warm_views + 1):
            self.render([OrbitPose()] * n)
        self._warm = True
        log.info("CUDA graphs ready for 1-%d views (%.1f s)", self.config.warm_views, time.perf_counter() - t0)

    @torch.no_grad()
    def render(self, poses: Sequence[OrbitPose], timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """Render (and refine) the current avatar at ``poses``: RGB uint8 [S, S, 3] each."""
        self._make_current()
        timings = {} if timings is None else timings
        size = self.config.size
        t0 = time.perf_counter()
        out = self.engine.render(list(poses))
        self._sync()
        timings["render"] = (time.perf_counter() - t0) * 1000.0
        views = out.rgb
        if self.refiner is not None:
            t0 = time.perf_counter()
            if self._reference is None:
                self._reference = self._avatar.source_view(size)[None]
            views = refine_views(self.refiner, self._reference, out.rgb[None], out.seen[None], self.config.noise_level)[0]
            self._sync()
            timings["refine"] = (time.perf_counter() - t0) * 1000.0
        # Channels last on the device (written so by the conversion to bytes: one kernel on a GPU), so that each
        # view the tracks take is C-contiguous as it comes: no copy a view a frame on the host.
        V, C, S, W = views.shape
        pictures = torch.empty((V, S, W, C), dtype=torch.uint8, device=views.device)
        to_uint8(views, out=pictures.permute(0, 3, 1, 2))  # [V, 3, S, S] written into the channels-last bytes
        if pictures.device.type == "cuda":  # into page-locked memory (torch's cache of it: a block comes back once the
            # frame's pictures are freed): 32 views at 512 in 0.48 ms instead of 1.99 from pageable memory, 4 in 0.08
            # instead of 0.30 (an H200 host, alone); in the sender at 32 viewers that copy held 12 % of its thread
            host = torch.empty(pictures.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pictures)
            pictures = host
        return list(pictures.cpu().numpy())


def cpu_threads(asked: int | None, device: str = "cpu") -> int:
    """Host threads for a pipeline on `device` (PipelineConfig.cpu_threads): ``asked``; else on the CPU the
    cores less one for analysis and encoding, on a GPU 2 (its work is on the device)."""
    import os

    if asked is not None:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # taskset, cgroups
    spare = max(1, (cores or 1) - 1)
    return spare if device == "cpu" else min(2, spare)


def _set_host_threads(asked: int | None, device: str) -> None:
    """Torch's thread pool for this process, and on a GPU OpenCV's (both default to one thread a core)."""
    threads = cpu_threads(asked, device)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if device == "cpu":  # OpenCV keeps its default: at 1 thread face analysis took 1.5 ms more (CPU demo, A/B)
        log.info("CPU: torch runs the avatar on %d thread%s%s", threads, "" if threads == 1 else "s",
                 "" if asked is not None else " (the cores less one: face analysis and the video encoder run beside "
                 "it; --threads N to change)")
    else:
        cv2.setNumThreads(threads)
        log.info("%s: torch and OpenCV use %d host thread%s in this process%s", device.upper(), threads,
                 "" if threads == 1 else "s", "" if asked is not None else
                 " (the work is on the device; a thread a core in each participant's process starved the call; "
                 "--threads N to change)")


def _open_memory(config: PipelineConfig, device: torch.device):
    """The sender's appearance memory (None with config.memory off); the log says which. The identity
    check (a new person resets it) uses dlib's descriptor every few seconds when dlib is installed."""
    if not config.memory:
        log.info("appearance memory: off (--no-memory)")
        return None
    from models.avatar.memory import AppearanceMemory, MemoryConfig
    from models.face.identity import IdentityEmbedder

    embedder = IdentityEmbedder.optional()

    def identity(image: np.ndarray, obs) -> np.ndarray | None:
        try:
            return embedder.embed(image, obs.landmarks_px)
        except (NoFaceError, RuntimeError):
            return None

    memory_config = MemoryConfig.for_sender(config.size, device)
    log.info("appearance memory: on (%d texels a side for the face, updated every %s; resets after %.0f s "
             "without a face%s)", memory_config.texels,
             "frame" if memory_config.update_every == 1 else f"{memory_config.update_every} frames",
             memory_config.lost_after_s,
             "" if embedder is not None else "; no identity check: dlib is not installed")
    return AppearanceMemory(memory_config, device, identity if embedder is not None else None)
