"""The receiver's HTTP side: methods, odd paths, and the Origin check on /ws."""

import asyncio
import logging
import socket

import pytest
import websockets

from telepresence.cli.receive import build_parser, config_from_args
from tests.helpers import async_test, connect, join, running_receiver


def raw_http(port, request_text):
    """Send one request as-is; returns (status, headers text, body bytes) read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request_text.encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


def http(port, method, path="/"):
    return raw_http(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")


@async_test()
async def test_only_get_and_head_are_served_and_head_has_no_body():
    async with running_receiver() as receiver:
        status, head, body = await asyncio.to_thread(http, receiver.port, "GET")
        assert status == 200 and b"app.js" in body
        length = len(body)
        status, head, body = await asyncio.to_thread(http, receiver.port, "HEAD")
        assert status == 200 and body == b"" and f"Content-Length: {length}" in head
        for method in ("OPTIONS", "DELETE", "TRACE", "POST", "PUT"):
            status, head, body = await asyncio.to_thread(http, receiver.port, method)
            assert status == 405 and "Allow: GET, HEAD" in head and b"app.js" not in body, method


@async_test()
async def test_a_long_path_component_is_a_404_and_one_short_log_line(caplog):
    async with running_receiver() as receiver:
        with caplog.at_level(logging.INFO):
            for path in ("/" + "a" * 300, "/" + "b" * 8000, "/x/" + "c" * 4000 + "/y.js"):
                status, _, _ = await asyncio.to_thread(http, receiver.port, "GET", path)
                assert status == 404, path[:20]
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert all(len(r.getMessage()) < 300 for r in caplog.records)
        ws, _ = await join(receiver, "viewer")  # still serving
        await ws.close()


@async_test()
async def test_signaling_accepts_its_own_page_python_clients_and_listed_origins_only():
    async with running_receiver(allowed_origins=("https://viewer.example.org",)) as receiver:
        own = f"http://127.0.0.1:{receiver.port}"
        for origin in (own, "https://viewer.example.org", None):  # None: a Python client sends no Origin
            ws = await connect(receiver, origin=origin)
            await ws.close()
        for origin in ("http://evil.example", f"http://127.0.0.1:{receiver.port + 1}", "null", "https://viewer.example.org.evil"):
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                await connect(receiver, origin=origin)
            assert info.value.response.status_code == 403, origin
        ws, _ = await join(receiver, "viewer")
        await ws.close()


def test_allow_origin_is_a_repeatable_receive_flag():
    args = build_parser().parse_args(["--allow-origin", "https://a.example", "--allow-origin", "http://b.example:8443"])
    assert config_from_args(args).allowed_origins == ("https://a.example", "http://b.example:8443")
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(["--allow-origin", "a.example/path"]))
