"""The sender under attack and fault: offer bursts, offers aiortc must not see, answers it cannot send,
a receiver that refuses or restarts, a source that cannot be used."""

import asyncio
import contextlib
import gc
import json
import logging
import re
import time

import numpy as np

from telepresence.stream import messages
from telepresence.stream.signaling import RoomLimits
from telepresence.stream.viewer import Viewer
from tests.helpers import (
    ScriptedSource,
    async_test,
    card_image,
    join,
    open_fds,
    recv_json,
    running_receiver,
    running_sender,
    udp_sockets,
    wait_until,
)


def still_source():
    image = card_image()
    return ScriptedSource(lambda i: image, fps=30)


@contextlib.asynccontextmanager
async def sender_in_room(receiver, **config):
    """A running sender (fake pipeline) joined to the receiver's room "demo"."""
    async with running_sender(source=config.pop("source", None) or still_source(),
                              signaling_url=receiver.signaling_url, **config) as sender:
        signaling = asyncio.ensure_future(sender.run_signaling())
        try:
            await wait_until(lambda: any(m.role == "sender" for m in receiver.signaling.registry.rooms.get("demo", {}).values()))
            yield sender
        finally:
            signaling.cancel()
            await asyncio.gather(signaling, return_exceptions=True)


def sender_id(receiver):
    return next(m.id for m in receiver.signaling.registry.rooms["demo"].values() if m.role == "sender")


async def viewer_offer():
    """A real browser-like offer (recvonly video + pose channel, candidates gathered); its peer is closed."""
    viewer = Viewer()
    sdp = await viewer.create_offer()
    await viewer.close()
    return sdp


async def replies(ws, count, timeout_s=20.0):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        with contextlib.suppress(asyncio.TimeoutError):
            message = await recv_json(ws, timeout_s=max(0.1, deadline - time.monotonic()))
            if message["type"] in ("answer", "decline"):
                out.append(message)
    return out


@async_test(timeout_s=120)
async def test_an_offer_burst_from_one_viewer_leaks_no_peer_connection():
    # Within the rate limit's burst (2 s at 20 messages: 40 tokens, the join takes one). It was 40 offers: the
    # 40th got the "rate-limited" error, not an answer or a decline, and each burst waited out its 30 s for it.
    BURST = 16
    async with running_receiver() as receiver, sender_in_room(receiver) as sender:
        offer = await viewer_offer()
        await asyncio.sleep(1.0)
        gc.collect()
        fds_before, udp_before = open_fds(), udp_sockets()
        for burst in range(2):
            ws, _ = await join(receiver, "viewer")
            target = sender_id(receiver)
            for _ in range(BURST):
                await ws.send(json.dumps({"type": "offer", "to": target, "sdp": offer}))
            answered = await replies(ws, BURST, timeout_s=30)
            assert len(answered) == BURST  # every offer answered or declined: none left without a word
            assert any(r["type"] == "answer" for r in answered)
            assert all(r["type"] == "answer" or r["reason"] for r in answered)
            await ws.close()
            await wait_until(lambda: not sender.viewers and not sender._closing_pcs, timeout_s=20)
        await asyncio.sleep(1.0)
        gc.collect()
        fds_after, udp_after = open_fds(), udp_sockets()
        assert sender.render_loop.view_count == 0
        assert udp_after <= udp_before, f"UDP sockets {udp_before} -> {udp_after}"
        assert fds_after <= fds_before + 2, f"file descriptors {fds_before} -> {fds_after}"


@async_test(timeout_s=60)
async def test_offers_aiortc_cannot_take_are_declined_with_a_reason_and_leave_nothing(caplog):
    good = await viewer_offer()
    lines = good.split("\r\n")
    candidate = re.compile(r"^(a=candidate:\S+ \d+ \S+ \d+ \S+ )(\d+)( .*)$")
    bad = {
        "fingerprint": "\r\n".join(l for l in lines if not l.startswith("a=fingerprint")),
        "port": "\r\n".join(candidate.sub(r"\g<1>99999\g<3>", l) for l in lines),
        "candidate": "\r\n".join(l if not l.startswith("a=candidate") else "a=candidate:x" for l in lines),
        "ice": "\r\n".join(l for l in lines if not l.startswith("a=ice-pwd")),
        "media": good + "".join(f"m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:{i + 9}\r\n" for i in range(40)),
    }
    async with running_receiver() as receiver, sender_in_room(receiver) as sender:
        ws, _ = await join(receiver, "viewer")
        with caplog.at_level(logging.WARNING):
            for what, sdp in bad.items():
                await ws.send(json.dumps({"type": "offer", "to": sender_id(receiver), "sdp": sdp}))
                (reply,) = await replies(ws, 1)
                assert reply["type"] == "decline" and what in reply["reason"], (what, reply)
                assert not sender.viewers and sender.render_loop.view_count == 0
            await ws.close()
            await asyncio.sleep(2.0)
            gc.collect()
            await asyncio.sleep(0.1)
        assert not [r for r in caplog.records if r.name == "asyncio" or r.exc_info], [r.getMessage() for r in caplog.records]
        declines = [r.getMessage() for r in caplog.records if "decline" in r.getMessage() or "could not answer" in r.getMessage()]
        assert all(not m.rstrip().endswith(":") for m in declines), declines


