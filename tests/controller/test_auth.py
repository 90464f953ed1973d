"""A cluster with an API token and a node token (real Redis, Docker, an agent over a CURVE link).

Without the API token a client gets 401 on every route but the probes; without the node token an agent is
refused at /register, and a peer that skips /register cannot complete a ZMQ handshake, let alone say HELLO.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from controller.api.middleware import NODE_PATHS, OPEN_PATHS
from controller.app import create_app
from controller.config import ControllerConfig
from shoal.auth import CurveKeys, registration_credential
from shoal.localcluster import LocalCluster
from tests.controller.conftest import ECHO, metrics, seed_runtime, upload
from tests.controller.test_cli import shoal
from tests.shoal.test_httpserver import raw_http

pytestmark = pytest.mark.docker
API = "api-token-for-the-test-0123"
NODE = "node-token-for-the-test-0123"


@pytest.fixture
def cluster(make_cluster: Any) -> LocalCluster:
    c: LocalCluster = make_cluster(agents=1, api_token=API, node_token=NODE)
    seed_runtime(c)
    return c


def anonymous(cluster: LocalCluster, method: str, path: str, token: str = "", **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stranger = LocalCluster(cluster.docker_url, port=cluster.port)  # the same controller, no token of its own
    return stranger.request(method, path, headers=headers, **kwargs)


def every_route() -> list[tuple[str, str]]:
    """(method, path) of every route the controller serves, path parameters filled in."""
    app = create_app(ControllerConfig(api_token=API, node_token=NODE))
    out = []
    for route in app.router.routes():
        path = re.sub(r"\{[^}]+\}", "x1", route.resource.canonical if route.resource else "")
        if route.method != "*" and path:
            out.append((route.method, path))
    return out


def test_every_route_but_the_probes_wants_the_api_token(cluster: LocalCluster) -> None:
    routes = [(m, p) for m, p in every_route() if p not in OPEN_PATHS | NODE_PATHS]
    assert ("POST", "/v1/functions/x1/invoke") in routes and ("GET", "/call/x1") in routes and len(routes) > 20
    for method, path in routes:
        for token in ("", "wrong-token-0123456789", NODE):
            status, answer, headers = anonymous(cluster, method, path, token, data=b"{}")
            assert status == 401, (method, path, token, status, answer)
            if method != "HEAD":
                assert answer["error"]["code"] == "unauthorized" and "API token" in answer["error"]["message"]
            assert headers["WWW-Authenticate"].startswith("Bearer")
    # A credential whose bytes are not UTF-8 (they reach the check as surrogates): a 500 before any check, it was.
    host, port = cluster.url.removeprefix("http://").rsplit(":", 1)
    status, _, body = raw_http(host, int(port), b"GET /v1/functions HTTP/1.1\r\nHost: x\r\n"
                                                b"Authorization: Bearer \xe9\xff\r\nConnection: close\r\n\r\n")
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized", body
    assert anonymous(cluster, "GET", "/ping")[:2] == (200, "pong")
    assert anonymous(cluster, "GET", "/version")[0] == 200
    assert anonymous(cluster, "GET", "/openapi.json")[0] == 200
    assert metrics(cluster)['shoal_controller_http_errors_total{code="unauthorized",status="401"}'] == \
        3 * len(routes) + 1
    # Nothing was registered by the refused requests.
    assert [r["name"] for r in cluster.get("/v1/runtimes")] == ["pythonruntime"]


def test_register_wants_a_credential_derived_from_the_node_token(cluster: LocalCluster) -> None:
    body = {"endpoint_id": "n9"}
    for token in ("", API, NODE):  # the node token itself never travels: it is refused
        status, answer, _ = anonymous(cluster, "POST", "/register", token, body=body)
        assert status == 401 and "node token" in answer["error"]["message"], answer
    status, answer, _ = anonymous(cluster, "POST", "/register", registration_credential(NODE), body=body)
    assert status == 200 and answer["curve"] is True and answer["task_url"].startswith("tcp://127.0.0.1:")


def test_calls_run_over_the_curve_link_and_the_cli_sends_the_token(cluster: LocalCluster) -> None:
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    status, call, _ = cluster.request("POST", "/v1/functions/echo/invoke", {"params": {"x": 1}})
    assert status == 200 and call["status"] == "DONE" and call["result"] == {"echo": {"x": 1}}, call
    assert shoal(cluster.url, "invoke", "echo", "--params", '{"y": 2}',
                 env={"SHOAL_API_TOKEN": API})["result"] == {"echo": {"y": 2}}
    refused = shoal(cluster.url, "runtime", "list", env={"SHOAL_API_TOKEN": ""}, check=False)
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr and "API token" in refused.stderr


@pytest.mark.parametrize(("token", "reason"), [("", "wants a node token"),
                                               ("a-wrong-node-token-0123456789", "is not the controller's")])
def test_an_agent_without_the_node_token_is_refused_and_says_why(cluster: LocalCluster, tmp_path: Path,
                                                                 token: str, reason: str) -> None:
    env = dict(os.environ, DOCKER_HOST=cluster.docker_url, SHOAL_NODE_TOKEN=token)
    proc = subprocess.run([sys.executable, "-m", "node_agent", "--controller", cluster.url, "--node-id", "intruder",
                           "--state-dir", str(tmp_path), "--status", "127.0.0.1:0"], env=env, capture_output=True,
                          text=True, timeout=120)
    # It stops at once with the reason; it does not retry for ever.
    assert proc.returncode == 2 and "not_registered" in proc.stderr + proc.stdout, proc
    assert reason in proc.stderr + proc.stdout
    assert [n["node_id"] for n in cluster.get("/v1/nodes")] == [cluster.node_ids[0]]


def test_a_peer_that_skips_register_cannot_join(cluster: LocalCluster) -> None:
    """A DEALER named like a node, straight to the ROUTER: without curve, or with a key pair of its own."""
    url = cluster.request("POST", "/register", {"endpoint_id": "x"},
                          headers={"Authorization": f"Bearer {registration_credential(NODE)}"})[1]["task_url"]
    ctx: zmq.Context[Any] = zmq.Context()
    own = CurveKeys.from_token("the-intruders-own-token-0123")
    try:
        for curve in (False, True):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, cluster.node_ids[0].encode())  # posing as the real node
            if curve:  # it even knows the server's public key
                sock.setsockopt(zmq.CURVE_SERVERKEY, CurveKeys.from_token(NODE).server_public)
                sock.setsockopt(zmq.CURVE_PUBLICKEY, own.client_public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, own.client_secret)
            monitor = sock.get_monitor_socket()
            sock.connect(url)
            sock.send_multipart([b"HELLO", b"{}"])
            outcome = None
            while outcome is None:
                assert monitor.poll(30_000), "no handshake outcome"
                event = int(recv_monitor_message(monitor)["event"])
                if event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                             zmq.EVENT_DISCONNECTED):
                    outcome = event
            assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED
            sock.disable_monitor()
            monitor.close()
            sock.close()
    finally:
        ctx.term()
    deadline = time.monotonic() + 30
    while metrics(cluster).get("shoal_controller_node_links_refused_total", 0) < 2:  # each of the two peers
        assert time.monotonic() < deadline, "the refused handshakes were not counted"
        time.sleep(0.05)
    # The real node kept its link: it still serves calls.
    upload(cluster, "echo", ECHO, entrypoint="handler:handler")
    assert cluster.request("POST", "/v1/functions/echo/invoke", {"params": 3})[1]["result"] == {"echo": 3}
    # Nothing the refused peers sent reached the hub (a HELLO would be a message from an unknown peer at best).
    assert metrics(cluster).get('shoal_protocol_errors_total{socket="nodes"}', 0) == 0


def test_an_agent_given_the_zmq_url_with_the_wrong_token_says_its_handshakes_fail(cluster: LocalCluster,
                                                                                   tmp_path: Path) -> None:
    """Skipping /register (a tcp:// controller URL) skips its check: the link's own handshakes tell instead."""
    url = cluster.request("POST", "/register", {"endpoint_id": "x"},
                          headers={"Authorization": f"Bearer {registration_credential(NODE)}"})[1]["task_url"]
    env = dict(os.environ, DOCKER_HOST=cluster.docker_url, SHOAL_NODE_TOKEN="a-wrong-node-token-0123456789")
    proc = subprocess.Popen([sys.executable, "-m", "node_agent", "--controller", url, "--node-id", "lost",
                             "--state-dir", str(tmp_path), "--status", "127.0.0.1:0"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for output in proc.stdout or []:
            lines.put(output)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "controller_link_handshake_failed" not in line:
            assert time.monotonic() < deadline, "no handshake failure was logged"
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert "SHOAL_NODE_TOKEN" in line
    finally:
        proc.terminate()
        proc.wait(60)
    assert [n["node_id"] for n in cluster.get("/v1/nodes")] == [cluster.node_ids[0]]
