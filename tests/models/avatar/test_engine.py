"""AvatarEngine: the fixed-shape path (what CUDA graphs replay) gives the eager
path's pictures, grows its raster room when a frame needs more, and follows new
frames; on CUDA the captured graphs match eager CUDA renders."""
import dataclasses
import time

import numpy as np
import pytest
import torch

import models.avatar.engine as engine_mod
from models.avatar import AvatarConfig, build_avatar, crop_box, render_views
from models.avatar.engine import AvatarEngine, graph_views
from models.geometry.raster import rasterize
from models.geometry.camera import OrbitPose

POSES = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in [(-30, 0), (0, 0), (25, 10), (60, -5)]]
FIELDS = ("rgb", "alpha", "depth", "seen")


def max_diff(a, b) -> float:
    return max(float((getattr(a, k).cpu() - getattr(b, k).cpu()).abs().max()) for k in FIELDS)


@pytest.fixture(scope="module")
def case(analyzer, astronaut):
    return astronaut, analyzer.analyze(astronaut)


def test_fixed_capacity_raster_equals_the_exact_one():
    torch.manual_seed(0)
    pix = torch.rand(3, 200, 3) * torch.tensor([64, 48, 1.0]) + torch.tensor([-5, -5, 0.5])
    faces = torch.randint(0, 200, (300, 3))
    exact = rasterize(pix, faces, 40, 50)
    fixed = rasterize(pix, faces, 40, 50, capacity=700_000)
    assert int(fixed.needed) <= 700_000
    assert torch.equal(exact.face_id, fixed.face_id)
    assert torch.equal(exact.bary, fixed.bary) and torch.equal(exact.depth, fixed.depth)
    # Too little room: fewer pixels drawn, and `needed` says so.
    short = rasterize(pix, faces, 40, 50, capacity=int(fixed.needed) // 2)
    assert int(short.needed) == int(fixed.needed)
    assert (short.face_id >= 0).sum() < (exact.face_id >= 0).sum()


@pytest.mark.parametrize("background", ["remove", "far"])
def test_fixed_shapes_give_the_eager_pictures(case, background):
    image, obs = case
    config = AvatarConfig(background=background)
    eager = render_views(build_avatar(image, obs, config, render_size=256), POSES, 256)
    engine = AvatarEngine(config, "cpu", render_size=256, fixed_shapes=True)
    engine.build(image, obs)
    assert max_diff(engine.render(POSES), eager) == 0.0
    assert max_diff(engine.render(POSES[:1]), render_views(engine.avatar, POSES[:1], 256)) == 0.0


def test_view_counts_above_four_share_the_graph_of_the_next_power_of_two(case):
    """5-8 viewers are served by one graph of 8 views (the poses padded with the last, the extra views dropped),
    each view the eager path's picture: one capture (and on CUDA one compile) instead of four."""
    assert [graph_views(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33)] == [1, 2, 3, 4, 8, 8, 16, 16, 32, 64]
    image, obs = case
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=96, fixed_shapes=True)
    engine.build(image, obs)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in [(-40, 0), (-25, 5), (-10, 0), (5, -5), (20, 0), (35, 10), (50, 0)]]
    for n in (5, 7, 6):
        out = engine.render(poses[:n])
        assert out.rgb.shape[0] == out.alpha.shape[0] == out.depth.shape[0] == out.seen.shape[0] == n
        assert max_diff(out, render_views(engine.avatar, poses[:n], 96)) == 0.0
    assert sorted(n for _, n in engine._renders) == [8]
    assert engine.captures == 2  # the build, and the render of 8 views once


def test_overflowing_raster_room_grows_and_the_frame_is_redone(case, monkeypatch):
    image, obs = case
    monkeypatch.setattr(engine_mod, "_HEADROOM", 0.5)  # half of what the first frame needed: overflow
    monkeypatch.setattr(engine_mod, "_RENDER_PER_PIXEL", 0.0)
    monkeypatch.setattr(engine_mod, "_BUILD_PER_PIXEL", 0.0)
    monkeypatch.setattr(engine_mod, "_ROUND", 1024)
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=256, fixed_shapes=True)
    engine.build(image, obs)
    (plan, first_build_cap), = engine._build_capacity.items()
    out = engine.render(POSES)
    eager = render_views(build_avatar(image, obs, render_size=256), POSES, 256)
    assert max_diff(out, eager) == 0.0  # the overflowing frame was redone
    (key, render_cap), = engine._render_capacity.items()
    build_cap = engine._build_capacity[plan]
    assert first_build_cap < int(engine.avatar.needed) <= build_cap
    assert int(out.needed) <= render_cap
    assert engine.captures == 4  # build and render, each set up twice