@async_test(timeout_s=60)
async def test_a_viewer_declined_after_its_answer_was_built_is_closed_at_once(monkeypatch):
    async with running_receiver() as receiver, sender_in_room(receiver) as sender:
        answer = sender.answer

        async def oversized_answer(viewer_id, offer_sdp):  # as if the answer came out over the size cap
            return await answer(viewer_id, offer_sdp) + "a=x-pad:" + "y" * messages.MAX_SDP_CHARS + "\r\n"

        monkeypatch.setattr(sender, "answer", oversized_answer)
        ws, _ = await join(receiver, "viewer")
        await ws.send(json.dumps({"type": "offer", "to": sender_id(receiver), "sdp": await viewer_offer()}))
        (reply,) = await replies(ws, 1)
        assert reply["type"] == "decline" and reply["reason"]
        await wait_until(lambda: not sender.viewers and sender.render_loop.view_count == 0, timeout_s=1.0)
        await ws.close()


@async_test(timeout_s=60)
async def test_the_sender_retries_a_refused_join_until_it_gets_in():
    async with running_receiver(limits=RoomLimits(max_rooms=1)) as receiver:
        squatter, _ = await join(receiver, "viewer", room="elsewhere")
        async with running_sender(source=still_source(), signaling_url=receiver.signaling_url) as sender:
            signaling = asyncio.ensure_future(sender.run_signaling())
            try:
                await asyncio.sleep(2.0)
                assert "demo" not in receiver.signaling.registry.rooms and not signaling.done()  # refused: too many rooms
                await squatter.close()  # a room frees up
                await wait_until(lambda: "demo" in receiver.signaling.registry.rooms, timeout_s=8)
                viewer = Viewer()
                await viewer.join(receiver.signaling_url, "demo")
                assert (await viewer.next_frame(timeout_s=10)).std() > 20
                await viewer.close()
            finally:
                signaling.cancel()
                await asyncio.gather(signaling, return_exceptions=True)


@async_test(timeout_s=90)
async def test_calls_survive_a_receiver_restart_and_ids_stay_the_same():
    async with running_receiver() as first:
        port = first.port
        async with sender_in_room(first) as sender:
            before_id = sender_id(first)
            viewer = Viewer()
            viewer_id = await viewer.join(first.signaling_url, "demo")
            await viewer.next_frame(timeout_s=10)
            await viewer.wait_channel_open()
            (peer_id,) = sender.viewers

            await first.stop()  # the receiver goes away: media still flows peer to peer
            count = viewer.frames_received
            await asyncio.sleep(2.0)
            assert viewer.frames_received > count + 10 and peer_id in sender.viewers

            async with running_receiver(port=port) as second:
                await wait_until(lambda: second.signaling.registry.rooms.get("demo"), timeout_s=10)
                assert sender_id(second) == before_id == viewer_id  # the sender resumed under its id
                newcomer = Viewer()
                await newcomer.join(second.signaling_url, "demo")
                assert (await newcomer.next_frame(timeout_s=10)).std() > 20
                count = viewer.frames_received
                await wait_until(lambda: viewer.frames_received > count + 10, timeout_s=5)  # the first call lives on
                assert peer_id in sender.viewers and len(sender.viewers) == 2
                await newcomer.close()
            await viewer.close()


@async_test(timeout_s=40)
async def test_a_source_the_pipeline_cannot_use_is_a_status_for_viewers_not_tracebacks(caplog):
    tiny = np.full((8, 8, 3), 200, np.uint8)
    with caplog.at_level(logging.WARNING):
        async with running_sender(source=ScriptedSource(lambda i: tiny, fps=60)) as sender:
            viewer = Viewer()
            await viewer.connect(sender, "v1")
            await viewer.wait_channel_open()
            await wait_until(lambda: viewer.status == "source_error", timeout_s=10)
            assert "source" in viewer.status_text
            await viewer.close()
    assert sum(r.exc_info is not None for r in caplog.records) == 0
    assert sum("too small" in r.getMessage() for r in caplog.records) <= 2
