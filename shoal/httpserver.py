"""aiohttp serving with every error answered in JSON, malformed HTTP included.

A request aiohttp cannot parse (a bad request line, a header too long, a broken chunked body) never reaches the
application or its middleware: aiohttp answers it itself, in text/plain, from ``RequestHandler.handle_error``,
and offers no hook for it (aio-libs/aiohttp#3287). ``JsonErrorAppRunner`` serves an application through a
request handler whose ``handle_error`` answers ``{"error": {"code", "message"}}`` as every other error of the
API does. It relies on two internals of ``web.Server`` (``_loop``, ``_kwargs``); the tests that send
malformed HTTP to the controller and to a node's status server pin that behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest


def error_body(status: int, message: str | None) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    code = phrase.lower().replace(" ", "_").replace("-", "_")
    # aiohttp's parser messages are "Bad status line ..."-style strings; a 500 carries no detail (it is logged).
    text = message if (message and status < 500) else phrase
    return json.dumps({"error": {"code": code, "message": text}})


#: Seconds a connection may keep a response waiting for its client to read it (its send buffer full). Past
#: that the connection is closed: a client that never reads held its whole response (up to the result bound)
#: in memory, with no end.
WRITE_STALL_S = 60.0
#: Seconds an idle keep-alive connection is kept (aiohttp's default is an hour: held by anyone who connects).
KEEPALIVE_S = 75.0


class JsonErrorHandler(web.RequestHandler):
    """Every error answered in JSON (see the module's docstring); besides, a connection whose client stops reading
    is closed after WRITE_STALL_S, and code serving a request can hear that its client went away (``on_lost``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_lost: list[Callable[[], None]] = []
        self.stalled: asyncio.TimerHandle | None = None

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # The base class logs, and refuses (ConnectionError) when a response has already begun.
        super().handle_error(request, status, exc, message)
        response = web.Response(status=status, text=error_body(status, message), content_type="application/json")
        response.force_close()
        return response

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stalled is None:
            self.stalled = asyncio.get_running_loop().call_later(WRITE_STALL_S, self.force_close_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None

    def force_close_stalled(self) -> None:
        self.stalled = None
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset: what the kernel still holds for the client goes too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()  # (a close would wait for the buffer to drain: it never does)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None
        callbacks, self.on_lost = self.on_lost, []
        for callback in callbacks:
            callback()
        super().connection_lost(exc)


@contextlib.contextmanager
def cancelled_if_client_leaves(request: BaseRequest) -> Iterator[bool]:
    """Within it, the current task (a request's handler) is cancelled if the request's client goes away: a sync
    wait whose client left used to go on to its end (an hour at most), holding its task, its connection and a
    waiter on its call. Yields False when the client has gone already (there is nobody to wait for)."""
    hooks = getattr(request.protocol, "on_lost", None)
    task = asyncio.current_task()
    if hooks is None or task is None:  # not served by JsonErrorHandler
        yield True
        return
    if request.transport is None or request.transport.is_closing():
        yield False
        return
    hooks.append(task.cancel)
    try:
        yield True
    finally:
        with contextlib.suppress(ValueError):
            hooks.remove(task.cancel)


def json_errors(handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
                ) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The application's handler, with the errors aiohttp raises before the application's middleware runs (an
    unknown ``Expect``: 417) answered in JSON too."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.Response(status=exc.status, text=error_body(exc.status, exc.text),
                                content_type="application/json")

    return handle


class JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(json_errors(server.request_handler), request_factory=server.request_factory,
                               handler_cancellation=server.handler_cancellation, loop=server._loop,
                               **server._kwargs)


def run(app: web.Application, host: str, port: int, loop: asyncio.AbstractEventLoop,
        shutdown_timeout: float = 5.0, **handler_args: Any) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (as ``web.run_app`` does), then clean up and close ``loop``."""
    runner = JsonErrorAppRunner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout,
                                **handler_args)

    async def serve() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()

    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve())
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            loop.run_until_complete(runner.cleanup())
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
