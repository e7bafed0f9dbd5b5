"""A call participant's pipeline in a process of its own (telepresence.stream.worker): the same views
as in this process (the fake pipeline and the real one), its faults (a crash, a hang, a kill, a raise),
and on CUDA two processes capturing their graphs at once."""

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from models.geometry.camera import OrbitPose
from telepresence.pipeline import Pipeline, PipelineConfig, PipelineUnavailableError
from telepresence.stream.worker import PipelineRaisedError, WorkerError, open_pipeline_process, prepare_workers
from tests import fake_pipeline
from tests.fake_camera import head_frame
from tests.helpers import open_fds

pytestmark = pytest.mark.slow

FAKE, FAILING = "tests.fake_pipeline:build_pipeline", "tests.fake_pipeline:build_failing_pipeline"
CONFIG = PipelineConfig(size=64)
POSES = [OrbitPose(), OrbitPose(yaw_deg=20.0), OrbitPose(pitch_deg=-10.0, dist_scale=1.3)]


def solid(rgb, shape=(120, 160)):
    return np.full((*shape, 3), rgb, np.uint8)


def shared_blocks():
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def leaked_blocks(before):
    """Shared-memory blocks made since ``before`` and still there, less those another process tree holds mapped
    (the suite runs in parallel: another test's live pipeline has its own). One this process still maps, or
    nobody does, is this test's leak."""
    others = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        if maps.parent.name == str(os.getpid()):
            continue
        try:
            others.update(line.rsplit("/dev/shm/", 1)[1].split(" ")[0] for line in maps.read_text().splitlines()
                          if "/dev/shm/" in line)
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return shared_blocks() - before - others


def test_a_pipeline_in_its_own_process_makes_the_same_views_as_in_this_one():
    prepare_workers()  # the fork server: started once, kept (its pipe and the resource tracker's)
    blocks, fds = shared_blocks(), open_fds()
    here = fake_pipeline.build_pipeline(CONFIG)
    there = open_pipeline_process(CONFIG, FAKE, name="test")
    try:
        assert (there.size, there.device, there.refiner_name) == (64, "cpu", None)  # what the sender tells viewers
        for frame in (head_frame(0.0), head_frame(0.3), head_frame(-0.2, width=640, height=480)):  # the blocks grow
            frame.setflags(write=False)  # as the uplink hands them over
            mine = here.analyze(frame)
            theirs = there.analyze(frame)
            assert (theirs.observation is not None) == (mine.observation is not None)
            np.testing.assert_array_equal(theirs.eyes_m, mine.eyes_m)
            expected = here.process(frame, POSES, analysis=mine)
            got = there.process(frame, POSES, analysis=theirs)  # the frame the worker kept with its analysis
            assert (got.status, got.face_found, got.timings_ms.keys()) == (expected.status, expected.face_found,
                                                                           expected.timings_ms.keys())
            assert len(got.views) == 3
            for a, b in zip(got.views, expected.views):
                np.testing.assert_array_equal(a, b)
        dark = np.zeros((120, 160, 3), np.uint8)
        lost = there.process(dark, POSES[:1])  # no analysis: the frame goes with the request
        assert lost.status == "face_lost" and lost.views[0].shape == (64, 64, 3)
        assert list(there.views_per_call) == [3, 3, 3, 1]
        assert there.describe() == {"pipeline": "tests.fake_pipeline.Pipeline", "device": "cpu", "refiner": None,
                                    "refiner_dtype": None, "avatar_cuda_graphs": None, "avatar_fell_back": None,
                                    "kernels": None}
    finally:
        there.close()
    assert there.closed and there.error == "it was closed"
    with pytest.raises(ProcessLookupError):
        os.kill(there.pid, 0)  # ended and reaped
    with pytest.raises(WorkerError, match="it was closed"):
        there.analyze(head_frame(0.0))
    there.close()  # twice is fine
    assert not leaked_blocks(blocks) and open_fds() <= fds


@pytest.mark.parametrize("fault, frame, reason", [
    ("crash", solid(fake_pipeline.BLUE), r"its pipeline process exited \(code 3\)"),
    ("hang", solid(fake_pipeline.GREEN), r"its pipeline did not answer in 1 s \(its process was stopped\)"),
    ("kill", None, r"its pipeline process was killed \(SIGKILL\)"),
])
def test_a_process_that_crashes_hangs_or_is_killed_fails_its_calls_with_the_reason(fault, frame, reason):
    blocks = shared_blocks()
    worker = open_pipeline_process(CONFIG, FAILING, name="test", timeout_s=1.0)
    try:
        assert worker.process(head_frame(0.0), POSES).status == "ok"
        if fault == "kill":
            os.kill(worker.pid, signal.SIGKILL)
            frame = head_frame(0.0)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=reason):
            worker.process(frame, POSES)
        assert time.monotonic() - t0 < (3.0 if fault == "hang" else 1.5)
        assert worker.error is not None and worker.error.startswith(reason.split("\\")[0])
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=reason):  # every later call fails at once, analysis too
            worker.analyze(head_frame(0.0))
        assert time.monotonic() - t0 < 0.1
    finally:
        worker.close()
    assert not worker.closed
    with pytest.raises(ProcessLookupError):
        os.kill(worker.pid, 0)
    assert not leaked_blocks(blocks)


