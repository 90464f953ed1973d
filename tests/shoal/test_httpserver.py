"""Malformed HTTP gets the API's JSON error body, from a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from shoal import httpserver
from shoal.httpserver import KEEPALIVE_S, JsonErrorAppRunner, cancelled_if_client_leaves

MALFORMED: dict[str, bytes] = {
    "bad-method": b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-too-long": b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n",
    "bad-chunk-size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
}


def raw_http(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; (status, headers lower-cased, body) of the answer (read to the close)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def raw_http_answer(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """As raw_http, reading the answer by its Content-Length rather than to the close (a server answering before
    it read a body it refuses lingers a while to drain it before it closes)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, body
            body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_json_error(answer: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    status, headers, body = answer
    assert status == 400, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request" and error["message"], error
    return dict(error)


WAITS: dict[str, threading.Event] = {"started": threading.Event(), "cancelled": threading.Event()}
BIG = b"x" * (64 << 20)  # more than the kernel's socket buffers hold


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def wait(request: web.Request) -> web.Response:
        """A sync invoke's wait, whose client may go away."""
        with cancelled_if_client_leaves(request):
            WAITS["started"].set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                WAITS["cancelled"].set()
                raise
        return web.json_response({"waited": True})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG)

    app = web.Application()
    app.router.add_route("*", "/", hello)
    app.router.add_get("/wait", wait)
    app.router.add_get("/big", big)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = JsonErrorAppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    yield port
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_http_is_answered_in_json(server: int, request_bytes: bytes) -> None:
    assert_json_error(raw_http("127.0.0.1", server, request_bytes))
    # and the server goes on serving
    status, _, body = raw_http("127.0.0.1", server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body) == {"ok": True}


def test_an_unknown_expect_is_answered_in_json(server: int) -> None:
    """aiohttp refuses it before the application's middleware runs: it was a text/plain 417."""
    status, headers, body = raw_http("127.0.0.1", server, b"POST / HTTP/1.1\r\nHost: x\r\nExpect: foo\r\n"
                                                          b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status == 417 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == {"code": "expectation_failed", "message": "Unknown Expect: foo"}


def test_a_wait_whose_client_leaves_is_cancelled(server: int) -> None:
    """It went on to its end (an hour at most), holding its task, its connection and a waiter on its call."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        assert WAITS["started"].wait(10)
    assert WAITS["cancelled"].wait(10)


def test_a_client_that_stops_reading_its_response_is_cut_off(server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its response stayed in memory for as long as the connection lived."""
    monkeypatch.setattr(httpserver, "WRITE_STALL_S", 0.2)
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)  # not reading: the server's send buffer fills, and it stops writing
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        assert received < len(BIG)


def test_idle_connections_are_not_kept_for_an_hour() -> None:
    runner = JsonErrorAppRunner(web.Application())
    assert runner._kwargs["keepalive_timeout"] == KEEPALIVE_S
