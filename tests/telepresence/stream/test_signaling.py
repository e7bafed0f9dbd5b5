"""Signaling server: a bad message gets an error reply and the socket stays up; limits, token, relay, static files."""

import asyncio
import contextlib
import http.client
import json

import pytest
import websockets

from telepresence.stream.signaling import Outbox, RoomLimits
from tests.helpers import async_test, connect, join, recv_json, request, running_receiver

SDP = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


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


@async_test()
async def test_a_token_with_a_lone_surrogate_is_a_bad_field_not_an_internal_error():
    async with running_receiver(token="s3cret") as receiver:
        ws = await connect(receiver)
        reply = await request(ws, '{"type": "join", "room": "demo", "role": "viewer", "token": "\\ud800"}')
        assert reply["type"] == "error" and reply["code"] == "bad-field", reply
        assert (await request(ws, {"type": "join", "room": "demo", "role": "viewer", "token": "s3cret"}))["type"] == "joined"
        await ws.close()


async def stop_reading_after_join(receiver, role, room="demo"):
    """A member whose client never reads again: a 4 kB receive buffer, and websockets stops
    reading the socket once one message waits unread (max_queue=1)."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", receiver.port))
    ws = await connect(receiver, sock=sock, max_queue=1)
    await ws.send(json.dumps({"type": "join", "room": room, "role": role}))
    return ws


@async_test(timeout_s=60)
async def test_a_member_that_never_reads_neither_stalls_joins_nor_stays():
    # A large outbox: the member stays until a send times out (the byte cap would drop it sooner).
    async with running_receiver(limits=RoomLimits(max_viewers_per_ip=8, outbox_bytes=64 << 20)) as receiver:
        stuck = await stop_reading_after_join(receiver, "sender")
        await asyncio.sleep(0.2)
        stuck_id = next(m.id for m in receiver.signaling.registry.rooms["demo"].values() if m.role == "sender")
        # Viewers send the stuck sender big offers until its socket's buffers are full.
        big_sdp = SDP + "a=x-pad:" + "y" * 59_000 + "\r\n"
        flooders = [(await join(receiver, "viewer", room="demo"))[0] for _ in range(4)]
        for ws in flooders:
            for _ in range(30):
                await ws.send(json.dumps({"type": "offer", "to": stuck_id, "sdp": big_sdp}))
        await asyncio.sleep(1.0)

        # A new viewer joins beside it and gets through at once: joined, then an answer to its next message.
        assert any(m.id == stuck_id for m in receiver.signaling.registry.members.values())
        t0 = asyncio.get_running_loop().time()
        viewer, joined = await join(receiver, "viewer")
        reply = await request(viewer, {"type": "offer", "to": "nobody", "sdp": SDP})
        elapsed = asyncio.get_running_loop().time() - t0
        assert reply["code"] == "unknown-peer"
        assert elapsed < 1.0, f"a join beside a non-reading member took {elapsed:.2f} s"

        # The member whose sends time out is dropped, and the room tells the others.
        timeout_s = receiver.signaling.send_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s + 3.0
        while any(m.id == stuck_id for m in receiver.signaling.registry.rooms.get("demo", {}).values()):
            assert asyncio.get_running_loop().time() < deadline, "the non-reading member was never dropped"
            await asyncio.sleep(0.1)
        for ws in (viewer, *flooders):
            await ws.close()
        stuck.transport.abort()


@async_test(timeout_s=40)
async def test_a_frozen_member_loses_its_place_within_ten_seconds():
    async with running_receiver(limits=RoomLimits(max_viewers_per_room=1)) as receiver:
        frozen, _ = await join(receiver, "viewer")
        frozen.transport.pause_reading()  # as if its process stopped: no pong, no close
        t0 = asyncio.get_running_loop().time()
        while receiver.signaling.registry.rooms.get("demo"):
            assert asyncio.get_running_loop().time() - t0 < 10.0, "a silent member kept its place for 10 s"
            await asyncio.sleep(0.2)
        fresh, _ = await join(receiver, "viewer")  # the place is free again
        await fresh.close()
        frozen.transport.abort()


@async_test()
async def test_a_member_rejoins_with_its_resume_token_under_the_same_id():
    async with running_receiver() as receiver:
        viewer, joined = await join(receiver, "viewer")
        assert len(joined["resume"]) == 32
        viewer.transport.abort()
        await asyncio.sleep(0.2)
        again, rejoined = await join(receiver, "viewer", resume=joined["resume"])
        assert rejoined["id"] == joined["id"] and rejoined["resume"] == joined["resume"]
        other, fresh = await join(receiver, "viewer")
        assert fresh["id"] != joined["id"]
        # Knowing an id is not enough to take it: ids are derived from the secret token.
        thief, stolen = await join(receiver, "viewer", resume="0" * 32)
        assert stolen["id"] != joined["id"]
        for ws in (again, other, thief):
            await ws.close()


@async_test()
async def test_one_address_cannot_fill_a_room_or_the_server():
    limits = RoomLimits(max_viewers_per_room=8, max_viewers_per_ip=3, max_rooms_per_ip=2)
    async with running_receiver(limits=limits) as receiver:
        viewers = [(await join(receiver, "viewer"))[0] for _ in range(3)]
        extra = await connect(receiver)
        assert (await request(extra, {"type": "join", "room": "demo", "role": "viewer"}))["code"] == "address-limit"
        other, _ = await join(receiver, "viewer", room="second")
        third = await connect(receiver)
        assert (await request(third, {"type": "join", "room": "third", "role": "viewer"}))["code"] == "address-limit"
        await viewers[0].close()
        await asyncio.sleep(0.1)
        assert (await request(extra, {"type": "join", "room": "demo", "role": "viewer"}))["type"] == "joined"
        for ws in (*viewers[1:], extra, other, third):
            await ws.close()


@async_test(timeout_s=30)
async def test_a_viewer_that_never_completes_a_call_expires():
    async with running_receiver(limits=RoomLimits(idle_viewer_s=1.0)) as receiver:
        alone, _ = await join(receiver, "viewer", room="empty")  # no sender to call: it may wait
        idle, _ = await join(receiver, "viewer")
        sender, _ = await join(receiver, "sender")
        busy, joined = await join(receiver, "viewer")
        sender_id = joined["peers"][0]["id"]
        await busy.send(json.dumps({"type": "offer", "to": sender_id, "sdp": SDP}))
        offer = None
        while offer is None or offer["type"] != "offer":
            offer = await recv_json(sender)
        await sender.send(json.dumps({"type": "answer", "to": offer["from"], "sdp": SDP}))
        await asyncio.sleep(2.5)
        members = {m.id: m for room in receiver.signaling.registry.rooms.values() for m in room.values()}
        assert joined["id"] in members  # it completed a call
        assert len([m for m in members.values() if m.room == "demo" and m.role == "viewer"]) == 1  # idle one expired
        assert any(m.room == "empty" for m in members.values())
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            while True:
                await recv_json(idle)
        for ws in (alone, sender, busy):
            await ws.close()


@async_test()
async def test_an_outbox_closes_whenever_it_is_closed():
    # Python 3.11's asyncio.wait_for swallows a cancel that lands just as its send completes; a socket whose
    # sends complete at once (the call's in-process senders, signaling_local) hit it: close() waited for ever.
    class InstantSocket:
        async def send(self, text):
            pass

        async def close(self, *args):
            pass

    for ticks in range(8):  # each moment of a send in progress
        outbox = Outbox(InstantSocket(), 5.0, 1 << 20, "test")
        await asyncio.sleep(0)
        outbox.put("x")
        for _ in range(ticks):
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.shield(outbox.close()), 1.0)


@async_test(timeout_s=30)
async def test_a_client_at_a_path_with_no_signaling_is_refused_for_good_with_the_path_named():
    from telepresence.stream.signaling_client import SignalingClient, SignalingRejectedError

    async with running_receiver() as receiver:
        url = receiver.signaling_url.replace("/ws", "/nope")
        with pytest.raises(SignalingRejectedError, match=r"/nope: the server answered HTTP 404: nothing to join at that path"):
            await SignalingClient(url, "demo", "sender", "sam").connect()
        client = SignalingClient(receiver.signaling_url, "demo", "sender", "sam")  # the right path joins
        assert (await client.connect()).room == "demo"
        await client.close()
