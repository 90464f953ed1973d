"""Status endpoints over HTTP (aiohttp, in its own thread): /healthz, /readyz, /status, /metrics.

Handlers never touch the agent's state directly: they ask the agent's loop for a snapshot (a future
fulfilled between two events), so no lock guards the hot path. Asks are shared (``Snapshots``): requests that
arrive together wait for one answer, and the /status and /metrics pages are kept for ``PAGE_MAX_AGE``, so a
flood of requests costs the agent's loop at most a few snapshots a second. /readyz is never answered from an
older snapshot: a probe joins only an ask the loop has not started on yet (whose answer is taken after it came).
A snapshot that fails (an OSError reading the state directory's disk, say) is logged and answered 503 with its
reason.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from node_agent.errors import AgentStopping
from shoal.httpserver import JsonErrorAppRunner
from shoal.logs import get_logger
from shoal.protocol import dumps

Ask = Callable[[str], "Future[Any]"]
ASK_TIMEOUT = 5.0  # seconds the agent's loop has to answer a status request
PAGE_MAX_AGE = 0.5  # seconds a /status or /metrics page is served again before the loop is asked anew

log = get_logger("status")


class LoopSilent(Exception):
    """The agent's loop did not answer in time (or is stopping)."""


class SnapshotFailed(Exception):
    """The agent's loop answered with an error: taking the snapshot failed."""


@dataclass
class Shared:
    """One ask of the agent's loop, awaited by every request that joined it."""

    fut: Future[Any]  # the agent's answer (set on its loop)
    task: asyncio.Task[Any]  # waits for it, within ASK_TIMEOUT, and renders it once for every waiter
    requests: int = 0  # how many requests waited for it

    def unstarted(self) -> bool:
        """The loop has not begun taking this snapshot: its answer will be at least as new as a request now."""
        return not (self.fut.running() or self.fut.done())


@dataclass
class Snapshots:
    """The status server's asks of the agent's loop; used on the server's own loop only (no lock)."""

    ask: Ask
    shared: dict[str, Shared] = field(default_factory=dict)
    #: what -> (time.monotonic() when answered, the rendered answer or the SnapshotFailed it was)
    kept: dict[str, tuple[float, Any]] = field(default_factory=dict)

    async def get(self, what: str, max_age: float = 0.0, render: Callable[[Any], Any] = lambda v: v) -> Any:
        """``render(snapshot)``: kept up to ``max_age`` seconds (0: a snapshot taken after this request came),
        shared with the requests asking at the same time. LoopSilent or SnapshotFailed if there is none."""
        if max_age > 0 and what in self.kept:
            at, outcome = self.kept[what]
            if time.monotonic() - at <= max_age:
                if isinstance(outcome, SnapshotFailed):
                    raise SnapshotFailed(str(outcome))  # a new one: a raise adds to an exception's traceback
                return outcome
        current = self.shared.get(what)
        if current is None or current.task.done() or (max_age <= 0 and not current.unstarted()):
            current = self.start(what, max_age, render)
        current.requests += 1
        # One request giving up (its client gone) does not cancel what the others wait for.
        return await asyncio.shield(current.task)

    def start(self, what: str, max_age: float, render: Callable[[Any], Any]) -> Shared:
        fut = self.ask(what)
        current = Shared(fut, asyncio.get_running_loop().create_task(self.answer(what, fut, max_age, render)))
        self.shared[what] = current

        def done(task: asyncio.Task[Any]) -> None:
            if self.shared.get(what) is current:
                del self.shared[what]
            if not task.cancelled():
                task.exception()  # retrieved: a failure every waiter left is not reported as unretrieved

        current.task.add_done_callback(done)
        return current

    async def answer(self, what: str, fut: Future[Any], max_age: float, render: Callable[[Any], Any]) -> Any:
        try:
            # A timeout cancels the agent's future too: its loop, answering late, finds it given up.
            value = await asyncio.wait_for(asyncio.wrap_future(fut), ASK_TIMEOUT)
            outcome = render(value)
        except TimeoutError:
            raise LoopSilent(f"the agent's loop did not answer within {ASK_TIMEOUT:g} s") from None
        except AgentStopping as exc:
            raise LoopSilent(str(exc)) from None
        except Exception as exc:
            log.error("status_snapshot_failed", what=what, error=repr(exc), exc_info=exc)
            failed = SnapshotFailed(f"the agent could not take its {what} snapshot: {exc}")
            if max_age > 0:
                self.kept[what] = (time.monotonic(), failed)
            raise failed from None
        if max_age > 0:
            self.kept[what] = (time.monotonic(), outcome)
        return outcome


SNAPSHOTS_KEY: web.AppKey[Snapshots] = web.AppKey("snapshots")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def unavailable(exc: LoopSilent | SnapshotFailed) -> web.Response:
    code = "agent_busy" if isinstance(exc, LoopSilent) else "snapshot_failed"
    return web.json_response({"error": {"code": code, "message": str(exc)}}, status=503)


async def readyz(request: web.Request) -> web.Response:
    try:
        ready: dict[str, Any] = await request.app[SNAPSHOTS_KEY].get("ready")
    except (LoopSilent, SnapshotFailed) as exc:
        return web.json_response({"ready": False, "reason": str(exc)}, status=503)
    return web.json_response(ready, status=200 if ready["ready"] else 503)


async def status(request: web.Request) -> web.Response:
    try:
        body: bytes = await request.app[SNAPSHOTS_KEY].get("status", PAGE_MAX_AGE, dumps)  # encoded once
    except (LoopSilent, SnapshotFailed) as exc:
        return unavailable(exc)
    return web.Response(body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    try:
        text: str = await request.app[SNAPSHOTS_KEY].get("metrics", PAGE_MAX_AGE)
    except (LoopSilent, SnapshotFailed) as exc:
        return unavailable(exc)
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def create_app(ask: Ask) -> web.Application:
    app = web.Application()
    app[SNAPSHOTS_KEY] = Snapshots(ask)
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
        self.snapshots: Snapshots | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="status-http", daemon=True)

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self) -> int:
        app = create_app(self.ask)
        self.snapshots = app[SNAPSHOTS_KEY]
        self.runner = JsonErrorAppRunner(app, access_log=None)
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