def test_new_frames_and_new_framing(case):
    """A second frame replaces the first (same plan, same buffers); a much larger
    framing picks a coarser texture (a new plan)."""
    image, obs = case
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True)
    engine.build(image, obs)
    a = engine.render(POSES[:2]).rgb.clone()
    flipped = np.ascontiguousarray(image[:, :, ::-1])  # same face, other colours
    engine.build(flipped, dataclasses.replace(obs))
    b = engine.render(POSES[:2]).rgb.clone()
    assert (a - b).abs().mean() > 0.01
    eager = render_views(build_avatar(flipped, obs, render_size=128), POSES[:2], 128)
    assert float((b - eager.rgb).abs().max()) == 0.0
    plans = set(engine._builds)
    assert len(plans) == 1
    cx, cy, side = crop_box(obs)
    assert side < 1.25 * 256  # the usual framing keeps the full-size texture
    engine.build(image, obs, crop=(cx, cy, side * 3.5))  # now the crop spans > 1.25 * 256 texels
    assert len(engine._builds) == 2
    width = engine.avatar.texture.shape[-1]
    assert width < 512 and 512 % width == 0  # a power-of-two reduction


@pytest.mark.gpu
def test_cuda_graphs_match_eager_cuda(case):
    image, obs = case
    eager = render_views(build_avatar(image, obs, device="cuda", render_size=512), POSES, 512)
    engine = AvatarEngine(AvatarConfig(), "cuda", render_size=512)
    assert engine.cuda_graphs
    for _ in range(3):  # capture, then replays
        engine.build(image, obs)
        out = engine.render(POSES)
        assert max_diff(out, eager) < 1e-4
    flipped = np.ascontiguousarray(image[:, :, ::-1])
    engine.build(flipped, obs)
    out = engine.render(POSES)
    eager_flipped = render_views(build_avatar(flipped, obs, device="cuda", render_size=512), POSES, 512)
    assert max_diff(out, eager_flipped) < 1e-4
    assert engine.captures == 2


def test_a_failed_capture_falls_back_to_the_eager_path(case, monkeypatch, caplog):
    image, obs = case

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine_mod, "_Graph", Broken)
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True)
    with caplog.at_level("WARNING", logger="models.avatar.engine"):
        engine.build(image, obs)
        out = engine.render(POSES[:2])
    assert engine.fell_back and not engine.fixed_shapes
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1
    eager = render_views(build_avatar(image, obs, render_size=128), POSES[:2], 128)
    assert max_diff(out, eager) == 0.0


@pytest.mark.gpu
def test_cuda_capture_failure_leaves_a_working_eager_engine(case, monkeypatch):
    """A host sync inside the build (illegal while capturing) makes the capture fail for real."""
    image, obs = case
    real = engine_mod.build_on_device

    def syncing(*args, **kwargs):
        out = real(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    monkeypatch.setattr(engine_mod, "build_on_device", syncing)
    engine = AvatarEngine(AvatarConfig(), "cuda", render_size=256)
    engine.build(image, obs)
    out = engine.render(POSES)
    assert engine.fell_back
    eager = render_views(build_avatar(image, obs, device="cuda", render_size=256), POSES, 256)
    assert max_diff(out, eager) < 1e-4
    # The aborted capture must not leave the device's random generator in capture mode
    # (the refiner draws its noise there, and the next graphs capture it).
    torch.nn.init.normal_(torch.empty(8, device="cuda"))
    assert torch.randn(8, device="cuda").std() > 0


class _Recording:
    """A compile_fn for tests: the 'compiled' function is the function itself, and each call says which
    thread made it (the real torch.compile takes minutes on a CPU)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, str]] = []
        self.made: list[tuple[str, str]] = []  # (function, thread) of each compile_fn call
        self.fail = fail

    def __call__(self, fn):
        import threading

        self.made.append((fn.__name__, threading.current_thread().name))

        def compiled(*args, **kwargs):
            self.calls.append((fn.__name__, threading.current_thread().name))
            if self.fail:
                raise RuntimeError("inductor: no compiler for this machine")
            return fn(*args, **kwargs)
        return compiled


def test_compiled_graphs_are_made_in_the_background_and_swapped_in(case):
    """With compile=True the plain graphs serve while the worker compiles; the next build and render after it
    capture the compiled functions in their place, with the same pictures, and the renders follow the swapped
    build's outputs."""
    image, obs = case
    recording = _Recording()
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True, compile=True,
                          compile_fn=recording)
    plain = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True)
    assert engine.compile_state == "waiting" and plain.compile_state == "off"
    engine.build(image, obs)
    first = engine.render(POSES[:2]).rgb.clone()
    assert engine.wait_compiled(120) and engine.compile_state == "swapping"
    worker = {name for name, thread in recording.calls if thread == "avatar-compile"}
    assert worker == {"build_on_device", "render_cameras"}  # compiled off the engine's thread
    assert all(not g.compiled for g in [*engine._builds.values(), *engine._renders.values()])
    flipped = np.ascontiguousarray(image[:, :, ::-1])  # a new frame after the swap: the renders must follow it
    for frame in (flipped, image):
        engine.build(frame, obs)
        out = engine.render(POSES[:2])
        plain.build(frame, obs)
        assert max_diff(out, plain.render(POSES[:2])) == 0.0
    assert float((out.rgb - first).abs().max()) == 0.0
    assert engine.compile_state == "compiled"
    assert all(g.compiled for g in [*engine._builds.values(), *engine._renders.values()])
    assert any(thread != "avatar-compile" for _, thread in recording.calls)  # captured on the engine's thread


