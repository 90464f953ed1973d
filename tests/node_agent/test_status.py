"""The node's status server, real on loopback, with a stand-in for the agent's loop."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import Future
from typing import Any

import pytest

from node_agent.status import StatusServer


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
