import time

import cv2
import numpy as np
import pytest
import torch

from telepresence.pipeline import Pipeline, PipelineConfig, ViewPose


@pytest.fixture(scope="module")
def pipeline():
    p = Pipeline(PipelineConfig(device="cpu", size=128, refiner=None))
    yield p
    p.close()


def test_views_per_pose_and_pose_changes_the_picture(pipeline, astronaut):
    poses = [ViewPose(yaw_deg=-25), ViewPose(), ViewPose(yaw_deg=25, pitch_deg=10)]
    result = pipeline.process(astronaut, poses)
    assert result.status == "ok" and result.face_found
    assert len(result.views) == 3
    assert all(v.shape == (128, 128, 3) and v.dtype == np.uint8 for v in result.views)
    assert result.fresh and all(v.flags.c_contiguous for v in result.views)  # the tracks take them without a copy
    assert set(result.timings_ms) >= {"landmarks", "avatar", "render"}
    assert result.kernels is None  # the CPU compiles nothing: the page shows no kernels row
    diff = np.abs(result.views[0].astype(int) - result.views[2].astype(int)).mean()
    assert diff > 5


def test_face_lost_keeps_the_last_avatar_and_recovers(pipeline, astronaut):
    poses = [ViewPose(yaw_deg=10)]
    good = pipeline.process(astronaut, poses)
    blank = np.zeros_like(astronaut)
    lost = pipeline.process(blank, poses)
    assert lost.status == "face_lost" and not lost.face_found
    assert np.array_equal(lost.views[0], good.views[0])
    back = pipeline.process(astronaut, poses)
    assert back.status == "ok"


def test_on_the_cpu_the_analysis_builds_the_avatar_and_the_render_uses_it(pipeline, astronaut, monkeypatch):
    """The build runs where the analysis runs (its own thread in a sender), beside the previous frame's render."""
    analysis = pipeline.analyze(astronaut)
    assert analysis.avatar is not None and analysis.avatar_ms > 0

    def no_second_build(*args):
        raise AssertionError("process() built the avatar again")

    monkeypatch.setattr(pipeline, "_build", no_second_build)
    result = pipeline.process(astronaut, [ViewPose(yaw_deg=15)], analysis)
    assert result.status == "ok"
    # the analysis's avatar itself (the appearance memory, on by default, attaches its atlas to a copy)
    assert pipeline.engine.avatar.verts is analysis.avatar.verts
    assert result.timings_ms["avatar"] >= analysis.avatar_ms
    assert pipeline.analyze(np.zeros_like(astronaut)).avatar is None


def test_the_real_pipeline_with_the_appearance_memory_fills_it_and_a_reset_empties_it(astronaut):
    p = Pipeline(PipelineConfig(device="cpu", size=96, refiner=None, memory=True))
    try:
        poses = [ViewPose(yaw_deg=-30), ViewPose(yaw_deg=30)]
        fills = [p.process(astronaut, poses).memory_fill for _ in range(4)]
        assert all(f is not None and 0.0 <= f <= 1.0 for f in fills)
        assert fills[-1] > 0.05 and fills == sorted(fills)  # the frames' seen texels kept, never fewer
        p.reset_memory()
        after = p.process(astronaut, poses)
        assert after.status == "ok" and len(after.views) == 2 and after.views[0].shape == (96, 96, 3)
        assert after.memory_fill < fills[-1]  # emptied, then one frame's worth at most
    finally:
        p.close()
    off = Pipeline(PipelineConfig(device="cpu", size=96, refiner=None, memory=False))
    try:
        assert off.process(astronaut, [ViewPose()]).memory_fill is None  # no memory: the page shows no fill
    finally:
        off.close()


