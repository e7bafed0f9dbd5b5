"""The per-frame avatar work of a sender, with fixed shapes: CUDA graphs on CUDA.

Eager torch spends most of a build + render on the host: about 1,400 small
kernel launches for 4 views at 512, while the GPU itself works for about
2.4 ms of it (torch profiler on an H100). With fixed shapes the build and the
render can each be captured once as a CUDA graph and replayed per frame, which
leaves the host a few numbers to prepare and two replays to launch.

Fixed shapes come from two changes against the eager path (same maths, same
pictures, see tests/models/avatar/test_engine.py):

- the rasterizer works through a fixed number of candidate pixels
  (``capacity``) and resolves every pixel instead of the covered ones, so it
  never asks the device how many there are;
- texture sizes come in powers of two of the picture size (``BuildPlan``), so they
  change only when the framing changes a lot; a new plan is a new capture.

Each replay reports how many raster candidates it needed. The render checks
both counts once its result is ready (the caller reads the pictures then
anyway); a frame that needed more than its capacity is captured again with
room to spare and redone, so no picture ever comes out with holes.

With ``compile=True`` each graph's function is also compiled with torch.compile on a worker
thread while the plain graph serves (models.avatar.compiling); once ready, the compiled
function is captured in its place: 1.27 ms instead of 5.35 ms for a build + 4 views at 512
on an H200 (docs/avatar.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

from models.avatar.build import build_on_device
from models.avatar.compiling import (
    CAPTURE_RETRIES,
    BackgroundCompiler,
    capture_compiled,
    clashed_with_a_capture,
    compile_fixed,
)
from models.avatar.plan import BuildInputs, BuildPlan, prepare_build
from models.avatar.render import render_cameras
from models.avatar.types import Avatar, AvatarConfig, RenderOutput
from models.geometry.camera import OrbitPose
from models.face.analysis import FaceObservation

log = logging.getLogger(__name__)

__all__ = ["AvatarEngine", "graph_views"]

# Raster room: the first frame of a shape is rasterized exactly, and the captured graph
# gets _HEADROOM times what it needed (new poses draw different amounts), at least
# these many candidates per pixel (the head is about a quarter of the source-depth map;
# a 4-view render needs about 2 per pixel, mostly for the card behind the head).
_HEADROOM = 1.4
_BUILD_PER_PIXEL = 0.25
_RENDER_PER_PIXEL = 1.5
_GROWTH = 1.5  # capacity after an overflow: this times what the frame needed
_ROUND = 1 << 16
# View counts up to this many get a render graph of their own; above it a render runs the graph of the next power
# of two (graph_views). Each graph is a capture and, compiled, a compile of tens of seconds: 16 viewers joining one by
# one asked for 16 of them, and the GPU loopback measured 10.8 fps each while the sender compiled the 5th to 16th
# counts on its own thread (H200, twenty-second session).
_EXACT_VIEWS = 4


def graph_views(n_views: int) -> int:
    """The view count of the render graph that serves ``n_views`` on the fixed-shape path: itself up to _EXACT_VIEWS,
    else the next power of two (5-8 -> 8, 9-16 -> 16, ...). The poses are padded with the last one and the extra views
    dropped: a render of up to twice the views asked, for ceil(log2(n / 4)) graphs above 4 views."""
    if n_views <= _EXACT_VIEWS:
        return n_views
    return 1 << (n_views - 1).bit_length()


class _Fallback(Exception):
    """A graph could not be set up: the engine now runs eagerly."""


class _Retry(Exception):
    """A capture met the background compile's CUDA work: this frame runs eagerly, the next captures again."""


