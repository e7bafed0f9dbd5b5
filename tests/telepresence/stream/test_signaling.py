"""Signaling server: a bad message gets an error reply and the socket stays up; limits, token, relay, static files."""

import asyncio
import contextlib
import http.client
import json
from pathlib import Path

import pytest
import websockets

from telepresence.stream.receiver import Receiver, ReceiverConfig
from telepresence.stream.signaling import RoomLimits
from tests.helpers import async_test

SDP = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


@contextlib.asynccontextmanager
async def running_receiver(**config):
    receiver = Receiver(ReceiverConfig(port=0, web_dir=Path("web"), **config))
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def connect(receiver):
    return await websockets.connect(receiver.signaling_url, compression=None, max_size=None)


async def recv_json(ws, timeout_s=5.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout_s))


async def request(ws, message):
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return await recv_json(ws)


async def join(receiver, role, room="demo", **extra):
    ws = await connect(receiver)
    reply = await request(ws, {"type": "join", "room": room, "role": role, **extra})
    assert reply["type"] == "joined", reply
    return ws, reply


@async_test()
async def test_bad_messages_get_an_error_reply_and_the_connection_stays_up():
    async with running_receiver() as receiver:
        ws = await connect(receiver)
        cases = [
            ("not json", "bad-json"),
            ("[1, 2, 3]", "bad-json"),
            (b"\x00\x01binary", "bad-json"),
            ('{"type": "join", "room": NaN, "role": "viewer"}', "bad-json"),
            ('{"type": "shutdown"}', "unknown-type"),
            ('{"type": "join", "room": "../../etc", "role": "viewer"}', "bad-field"),
            ('{"type": "join", "room": "demo"}', "bad-field"),
            ('{"type": "offer", "to": "abc", "sdp": "v=0"}', "not-joined"),
            (json.dumps({"type": "join", "room": "demo", "role": "viewer", "pad": "x" * 100_000}), "too-large"),
        ]
        for raw, code in cases:
            reply = await request(ws, raw)
            assert reply["type"] == "error" and reply["code"] == code, (raw[:40], reply)
        reply = await request(ws, {"type": "join", "room": "demo", "role": "viewer"})
        assert reply["type"] == "joined"
        reply = await request(ws, {"type": "join", "room": "demo", "role": "viewer"})
        assert reply["code"] == "already-joined"
        await ws.close()


@async_test()
async def test_a_frame_beyond_the_transport_cap_closes_only_that_socket():
    async with running_receiver() as receiver:
        other, _ = await join(receiver, "viewer")
        ws = await connect(receiver)
        await ws.send("x" * (2 * 2**20))
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1009  # message too big
        assert (await request(other, "still there?"))["code"] == "bad-json"
        fresh, _ = await join(receiver, "viewer")
        await fresh.close()
        await other.close()


@async_test()
async def test_wrong_token_is_refused_and_the_right_one_joins():
    async with running_receiver(token="s3cret") as receiver:
        ws = await connect(receiver)
        assert (await request(ws, {"type": "join", "room": "demo", "role": "viewer"}))["code"] == "bad-token"
        assert (await request(ws, {"type": "join", "room": "demo", "role": "viewer", "token": "guess"}))["code"] == "bad-token"
        reply = await request(ws, {"type": "join", "room": "demo", "role": "viewer", "token": "s3cret"})
        assert reply["type"] == "joined"
        assert "token=s3cret" in receiver.url
        await ws.close()


@async_test()
async def test_room_caps_viewers_and_senders():
    async with running_receiver(limits=RoomLimits(max_viewers_per_room=2, max_senders_per_room=1)) as receiver:
        a, _ = await join(receiver, "viewer")
        b, _ = await join(receiver, "viewer")
        c = await connect(receiver)
        assert (await request(c, {"type": "join", "room": "demo", "role": "viewer"}))["code"] == "room-full"
        s1, _ = await join(receiver, "sender")
        s2 = await connect(receiver)
        assert (await request(s2, {"type": "join", "room": "demo", "role": "sender"}))["code"] == "room-full"
        # another room is not affected, and a freed place can be taken again
        d, _ = await join(receiver, "viewer", room="other")
        await a.close()
        await asyncio.sleep(0.1)
        assert (await request(c, {"type": "join", "room": "demo", "role": "viewer"}))["type"] == "joined"
        for ws in (b, c, d, s1, s2):
            await ws.close()


