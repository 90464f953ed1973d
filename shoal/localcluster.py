"""A whole Shoal cluster on this machine: Redis, a controller and N node agents, as child processes.

Used by `shoal up`, `make demo`, the end-to-end tests and the benchmarks. Agents register over HTTP
(``POST /register``) and then keep their ZMQ link, as on real hosts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal import httpclient
from shoal.auth import bearer
from shoal.devenv import procs
from shoal.devenv.redis_server import RedisServer, free_port, start_redis


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the controller binds: TIME_WAIT is no use
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def child_env(own: dict[str, str], *overrides: dict[str, str],
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a cluster's child: the caller's (``os.environ``) without any ``SHOAL_*`` setting, then
    ``own`` (what the cluster sets), then each of ``overrides`` (``controller_env``, ``agent_env``, ...).

    A caller's settings are for the cluster it deploys or talks to, not this one: ``SHOAL_HOST=0.0.0.0`` would
    serve this cluster on every interface, ``SHOAL_ZMQ_ADVERTISE`` would send its agents to another controller,
    ``SHOAL_API_TOKEN_FILE`` (exported for the CLI) would replace its tokens."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if not k.startswith("SHOAL_")}
    env.update(own)
    for extra in overrides:
        env.update(extra)
    return env


class ClusterError(RuntimeError):
    pass


@dataclass
class Agent:
    node_id: str
    proc: subprocess.Popen[bytes]
    state_dir: Path


@dataclass
class LocalCluster:
    docker_url: str
    agents: int = 2
    name: str = "node"  # node ids are NAME-1..N: unique per Docker engine (orphan sweeps go by node id)
    policy: str = "function"
    placement: str = "warm-first"
    redis_url: str | None = None
    base: Path | None = None
    log_level: str = "warning"
    agent_env: dict[str, str] = field(default_factory=dict)
    controller_env: dict[str, str] = field(default_factory=dict)
    heartbeat: float = 0.5
    api_token: str = ""  # given to the controller, and sent by request()
    node_token: str = ""  # given to the controller and the agents (shoal/auth.py)
    liveness: int = 3  # heartbeats missed, both ways, before a peer counts as lost
    detach: bool = False  # children in their own sessions, to outlive this process (`shoal up`)
    port: int = 0
    zmq_port: int = 0
    controller: subprocess.Popen[bytes] | None = None
    nodes: dict[str, Agent] = field(default_factory=dict)
    _redis: RedisServer | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def node_ids(self) -> list[str]:
        return [f"{self.name}-{i + 1}" for i in range(self.agents)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalCluster:
        if self.base is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="shoal-cluster-")
            self.base = Path(self._tmp.name)
        if self.redis_url is None:
            self._redis = start_redis(appendonly=True)
            self.redis_url = self._redis.url
        self.port = self.port or free_port()
        while not self.zmq_port or self.zmq_port == self.port:  # two draws can match
            self.zmq_port = free_port()
        self.start_controller()
        for node_id in self.node_ids:
            self.start_agent(node_id)
        self.wait_nodes(self.agents)
        return self

    def start_controller(self) -> None:
        assert self.base is not None and self.redis_url is not None
        for port, what in ((self.port, "HTTP"), (self.zmq_port, "ZMQ")):
            if not port_free(port):  # else a controller already there would answer as if it were ours
                raise ClusterError(f"the controller's {what} port {port} is in use (another cluster is up?)")
        env = child_env(self.controller_variables(), self.controller_env)
        self.controller = subprocess.Popen([sys.executable, "-m", "controller"], env=env, stdin=subprocess.DEVNULL,
                                           start_new_session=self.detach, **self._output("controller"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                where = f" (see {self.base / 'controller.log'})" if self.detach else ""
                raise ClusterError(f"the controller exited with {self.controller.returncode}{where}")
            try:
                self.request("GET", "/ping", timeout=5)
                return
            except (OSError, ClusterError):
                time.sleep(0.05)
        raise ClusterError("the controller did not answer within 30 s")

    def controller_variables(self) -> dict[str, str]:
        """What the cluster sets for its controller (over the caller's environment, without its ``SHOAL_*``)."""
        assert self.base is not None and self.redis_url is not None
        return {"SHOAL_HOST": "127.0.0.1", "SHOAL_PORT": str(self.port),
                "SHOAL_ZMQ_BIND": f"tcp://127.0.0.1:{self.zmq_port}", "SHOAL_REDIS_URL": self.redis_url,
                "SHOAL_BLOB_DIR": str(self.base / "blobs"), "SHOAL_PLACEMENT": self.placement,
                "SHOAL_HEARTBEAT": str(self.heartbeat), "SHOAL_LIVENESS": str(self.liveness),
                "SHOAL_LOG_LEVEL": self.log_level, "SHOAL_API_TOKEN": self.api_token,
                "SHOAL_NODE_TOKEN": self.node_token}

    def agent_variables(self) -> dict[str, str]:
        """What the cluster sets for its agents (the rest of their settings are on their command line)."""
        return {"DOCKER_HOST": self.docker_url, "SHOAL_AGENT_HEARTBEAT": str(self.heartbeat),
                "SHOAL_AGENT_LIVENESS": str(self.liveness), "SHOAL_NODE_TOKEN": self.node_token}

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(sig)
            try:
                self.controller.wait(30)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait(10)
        self.controller = None

    def start_agent(self, node_id: str, env: dict[str, str] | None = None) -> Agent:
        """Start one agent (``env``: its own variables, over the cluster's)."""
        assert self.base is not None
        state = self.base / "agents"
        variables = child_env(self.agent_variables(), self.agent_env, env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent", "--controller", self.url, "--node-id", node_id,
             "--state-dir", str(state), "--status", "127.0.0.1:0", "--policy", self.policy,
             "--log-level", self.log_level],
            env=variables, stdin=subprocess.DEVNULL, start_new_session=self.detach, **self._output(node_id))
        agent = self.nodes[node_id] = Agent(node_id, proc, state)
        return agent

    def stop_agent(self, node_id: str, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        agent = self.nodes.pop(node_id)
        if agent.proc.poll() is None:
            agent.proc.send_signal(sig)
        try:
            return agent.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            return agent.proc.wait(10)

    def wait_nodes(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = [n for n in self.get("/v1/nodes") if n["state"] == "ready"]
            if len(nodes) >= count:
                return nodes
            exited = {n: a.proc.returncode for n, a in self.nodes.items() if a.proc.poll() is not None}
            if exited:
                raise ClusterError(f"agents exited before joining: {exited}")
            if time.monotonic() > deadline:
                raise ClusterError(f"only {len(nodes)} of {count} nodes joined within {timeout:g} s")
            time.sleep(0.1)

    def _output(self, name: str) -> dict[str, Any]:
        """Detached children log to files: they must not hold the caller's stdout/stderr open."""
        if not self.detach:
            return {}
        assert self.base is not None
        log = open(self.base / f"{name}.log", "ab")
        return {"stdout": log, "stderr": subprocess.STDOUT}

    def describe(self) -> dict[str, Any]:
        """What `shoal down` needs to stop a detached cluster."""
        assert self.controller is not None and self._redis is not None
        return {"url": self.url, "controller": procs.identity(self.controller.pid),
                "agents": {n: procs.identity(a.proc.pid) for n, a in self.nodes.items()},
                "redis_port": self._redis.port, "redis_dir": str(self._redis.directory), "base": str(self.base)}

    def stop(self) -> None:
        """Stop the agents, the controller and Redis, and remove the temporary directory: each step runs even if
        one before it raised (an agent that would not stop, Ctrl-C); what raised is raised at the end (the last
        error, the ones before it chained as its context)."""
        with ExitStack() as steps:  # (callbacks run last registered first)
            steps.callback(self._remove_tmp)
            steps.callback(self._stop_redis)
            steps.callback(self.stop_controller)
            for node_id in reversed(list(self.nodes)):
                steps.callback(self.stop_agent, node_id)

    def _stop_redis(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            redis.stop(remove=True)

    def _remove_tmp(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- HTTP --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, Any, dict[str, str]]:
        hdrs = {**bearer(self.api_token), **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with httpclient.urlopen(req, timeout=timeout) as resp:  # (redirects not followed)
                raw, status, rh = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw, status, rh = err.read(), err.code, dict(err.headers)
        ctype = rh.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype and raw else raw.decode("utf-8", "replace")), rh

    def get(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        if status != 200:
            raise ClusterError(f"GET {path} answered {status}: {body}")
        return body
