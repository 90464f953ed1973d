"""The node's status server, real on loopback, with a stand-in for the agent's loop."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

from node_agent.agent import Agent
from node_agent.status import PAGE_MAX_AGE, StatusServer


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_loop_that_does_not_answer_makes_the_node_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wedged agent loop used to leave /readyz (and /status) waiting for ever: a balancer's probe hung."""
    monkeypatch.setattr("node_agent.status.ASK_TIMEOUT", 0.2)
    asked: list[Future[Any]] = []

    def ask(what: str) -> Future[Any]:
        asked.append(Future())
        return asked[-1]

    server = StatusServer("127.0.0.1", 0, ask)
    port = server.start()
    try:
        status, body = get(port, "/readyz")
        assert status == 503 and body["ready"] is False and "did not answer" in body["reason"]
        status, body = get(port, "/status")
        assert status == 503 and body["error"]["code"] == "agent_busy"
        # Given up on: the loop, answering late, must find them so (and not raise setting them).
        assert all(f.cancelled() for f in asked) and not any(f.set_running_or_notify_cancel() for f in asked)
    finally:
        server.stop()


class Loop:
    """A stand-in for the agent's loop: counts asks, answers them when told."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Future[Any]]] = []
        self.lock = threading.Lock()

    def ask(self, what: str) -> Future[Any]:
        fut: Future[Any] = Future()
        with self.lock:
            self.asked.append((what, fut))
        return fut

    def count(self, what: str) -> int:
        with self.lock:
            return sum(1 for w, _ in self.asked if w == what)

    def answer(self, what: str, value: Any) -> int:
        """Answer every open ask of ``what``; how many there were."""
        with self.lock:
            open_ = [f for w, f in self.asked if w == what and not f.done()]
        for fut in open_:
            if fut.set_running_or_notify_cancel():
                fut.set_result(value)
        return len(open_)


def wait_for(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Rig:
    def __init__(self, server: StatusServer, stand_in: Loop, port: int) -> None:
        self.server, self.loop, self.port = server, stand_in, port

    def requests(self, what: str) -> int:
        """How many requests wait for the ask of ``what`` in flight (read across threads: a test's estimate)."""
        assert self.server.snapshots is not None
        shared = self.server.snapshots.shared.get(what)
        return shared.requests if shared is not None else 0


@pytest.fixture
def rig() -> Iterator[Rig]:
    stand_in = Loop()
    server = StatusServer("127.0.0.1", 0, stand_in.ask)
    port = server.start()
    try:
        yield Rig(server, stand_in, port)
    finally:
        server.stop()


def test_a_failed_snapshot_is_a_503_with_its_reason_and_is_logged(agent: Agent, monkeypatch: pytest.MonkeyPatch,
                                                                  ) -> None:
    """The state directory removed under the agent: disk_usage raised, and the status server answered a bare 500."""
    logged: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr("node_agent.status.log", SimpleNamespace(error=lambda e, **kw: logged.append((e, kw))))
    clock = Clock(monkeypatch)

    def ask(what: str) -> Future[Any]:  # the agent's own answer, its loop's turn taken at once
        fut = agent.ask(what)
        agent.drain_inbox()
        return fut

    server = StatusServer("127.0.0.1", 0, ask)
    port = server.start()
    try:
        assert get(port, "/status")[0] == 200
        shutil.rmtree(agent.cache.root)
        clock.now += PAGE_MAX_AGE + 0.1  # past the page kept from before
        status, body = get(port, "/status")
        assert status == 503 and body["error"]["code"] == "snapshot_failed"
        assert "No such file or directory" in body["error"]["message"], body
        [(event, fields)] = logged
        assert event == "status_snapshot_failed" and fields["what"] == "status"
        assert isinstance(fields["exc_info"], FileNotFoundError)
        # Kept like a page: a flood of requests is neither a flood of snapshots nor of tracebacks in the log.
        status, again = get(port, "/status")
        assert (status, again) == (503, body) and len(logged) == 1
        status, body = get(port, "/readyz")  # readiness needs no disk: answered as ever
        assert status == 503 and body == {"ready": False, "controller": False, "draining": False, "docker": True}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200 and b"shoal_calls_total" in resp.read()
    finally:
        server.stop()


class Clock:
    """The status module's time.monotonic, moved by the test (the page's age), not by the machine's load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr("node_agent.status.time", SimpleNamespace(monotonic=lambda: self.now))


def test_every_endpoint_maps_a_failed_snapshot_to_a_503(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node_agent.status.log", SimpleNamespace(error=lambda e, **kw: None))

    def fail(path: str, what: str) -> tuple[int, Any]:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, rig.port, path)
            wait_for(lambda: rig.loop.count(what) > 0)
            with rig.loop.lock:
                fut = rig.loop.asked[-1][1]
            fut.set_running_or_notify_cancel()
            fut.set_exception(OSError(5, "Input/output error"))
            return pending.result()

    status, body = fail("/readyz", "ready")
    assert status == 503 and body["ready"] is False and "Input/output error" in body["reason"]
    status, body = fail("/metrics", "metrics")
    assert status == 503 and body["error"]["code"] == "snapshot_failed" and "Input/output" in body["error"]["message"]


def test_requests_at_the_same_time_share_one_snapshot_and_a_page_is_kept_briefly(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each /status and /metrics request took a full snapshot on the agent's loop: a flood of them took its time."""
    clock = Clock(monkeypatch)
    with ThreadPoolExecutor(20) as pool:
        pending = [pool.submit(get, rig.port, "/status") for _ in range(20)]
        wait_for(lambda: rig.requests("status") == 20)
        assert rig.loop.answer("status", {"node_id": "n1"}) == 1
        assert [p.result() for p in pending] == [(200, {"node_id": "n1"})] * 20
    assert get(rig.port, "/status") == (200, {"node_id": "n1"})  # kept: the loop is not asked again
    clock.now += PAGE_MAX_AGE / 2
    assert get(rig.port, "/status") == (200, {"node_id": "n1"})
    assert rig.loop.count("status") == 1
    clock.now += PAGE_MAX_AGE
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(get, rig.port, "/status")
        wait_for(lambda: rig.loop.count("status") == 2)  # too old: asked anew
        rig.loop.answer("status", {"node_id": "n1", "new": True})
        assert later.result() == (200, {"node_id": "n1", "new": True})


def test_readiness_is_never_answered_from_a_snapshot_older_than_the_probe(rig: Rig) -> None:
    ready = {"ready": True, "controller": True, "draining": False, "docker": True}
    with ThreadPoolExecutor(10) as pool:
        # Probes that come while the loop has not started on an ask join it: its answer is newer than them all.
        first = [pool.submit(get, rig.port, "/readyz") for _ in range(5)]
        wait_for(lambda: rig.requests("ready") == 5)
        assert rig.loop.count("ready") == 1
        # Once the loop has started on it, a new probe asks again rather than take what may predate it.
        with rig.loop.lock:
            started = rig.loop.asked[-1][1]
        assert started.set_running_or_notify_cancel()
        second = pool.submit(get, rig.port, "/readyz")
        wait_for(lambda: rig.loop.count("ready") == 2)
        started.set_result(ready)
        assert [p.result() for p in first] == [(200, ready)] * 5
        rig.loop.answer("ready", dict(ready, ready=False, draining=True))
        assert second.result() == (503, dict(ready, ready=False, draining=True))
    # Nothing kept: the next probe asks again.
    with ThreadPoolExecutor(1) as pool:
        third = pool.submit(get, rig.port, "/readyz")
        wait_for(lambda: rig.loop.count("ready") == 3)
        rig.loop.answer("ready", ready)
        assert third.result() == (200, ready)
