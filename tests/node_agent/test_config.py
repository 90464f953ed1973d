from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.config import AgentConfig
from shoal.errors import ConfigError
from shoal.models import Policy


def test_env_and_args_build_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_AGENT_POLICY", "runtime")
    monkeypatch.setenv("SHOAL_AGENT_CAPACITY", "3")
    cfg = AgentConfig.from_args(["--controller", "tcp://127.0.0.1:7000", "--node-id", "n1", "--status", "127.0.0.1:0"])
    assert cfg.policy == Policy.RUNTIME and cfg.capacity == 3 and cfg.status_port == 0
    assert cfg.broker_url.startswith("ipc://") and cfg.broker_url.endswith("n1/broker.ipc")


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [("SHOAL_AGENT_CAPACITY", "lots", "integer"), ("SHOAL_AGENT_CAPACITY", "0", r"\[1, 1024\]"),
     ("SHOAL_AGENT_POLICY", "sometimes", "one of"), ("SHOAL_AGENT_HEARTBEAT", "-1", "in")],
)
def test_bad_values_fail_loudly(monkeypatch: pytest.MonkeyPatch, var: str, value: str, needle: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=needle):
        AgentConfig.from_env()


def test_bad_arguments_fail_loudly() -> None:
    with pytest.raises(ConfigError):
        AgentConfig.from_args(["--controller", "ftp://not-zmq", "--node-id", "n"])
    with pytest.raises(ConfigError):
        AgentConfig.from_args(["--controller", "tcp://127.0.0.1:1", "--node-id", "bad id"])
    with pytest.raises(ConfigError):
        AgentConfig.from_args(["--controller", "tcp://127.0.0.1:1", "--status", "nohostport"])


def test_a_broker_endpoint_too_long_for_a_unix_socket_moves_to_a_short_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    cfg = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=deep)
    assert cfg.broker_url.startswith("ipc:///tmp/shoal-broker-") and len(cfg.broker_url) < 60
    other = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n2", state_dir=deep)
    assert other.broker_url != cfg.broker_url  # one per node directory
    assert AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=tmp_path).broker_url == \
        f"ipc://{tmp_path.resolve()}/n1/broker.ipc"