def _prefilling_pipeline(monkeypatch) -> tuple[Pipeline, list[tuple[str, int, str]]]:
    """compile_avatar="prefill" is a CUDA path (the CPU compiles nothing); here its steps run on the CPU with the
    flags it sets, an engine of fixed shapes whose compiler records which thread runs what (for how many views),
    and torch.compile a no-op in the children, so that each ends in seconds."""
    import dataclasses
    import threading

    from models.avatar import crop_box
    from models.avatar.engine import AvatarEngine

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    calls: list[tuple[str, int, str]] = []

    def recording(fn):
        def compiled(*args, **kwargs):
            views = args[1].shape[0] if fn.__name__ == "render_cameras" else 0
            calls.append((fn.__name__, views, threading.current_thread().name))
            return fn(*args, **kwargs)
        return compiled

    p = Pipeline(PipelineConfig(device="cpu", size=64, refiner=None, memory=False))
    p.engine = AvatarEngine(p.avatar_config, "cpu", 64, fixed_shapes=True, compile=True, compile_fn=recording,
                            compile_held=True)
    p._prefill_mode = p._prefill_asked = True
    p.analyze = lambda frame, t_s=None: dataclasses.replace(type(p).analyze(p, frame, t_s), avatar=None)  # the engine builds
    p._build = lambda frame, obs: p.engine.build(frame, obs, crop=p._follow(crop_box(obs, p.avatar_config)))
    return p, calls


def _until_the_child_ends(p: Pipeline, frame: np.ndarray, poses: list[ViewPose]) -> None:
    deadline = time.monotonic() + 120
    while p._prefill is not None:
        assert time.monotonic() < deadline, "the prefill child did not end"
        assert p.process(frame, poses).status == "ok"  # frames go on meanwhile
        time.sleep(0.2)


def test_precompiled_avatar_reaches_the_engine_and_the_prefill_child(astronaut, monkeypatch, caplog):
    """--precompiled-avatar: the engine compiles through the store of whole compiled functions (beside inductor's
    cache), and so does the prefill child, whose saved functions the sender then loads."""
    from models.avatar.compiling import compile_fixed
    from models.avatar.precompiled import PrecompiledStore, compile_fn_for

    assert compile_fn_for(False) is compile_fixed
    store = compile_fn_for(True)
    assert isinstance(store, PrecompiledStore) and store.folder.name == "telepresence-precompiled"
    with caplog.at_level("WARNING", logger="telepresence.pipeline"):
        default = Pipeline(PipelineConfig(device="cpu", size=64, refiner=None, memory=False))
        default.close()
        assert PipelineConfig.precompiled_avatar is None and not default._precompiled  # on where it compiles: not here
        assert "--precompiled-avatar" not in caplog.text  # the default says nothing where it does not apply
        Pipeline(PipelineConfig(device="cpu", size=64, refiner=None, memory=False, precompiled_avatar=True)).close()
    assert "--precompiled-avatar has no effect here: nothing compiles on the CPU" in caplog.text
    p, _ = _prefilling_pipeline(monkeypatch)
    try:
        assert p.process(astronaut, [ViewPose()]).status == "ok"
        assert p._prefill is not None and p._prefill.job.precompiled is False
        p._prefill.stop()
        p._prefill, p._prefill_asked = None, True
        p._precompiled = True  # as a CUDA pipeline's, whose default compiles through the store
        assert p.process(astronaut, [ViewPose()]).status == "ok"
        assert p._prefill is not None and p._prefill.job.precompiled is True
        assert p._prefill.job.host_threads == torch.get_num_threads()  # the child's compiled code guards on it
    finally:
        p.close()


