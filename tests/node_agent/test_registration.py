"""An agent started with an http:// controller: registration over HTTP (a real HTTP server stands for the
controller's /register), and registering again when the controller stays away."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from node_agent.agent import REREGISTER_AFTER, Agent, register_over_http
from node_agent.config import AgentConfig
from node_agent.errors import AgentError
from tests.node_agent.helpers import close_agent


class Register:
    """A /register endpoint on loopback answering ``answer`` (JSON)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.requests += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps(owner.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def register() -> Iterator[Register]:
    server = Register({"task_url": "tcp://127.0.0.1:1", "curve": False})
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("answer", [["not", "an", "object"], {"task_url": 5}, {"task_url": "ipc:///x"}, {}])
def test_a_malformed_registration_answer_is_an_error_not_a_crash(register: Register, tmp_path: Path,
                                                                  answer: Any) -> None:
    register.answer = answer
    config = AgentConfig(controller=register.url, node_id="n1", state_dir=tmp_path)
    with pytest.raises(AgentError, match="could not register"):
        register_over_http(config, attempts=1)


def test_an_agent_the_controller_leaves_unwelcomed_registers_again_and_follows_it(register: Register,
                                                                                tmp_path: Path) -> None:
    """The controller came back on another ZMQ address: the agent kept knocking at the old one for ever."""
    config = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=tmp_path / "state", status_port=0)
    agent = Agent(config, register_url=register.url)
    try:
        register.answer = {"task_url": "tcp://127.0.0.1:2", "curve": False}
        agent.check_registration(time.monotonic())
        assert register.requests == 0  # not yet: it has only just started
        later = time.monotonic() + REREGISTER_AFTER + 1
        agent.check_registration(later)
        agent.check_registration(later)  # one registration at a time
        deadline = time.monotonic() + 10
        while agent.link.url != "tcp://127.0.0.1:2":
            assert time.monotonic() < deadline
            agent.drain_inbox()
            time.sleep(0.01)
        assert register.requests == 1 and not agent.reregistering
        agent.link.welcomed = True
        agent.check_registration(later + 2 * REREGISTER_AFTER)
        assert register.requests == 1  # welcomed: nothing to do
    finally:
        close_agent(agent)
