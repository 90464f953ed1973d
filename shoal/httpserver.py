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
import json
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


class JsonErrorHandler(web.RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # The base class logs, and refuses (ConnectionError) when a response has already begun.
        super().handle_error(request, status, exc, message)
        response = web.Response(status=status, text=error_body(status, message), content_type="application/json")
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return JsonErrorServer(server.request_handler, request_factory=server.request_factory,
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