def test_a_call_held_up_by_a_compile_longer_than_the_timeout_is_waited_for_while_the_process_says_so():
    worker = open_pipeline_process(CONFIG, FAILING, name="test", timeout_s=3.0)
    try:
        t0 = time.monotonic()
        result = worker.process(solid(fake_pipeline.MAGENTA), POSES)  # 5 s: "busy" every 2 s restarts the 3 s
        assert time.monotonic() - t0 >= fake_pipeline.FailingPipeline.COMPILE_S - 0.5
        assert worker.error is None and result.status == "ok" and len(result.views) == len(POSES)
        assert worker.process(head_frame(0.0), POSES).status == "ok"
        with pytest.raises(WorkerError, match=r"did not answer in 3 s"):  # a hang without the word still fails
            worker.process(solid(fake_pipeline.GREEN), POSES)
    finally:
        worker.close()


def test_an_exception_in_the_pipeline_fails_that_call_only():
    worker = open_pipeline_process(CONFIG, FAILING, name="test")
    try:
        with pytest.raises(PipelineRaisedError, match="ValueError: a red frame"):
            worker.process(solid((255, 0, 0)), POSES)
        assert worker.error is None and worker.process(head_frame(0.0), POSES).status == "ok"
    finally:
        worker.close()
    assert worker.closed


def test_a_viewers_memory_reset_reaches_the_pipeline_in_its_process():
    """The reset button of a call's tile: the Sender calls reset_memory() on its pipeline, here a process; the
    pipeline there forgets at its next frame (before, a pipeline process had no reset_memory and the button did
    nothing)."""
    worker = open_pipeline_process(CONFIG, FAKE, name="test")
    try:
        frame = head_frame(0.0)
        fills = [worker.process(frame, POSES[:1]).memory_fill for _ in range(3)]
        assert fills == pytest.approx([0.01, 0.02, 0.03])
        worker.reset_memory()  # does not wait for the process: an event loop calls it
        assert worker.process(frame, POSES[:1]).memory_fill == pytest.approx(0.01)  # forgot, then this frame
        assert worker.process(frame, POSES[:1]).memory_fill == pytest.approx(0.02)  # once
    finally:
        worker.close()


def test_a_pipeline_that_cannot_be_made_is_unavailable_with_the_reason(caplog):
    with pytest.raises(PipelineUnavailableError, match="cannot load the pipeline factory 'tests.no_such_module:build'"):
        open_pipeline_process(CONFIG, "tests.no_such_module:build", name="test")
    # the reason is the one line: no warnings before it about the process that gave it and ended
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_real_pipeline_in_its_own_process_makes_the_same_pictures(astronaut):
    config = PipelineConfig(device="cpu", size=64, refiner=None, cpu_threads=1)
    here = Pipeline(config)
    there = open_pipeline_process(config, name="test")
    try:
        flipped = np.ascontiguousarray(astronaut[:, ::-1])
        for i, frame in enumerate((astronaut, flipped, astronaut)):  # the face tracker follows the frames in both
            t_s = i / 30  # the capture times: the landmarks' smoothing over frames goes by them
            expected = here.process(frame, POSES, analysis=here.analyze(frame, t_s))
            got = there.process(frame, POSES, analysis=there.analyze(frame, t_s))
            assert got.status == expected.status == "ok"
            for a, b in zip(got.views, expected.views):
                np.testing.assert_array_equal(a, b)
        assert there.describe()["pipeline"] == "telepresence.pipeline.Pipeline"
    finally:
        here.close()
        there.close()
    assert there.closed


@pytest.mark.gpu
def test_pipelines_in_two_processes_capture_their_cuda_graphs_at_the_same_time(astronaut):
    # Each process has its own CUDA context: no turns while one captures (docs/call.md).
    import concurrent.futures

    config = PipelineConfig(device="cuda", size=128, refiner=None, warm_views=3)
    workers = [open_pipeline_process(config, name=f"gpu{i}") for i in range(2)]
    try:
        def frames(worker):  # frames 1/30 s apart in both (the landmarks' smoothing goes by the capture times)
            return [worker.process(astronaut, POSES, analysis=worker.analyze(astronaut, i / 30)) for i in range(5)]

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(frames, workers))  # both capture their graphs on their first frame, together
        for worker, made in zip(workers, results):
            assert all(r.status == "ok" for r in made)
            path = worker.describe()
            assert path["avatar_cuda_graphs"] and not path["avatar_fell_back"], path
        for a, b in zip(results[0][-1].views, results[1][-1].views):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    finally:
        for worker in workers:
            worker.close()


def test_the_process_gets_its_environment_before_the_pipeline_loads():
    """The call hands each pipeline process CUDA MPS's pipe folder, which CUDA reads when it starts."""
    prepare_workers()
    worker = open_pipeline_process(CONFIG, "tests.fake_pipeline:build_pipeline_naming_mps", name="test",
                                   env={"CUDA_MPS_PIPE_DIRECTORY": "/tmp/somewhere"})
    try:
        assert worker.refiner_name == "mps pipe: /tmp/somewhere"
    finally:
        worker.close()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ or os.environ["CUDA_MPS_PIPE_DIRECTORY"] != "/tmp/somewhere"
