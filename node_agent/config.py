"""The node agent's settings: a dataclass built from ``SHOAL_AGENT_*`` variables and the command line."""

from __future__ import annotations

import argparse
import hashlib
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from miniworker.spec import ContainerLimits
from shoal.auth import check_token, read_token_file, token_from_env
from shoal.envconfig import env_choice, env_float, env_int, env_str
from shoal.errors import ConfigError
from shoal.models import NAME_RE, Policy
from shoal.protocol import UNIX_PATH_MAX


@dataclass(frozen=True)
class AgentConfig:
    controller: str  # the controller's ZMQ ROUTER, e.g. tcp://127.0.0.1:5555
    node_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    state_dir: Path = Path("/var/tmp/shoal/agents")
    status_host: str = "127.0.0.1"
    status_port: int = 9100
    policy: Policy = Policy.FUNCTION
    docker_url: str = "unix:///var/run/docker.sock"
    docker_api_version: str = "1.41"
    capacity: int = 8  # miniworkers (containers) at most on this node
    min_warm: int = 1  # warm containers kept per function under the `function` policy
    runtime_warm: int = 2  # started-ahead containers per runtime under the `runtime` policy
    oneshot_spares: int = 2  # miniworker processes kept ready under the `none` policy
    keepalive: float = 600.0  # idle seconds before a warm container above min_warm is stopped
    queue_limit: int = 256  # calls waiting per function; beyond, the node rejects
    pipeline_max_run: float = 0.005  # a function whose runs average less (s) may have a call held ahead
    heartbeat: float = 1.0
    liveness: int = 3
    start_timeout: float = 120.0
    retries_on_loss: int = 1  # a call whose miniworker died is retried this many times, then failed
    drain_timeout: float = 60.0
    orphan_sweep: float = 60.0  # seconds between sweeps for containers of this node no live miniworker owns
    retire_after: float = 3600.0  # seconds a superseded function version stays unused before it is dropped here
    limits: ContainerLimits = field(default_factory=ContainerLimits)
    log_level: str = "info"
    # The controller's node token (shoal/auth.py): sent to POST /register, and the link's CURVE keys derive
    # from it. Empty: a controller without one. Kept out of repr (and so out of logs).
    node_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        check_token(self.node_token, "node_token")
        if not NAME_RE.fullmatch(self.node_id):
            raise ConfigError(f"node id {self.node_id!r} must be letters, digits, '_', '.', '-'")
        if not self.controller.startswith(("tcp://", "ipc://", "inproc://", "http://", "https://")):
            raise ConfigError(
                f"controller must be http://host:port (registers over HTTP) or a ZMQ endpoint tcp://host:port, "
                f"got {self.controller!r}")
        if not 0 <= self.status_port <= 65535:
            raise ConfigError(f"status port must be in [0, 65535], got {self.status_port}")
        if self.capacity < 1:
            raise ConfigError("capacity must be at least 1")
        if self.min_warm > self.capacity:
            raise ConfigError("min_warm must not exceed capacity")

    @property
    def node_dir(self) -> Path:
        return self.state_dir / self.node_id

    @property
    def broker_url(self) -> str:
        """The broker's ipc endpoint: in the node's directory, unless that path is too long for a unix socket
        (107 bytes): then a short one named after it under /tmp."""
        path = str(self.node_dir.resolve() / "broker.ipc")
        if len(path.encode()) > UNIX_PATH_MAX:
            path = f"/tmp/shoal-broker-{hashlib.sha256(path.encode()).hexdigest()[:16]}.ipc"
        return f"ipc://{path}"

    @classmethod
    def from_env(cls, **overrides: object) -> AgentConfig:
        p = "SHOAL_AGENT_"
        values: dict[str, object] = {
            "controller": env_str(p + "CONTROLLER", "tcp://127.0.0.1:5555"),
            "node_id": env_str(p + "NODE_ID", socket.gethostname().split(".")[0]),
            "state_dir": Path(env_str(p + "STATE_DIR", "/var/tmp/shoal/agents")),
            "status_host": env_str(p + "STATUS_HOST", "127.0.0.1"),
            "status_port": env_int(p + "STATUS_PORT", 9100, 0, 65535),
            "policy": Policy(env_choice(p + "POLICY", "function", [x.value for x in Policy])),
            "docker_url": env_str("DOCKER_HOST", "unix:///var/run/docker.sock"),
            "capacity": env_int(p + "CAPACITY", 8, 1, 1024),
            "min_warm": env_int(p + "MIN_WARM", 1, 0, 1024),
            "runtime_warm": env_int(p + "RUNTIME_WARM", 2, 0, 1024),
            "oneshot_spares": env_int(p + "ONESHOT_SPARES", 2, 0, 1024),
            "keepalive": env_float(p + "KEEPALIVE", 600.0, 0.0, 7 * 86400.0),
            "queue_limit": env_int(p + "QUEUE_LIMIT", 256, 1, 1_000_000),
            "pipeline_max_run": env_float(p + "PIPELINE_MAX_RUN", 0.005, 0.0, 3600.0),
            "heartbeat": env_float(p + "HEARTBEAT", 1.0, 0.05, 60.0),
            "liveness": env_int(p + "LIVENESS", 3, 1, 100),
            "retries_on_loss": env_int(p + "RETRIES_ON_LOSS", 1, 0, 10),
            "drain_timeout": env_float(p + "DRAIN_TIMEOUT", 60.0, 0.0, 86400.0),
            "orphan_sweep": env_float(p + "ORPHAN_SWEEP", 60.0, 0.1, 86400.0),
            "retire_after": env_float(p + "RETIRE_AFTER", 3600.0, 0.1, 365 * 86400.0),
            "log_level": env_choice(p + "LOG_LEVEL", "info", ["debug", "info", "warning", "error"]),
            "node_token": token_from_env("SHOAL_NODE_TOKEN"),  # the controller's name for it too
            "limits": ContainerLimits(
                memory=env_str(p + "CONTAINER_MEMORY", "512m"),
                cpus=env_float(p + "CONTAINER_CPUS", 1.0, 0.01, 256.0),
                pids=env_int(p + "CONTAINER_PIDS", 256, 8, 1_000_000),
                user=env_str(p + "CONTAINER_USER", "65534:65534"),
                disk_mb=env_int(p + "CONTAINER_DISK_MB", 1024, 1, 1 << 30),
            ),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> AgentConfig:
        parser = argparse.ArgumentParser(prog="shoal-agent", description="Run a Shoal node agent.")
        parser.add_argument("--controller", help="controller ZMQ endpoint (tcp://host:port)")
        parser.add_argument("--node-id")
        parser.add_argument("--state-dir", type=Path)
        parser.add_argument("--status", metavar="HOST:PORT", help="status HTTP address")
        parser.add_argument("--policy", choices=[p.value for p in Policy])
        parser.add_argument("--docker-url")
        parser.add_argument("--capacity", type=int)
        parser.add_argument("--min-warm", type=int)
        parser.add_argument("--runtime-warm", type=int)
        parser.add_argument("--oneshot-spares", type=int)
        parser.add_argument("--keepalive", type=float)
        parser.add_argument("--heartbeat", type=float)
        parser.add_argument("--drain-timeout", type=float, help="seconds a stopping agent lets running calls finish")
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        parser.add_argument("--node-token-file", type=Path, help="file holding the controller's node token")
        args = parser.parse_args(argv)
        overrides: dict[str, object] = {}
        if args.node_token_file is not None:
            overrides["node_token"] = read_token_file(args.node_token_file, "--node-token-file")
        for name in ("controller", "node_id", "state_dir", "docker_url", "capacity", "min_warm",
                     "runtime_warm", "oneshot_spares", "keepalive", "heartbeat", "drain_timeout", "log_level"):
            value = getattr(args, name)
            if value is not None:
                overrides[name] = value
        if args.policy:
            overrides["policy"] = Policy(args.policy)
        if args.status:
            host, sep, port = args.status.rpartition(":")
            if not sep or not port.isdigit():
                raise ConfigError(f"--status must be HOST:PORT, got {args.status!r}")
            overrides["status_host"], overrides["status_port"] = host, int(port)
        return cls.from_env(**overrides)

    def with_(self, **changes: object) -> AgentConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