def test_a_child_compiles_first_the_warmed_view_counts_then_each_new_one(astronaut, monkeypatch, caplog):
    """The first child starts after the first frame; the sender compiles (from the disk cache) once it has ended.
    A view count no child has compiled (a fifth viewer: the graph of 8 views, models.avatar.engine.graph_views)
    waits for a child of its own rather than compiling cold in the sender, and the child bakes in the sender's raster
    capacities; a sixth viewer uses the same graph, no child and no compile."""
    p, calls = _prefilling_pipeline(monkeypatch)
    two, five = [ViewPose(), ViewPose(yaw_deg=20)], [ViewPose(yaw_deg=y) for y in (-30, -15, 0, 15, 30)]
    six = five + [ViewPose(yaw_deg=45)]
    try:
        with caplog.at_level("INFO", logger="telepresence.pipeline"):
            assert p.process(astronaut, two).status == "ok"
            first = p._prefill
            assert first is not None and first.job.view_counts == (1, 2, 3, 4)
            build_capacity, render_capacities = first.job.capacities
            assert build_capacity > 0 and set(render_capacities) == {2}  # what the sender captured so far
            _until_the_child_ends(p, astronaut, two)
            assert first.ok
            assert p.engine.wait_compiled(60)  # released: the sender compiles what it serves
            assert {(name, n) for name, n, thread in calls if thread == "avatar-compile"} == {
                ("build_on_device", 0), ("render_cameras", 2)}

            assert p.process(astronaut, five).status == "ok"
            second = p._prefill
            assert second is not None and second.job.view_counts == (8,)
            assert second.job.capacities[1][8] == p.engine.capacities()[1][8]
            time.sleep(0.3)  # a held compiler that did not wait would have compiled the eight views by now
            assert not any(n == 8 for _, n, thread in calls if thread == "avatar-compile")
            _until_the_child_ends(p, astronaut, five)
            assert second.ok and p.engine.wait_compiled(60)
            assert any(n == 8 for _, n, thread in calls if thread == "avatar-compile")
            assert p.process(astronaut, five).status == "ok" and p._prefill is None  # no child for a count compiled
            result = p.process(astronaut, six)
            assert result.status == "ok" and len(result.views) == 6 and p._prefill is None  # the same graph
            assert {n for _, n, thread in calls if thread == "avatar-compile"} == {0, 2, 8}
        said = [r.message for r in caplog.records]
        assert any("a child process compiles its kernels for 1, 2, 3, 4 view(s)" in m for m in said)
        assert any("the render graph of 8 view(s) is not compiled yet: a child process compiles it first" in m
                   for m in said)
        assert sum("compiling here from the disk cache" in m for m in said) == 2
    finally:
        p.close()


def test_compile_refiner_without_a_refiner_says_it_has_nothing_to_compile(caplog, monkeypatch, tmp_path):
    """--compile-refiner with no weights shipped (the default) or --refiner none: one warning, not silence."""
    monkeypatch.setenv("TELEPRESENCE_WEIGHTS", str(tmp_path))  # an empty weights folder: nothing shipped
    with caplog.at_level("WARNING", logger="telepresence.pipeline"):
        Pipeline(PipelineConfig(device="cpu", size=64, refiner="default", memory=False, compile_refiner=True)).close()
        Pipeline(PipelineConfig(device="cpu", size=64, refiner=None, memory=False, compile_refiner=True)).close()
    said = [r.getMessage() for r in caplog.records if "--compile-refiner" in r.getMessage()]
    assert said == ["refiner: --compile-refiner has no effect here: no refiner weights loaded (raw avatar renders)",
                    "refiner: --compile-refiner has no effect here: --refiner none (raw avatar renders)"]


def test_no_face_yet_gives_placeholders():
    p = Pipeline(PipelineConfig(size=64, refiner=None))
    try:
        result = p.process(np.zeros((120, 160, 3), np.uint8), [ViewPose(), ViewPose(yaw_deg=5)])
        assert result.status == "no_face_yet" and len(result.views) == 2
        assert result.views[0].shape == (64, 64, 3)
        assert p.process(np.zeros((120, 160, 3), np.uint8), []).views == []
    finally:
        p.close()


def test_config_validates():
    with pytest.raises(ValueError, match="multiple of 8"):
        PipelineConfig(size=100)
    with pytest.raises(ValueError, match="warm_views"):
        PipelineConfig(warm_views=-1)
    with pytest.raises(ValueError, match="compile_avatar"):
        PipelineConfig(compile_avatar="sometimes")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="cpu_threads"):
            PipelineConfig(cpu_threads=bad)


