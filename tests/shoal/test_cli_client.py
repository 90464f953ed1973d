"""Clients that send a credential, against real local HTTP servers: the CLI, the local cluster harness and a node
registering. A redirect is reported, never followed (urllib would send the credential along to wherever it
points, and turn a POST into a GET that still carries it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shoal.cli import Client, CliError

TOKEN = "a-long-enough-api-token-for-tests"


class Recorder(BaseHTTPRequestHandler):
    """Answers 200 {} and records each request's path and headers (the place a redirect points to)."""

    seen: list[tuple[str, dict[str, str]]]

    def _answer(self) -> None:
        self.seen.append((self.path, dict(self.headers)))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *_: Any) -> None:
        pass


def redirector(code: int, location: str) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(code)
            self.send_header("Location", location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *_: Any) -> None:
            pass

    return Redirect


def serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Elsewhere", (Recorder,), {"seen": seen})
    server, url = serve(handler)
    try:
        yield url, seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_reported_and_the_token_goes_nowhere(code: int, elsewhere: Any) -> None:
    target, seen = elsewhere
    server, url = serve(redirector(code, target))
    try:
        client = Client(url, TOKEN)
        for call in (lambda: client.request("GET", "/v1/runtimes"),
                     lambda: client.request("POST", "/v1/runtimes", {"name": "x"}),
                     lambda: client.upload("/v1/functions/f?runtime=r", b"archive", show=False)):
            with pytest.raises(CliError, match=f"HTTP {code}: .*redirects to '{target}/v1/") as raised:
                call()
            assert "not followed" in str(raised.value)
        # The place it points to works, and is reached directly only.
        assert Client(target, TOKEN).request("GET", "/v1/runtimes") == {}
        assert [path for path, _ in seen] == ["/v1/runtimes"]
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_says_so_in_one_line(elsewhere: Any) -> None:
    target, seen = elsewhere
    server, url = serve(redirector(302, target))
    try:
        env = {k: v for k, v in os.environ.items() if k != "SHOAL_API_TOKEN_FILE"}
        done = subprocess.run([sys.executable, "-m", "shoal.cli", "--url", url, "runtime", "list"],
                              capture_output=True, text=True, timeout=60, env=dict(env, SHOAL_API_TOKEN=TOKEN))
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2 and "redirects to" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert TOKEN not in done.stderr
    assert seen == []


def test_a_node_whose_controller_never_answers_gives_up_as_worth_retrying(tmp_path: Any) -> None:
    """Exit status 1, not 2: a service manager restarts it (2 is a refusal, which it does not)."""
    from node_agent.agent import register_over_http
    from node_agent.config import AgentConfig
    from node_agent.errors import ControllerUnreachable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    config = AgentConfig(controller=url, node_id="n1", state_dir=tmp_path, node_token=TOKEN)
    with pytest.raises(ControllerUnreachable, match="could not register"):
        register_over_http(config, attempts=1)


@pytest.mark.parametrize("code", [301, 302, 307])
def test_a_node_registering_does_not_follow_a_redirect(code: int, elsewhere: Any, tmp_path: Any) -> None:
    from node_agent.agent import register_over_http
    from node_agent.config import AgentConfig
    from node_agent.errors import AgentError

    target, seen = elsewhere
    server, url = serve(redirector(code, target))
    try:
        config = AgentConfig(controller=url, node_id="n1", state_dir=tmp_path, node_token=TOKEN)
        with pytest.raises(AgentError, match=f"redirects to '{target}/register' \\({code}\\)"):
            register_over_http(config, attempts=1)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == []


def test_the_local_cluster_harness_does_not_follow_a_redirect(elsewhere: Any) -> None:
    from shoal.localcluster import LocalCluster

    target, seen = elsewhere
    server, url = serve(redirector(302, target))
    try:
        cluster = LocalCluster("unix:///unused.sock", api_token=TOKEN, port=int(url.rsplit(":", 1)[1]))
        status, _, headers = cluster.request("GET", "/v1/runtimes")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 302 and headers["Location"] == f"{target}/v1/runtimes" and seen == []
