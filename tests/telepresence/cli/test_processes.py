"""The command-line processes: clear one-line errors, the demo end to end (a sender surviving a receiver
restart: tests/telepresence/stream/test_sender.py)."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import pytest

from telepresence.stream.viewer import Viewer

from tests.conftest import REPO as ROOT
URL_PATTERN = re.compile(r"Open (http://\S+)")


def run_cli(*args, timeout_s=30):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize(
    "source, message",
    [("no/such/clip.mp4", "no such video file"), ("57", "no camera at index 57"), ("pyproject.toml", "cannot (open|decode) video")],
)
def test_sender_bad_source_is_one_clear_line(source, message):
    result = run_cli("run_sender.py", "--source", source, "--signaling", "ws://127.0.0.1:9/ws")
    assert result.returncode == 2  # bad input, as for `render` (tests/telepresence/cli/test_inputs.py)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr


def test_demo_with_a_bad_source_says_so_before_it_says_it_is_running(tmp_path, capsys, caplog):
    """The demo opened --source only after printing "Demo running. Open URL": the user was sent to a page that
    would never show anything, and the error came after."""
    from telepresence.cli import demo

    (tmp_path / "empty.jpg").write_bytes(b"")
    code = demo.main(["--port", "0", "--source", str(tmp_path / "empty.jpg"), "--pipeline", "tests.fake_pipeline"])
    assert code == 2 and "Demo running" not in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"cannot read image '{tmp_path / 'empty.jpg'}': not an image file, or corrupt"]


def test_sender_missing_pipeline_is_one_clear_line():
    result = run_cli("run_sender.py", "--source", "sample", "--pipeline", "no_such_pipeline_module")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot load the pipeline factory 'no_such_pipeline_module'" in result.stderr


def test_receiver_port_in_use_is_one_clear_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("run_receiver.py", "--port", str(port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "address already in use" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_serves_the_sample_and_stops_cleanly_on_ctrl_c_or_sigterm(stop):
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, telepresence.cli.demo as d; sys.exit(d.main(sys.argv[1:]))",
         "--port", "0", "--pipeline", "tests.fake_pipeline"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal: an ignored SIGINT is inherited through exec, and something earlier in
        # the test session (a worker pool) leaves it ignored in this process.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        match = URL_PATTERN.search(line)
        assert match, line
        url = match.group(1)
        signaling_url = url.replace("http://", "ws://").split("/?")[0] + "/ws"

        async def watch():
            viewer = Viewer()
            await viewer.join(signaling_url, "demo")
            image = await viewer.next_frame(timeout_s=15)
            await viewer.close()
            return image

        image = asyncio.run(asyncio.wait_for(watch(), 30))
        assert image.std() > 20
        process.send_signal(stop)
        try:  # communicate() drains both pipes: a chatty child cannot block on a full pipe
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"the demo did not stop within 20 s of {stop.name}; its log:\n{stderr[-3000:]}")
        assert process.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_send_with_its_pipeline_in_a_process_of_its_own_serves_a_viewer():
    """`send --pipeline-process`: the pipeline runs as a call participant's does (telepresence.stream.worker)."""
    from tests.web.test_browser import Process, start_receiver

    receiver, _, port = start_receiver()
    sender = Process("run_sender.py", "--signaling", f"ws://127.0.0.1:{port}/ws", "--source", "sample",
                     "--pipeline", "tests.fake_pipeline", "--pipeline-process")
    try:
        sender.read_until(r"loading the pipeline \(device cpu, \d+ px, in a process of its own\)", timeout_s=30)
        pid = int(sender.read_until(r"the pipeline runs in process (\d+)", timeout_s=60).group(1))  # soak.py samples it
        assert pid != sender.popen.pid
        os.kill(pid, 0)  # alive
        sender.read_until(r"joined room 'demo'", timeout_s=60)

        async def watch():
            viewer = Viewer()
            await viewer.join(f"ws://127.0.0.1:{port}/ws", "demo")
            image = await viewer.next_frame(timeout_s=15)
            await viewer.close()
            return image

        image = asyncio.run(asyncio.wait_for(watch(), 30))
        assert image.shape[2] == 3 and image.std() > 20  # the sample's picture, through the pipeline process
    finally:
        sender.stop()
        receiver.stop()


def test_a_send_whose_pipeline_process_is_gone_stops_with_the_reason():
    from telepresence.cli.send import _watch_process
    from telepresence.pipeline import PipelineUnavailableError

    class Gone:
        error = None

        def poll(self):
            return self.error

    pipeline = Gone()

    async def run():
        watch = asyncio.ensure_future(_watch_process(pipeline))
        await asyncio.sleep(0.1)
        assert not watch.done()  # nothing wrong yet: it keeps watching
        pipeline.error = "it exited with code -9"
        return await asyncio.wait_for(watch, 5)

    with pytest.raises(PipelineUnavailableError, match="can no longer be used: it exited with code -9"):
        asyncio.run(run())
