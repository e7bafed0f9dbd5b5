"""models.avatar.prefill: a child process compiles what a sender will, so that the sender's own compile finds
inductor's disk cache. torch.compile itself is stood in for (a real one takes minutes on a CPU): the process
handling, the graphs asked for and the failure and orphan cases are what is tested here."""
import os
import subprocess
import sys
import time

import pytest
import torch

from models.avatar import AvatarConfig, crop_box
from models.avatar.memory import MemoryConfig
from models.avatar.prefill import CachePrefill, PrefillJob, compile_like_the_sender, view_counts_to_prefill
from tests.conftest import REPO


@pytest.fixture(scope="module")
def case(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    return astronaut, obs, tuple(float(v) for v in crop_box(obs, AvatarConfig()))


def _job(case, **kw) -> PrefillJob:
    image, obs, crop = case
    return PrefillJob(AvatarConfig(), "cpu", 64, image, obs, crop, kw.pop("view_counts", (1, 2)), **kw)


def _wait(prefill: CachePrefill, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not prefill.finished():
        assert time.monotonic() < deadline, "the prefill child did not end"
        time.sleep(0.2)


def test_the_child_compiles_the_build_and_the_render_of_each_view_count(case, monkeypatch):
    compiled = []

    def recording(fn, **kwargs):
        compiled.append(fn.__name__)
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    seconds = compile_like_the_sender(_job(case, view_counts=(1, 3), memory=MemoryConfig(texels=32)))
    assert seconds >= 0 and sorted(compiled) == ["build_on_device", "render_cameras"]  # one compiled function each


def test_a_child_whose_first_capture_meets_the_compile_still_compiles_every_render(case, monkeypatch):
    """The worker starts compiling the build at once; a capture that meets it makes that frame eager, and an eager
    frame asks for no render. The child frames again, so every view count's render is compiled all the same."""
    import models.avatar.engine as engine_module

    rendered = set()

    def recording(fn, **kwargs):
        def compiled(*args, **kw):
            if fn.__name__ == "render_cameras":
                rendered.add(int(args[1].shape[0]))  # the view count
            return fn(*args, **kw)
        return compiled

    real_graph, graphs = engine_module._Graph, []

    def clashing(*args, **kwargs):
        graphs.append(1)
        if len(graphs) == 1:  # the build's capture, as CUDA words it
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real_graph(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(engine_module, "_Graph", clashing)
    compile_like_the_sender(_job(case, view_counts=(1, 3)))
    assert rendered == {1, 3}


def test_the_view_counts_are_the_warmed_ones_and_the_current_one():
    assert view_counts_to_prefill(4, 2) == (1, 2, 3, 4)
    assert view_counts_to_prefill(4, 6) == (1, 2, 3, 4, 6)
    assert view_counts_to_prefill(0, 3) == (1, 3)


def test_a_child_process_compiles_and_ends(case, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # torch.compile a no-op in the child: seconds, not minutes
    prefill = CachePrefill(_job(case)).start()
    _wait(prefill)
    assert prefill.ok and prefill.exitcode == 0 and prefill.seconds > 0


def test_a_child_that_fails_says_so(case, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    image, obs, crop = case
    prefill = CachePrefill(PrefillJob(AvatarConfig(), "cpu", 64, image, None, crop, (1,))).start()  # no observation
    _wait(prefill)
    assert prefill.finished() and not prefill.ok and prefill.exitcode == 1


def test_the_child_compiles_below_the_senders_cpu_priority(case, tmp_path):
    """Each participant's sender in a call starts a child: they compile on the cores the calls are left, not theirs,
    with the sender's torch thread count (compiled code guards on it: a store's files would not load otherwise)."""
    import pickle

    job = tmp_path / "job.pickle"
    job.write_bytes(pickle.dumps(_job(case, host_threads=2)))
    out = subprocess.run([sys.executable, "-m", "models.avatar.prefill", str(job), str(os.getpid())], capture_output=True,
                         text=True, cwd=REPO, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO), "TORCHDYNAMO_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiling at CPU priority idle:" in out.stderr or "compiling at CPU priority niceness 19:" in out.stderr, \
        out.stderr[-2000:]
    assert "torch threads: 2, as the sender's" in out.stderr


def test_the_child_ends_when_the_sender_is_gone(case, tmp_path):
    """A sender killed mid-compile leaves no process compiling on for minutes: here the sender starts the child
    and exits at once, and the child (a real compile: minutes on a CPU) stops within seconds."""
    import pickle

    job = tmp_path / "job.pickle"
    job.write_bytes(pickle.dumps(_job(case)))
    code = ("import os, subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-m', 'models.avatar.prefill', sys.argv[1], str(os.getpid())])\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHDYNAMO_DISABLE"}
    t0 = time.monotonic()
    # The child inherits the output pipes: run() returns once the child too has ended and closed them.
    out = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**env, "PYTHONPATH": str(REPO)})
    assert "the sender that started this compile is gone: stopping" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - t0 < 60
