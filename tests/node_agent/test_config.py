from __future__ import annotations

from pathlib import Path

import pytest

from miniworker.spec import ContainerLimits
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
     ("SHOAL_AGENT_POLICY", "sometimes", "one of"), ("SHOAL_AGENT_HEARTBEAT", "-1", "in"),
     # A user name became uid 0 (a root-owned workdir); a bad size failed every container start instead.
     ("SHOAL_AGENT_CONTAINER_USER", "nobody", "UID or UID:GID"), ("SHOAL_AGENT_CONTAINER_USER", "1:x", "UID"),
     ("SHOAL_AGENT_CONTAINER_MEMORY", "lots", "512m"), ("SHOAL_AGENT_CONTAINER_MEMORY", "0", "512m")],
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


BASE = ["--controller", "tcp://127.0.0.1:1", "--node-id", "n1"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--heartbeat", "0"], r"heartbeat \(--heartbeat, SHOAL_AGENT_HEARTBEAT\) must be in \[0.05, 60.0\], got 0.0"),
     (["--heartbeat", "-1"], "--heartbeat"), (["--heartbeat", "nan"], "--heartbeat.* must be a finite number, got nan"),
     (["--heartbeat", "inf"], "--heartbeat.* finite"), (["--heartbeat", "61"], "--heartbeat"),
     (["--keepalive", "-1"], "--keepalive"), (["--keepalive", "nan"], "--keepalive.* finite"),
     (["--drain-timeout", "-0.5"], "--drain-timeout"), (["--drain-timeout", "inf"], "--drain-timeout.* finite"),
     (["--capacity", "0"], "--capacity"), (["--capacity", "5000"], "--capacity"),
     (["--min-warm", "-1"], "--min-warm"), (["--runtime-warm", "-1"], "--runtime-warm"),
     (["--oneshot-spares", "-2"], "--oneshot-spares"), (["--status", "127.0.0.1:70000"], "--status"),
     # More warm containers per pool than the node holds: never reachable.
     (["--capacity", "2", "--min-warm", "3"], r"--min-warm.* must not exceed capacity \(2\), got 3"),
     (["--capacity", "2", "--policy", "runtime", "--runtime-warm", "3"], "--runtime-warm.* capacity"),
     (["--capacity", "2", "--policy", "none", "--oneshot-spares", "3"], "--oneshot-spares.* capacity")],
)
def test_bad_command_line_values_are_refused_naming_the_option(args: list[str], needle: str) -> None:
    """Bounds were checked only for variables: `--heartbeat 0` made the agent say HELLO every tick, and
    `--heartbeat nan` stopped its heartbeats."""
    with pytest.raises(ConfigError, match=needle):
        AgentConfig.from_args(BASE + args)


def test_good_command_line_values_pass() -> None:
    cfg = AgentConfig.from_args([
        *BASE, "--heartbeat", "0.05", "--keepalive", "0", "--drain-timeout", "0", "--capacity", "4", "--min-warm", "4",
        "--runtime-warm", "4", "--oneshot-spares", "0", "--policy", "runtime", "--status", "127.0.0.1:65535"])
    assert (cfg.heartbeat, cfg.keepalive, cfg.drain_timeout, cfg.capacity, cfg.min_warm, cfg.runtime_warm,
            cfg.oneshot_spares, cfg.status_port) == (0.05, 0.0, 0.0, 4, 4, 4, 0, 65535)
    # The warm counts of a policy the node does not use are not held against its capacity (defaults are 2).
    assert AgentConfig.from_args([*BASE, "--capacity", "1"]).runtime_warm == 2
    assert AgentConfig.from_args([*BASE, "--capacity", "1", "--policy", "none", "--oneshot-spares", "1"])


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"heartbeat": float("nan")}, "heartbeat"), ({"liveness": 0}, "liveness"), ({"queue_limit": 0}, "queue_limit"),
     ({"start_timeout": -1.0}, "start_timeout"), ({"pipeline_max_run": float("inf")}, "pipeline_max_run"),
     ({"capacity": True}, "capacity .* must be an integer"), ({"capacity": 2.5}, "capacity .* must be an integer"),
     ({"heartbeat": "1"}, "heartbeat .* must be a number"),
     ({"limits": ContainerLimits(cpus=float("nan"))}, "SHOAL_AGENT_CONTAINER_CPUS"),
     ({"limits": ContainerLimits(pids=0)}, "SHOAL_AGENT_CONTAINER_PIDS")],
)
def test_every_way_of_building_a_config_is_checked(changes: dict[str, object], needle: str) -> None:
    """Not the environment alone: the constructor, and so dataclasses.replace and with_, check too."""
    cfg = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1")
    with pytest.raises(ConfigError, match=needle):
        AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", **changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=needle):
        cfg.with_(**changes)


def test_a_broker_endpoint_too_long_for_a_unix_socket_moves_to_a_short_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    cfg = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=deep)
    assert cfg.broker_url.startswith("ipc:///tmp/shoal-broker-") and len(cfg.broker_url) < 60
    other = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n2", state_dir=deep)
    assert other.broker_url != cfg.broker_url  # one per node directory
    assert AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=tmp_path).broker_url == \
        f"ipc://{tmp_path.resolve()}/n1/broker.ipc"
