"""Status endpoints over HTTP (aiohttp, in its own thread): /healthz, /readyz, /status, /metrics.

Handlers never touch the agent's state directly: they ask the agent's loop for a snapshot (a future
fulfilled between two events), so no lock guards the hot path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from aiohttp import web

from node_agent.errors import AgentStopping
from shoal.httpserver import JsonErrorAppRunner

Ask = Callable[[str], "Future[Any]"]
ASK_KEY: web.AppKey[Ask] = web.AppKey("ask")
ASK_TIMEOUT = 5.0  # seconds the agent's loop has to answer a status request


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


class LoopSilent(Exception):
    """The agent's loop did not answer in time."""


async def ask(request: web.Request, what: str) -> Any:
    """A snapshot from the agent's loop; a loop that does not answer within ASK_TIMEOUT is an answer too."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(request.app[ASK_KEY](what)), ASK_TIMEOUT)
    except TimeoutError:
        raise LoopSilent(f"the agent's loop did not answer within {ASK_TIMEOUT:g} s") from None
    except AgentStopping as exc:
        raise LoopSilent(str(exc)) from None


def silent(exc: LoopSilent) -> web.Response:
    return web.json_response({"error": {"code": "agent_busy", "message": str(exc)}}, status=503)


async def readyz(request: web.Request) -> web.Response:
    try:
        ready: dict[str, Any] = await ask(request, "ready")
    except LoopSilent as exc:
        return web.json_response({"ready": False, "reason": str(exc)}, status=503)
    return web.json_response(ready, status=200 if ready["ready"] else 503)


async def status(request: web.Request) -> web.Response:
    try:
        return web.json_response(await ask(request, "status"))
    except LoopSilent as exc:
        return silent(exc)


async def metrics(request: web.Request) -> web.Response:
    try:
        text: str = await ask(request, "metrics")
    except LoopSilent as exc:
        return silent(exc)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def create_app(ask: Ask) -> web.Application:
    app = web.Application()
    app[ASK_KEY] = ask
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


class StatusServer:
    def __init__(self, host: str, port: int, ask: Ask) -> None:
        self.host = host
        self.port = port
        self.ask = ask
        self.loop = asyncio.new_event_loop()
        self.runner: JsonErrorAppRunner | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="status-http", daemon=True)

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> int:
        self.runner = JsonErrorAppRunner(create_app(self.ask), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