def test_held_compiles_wait_until_released_while_the_plain_graphs_serve(case):
    """A sender's engine holds its compiles until the first frame is out: the build and render capture and serve
    with nothing compiled meanwhile; release_compiles() starts them (once) and the swap follows as before."""
    image, obs = case
    recording = _Recording()
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True, compile=True,
                          compile_fn=recording, compile_held=True)
    plain = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True)
    for _ in range(2):
        engine.build(image, obs)
        out = engine.render(POSES[:2])
    plain.build(image, obs)
    assert max_diff(out, plain.render(POSES[:2])) == 0.0
    time.sleep(0.3)  # a worker that did not wait would have run the jobs by now
    assert recording.calls == [] and engine.compile_state == "compiling" and engine.compiler.held
    # Nor is torch.compile called yet: it imports dynamo and inductor (seconds), which held the first frame.
    assert recording.made == []
    assert engine.release_compiles() and not engine.release_compiles()
    assert engine.wait_compiled(120) and {n for n, t in recording.calls if t == "avatar-compile"} == {
        "build_on_device", "render_cameras"}
    assert sorted(recording.made) == [("build_on_device", "avatar-compile"), ("render_cameras", "avatar-compile")]
    engine.build(image, obs)
    engine.render(POSES[:2])
    assert engine.compile_state == "compiled"


def test_a_graph_no_longer_served_does_not_hold_the_state_at_swapping(case):
    """Viewers joined (5: the 8-view graph, compiled in the background) and left (2 again): the state is
    "compiled" once the graphs in use are swapped; the 8-view graph swaps when 5 views are rendered again.
    Before, it held the state at "swapping" for good: the page's "compiling" badge and a benchmark's settle
    waited on a compile that was done."""
    image, obs = case
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=64, fixed_shapes=True, compile=True,
                          compile_fn=_Recording())
    many = [*POSES, OrbitPose(yaw_deg=10, pitch_deg=5)]
    engine.build(image, obs)
    engine.render(POSES[:2])
    assert engine.wait_compiled(120)
    engine.build(image, obs)
    engine.render(POSES[:2])  # build and the 2-view render swapped in
    engine.render(many)  # the 8-view graph: plain, its compile asked for
    assert engine.wait_compiled(120) and engine.compile_state == "swapping"  # in use, not yet swapped
    engine.build(image, obs)
    engine.render(POSES[:2])
    eight = engine._renders[(engine._plan, 8)]
    assert not eight.compiled and engine.compile_state == "compiled"
    engine.build(image, obs)
    engine.render(many)
    assert engine._renders[(engine._plan, 8)].compiled and engine.compile_state == "compiled"


def test_waiting_for_a_held_compiler_releases_it():
    from models.avatar.compiling import BackgroundCompiler

    runs = []
    compiler = BackgroundCompiler("cpu", held=True)
    compiler.submit("k", lambda: runs.append(1), "a job")
    assert compiler.held and not compiler.idle()
    assert compiler.wait(30) and runs == [1] and compiler.ready("k") and not compiler.held