def _round_up(n: float) -> int:
    """n rounded up to a rung of a ladder of 4 rungs an octave, in multiples of _ROUND. Raster capacities
    then recur across frames, people and runs; torch.compile specializes on them, so a restart finds its
    compiled graphs in inductor's cache on disk (at most 19 % more raster room than a plain rounding)."""
    n = max(int(math.ceil(n)), 1)
    k = math.ceil(4 * math.log2(max(n / _ROUND, 1.0)))
    while True:
        rung = -(-int(_ROUND * 2 ** (k / 4)) // _ROUND) * _ROUND
        if rung >= n:
            return rung
        k += 1


class _Graph:
    """fn(inputs) captured once as a CUDA graph; each call copies new inputs into the
    captured ones, replays, and returns the captured outputs (overwritten next call).
    capture=False runs fn eagerly on the same fixed inputs instead (CPU, tests)."""

    def __init__(self, fn: Callable[[dict], object], inputs: dict[str, torch.Tensor | None], capture: bool = True,
                 warmup: int = 2):
        self.inputs = {k: None if v is None else v.clone() for k, v in inputs.items()}
        self.fn, self.graph = fn, None
        self.compiled = False  # fn is a torch.compile'd function (AvatarEngine with compile=True)
        self.compile_key = None  # the key its compiled form goes by (AvatarEngine with compile=True)
        # Host-side inputs go through pinned buffers made once: a copy from pageable memory
        # waits for the device's queue, and pin_memory() per frame sometimes costs 1-4 ms
        # (a new page-locked allocation; measured on the H100 machine).
        self._staging: dict[str, torch.Tensor] = {}
        self._uploaded: torch.cuda.Event | None = None
        if not capture:
            self.out = fn(self.inputs)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # fills every lazily made constant before the capture
                fn(self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.inputs)
        self.graph.replay()  # a capture records the kernels without running them

    def __call__(self, inputs: dict[str, torch.Tensor | None]):
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous frame's uploads have left the pinned buffers
        for k, v in inputs.items():
            if v is None:
                continue
            if self.graph is not None and v.device.type == "cpu":
                if k not in self._staging:
                    self._staging[k] = torch.empty_like(self.inputs[k], device="cpu").pin_memory()
                # One memcpy on this thread, not torch's CPU copy: that splits a frame's picture over the intra-op
                # pool, whose threads wait on each other whenever any core is busy (8 ms a copy, 16 a build, while
                # inductor's compile workers started on an H200 with 16 threads: docs/avatar.md).
                np.copyto(self._staging[k].numpy(), v.numpy())
                v = self._staging[k]
            self.inputs[k].copy_(v, non_blocking=True)
        if self.graph is not None and self._staging:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        if self.graph is None:
            self.out = self.fn(self.inputs)
        else:
            self.graph.replay()
        return self.out


class AvatarEngine:
    """Builds the avatar of each new frame and renders it at the viewers' poses.

    On CUDA (``cuda_graphs``, the default there) both steps replay captured CUDA
    graphs: one per build plan (picture size, texture sizes) and one per view
    count. Elsewhere they run eagerly, exactly as :func:`models.avatar.build_avatar`
    and :func:`models.avatar.render_cameras`; ``fixed_shapes=True`` without graphs
    runs the graph path's fixed-shape maths eagerly (what the CPU tests check).

    The avatar and the render output of the graph path live in the graphs'
    buffers: the next build or render overwrites them. Copy what must outlive
    the frame. If a capture fails (an old driver, an operation a graph cannot
    hold), the engine says so once in the log and runs eagerly from then on.

    ``compile`` (fixed shapes only): torch.compile each graph's function in the background
    and capture it in place of the plain graph once ready (:attr:`compile_state` says where
    that stands; :meth:`wait_compiled` waits for it). ``compile_fn`` stands in for
    torch.compile in tests. ``compile_held``: the compiles wait for :meth:`release_compiles` (a sender's first
    frame goes out first; models.avatar.compiling).
    """

    def __init__(
        self,
        config: AvatarConfig = AvatarConfig(),
        device: str | torch.device = "cpu",
        render_size: int = 512,
        cuda_graphs: bool | None = None,
        fixed_shapes: bool | None = None,
        max_plans: int = 3,
        compile: bool = False,
        compile_fn: Callable[[Callable], Callable] = compile_fixed,
        compile_held: bool = False,
    ):
        self.config = config
        self.device = torch.device(device)
        self.render_size = render_size
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"expected a CUDA device for cuda_graphs, got {self.device}")
        self.fixed_shapes = self.cuda_graphs if fixed_shapes is None else (fixed_shapes or self.cuda_graphs)
        self.max_plans = max_plans
        if compile and not self.fixed_shapes:
            raise ValueError("compile needs the fixed-shape path (cuda_graphs or fixed_shapes)")
        self.compiler = BackgroundCompiler(self.device, compile_fn, held=compile_held) if compile else None
        self._compile_asked = compile
        self._swap_failed: set = set()  # keys whose compiled capture failed: their plain graph stays
        self._clashes = 0  # captures that met the background compile so far (CAPTURE_RETRIES are let go)
        self._eager_frame = False  # this frame's build ran eagerly after such a clash: so does its render
        self.avatar: Avatar | None = None
        self.captures = 0  # graphs captured so far (a steady stream captures a handful)
        self.fell_back = False  # a capture failed: eager from then on
        self._plan: BuildPlan | None = None
        self._inputs: BuildInputs | None = None
        self._builds: OrderedDict[BuildPlan, _Graph] = OrderedDict()
        self._renders: dict[tuple[BuildPlan, int], _Graph] = {}
        self._build_capacity: dict[BuildPlan, int] = {}
        self._render_capacity: dict[tuple[BuildPlan, int], int] = {}
        self._render_in_use: tuple[BuildPlan, int] | None = None  # the latest render's graph (compile_state)
        self._preset_build: int | None = None  # raster capacities to use instead of sizing them (preset_capacities)
        self._preset_render: dict[int, int] = {}

    # -- build --

    def build(self, image: np.ndarray, obs: FaceObservation, crop: tuple[float, float, float] | None = None) -> Avatar:
        """The avatar of the face in ``image`` (RGB uint8 [H, W, 3]); becomes :attr:`avatar`."""
        inputs = prepare_build(image, obs, self.config, None, crop, self.render_size)
        avatar = None
        self._eager_frame = False
        if self.fixed_shapes:
            try:
                avatar = self._replay_build(inputs)
            except _Fallback:
                pass
            except _Retry:
                self._eager_frame = True
        if avatar is None:
            avatar = build_on_device(inputs.plan, inputs.tensors(self.device), self.device)
        avatar = dataclasses.replace(avatar, host=inputs.host)
        self.avatar, self._plan, self._inputs = avatar, inputs.plan, inputs
        return avatar

    def _replay_build(self, inputs: BuildInputs) -> Avatar:
        plan = inputs.plan
        graph = self._builds.get(plan)
        if graph is not None and self._swap_due(graph, self._build_key(plan)):
            del self._builds[plan]  # its compiled form is ready: captured below in its place
            self._drop_renders(plan)  # they read the plain graph's outputs
            graph = None
        if graph is None:
            if plan not in self._build_capacity and self._preset_build is not None:
                self._build_capacity[plan] = self._preset_build
            elif plan not in self._build_capacity:
                first = build_on_device(plan, inputs.tensors(self.device), self.device)  # exact: sizes the raster
                self._build_capacity[plan] = self._sized(
                    ("build", plan), _round_up(max(_HEADROOM * int(first.needed), _BUILD_PER_PIXEL * plan.vis_size**2)))
            capacity = self._build_capacity[plan]
            log.info("capturing the avatar build for %s (raster capacity %d)", _describe(plan), capacity)
            device, build = self.device, self._compiled("build", build_on_device)
            graph = self._new_graph(lambda t: build_on_device(plan, t, device, capacity), inputs.tensors(device),
                                    self._build_key(plan), build and (lambda t: build(plan, t, device, capacity)),
                                    f"build for {_describe(plan)}")
            self._builds[plan] = graph
            while len(self._builds) > self.max_plans:
                self._drop_renders(self._builds.popitem(last=False)[0])
        else:
            self._builds.move_to_end(plan)
            graph(inputs.tensors(torch.device("cpu")))
        return graph.out

    # -- render --

    def render(self, poses: Sequence[OrbitPose]) -> RenderOutput:
        """Render the current avatar at ``poses`` (size x size pixels each)."""
        if self.avatar is None:
            raise RuntimeError("no avatar yet: call build() first")
        if self.fixed_shapes and not self._eager_frame:
            n, m = len(poses), graph_views(len(poses))
            padded = list(poses) + [poses[-1]] * (m - n)  # the graph of m views; the extra ones dropped below
            viewmats, Ks = self.avatar.cameras(padded, self.render_size)
            try:
                out = self._render_fixed(viewmats, Ks, m)
            except (_Fallback, _Retry):
                return render_cameras(self.avatar, viewmats[:n], Ks[:n], self.render_size)
            return out if m == n else dataclasses.replace(out, rgb=out.rgb[:n], alpha=out.alpha[:n], depth=out.depth[:n],
                                                          seen=out.seen[:n])
        viewmats, Ks = self.avatar.cameras(poses, self.render_size)
        return render_cameras(self.avatar, viewmats, Ks, self.render_size)

    def _render_fixed(self, viewmats: torch.Tensor, Ks: torch.Tensor, n_views: int) -> RenderOutput:
        for _ in range(4):
            out = self._replay_render(viewmats, Ks)
            build_needed, render_needed = torch.stack([self.avatar.needed, out.needed]).tolist()  # waits for the frame
            key = (self._plan, n_views)
            redo = False
            if build_needed > self._build_capacity[self._plan]:
                self._grow_build(build_needed)
                redo = True
            if render_needed > self._render_capacity[key]:
                self._render_capacity[key] = self._sized(("render", key, self.render_size),
                                                         _round_up(_GROWTH * render_needed))
                log.info("render raster capacity for %d views grown to %d", n_views, self._render_capacity[key])
                self._renders.pop(key, None)
                redo = True
            if not redo:
                return out
        raise RuntimeError("avatar raster capacity kept overflowing")

    @property
    def eager_frame(self) -> bool:
        """This frame's avatar was built eagerly (a capture met the background compile): it is not in the build
        graph's buffers, and its render runs eagerly too."""
        return self._eager_frame

    # -- compiling (models.avatar.compiling) --

    @property
    def compile_state(self) -> str:
        """"off" (not asked), "failed" (a compile failed: plain graphs), "waiting" (no graph yet: the first build
        asks for the compiles), "compiling" (the worker is busy), "swapping" (compiled, a graph in use not yet
        captured so: at its next use) or "compiled" (every graph in use). In use: the latest frame's build and
        render; a graph of a view count no longer served (viewers left) swaps when it serves again, and until
        then does not hold the state at "swapping" (it did: a "compiling" badge forever on the viewers' page)."""
        if self.compiler is None:
            return "failed" if self._compile_asked and self.fell_back else "off"
        if self.compiler.failed is not None:
            return "failed"
        if not self.compiler.idle():
            return "compiling"
        graphs = [*self._builds.values(), *self._renders.values()]
        if not graphs:
            return "waiting"
        in_use = [g for g in (self._builds.get(self._plan), self._renders.get(self._render_in_use)) if g is not None]
        done = [g.compiled or g.compile_key in self._swap_failed  # (a failed swap: said in the log)
                for g in in_use or graphs]
        return "compiled" if all(done) else "swapping"

    def release_compiles(self) -> bool:
        """Start the compiles a ``compile_held`` engine has queued; True if it was holding them."""
        if self.compiler is None or not self.compiler.held:
            return False
        self.compiler.release()
        return True

    def hold_compiles(self) -> bool:
        """Let the compiles asked from now on (and those queued) wait until :meth:`release_compiles`; False if
        nothing compiles here (not asked, failed, or fell back to eager)."""
        if self.compiler is None or self.compiler.failed is not None:
            return False
        self.compiler.hold()
        return True

    def capacities(self) -> tuple[int | None, dict[int, int]]:
        """The raster capacities of the current build plan: its build's, and its render's by view count. torch.compile
        bakes them in, so a process that compiles for this one (models.avatar.prefill) presets them."""
        plan = self._plan
        return self._build_capacity.get(plan), {n: c for (p, n), c in self._render_capacity.items() if p == plan}

    def preset_capacities(self, build: int | None, render: dict[int, int]) -> None:
        """Raster capacities to take (another engine's :meth:`capacities`) where this one would size its own from
        its first frame of a shape."""
        self._preset_build, self._preset_render = build, dict(render)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the compiles asked so far (False: timeout seconds passed first, or no compiling asked). The
        next build and render capture what is ready."""
        return self.compiler is not None and self.compiler.wait(timeout)

    def _sized(self, what: tuple, proposed: int) -> int:
        """The raster capacity for ``what`` (a build plan, or a plan and view count): ``proposed``, or where the
        compiler keeps its compiled functions on disk (models.avatar.precompiled) the smallest capacity an earlier
        start compiled for that holds as much, up to half as much again (at most that much more raster work a frame),
        so that this start loads that function instead of compiling one for its own first frame's size."""
        store = None if self.compiler is None else self.compiler.compile_fn
        if not hasattr(store, "known_sizes"):
            return proposed
        name = hashlib.sha256(repr(what).encode()).hexdigest()[:24]
        known = [c for c in store.known_sizes(name) if proposed <= c <= 1.5 * proposed]
        if known:
            if known[0] != proposed:
                log.info("%s raster capacity %d, compiled at an earlier start (this frame's own size: %d)", what[0],
                         known[0], proposed)
            return known[0]
        store.add_size(name, proposed)
        return proposed

    def _compiled(self, name: str, fn: Callable) -> Callable | None:
        return None if self.compiler is None else self.compiler.function(name, fn)

    def _build_key(self, plan: BuildPlan) -> tuple:
        return ("build", plan, self._build_capacity[plan])

    def _render_key(self, key: tuple[BuildPlan, int]) -> tuple:
        return ("render", key, self._render_capacity[key])

    def _swap_due(self, graph: _Graph, key: tuple) -> bool:
        """graph is plain and its compiled form is ready (swapped only while the worker is idle: the capture
        forbids compiling, a global setting)."""
        return (self.compiler is not None and not graph.compiled and key not in self._swap_failed
                and self.compiler.ready(key) and self.compiler.idle())

    def _new_graph(self, fn: Callable[[dict], object], inputs: dict[str, torch.Tensor | None], key: tuple | None = None,
                   compiled: Callable[[dict], object] | None = None, what: str = "",
                   job: Callable[[dict], object] | None = None) -> _Graph:
        """fn's graph. With a compiler: ``compiled`` (fn through compiled functions) once the worker has compiled
        it; until then fn, and the worker is asked to run ``job`` (``compiled`` with what it reads now bound: the
        current avatar) on a copy of the inputs."""
        if compiled is not None and key not in self._swap_failed:
            if self.compiler.ready(key) and self.compiler.idle():
                graph = self._compiled_graph(key, compiled, inputs, what)
                if graph is not None:
                    return graph
            elif not self.compiler.ready(key):
                private = {k: None if v is None else v.clone() for k, v in inputs.items()}
                self.compiler.submit(key, lambda: (job or compiled)(private), what)
        try:
            graph = _Graph(fn, inputs, capture=self.cuda_graphs)
        except Exception as error:  # noqa: BLE001 - whatever stops a capture, the eager path still works
            if self.compiler is not None and clashed_with_a_capture(error) and self._clashes < CAPTURE_RETRIES:
                self._clashes += 1
                log.warning("avatar: a CUDA-graph capture met the background compile (%s); this frame runs eagerly, "
                            "the next captures again", str(error).splitlines()[0] if str(error) else type(error).__name__)
                if self.cuda_graphs:
                    _end_aborted_capture(self.device)
                raise _Retry from error
            self._fall_back(error)
            raise _Fallback from error
        graph.compile_key = key
        self.captures += 1
        return graph

    def _compiled_graph(self, key: tuple, compiled: Callable[[dict], object], inputs: dict[str, torch.Tensor | None],
                        what: str) -> _Graph | None:
        """The graph of the compiled function (None: it would compile again, or its capture failed: said once)."""
        def failed() -> None:
            if self.cuda_graphs:
                _end_aborted_capture(self.device)
            self._swap_failed.add(key)

        graph = capture_compiled(lambda: _Graph(compiled, inputs, capture=self.cuda_graphs), f"avatar {what}", failed)
        if graph is not None:
            graph.compile_key = key
            self.captures += 1
        return graph

    def _fall_back(self, error: Exception) -> None:
        log.warning("could not set up the avatar's CUDA graphs (%s: %s); running it eagerly from now on",
                    type(error).__name__, error)
        log.debug("where the capture failed", exc_info=error)
        if self.cuda_graphs:
            _end_aborted_capture(self.device)
        self.cuda_graphs = self.fixed_shapes = False
        self.fell_back = True
        self.compiler = None  # nothing more to capture
        self._builds.clear()
        self._renders.clear()
        if self._inputs is not None:  # the current avatar may come from a half-grown graph: make it again
            avatar = build_on_device(self._plan, self._inputs.tensors(self.device), self.device)
            self.avatar = dataclasses.replace(avatar, host=self._inputs.host)

    def _drop_renders(self, plan: BuildPlan) -> None:
        """Forget the render graphs that read the outputs of this plan's build graph."""
        for key in [k for k in self._renders if k[0] == plan]:
            del self._renders[key]

    def _grow_build(self, needed: int) -> None:
        """Capture the build again with more raster room and rebuild the current frame."""
        plan, inputs = self._plan, self._inputs
        self._build_capacity[plan] = self._sized(("build", plan), _round_up(_GROWTH * needed))
        log.info("build raster capacity grown to %d", self._build_capacity[plan])
        del self._builds[plan]
        self._drop_renders(plan)
        try:
            self.avatar = dataclasses.replace(self._replay_build(inputs), host=inputs.host)
        except _Retry:  # this frame's avatar eagerly (with room for all of it), and so its render
            self.avatar = dataclasses.replace(build_on_device(plan, inputs.tensors(self.device), self.device),
                                              host=inputs.host)
            self._eager_frame = True
            raise

    def _replay_render(self, viewmats: torch.Tensor, Ks: torch.Tensor) -> RenderOutput:
        key = (self._plan, viewmats.shape[0])
        self._render_in_use = key
        graph = self._renders.get(key)
        if graph is not None and self._swap_due(graph, self._render_key(key)):
            del self._renders[key]  # its compiled form is ready: captured below in its place
            graph = None
        if graph is None:
            V, S = viewmats.shape[0], self.render_size
            if key not in self._render_capacity and V in self._preset_render:
                self._render_capacity[key] = self._preset_render[V]
            elif key not in self._render_capacity:
                first = render_cameras(self.avatar, viewmats, Ks, S)  # exact: sizes the raster
                self._render_capacity[key] = self._sized(
                    ("render", key, S), _round_up(max(_HEADROOM * int(first.needed), _RENDER_PER_PIXEL * V * S * S)))
            capacity = self._render_capacity[key]
            log.info("capturing the avatar render for %d views at %d (raster capacity %d)", V, S, capacity)
            # The avatar's tensors are the build graph's outputs: the same for every build of this plan.
            avatar, render = self.avatar, self._compiled("render", render_cameras)
            graph = self._new_graph(lambda t: render_cameras(self.avatar, t["viewmats"], t["Ks"], S, capacity),
                                    {"viewmats": viewmats, "Ks": Ks}, self._render_key(key),
                                    render and (lambda t: render(self.avatar, t["viewmats"], t["Ks"], S, capacity)),
                                    f"render of {V} view(s)",
                                    render and (lambda t: render(avatar, t["viewmats"], t["Ks"], S, capacity)))
            self._renders[key] = graph
            return graph.out
        return graph({"viewmats": viewmats, "Ks": Ks})


def _end_aborted_capture(device: torch.device) -> None:
    """An aborted capture leaves the CUDA random generator in capture mode: every later
    random draw on the device fails ("Offset increment outside graph capture"). A small
    capture that completes, drawing one random number, ends that mode (measured on the
    H100 machine with torch 2.11)."""
    try:
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                torch.rand(1, device=device)
    except Exception as error:  # noqa: BLE001
        log.warning("the CUDA random generator may be unusable after the failed capture: %s", error)


def _describe(plan: BuildPlan) -> str:
    H, W = plan.image_size
    return f"{W}x{H} pictures, texture {plan.tex_size or 'full'}, fill {plan.fill_size or 'texture'}"