def test_a_cpu_pipeline_leaves_a_core_to_analysis_and_encoding(monkeypatch, caplog):
    import os

    from telepresence.pipeline import cpu_threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS: the machine's cores
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_threads(None) == 1 and cpu_threads(3) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_threads(None) == 15
    # On a GPU the work is on the device: a pipeline process (one per participant in a call) keeps to 2
    assert cpu_threads(None, "cuda") == 2 and cpu_threads(5, "cuda") == 5
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu_threads(None) == 1 and cpu_threads(None, "cuda") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # taskset -c 0-3
    assert cpu_threads(None) == 3
    before = torch.get_num_threads(), cv2.getNumThreads()
    with caplog.at_level("INFO", logger="telepresence.pipeline"):
        p = Pipeline(PipelineConfig(size=64, refiner=None, cpu_threads=1))
    try:
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == before[1]  # OpenCV's own on the CPU
        assert "torch runs the avatar on 1 thread" in caplog.text
    finally:
        p.close()
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@pytest.mark.gpu
def test_cuda_graphs_for_up_to_warm_views_are_captured_on_the_first_face(astronaut):
    """A viewer joining later (a new view count) finds its graphs ready: no capture, no stall."""
    p = Pipeline(PipelineConfig(device="cuda", size=128, refiner=None, warm_views=3, compile_avatar="off"))
    try:
        # Frames 1/30 s apart (the landmarks' smoothing goes by the capture times, not by how long a capture takes)
        first = p.process(astronaut, [ViewPose(yaw_deg=10)], p.analyze(astronaut, 0.0))
        assert first.status == "ok"
        captured = p.engine.captures
        assert captured == 1 + 3  # the build, and the render of 1, 2 and 3 views
        result = p.process(astronaut, [ViewPose(yaw_deg=y) for y in (-20, 0, 20)], p.analyze(astronaut, 1 / 30))
        assert p.engine.captures == captured and len(result.views) == 3
        eager = Pipeline(PipelineConfig(device="cuda", size=128, refiner=None, warm_views=0, compile_avatar="off"))
        eager.engine.cuda_graphs = eager.engine.fixed_shapes = False
        # the same frames at the same times: face tracking, smoothing and framing follow them
        eager.process(astronaut, [ViewPose(yaw_deg=10)], eager.analyze(astronaut, 0.0))
        reference = eager.process(astronaut, [ViewPose(yaw_deg=y) for y in (-20, 0, 20)], eager.analyze(astronaut, 1 / 30))
        eager.close()
        for a, b in zip(result.views, reference.views):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    finally:
        p.close()


def test_the_pipeline_smooths_the_landmarks_unless_asked_not_to(monkeypatch):
    """The avatar gets landmarks smoothed over frames (models.face.smoothing); head tracking gets the eyes as seen."""
    from models.face.analysis import LEFT_IRIS, RIGHT_IRIS
    from tests.models.face.test_smoothing import observation

    frames = [observation((0.0, 0.0)), observation((6.0, 0.0))]
    image = np.zeros((512, 512, 3), np.uint8)
    for smooth in (True, False):
        p = Pipeline(PipelineConfig(size=64, refiner=None, smooth_landmarks=smooth))
        try:
            assert (p._smoother is not None) == smooth
            seen = iter(frames)
            monkeypatch.setattr(p.analyzer, "analyze", lambda frame: next(seen))
            if smooth:  # frames 1/30 s apart, whatever the build between them takes here
                real, times = p._smoother, iter([0.0, 1 / 30])
                p._smoother = lambda t, obs: real(next(times), obs)
            p.analyze(image)
            second = p.analyze(image)
            shift = float((second.observation.landmarks_px - frames[0].landmarks_px)[:, 0].mean())
            assert (0.5 < shift < 5.5) if smooth else shift == pytest.approx(6.0)
            np.testing.assert_allclose(second.eyes_m, frames[1].points_cam[[RIGHT_IRIS, LEFT_IRIS]].mean(axis=0))
        finally:
            p.close()