def test_a_failed_compile_keeps_the_plain_graphs_and_says_so(case, caplog):
    image, obs = case
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True, compile=True,
                          compile_fn=_Recording(fail=True))
    with caplog.at_level("WARNING", logger="models.avatar.compiling"):
        engine.build(image, obs)
        engine.render(POSES[:2])
        assert engine.wait_compiled(120)
    assert engine.compile_state == "failed"
    assert sum("could not compile" in r.message for r in caplog.records) == 1
    engine.build(image, obs)
    out = engine.render(POSES[:2])
    eager = render_views(build_avatar(image, obs, render_size=128), POSES[:2], 128)
    assert max_diff(out, eager) == 0.0 and not engine.fell_back


def test_compile_needs_the_fixed_shape_path():
    with pytest.raises(ValueError, match="fixed-shape"):
        AvatarEngine(AvatarConfig(), "cpu", compile=True)


@pytest.mark.gpu
def test_compiled_cuda_graphs_match_eager_cuda(case):
    """The real torch.compile (minutes the first time on a machine): the compiled graphs give the eager CUDA
    pictures. Compiled kernels may order float sums differently and resolve a raster tie (a pixel where two
    triangles meet at one depth) the other way, so a pixel may differ; no more than 0.2 % of them by 0.05."""
    image, obs = case
    eager = render_views(build_avatar(image, obs, device="cuda", render_size=512), POSES, 512)
    engine = AvatarEngine(AvatarConfig(), "cuda", render_size=512, compile=True)
    engine.build(image, obs)
    engine.render(POSES)
    assert engine.wait_compiled(600) and engine.compile_state == "swapping"
    for _ in range(2):  # capture of the compiled functions, then a replay
        engine.build(image, obs)
        out = engine.render(POSES)
    assert engine.compile_state == "compiled"
    for k in FIELDS:
        diff = (getattr(out, k).float() - getattr(eager, k).float()).abs()
        assert float((diff > 0.05).float().mean()) < 0.002, k
        assert float(diff.mean()) < 1e-3, k


def test_the_compile_worker_hands_the_interpreter_over_more_often_while_it_compiles():
    """While a compile runs the switch interval is short (the frames' threads wait less for the lock), after it
    the caller's own again."""
    import sys

    from models.avatar.compiling import SWITCH_INTERVAL_S, BackgroundCompiler

    seen = []
    compiler = BackgroundCompiler("cpu")
    before = sys.getswitchinterval()
    compiler.submit("k", lambda: seen.append(sys.getswitchinterval()), "a job")
    assert compiler.wait(30) and compiler.ready("k")
    assert seen == [pytest.approx(min(before, SWITCH_INTERVAL_S))]
    assert sys.getswitchinterval() == before


def test_a_capture_that_meets_the_background_compile_is_tried_again(case, monkeypatch, caplog):
    """A CUDA-graph capture refused while the worker runs compiled CUDA work is no reason to give up the graphs:
    that frame runs eagerly (the same pictures) and the next one captures."""
    import threading

    image, obs = case
    release = threading.Event()

    def slow(fn):  # a compile that takes a while: the worker stays busy until released
        def compiled(*args, **kwargs):
            release.wait(60)
            return fn(*args, **kwargs)
        return compiled

    real, refused = engine_mod._Graph, []

    def refusing(fn, inputs, capture=True, warmup=2):
        if not refused:
            refused.append(True)
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real(fn, inputs, capture=capture, warmup=warmup)

    monkeypatch.setattr(engine_mod, "_Graph", refusing)
    engine = AvatarEngine(AvatarConfig(), "cpu", render_size=128, fixed_shapes=True, compile=True, compile_fn=slow)
    engine.compiler.submit("busy", lambda: release.wait(60), "a long compile")
    try:
        with caplog.at_level("WARNING", logger="models.avatar.engine"):
            engine.build(image, obs)
            out = engine.render(POSES[:2])
        assert refused and engine.eager_frame and not engine.fell_back and engine.fixed_shapes
        assert sum("met the background compile" in r.message for r in caplog.records) == 1
        eager = render_views(build_avatar(image, obs, render_size=128), POSES[:2], 128)
        assert max_diff(out, eager) == 0.0
        engine.build(image, obs)  # the next frame captures
        assert not engine.eager_frame and len(engine._builds) == 1
        assert max_diff(engine.render(POSES[:2]), eager) == 0.0
    finally:
        release.set()


