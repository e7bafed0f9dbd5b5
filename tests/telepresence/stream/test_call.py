"""The call's server side in process: Python participants (telepresence.stream.participant, the call
page's role) against `telepresence serve`'s Receiver + CallHost with the fake pipeline."""

import asyncio
import collections
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from telepresence.stream.capture import FrameSource, SourceError
from telepresence.stream.participant import CallParticipant
from telepresence.stream.signaling import RoomLimits
from telepresence.stream.viewer import ViewerError
from tests import fake_pipeline
from tests.conftest import REPO
from tests.fake_camera import head_frame, head_moving_frames
from tests.helpers import (
    ScriptedSource,
    async_test,
    join,
    open_fds,
    request,
    running_call,
    running_receiver,
    running_sender,
    udp_sockets,
    wait_until,
)

pytestmark = pytest.mark.slow


class Frames:
    """What one participant received: frames per watched sender id, and the newest of each."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.latest: dict = {}

    def __call__(self, sender_id, frame, t_received) -> None:
        self.counts[sender_id] += 1
        self.latest[sender_id] = frame

    async def flowing(self, sender_id, frames=5, timeout_s=15.0) -> None:
        start = self.counts[sender_id]
        await wait_until(lambda: self.counts[sender_id] >= start + frames, timeout_s)

    def picture(self, sender_id) -> np.ndarray:
        return self.latest[sender_id].to_ndarray(format="rgb24")


def clip(frames, fps=15.0):
    return ScriptedSource(lambda i: frames[min(i, len(frames) - 1)] if isinstance(frames, list) else frames, fps=fps)


@contextlib.asynccontextmanager
async def participant(receiver, name, source=None):
    """A joined CallParticipant whose camera is a centred synthetic head unless `source` is given; `.frames`."""
    frames = Frames()
    p = CallParticipant(source or clip(head_frame(0.0)), name, on_frame=frames)
    p.frames = frames
    try:
        await p.join(receiver.signaling_url, "demo", timeout_s=30)
        yield p
    finally:
        await p.leave()


@contextlib.asynccontextmanager
async def python_sender(receiver, name="sam"):
    """A Python sender (fake pipeline, the embedded sample) in the receiver's room "demo"."""
    async with running_sender(signaling_url=receiver.signaling_url, name=name) as sender:
        task = asyncio.ensure_future(sender.run_signaling())
        try:
            await wait_until(lambda: any(m.role == "sender" and m.name == name for m in receiver.signaling.registry.members.values()))
            yield sender
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def sender_id(receiver, name):
    return next(m.id for m in receiver.signaling.registry.members.values() if m.role == "sender" and m.name == name)


def marker_x(picture):
    """The fake pipeline's red pose marker, -1 (left edge) .. 1 (right edge)."""
    red = (picture[..., 0] > 150) & (picture[..., 1] < 90) & (picture[..., 2] < 90)
    return float((np.nonzero(red)[1].mean() + 0.5) / (picture.shape[1] / 2) - 1.0)


@async_test(timeout_s=120)
async def test_everyone_sees_everyone_else_in_one_pipeline_call_per_frame():
    async with running_call() as receiver, participant(receiver, "alice") as a, participant(receiver, "bob") as b, \
            participant(receiver, "cleo") as c:
        people = (a, b, c)
        for watcher in people:
            others = {p.avatar_id for p in people if p is not watcher}
            for other in others:
                await watcher.frames.flowing(other)
            assert set(watcher.viewers) == others  # one track per other participant, none of one's own avatar
        assert a.names[b.avatar_id] == "bob" and b.names[a.avatar_id] == "alice"
        host = receiver.signaling.cameras
        for p in host.participants.values():  # every watcher's view of one person comes from one pipeline call
            assert max(p.pipeline.views_per_call) == 2 and p.sender.viewers.keys() == {q.id for q in host.participants.values()} - {p.id}
        assert len({p.pipeline.pid for p in host.participants.values()} - {os.getpid(), None}) == 3  # a process each
        # a camera picture never leaves the server: what a watcher gets is the avatar (the fake draws its pose marker)
        picture = a.frames.picture(b.avatar_id)
        assert (picture[..., 0] > 150).any() and abs(marker_x(picture)) < 0.1