@async_test()
async def test_connections_per_ip_are_capped():
    async with running_receiver(limits=RoomLimits(max_connections_per_ip=2)) as receiver:
        a, b = await connect(receiver), await connect(receiver)
        c = await connect(receiver)
        assert (await recv_json(c))["code"] == "too-many-connections"
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await recv_json(c)
        await a.close()
        await asyncio.sleep(0.1)
        d, _ = await join(receiver, "viewer")
        await b.close()
        await d.close()


@async_test()
async def test_offer_and_answer_are_relayed_within_a_room_by_role():
    async with running_receiver() as receiver:
        sender, _ = await join(receiver, "sender", name="alice")
        viewer, joined = await join(receiver, "viewer")
        assert [p["name"] for p in joined["peers"]] == ["alice"]
        sender_id = joined["peers"][0]["id"]
        viewer_id = joined["id"]
        assert (await recv_json(sender))["type"] == "peer-joined"

        await viewer.send(json.dumps({"type": "offer", "to": sender_id, "sdp": SDP}))
        offer = await recv_json(sender)
        assert offer == {"type": "offer", "from": viewer_id, "sdp": SDP}
        await sender.send(json.dumps({"type": "answer", "to": viewer_id, "sdp": SDP}))
        assert (await recv_json(viewer))["from"] == sender_id

        assert (await request(viewer, {"type": "answer", "to": sender_id, "sdp": SDP}))["code"] == "wrong-role"
        assert (await request(viewer, {"type": "offer", "to": "nobody", "sdp": SDP}))["code"] == "unknown-peer"
        assert (await request(sender, {"type": "offer", "to": viewer_id, "sdp": SDP}))["code"] == "wrong-role"

        # a viewer in another room cannot reach this sender
        stranger, joined_other = await join(receiver, "viewer", room="elsewhere")
        assert joined_other["peers"] == []
        assert (await request(stranger, {"type": "offer", "to": sender_id, "sdp": SDP}))["code"] == "unknown-peer"

        await viewer.close()
        assert await recv_json(sender) == {"type": "peer-left", "id": viewer_id, "role": "viewer"}
        await sender.close()
        await stranger.close()


@async_test()
async def test_a_flood_is_rate_limited_without_dropping_the_socket():
    async with running_receiver(limits=RoomLimits(messages_per_s=20)) as receiver:
        ws = await connect(receiver)
        for _ in range(200):
            await ws.send('{"type": "nope"}')
        codes = set()
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                codes.add((await recv_json(ws, timeout_s=0.5))["code"])
        assert codes == {"unknown-type", "rate-limited"}
        await asyncio.sleep(1.0)
        assert (await request(ws, {"type": "join", "room": "demo", "role": "viewer"}))["type"] == "joined"
        await ws.close()


def http_get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", path)  # sent as-is: no client-side path normalisation
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type"), body


@async_test()
async def test_static_files_are_served_from_web_only():
    async with running_receiver() as receiver:
        get = lambda path: asyncio.to_thread(http_get, receiver.port, path)  # noqa: E731
        status, content_type, body = await get("/?room=demo")
        assert status == 200 and content_type.startswith("text/html") and b"app.js" in body
        status, content_type, _ = await get("/app.js")
        assert status == 200 and content_type.startswith("text/javascript")
        for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fpyproject.toml", "/missing.js", "//etc/passwd", "/web/../../etc/passwd"):
            status, _, body = await get(path)
            assert status == 404, path
        # the server is still fine after all that
        ws, _ = await join(receiver, "viewer")
        await ws.close()