def test_a_compile_job_that_meets_a_capture_runs_again():
    from models.avatar.compiling import BackgroundCompiler

    runs = []

    def job():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    compiler = BackgroundCompiler("cpu")
    compiler.submit("k", job, "a job")
    assert compiler.wait(30) and compiler.ready("k") and compiler.failed is None and len(runs) == 2


def test_preset_raster_capacities_are_baked_in_whatever_the_first_frame_needs(case):
    """A child that compiles for a sender (models.avatar.prefill) renders other poses than the sender did, so it
    takes the sender's raster capacities instead of sizing its own: torch.compile bakes them in, and a different
    number would miss the disk cache the child fills."""
    image, obs = case
    sender = AvatarEngine(AvatarConfig(), "cpu", render_size=96, fixed_shapes=True)
    sender.build(image, obs)
    sender.render(POSES[:3])
    build, render = sender.capacities()
    assert build > 0 and set(render) == {3}
    child = AvatarEngine(AvatarConfig(), "cpu", render_size=96, fixed_shapes=True)
    child.preset_capacities(2 * build, {3: 2 * render[3]})  # unlike anything it would size itself
    child.build(image, obs)
    child.render([OrbitPose()] * 3)
    child.render([OrbitPose()])
    own = AvatarEngine(AvatarConfig(), "cpu", render_size=96, fixed_shapes=True)
    own.build(image, obs)
    own.render([OrbitPose()])
    assert child.capacities() == (2 * build, {3: 2 * render[3], 1: own.capacities()[1][1]})


def test_a_compiler_held_again_lets_later_jobs_wait_until_released():
    """A sender holds its compiler again while a child compiles a view count it has not seen (telepresence.pipeline):
    jobs asked for meanwhile wait, and run once it is released."""
    from models.avatar.compiling import BackgroundCompiler

    runs = []
    compiler = BackgroundCompiler("cpu")
    compiler.submit("a", lambda: runs.append("a"), "a job")
    assert compiler.wait(30) and runs == ["a"]
    compiler.hold()
    compiler.submit("b", lambda: runs.append("b"), "a later job")
    time.sleep(0.3)  # a worker that did not wait would have run it by now
    assert runs == ["a"] and compiler.held and not compiler.idle() and not compiler.ready("b")
    compiler.release()
    assert compiler.wait(30) and runs == ["a", "b"] and compiler.ready("b")


def test_a_start_takes_the_raster_capacity_an_earlier_start_compiled_for(case, tmp_path, caplog):
    """With its compiled functions kept on disk (models.avatar.precompiled), an engine sizes a capacity as the
    smallest one an earlier start compiled for that holds as much as its own first frame asks, up to 1.5 times: a
    capacity is baked into the compiled code, and a start whose first frame asked one rung more or less would
    otherwise compile again instead of loading."""
    import json

    from models.avatar.precompiled import PrecompiledStore

    image, obs = case

    def start(compile_fn=None):
        engine = AvatarEngine(AvatarConfig(), "cpu", render_size=96, fixed_shapes=True, compile=compile_fn is not None,
                              compile_held=True, compile_fn=compile_fn)  # held: nothing compiles here
        engine.build(image, obs)
        engine.render(POSES[:3])
        return engine.capacities()

    first = start(PrecompiledStore(tmp_path))
    sizes = tmp_path.glob("sizes-*.json")
    (path,) = sizes
    table = json.loads(path.read_text())
    assert sorted(v for vs in table.values() for v in vs) == sorted([first[0], first[1][3]])
    # An earlier start compiled the render for a larger capacity (its first frame asked for more): this one takes
    # it; the build keeps its own, which that start also had.
    (render_name,) = [name for name, vs in table.items() if vs == [first[1][3]]]
    more = first[1][3] * 5 // 4
    path.write_text(json.dumps({**table, render_name: [more, 2 * first[1][3]]}))  # the second: too much more
    with caplog.at_level("INFO", logger="models.avatar.engine"):
        second = start(PrecompiledStore(tmp_path))
    assert second == (first[0], {3: more})
    assert f"render raster capacity {more}, compiled at an earlier start (this frame's own size: {first[1][3]})" in caplog.text
    assert start() == first  # compiled the usual way (or not at all): its own sizes, as before