@async_test(timeout_s=120)
async def test_on_two_gpus_the_participants_pipelines_alternate_and_everyone_still_sees_everyone():
    """serve spreads the pipelines over the host's GPUs (CallConfig.gpus; here 2 told, the fake pipeline standing in
    for CUDA): each process gets its cuda:N, and the call is the same call."""
    async with running_call(device="cuda", gpus=2, mps=False) as receiver, participant(receiver, "alice") as a, \
            participant(receiver, "bob") as b, participant(receiver, "cleo") as c:
        for watcher, other in ((a, b), (b, c), (c, a)):
            await watcher.frames.flowing(other.avatar_id)
        host = receiver.signaling.cameras
        devices = sorted(p.pipeline.describe()["device"] for p in host.participants.values())
        assert devices == ["cuda:0", "cuda:0", "cuda:1"]
        assert sorted(p.gpu for p in host.participants.values()) == [0, 0, 1]


@async_test(timeout_s=120)
async def test_a_head_that_moves_left_turns_the_camera_on_the_others_to_the_left():
    # The participant's left is the right of their (unmirrored) camera picture; through a window they
    # then see more of the other's right cheek: yaw < 0, which the fake pipeline draws left of centre.
    async with running_call() as receiver, \
            participant(receiver, "left", clip(head_moving_frames(+0.5, 15))) as moved_left, \
            participant(receiver, "right", clip(head_moving_frames(-0.5, 15))) as moved_right:
        await wait_until(lambda: moved_left.head is not None and moved_left.head.yaw < -5, timeout_s=10)
        await wait_until(lambda: moved_right.head is not None and moved_right.head.yaw > 5, timeout_s=10)
        assert moved_left.head.tracking and abs(moved_left.head.pitch) < 1 and moved_left.head.dist == pytest.approx(1.0)
        await asyncio.sleep(1.0)
        await moved_left.frames.flowing(moved_right.avatar_id)
        await moved_right.frames.flowing(moved_left.avatar_id)
        assert marker_x(moved_left.frames.picture(moved_right.avatar_id)) < -0.1
        assert marker_x(moved_right.frames.picture(moved_left.avatar_id)) > 0.1


@async_test(timeout_s=120)
async def test_leaving_stops_the_avatar_and_frees_the_server():
    async with running_call() as receiver, participant(receiver, "alice") as a:
        host = receiver.signaling.cameras
        await asyncio.sleep(1.0)
        gc.collect()
        fds, udp, threads = open_fds(), udp_sockets(), set(threading.enumerate())
        for round_ in range(2):
            async with participant(receiver, "bob") as b:
                await a.frames.flowing(b.avatar_id)
                bob = host.participants[b.id]
                loop = bob.sender.render_loop
            await wait_until(lambda: b.avatar_id not in a.viewers, timeout_s=5)  # the others are told (peer-left)
            await wait_until(lambda: bob.closing is not None and bob.closing.done(), timeout_s=10)
            assert list(host.participants) == [a.id]
            assert b.avatar_id not in receiver.signaling.registry.members and b.id not in receiver.signaling.registry.members
            assert bob.pipeline.closed and not loop.capture._thread.is_alive() and not loop._worker.is_alive()
            with pytest.raises(ProcessLookupError):
                os.kill(bob.pipeline.pid, 0)  # its pipeline's process ended
        await asyncio.sleep(1.0)
        gc.collect()
        assert open_fds() <= fds + 2 and udp_sockets() <= udp, (open_fds(), fds, udp_sockets(), udp)
        left = [t.name for t in set(threading.enumerate()) - threads if not t.name.startswith("asyncio_")]  # a bounded pool
        assert not left, left


VANISHING = """
import asyncio, sys
from telepresence.stream.participant import CallParticipant
from tests.fake_camera import head_frame
from tests.helpers import ScriptedSource

async def main():
    p = CallParticipant(ScriptedSource(lambda i: head_frame(0.0), fps=15), "vanishing")
    await p.join(sys.argv[1], "demo", timeout_s=60)
    print("joined", flush=True)
    await asyncio.Future()

asyncio.run(main())
"""


