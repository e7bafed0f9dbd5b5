"""The call's CUDA MPS daemon (telepresence.stream.mps), with a stand-in for nvidia-cuda-mps-control that
records how it was called: started with its own folders, stopped with `quit`, failures said in one line."""

import asyncio
import logging
import os
import stat
import tempfile
from pathlib import Path

import pytest

from telepresence.pipeline import PipelineConfig
from telepresence.stream import mps
from telepresence.stream.call import CallConfig, CallHost
from telepresence.stream.mps import MpsDaemon, MpsUnavailableError, share_gpu
from tests.helpers import async_test


def fake_control(folder: Path, exit_status: int = 0, stderr: str = "") -> Path:
    """An nvidia-cuda-mps-control on PATH that appends its arguments, pipe folder and input to calls.log."""
    folder.mkdir(exist_ok=True)
    log = folder / "calls.log"
    script = folder / mps.CONTROL
    script.write_text(
        "#!/bin/sh\n"
        f'input=""; [ "$1" = "-d" ] || input=$(cat)\n'
        f'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY input=$input" >> {log}\n'
        f'[ -z "{stderr}" ] || echo "{stderr}" >&2\n'
        f"exit {exit_status}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log


@pytest.fixture
def path(tmp_path, monkeypatch):
    """PATH with only the stand-in's folder in front; no daemon configured, none of the system's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv(mps.PIPE, raising=False)
    monkeypatch.setattr(mps, "SYSTEM_PIPE_DIRECTORY", tmp_path / "no-system-daemon")
    return bin_dir


def test_a_daemon_of_our_own_starts_in_its_own_folders_and_quits_at_the_end(path):
    log = fake_control(path)
    daemon = MpsDaemon()
    what = daemon.start()
    pipe = Path(daemon.env[mps.PIPE])
    assert daemon.owned and pipe.is_dir() and Path(daemon.env[mps.LOG]).is_dir()
    assert "of ours" in what and str(pipe.parent) in what
    assert log.read_text().splitlines() == [f"args=-d pipe={pipe} log={daemon.env[mps.LOG]} input="]
    daemon.stop()
    assert log.read_text().splitlines()[1] == f"args= pipe={pipe} log={daemon.env[mps.LOG]} input=quit"
    assert not pipe.parent.exists() and not daemon.owned
    daemon.stop()  # twice: nothing more
    assert len(log.read_text().splitlines()) == 2


def test_a_daemon_that_fails_to_start_says_why_and_leaves_nothing(path, tmp_path, monkeypatch):
    fake_control(path, exit_status=1, stderr="An instance of this daemon is already running")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    daemon = MpsDaemon()
    with pytest.raises(MpsUnavailableError, match="already running"):
        daemon.start()
    assert not daemon.owned and daemon.env == {}
    assert list(temp.iterdir()) == []  # its folders are gone


def test_without_mps_the_call_goes_on_by_turns_and_the_log_says_what_that_costs(path, caplog):
    with caplog.at_level(logging.WARNING, logger="telepresence.stream.mps"):
        env, how = share_gpu(MpsDaemon(control="no-such-mps-control"))
    assert env == {} and how.startswith("by turns") and "not on PATH" in how
    assert "take turns on the GPU" in caplog.text and "--no-mps" in caplog.text


def test_a_daemon_already_configured_is_used_as_it_is(path, monkeypatch):
    log = fake_control(path)
    monkeypatch.setenv(mps.PIPE, "/run/their-mps")
    daemon = MpsDaemon()
    assert "/run/their-mps" in daemon.start()
    assert daemon.env == {mps.PIPE: "/run/their-mps"} and not daemon.owned
    daemon.stop()
    assert not log.exists()  # neither started nor stopped: not ours


@async_test()
async def test_the_call_starts_one_daemon_for_its_gpu_pipelines_only_and_stops_it_with_the_server(path):
    log = fake_control(path)
    cpu = CallHost(CallConfig(pipeline=PipelineConfig(device="cpu")))
    assert await cpu.gpu_env() == {} and cpu.gpu_sharing is None
    off = CallHost(CallConfig(pipeline=PipelineConfig(device="cuda"), mps=False))
    assert await off.gpu_env() == {} and off.gpu_sharing == "by turns (--no-mps)"
    assert not log.exists()
    host = CallHost(CallConfig(pipeline=PipelineConfig(device="cuda")))
    first, second = await asyncio.gather(host.gpu_env(), host.gpu_env())  # two participants joining at once
    assert first == second and Path(first[mps.PIPE]).is_dir() and host.gpu_sharing.startswith("MPS: ")
    await host.close()
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["args=-d", "args="]  # started once, quit once
    assert not Path(first[mps.PIPE]).exists()


@pytest.mark.slow
@async_test(timeout_s=120)
async def test_a_pipeline_that_cannot_start_under_mps_starts_without_it_and_so_do_the_next_ones(path, caplog):
    from telepresence.stream.participant import CallParticipant
    from tests.fake_camera import head_frame
    from tests.helpers import ScriptedSource, running_call

    log = fake_control(path)
    with caplog.at_level(logging.WARNING, logger="telepresence.stream.call"):
        async with running_call(device="cuda", pipeline_factory="tests.fake_pipeline:build_pipeline_refusing_mps") as receiver:
            host = receiver.signaling.cameras
            people = [CallParticipant(ScriptedSource(lambda i: head_frame(0.0), fps=15), name) for name in ("alice", "bob")]
            try:
                for person in people:
                    await person.join(receiver.signaling_url, "demo", timeout_s=30)
                assert len(host.participants) == 2
                assert {p.pipeline.refiner_name for p in host.participants.values()} == {"mps pipe: None"}  # started without
                assert host.gpu_sharing.startswith("by turns (a pipeline did not start under MPS: CUDA error")
            finally:
                for person in people:
                    await person.leave()
    assert caplog.text.count("did not start under CUDA MPS") == 1  # said once
    assert log.read_text().splitlines()[0].startswith("args=-d")  # the daemon had started, and was stopped:
    assert log.read_text().splitlines()[-1].endswith("input=quit")


@pytest.mark.slow
@async_test(timeout_s=120)
async def test_a_pipeline_that_cannot_start_at_all_is_refused_and_mps_stays_on(path, caplog):
    """Only a pipeline that starts without MPS after failing under it turns MPS off for the later ones."""
    from telepresence.stream.participant import CallParticipant
    from telepresence.stream.viewer import ViewerError
    from tests.fake_camera import head_frame
    from tests.helpers import ScriptedSource, running_call

    fake_control(path)
    with caplog.at_level(logging.WARNING, logger="telepresence.stream.call"):
        async with running_call(device="cuda", pipeline_factory="tests.no_such_module:build") as receiver:
            person = CallParticipant(ScriptedSource(lambda i: head_frame(0.0), fps=15), "alice")
            try:
                with pytest.raises(ViewerError, match="cannot load the pipeline factory"):
                    await person.join(receiver.signaling_url, "demo", timeout_s=30)
            finally:
                await person.leave()
            assert receiver.signaling.cameras.gpu_sharing.startswith("MPS: ")
    assert "did not start under CUDA MPS" not in caplog.text
