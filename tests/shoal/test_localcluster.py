"""The local cluster harness: its children's environment, and a stop that finishes whatever fails on the way."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest

from shoal.localcluster import Agent, LocalCluster, child_env

CALLER = {"PATH": "/usr/bin", "HOME": "/root", "SHOAL_HOST": "0.0.0.0",
          "SHOAL_ZMQ_ADVERTISE": "tcp://192.0.2.1:5555", "SHOAL_API_TOKEN_FILE": "/etc/shoal/api_token",
          "SHOAL_AGENT_CAPACITY": "64", "SHOAL_REDIS_URL": "redis://192.0.2.1:6379/0"}


def test_a_callers_shoal_settings_do_not_reach_the_clusters_children() -> None:
    """SHOAL_HOST=0.0.0.0 exported for a deployed controller served the local one on every interface, and
    SHOAL_ZMQ_ADVERTISE sent its agents to another controller."""
    cluster = LocalCluster("unix:///unused.sock", base=Path("/tmp/base"), redis_url="redis://127.0.0.1:1/0",
                           port=20001, zmq_port=20002, controller_env={"SHOAL_QUEUE_LIMIT": "5"},
                           agent_env={"SHOAL_AGENT_QUEUE_LIMIT": "2"})
    env = child_env(cluster.controller_variables(), cluster.controller_env, environ=CALLER)
    assert env["SHOAL_HOST"] == "127.0.0.1" and env["SHOAL_PORT"] == "20001"
    assert env["SHOAL_ZMQ_BIND"] == "tcp://127.0.0.1:20002" and env["SHOAL_REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert "SHOAL_ZMQ_ADVERTISE" not in env and "SHOAL_API_TOKEN_FILE" not in env
    assert env["SHOAL_QUEUE_LIMIT"] == "5" and env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    agent = child_env(cluster.agent_variables(), cluster.agent_env, {"SHOAL_AGENT_LIVENESS": "7"}, environ=CALLER)
    assert agent["DOCKER_HOST"] == "unix:///unused.sock" and agent["SHOAL_AGENT_QUEUE_LIMIT"] == "2"
    assert agent["SHOAL_AGENT_LIVENESS"] == "7" and agent["PATH"] == "/usr/bin"
    assert not {k for k in agent if k.startswith("SHOAL_")} - {"SHOAL_AGENT_HEARTBEAT", "SHOAL_AGENT_LIVENESS",
                                                              "SHOAL_AGENT_QUEUE_LIMIT", "SHOAL_NODE_TOKEN"}
    # What the cluster or its caller sets explicitly still wins over its own.
    assert child_env(cluster.controller_variables(), {"SHOAL_HOST": "127.0.0.2"}, environ=CALLER)["SHOAL_HOST"] \
        == "127.0.0.2"


def test_a_cluster_started_under_a_deployments_settings_stays_on_loopback(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """The real thing (Redis and a controller, no agent: no engine needed)."""
    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    for name, value in CALLER.items():
        if name.startswith("SHOAL_") and name != "SHOAL_API_TOKEN_FILE":
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("SHOAL_API_TOKEN_FILE", str(tmp_path / "missing"))  # would fail the controller's start
    with LocalCluster("unix:///unused.sock", agents=0) as cluster:
        assert cluster.controller is not None
        listening = [c.laddr for c in psutil.Process(cluster.controller.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]
        assert {a.port for a in listening} == {cluster.port, cluster.zmq_port}
        assert {a.ip for a in listening} == {"127.0.0.1"}, listening
        status, answer, _ = cluster.request("POST", "/register", {"endpoint_id": "probe"})
        assert status == 200 and answer["task_url"] == f"tcp://127.0.0.1:{cluster.zmq_port}", answer


class StuckProc:
    """An agent's process that fails to be signalled."""

    pid = 999_999_999

    def poll(self) -> None:
        return None

    def send_signal(self, sig: int) -> None:
        raise PermissionError("cannot signal the agent")


class RecordingRedis:
    def __init__(self) -> None:
        self.stopped: list[bool] = []

    def stop(self, remove: bool = False) -> None:
        self.stopped.append(remove)


def test_stop_goes_on_past_an_agent_it_cannot_stop(tmp_path: Path) -> None:
    """An agent that would not stop left the controller and Redis running and the directory behind."""
    sleeper = ["sleep", "60"]
    controller, other = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    tmp = tempfile.TemporaryDirectory(dir=tmp_path)
    redis = RecordingRedis()
    cluster = LocalCluster("unix:///unused.sock", controller=controller, _redis=redis,  # type: ignore[arg-type]
                           _tmp=tmp)
    stuck: Any = StuckProc()
    cluster.nodes = {"node-1": Agent("node-1", stuck, tmp_path), "node-2": Agent("node-2", other, tmp_path)}
    try:
        with pytest.raises(PermissionError):
            cluster.stop()
        assert controller.wait(10) == -15 and other.wait(10) == -15
        assert redis.stopped == [True] and not Path(tmp.name).exists()
        assert cluster.controller is None and cluster._redis is None and cluster.nodes == {}
        cluster.stop()  # again: nothing left to do
    finally:
        for proc in (controller, other):
            proc.kill()
            proc.wait()



def test_a_local_node_leaves_the_callers_shoal_settings_out_of_its_agents_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SHOAL_NODE_TOKEN exported for `shoal up` turned CURVE on in a test's agent (its link does not speak it):
    every node test waited 60 s and failed with "to say hello", naming no cause."""
    from shoal import localnode

    monkeypatch.setenv("SHOAL_NODE_TOKEN", "n" * 43)
    monkeypatch.setenv("SHOAL_AGENT_CAPACITY", "1")
    seen: dict[str, str] = {}

    def popen(args: list[str], env: dict[str, str], **_: Any) -> None:
        seen.update(env)
        raise OSError("not started: the environment is what this test reads")

    monkeypatch.setattr(localnode.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="not started"), localnode.LocalNode("unix:///x.sock",
                                                                         env={"SHOAL_AGENT_KEEPALIVE": "5"}):
        pass
    assert seen["DOCKER_HOST"] == "unix:///x.sock" and seen["SHOAL_AGENT_KEEPALIVE"] == "5"
    assert "SHOAL_NODE_TOKEN" not in seen and "SHOAL_AGENT_CAPACITY" not in seen and seen["PATH"]