@async_test(timeout_s=150)
async def test_a_vanished_participant_is_dropped_within_5_s_and_the_others_go_on():
    async with running_call() as receiver, python_sender(receiver) as sender, participant(receiver, "alice") as a:
        host = receiver.signaling.cameras
        child = subprocess.Popen([sys.executable, "-c", VANISHING, receiver.signaling_url], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
            assert line.strip() == "joined", line
            vanishing = next(p for p in host.participants.values() if p.name == "vanishing")
            await a.frames.flowing(vanishing.avatar_id)
            child.send_signal(signal.SIGKILL)  # no goodbye: no unpublish, no socket close, no more packets
            t0 = time.monotonic()
            await wait_until(lambda: vanishing.id not in host.participants, timeout_s=10, interval_s=0.05)
            dropped_s = time.monotonic() - t0
        finally:
            child.kill()
            child.wait()
        print(f"vanished participant dropped after {dropped_s:.1f} s")
        assert dropped_s < 5.0
        await wait_until(lambda: vanishing.avatar_id not in a.viewers, timeout_s=5)
        # nobody else noticed: alice is in, and still watches the Python sender, who still serves her
        assert a.id in host.participants
        await a.frames.flowing(sender_id(receiver, "sam"))
        assert a.id in sender.viewers


class SilentSource(FrameSource):
    """A camera that never delivers a frame."""

    name = "silent"

    def __init__(self) -> None:
        self._closed = threading.Event()

    def grab(self) -> None:
        self._closed.wait()
        raise SourceError("closed")

    def retrieve(self) -> np.ndarray:
        raise SourceError("no frame")

    def close(self) -> None:
        self._closed.set()


def wrong_codec_offer(sdp: str) -> str:
    """The offer with its video codecs renamed to ones the server does not decode."""
    return sdp.replace("VP8/90000", "VP9/90000").replace("H264/90000", "AV1/90000")


@async_test(timeout_s=150)
async def test_garbage_is_refused_or_dropped_with_a_reason_and_nobody_else_is_affected():
    limits = RoomLimits(max_senders_per_room=8)
    async with running_call(limits=limits, first_frame_s=3.0) as receiver, python_sender(receiver) as sender, \
            participant(receiver, "alice") as a:
        host = receiver.signaling.cameras
        sam = sender_id(receiver, "sam")
        await a.frames.flowing(sam)

        # a codec the server cannot decode: refused at once, with the reason
        offerer = CallParticipant(clip(head_frame(0.0)), "vp9")
        await offerer.uplink.setLocalDescription(await offerer.uplink.createOffer())
        ws, _ = await join(receiver, "viewer")
        reply = await request(ws, {"type": "publish", "sdp": wrong_codec_offer(offerer.uplink.localDescription.sdp)})
        assert reply["type"] == "unpublished" and "no usable video codec in the offer (AV1, VP9" in reply["reason"], reply
        await ws.close()
        await offerer.leave()

        # frames of 1x1 pixels, of 4000x32, none at all: each dropped with its reason
        cases = {
            "tiny": (clip(np.full((1, 1, 3), 200, np.uint8)), "frames of 1x1 pixels are too small"),
            "huge": (clip(np.full((32, 4000, 3), 200, np.uint8)), "frames of 4000x32 pixels are too large"),
            "silent": (SilentSource(), "no frames from its camera in 3 s"),
        }
        async with contextlib.AsyncExitStack() as stack:
            bad = {name: await stack.enter_async_context(participant(receiver, name, source))
                   for name, (source, _) in cases.items()}
            await wait_until(lambda: all(p.unpublished for p in bad.values()), timeout_s=15)
            for name, (_, reason) in cases.items():
                assert reason in bad[name].unpublished, (name, bad[name].unpublished)
        assert list(host.participants) == [a.id]
        await a.frames.flowing(sam)  # alice went on watching the whole time
        assert a.id in sender.viewers and a.unpublished is None


@async_test(timeout_s=120)
async def test_a_lost_face_keeps_the_last_good_avatar_with_a_status_line():
    face, dark, gone = head_frame(0.0), np.zeros((240, 320, 3), np.uint8), threading.Event()
    source = ScriptedSource(lambda i: dark if gone.is_set() else face, fps=15)
    async with running_call() as receiver, participant(receiver, "alice", source) as a, participant(receiver, "bob") as b:
        viewer = b.viewers[a.avatar_id]
        await b.frames.flowing(a.avatar_id)
        await wait_until(lambda: viewer.status == "ok", timeout_s=5)
        gone.set()  # the face goes once bob sees alice's avatar
        await wait_until(lambda: viewer.status == "face_lost", timeout_s=15)
        assert viewer.status_text == "Face lost: showing the last good avatar"
        await b.frames.flowing(a.avatar_id)
        assert b.frames.picture(a.avatar_id).mean() > 30  # the last good avatar, not the dark camera
        await wait_until(lambda: a.head is not None and not a.head.tracking, timeout_s=5)  # alice is told too


@async_test(timeout_s=90)
async def test_cameras_the_server_cannot_take_are_refused_with_the_reason():
    async with running_receiver() as receiver:  # a plain receiver takes no cameras
        ws, _ = await join(receiver, "viewer")
        reply = await request(ws, {"type": "publish", "sdp": "v=0\r\n"})
        assert reply == {"type": "error", "code": "no-calls", "message": reply["message"]} and "telepresence serve" in reply["message"]
        await ws.close()
    async with running_call(max_participants=1) as receiver, participant(receiver, "alice"):
        with pytest.raises(ViewerError, match=r"the server is full \(1 participants\)"):
            async with participant(receiver, "bob"):
                pass
        ws, _ = await join(receiver, "sender")
        reply = await request(ws, {"type": "publish", "sdp": "v=0\r\n"})
        assert reply["code"] == "wrong-role"
        await ws.close()
    async with running_call(limits=RoomLimits(max_senders_per_room=1)) as receiver, participant(receiver, "alice"):
        with pytest.raises(ViewerError, match=r"room 'demo' is full \(1 people\)"):
            async with participant(receiver, "bob"):
                pass
        assert len(receiver.signaling.cameras.participants) == 1


@async_test(timeout_s=120)
async def test_a_page_that_leaves_while_its_camera_is_answered_takes_no_place_in_the_call():
    from aiortc import RTCPeerConnection, VideoStreamTrack

    pc = RTCPeerConnection()
    pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    pc.createDataChannel("uplink")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        async with running_call(max_participants=2) as receiver:
            host = receiver.signaling.cameras
            for _ in range(3):  # more than the call holds: each one's place must come back
                ws, _ = await join(receiver, "viewer")
                await ws.send(json.dumps({"type": "publish", "sdp": pc.localDescription.sdp}))
                await wait_until(lambda: len(host.participants) == 1, timeout_s=10, interval_s=0.01)  # being started
                await ws.close()  # gone before its answer
                await wait_until(lambda: not host.participants, timeout_s=3)  # before: until its uplink timed out (10 s)
            await wait_until(lambda: not receiver.signaling.registry.members, timeout_s=5)  # no avatar left in a room
            async with participant(receiver, "alice") as a:  # a real participant gets in and is served
                assert list(host.participants) == [a.id]
    finally:
        await pc.close()


@pytest.mark.parametrize("fault, colour, reason", [
    ("crash", fake_pipeline.BLUE, "its pipeline process exited (code 3)"),
    ("hang", fake_pipeline.GREEN, "its pipeline did not answer in 2 s (its process was stopped)"),
])
@async_test(timeout_s=150)
async def test_a_pipeline_process_that_dies_or_hangs_drops_its_participant_only(fault, colour, reason):
    # Everyone's pipeline is the failing fake; only bob's camera shows the colour that crashes or hangs it.
    good, bad, turned = head_frame(0.0), np.full((240, 320, 3), colour, np.uint8), threading.Event()
    bobs_camera = ScriptedSource(lambda i: bad if turned.is_set() else good, fps=15)
    async with running_call(pipeline_factory="tests.fake_pipeline:build_failing_pipeline", pipeline_timeout_s=2.0) as receiver, \
            participant(receiver, "alice") as a, participant(receiver, "cleo") as c:
        host = receiver.signaling.cameras
        await a.frames.flowing(c.avatar_id)
        async with participant(receiver, "bob", bobs_camera) as b:
            bob = host.participants[b.id]
            await a.frames.flowing(b.avatar_id)
            turned.set()
            t0 = time.monotonic()
            await wait_until(lambda: b.unpublished is not None, timeout_s=20)
            print(f"{fault}: bob dropped {time.monotonic() - t0:.1f} s after his camera turned {fault}-coloured: {b.unpublished!r}")
            assert b.unpublished == reason
            await wait_until(lambda: b.avatar_id not in a.viewers and b.avatar_id not in c.viewers, timeout_s=5)
            await wait_until(lambda: bob.closing is not None and bob.closing.done(), timeout_s=10)
            with pytest.raises(ProcessLookupError):
                os.kill(bob.pipeline.pid, 0)
        assert set(host.participants) == {a.id, c.id}
        for watcher, other in ((a, c), (c, a)):  # nobody else noticed
            await watcher.frames.flowing(other.avatar_id)
            assert watcher.unpublished is None