@pytest.mark.gpu
def test_a_pipeline_on_the_second_gpu_captures_and_serves_there(astronaut):
    """serve spreads its participants' pipelines over the GPUs as cuda:N (telepresence.stream.gpus): such a
    pipeline makes the GPU current, so that its CUDA graphs capture there, and serves as one on the first."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the device tool's nvidia-h200-x2)")
    from concurrent.futures import ThreadPoolExecutor

    p = Pipeline(PipelineConfig(device="cuda:1", size=128, refiner=None, warm_views=2, compile_avatar="off"))
    try:
        with ThreadPoolExecutor(1) as worker:  # a sender calls process() from a thread of its own, whose current
            # device is the first GPU until the pipeline makes its own current there
            result = worker.submit(p.process, astronaut, [ViewPose(yaw_deg=-20), ViewPose(yaw_deg=20)],
                                   p.analyze(astronaut, 0.0)).result()
        assert result.status == "ok" and len(result.views) == 2
        assert p.engine.cuda_graphs and not p.engine.fell_back and p.engine.captures == 1 + 2
        assert p.engine.avatar.verts.device == torch.device("cuda:1")
    finally:
        p.close()
    with pytest.raises(RuntimeError, match="this machine has"):
        Pipeline(PipelineConfig(device=f"cuda:{torch.cuda.device_count()}", size=128, refiner=None))


@pytest.mark.gpu
def test_compile_avatar_wait_serves_the_first_face_through_compiled_graphs(astronaut, monkeypatch):
    """compile_avatar="wait" (the benchmarks'): the first frame with a face comes back through the compiled
    graphs, with the plain graphs' pictures (a compiled kernel may resolve a raster tie the other way: at most
    0.2 % of the values off by more than 12 of 255). No capture runs beside a compile: one that meets the worker's
    CUDA work fails, its frame runs eagerly and asks for no render's compile (a GPU loopback's "wait" so compiled
    the build alone first, and the renders while it measured)."""
    import models.avatar.engine as engine_module
    from models.avatar.compiling import compiling_now

    real_graph, beside_a_compile = engine_module._Graph, []

    def watched(*args, **kwargs):
        beside_a_compile.append(compiling_now())
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_Graph", watched)
    views = [ViewPose(yaw_deg=y) for y in (-20, 0, 20)]
    results = {}
    for mode in ("wait", "off"):
        p = Pipeline(PipelineConfig(device="cuda", size=128, refiner=None, warm_views=3, compile_avatar=mode))
        try:
            results[mode] = p.process(astronaut, views, p.analyze(astronaut, 0.0))
            assert p.engine.compile_state == ("compiled" if mode == "wait" else "off")
            assert beside_a_compile and not any(beside_a_compile)
            assert results[mode].kernels == p.engine.compile_state  # what the viewers' stats say
        finally:
            p.close()
    for a, b in zip(results["wait"].views, results["off"].views):
        assert np.mean(np.abs(a.astype(int) - b.astype(int)) > 12) < 0.002


def test_compile_refiner_compiles_the_live_frames_shapes_when_the_pipeline_opens(astronaut, monkeypatch):
    """--compile-refiner: the refiner compiles for 1 and 2 views when the pipeline opens, before a sender joins a
    room (compiled at the first frame, the compile starved the event loop and viewers were dropped), on inputs
    shaped and typed as the live frames' (so that the same compiled step and CUDA graph serve them)."""
    import models.refiner.shipped as shipped
    from models.refiner import Refiner

    refiner = Refiner.tiny(seen_mask=True).prepare("cpu", torch.float32)
    calls, asked = [], {}
    real_refine = refiner.refine

    def spy(ref, views, seen=None, **kwargs):
        calls.append((tuple(ref.shape), tuple(views.shape), None if seen is None else tuple(seen.shape),
                      ref.dtype, views.dtype, sorted(kwargs)))
        return real_refine(ref, views, seen, **kwargs)

    def load(spec, device, cuda_graphs=False, compile=False):
        asked.update(spec=spec, compile=compile)
        return refiner

    monkeypatch.setattr(refiner, "refine", spy)
    monkeypatch.setattr(shipped, "load_refiner", load)
    p = Pipeline(PipelineConfig(device="cpu", size=64, refiner="stand-in", compile_refiner=True, memory=False))
    try:
        assert asked == {"spec": "stand-in", "compile": True}
        assert [call[1] for call in calls] == [(1, 1, 3, 64, 64), (1, 2, 3, 64, 64)]
        opened = calls[-1]
        assert p.process(astronaut, [ViewPose(yaw_deg=-20), ViewPose(yaw_deg=20)]).status == "ok"
        assert calls[-1] == opened  # the live call at 2 views: what the pipeline compiled at its opening
    finally:
        p.close()
