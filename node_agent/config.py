"""The node agent's settings: a dataclass built from ``SHOAL_AGENT_*`` variables and the command line."""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from miniworker.spec import ContainerLimits
from shoal.auth import check_token, read_token_file, token_from_env
from shoal.envconfig import env_choice, env_float, env_int, env_str
from shoal.errors import ConfigError
from shoal.models import NAME_RE, Policy
from shoal.protocol import UNIX_PATH_MAX

ENV_PREFIX = "SHOAL_AGENT_"
CONTAINER_USER_RE = re.compile(r"[0-9]{1,10}(:[0-9]{1,10})?")
CONTAINER_MEMORY_RE = re.compile(r"[1-9][0-9]{0,15}[bkmgBKMG]?")

#: The bounds of every numeric setting, checked by ``AgentConfig.__post_init__`` whatever built the config (the
#: environment, the command line, a caller), and used by ``from_env`` to read the variables.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "status_port": (0, 65535),
    "capacity": (1, 1024),
    "min_warm": (0, 1024),
    "runtime_warm": (0, 1024),
    "oneshot_spares": (0, 1024),
    "queue_limit": (1, 1_000_000),
    "liveness": (1, 100),
    "retries_on_loss": (0, 10),
}
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "keepalive": (0.0, 7 * 86400.0),
    "pipeline_max_run": (0.0, 3600.0),
    "heartbeat": (0.05, 60.0),
    "start_timeout": (1.0, 86400.0),
    "drain_timeout": (0.0, 86400.0),
    "orphan_sweep": (0.1, 86400.0),
    "retire_after": (0.1, 365 * 86400.0),
}
#: ContainerLimits' numeric fields (SHOAL_AGENT_CONTAINER_*).
LIMIT_INT_BOUNDS: dict[str, tuple[int, int]] = {"pids": (8, 1_000_000), "disk_mb": (1, 1 << 30)}
LIMIT_FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"cpus": (0.01, 256.0)}
#: Settings the command line can give (the rest come from the environment only).
CLI_OPTIONS = {
    "status_port": "--status", "capacity": "--capacity", "min_warm": "--min-warm", "runtime_warm": "--runtime-warm",
    "oneshot_spares": "--oneshot-spares", "keepalive": "--keepalive", "heartbeat": "--heartbeat",
    "drain_timeout": "--drain-timeout",
}
NO_ENV = {"start_timeout"}  # set by callers only


def setting_name(name: str) -> str:
    """How a message names a setting: its field, with its command-line option and variable, e.g.
    ``heartbeat (--heartbeat, SHOAL_AGENT_HEARTBEAT)``."""
    sources = [CLI_OPTIONS[name]] if name in CLI_OPTIONS else []
    if name not in NO_ENV:
        sources.append(ENV_PREFIX + name.upper())
    return f"{name} ({', '.join(sources)})" if sources else name


def check_number(label: str, value: object, kind: type[int] | type[float], low: float, high: float) -> None:
    """Refuse ``value`` unless it is a finite ``kind`` (an int for a float too; never a bool) in [low, high]."""
    accepted: tuple[type, ...] = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(f"{label} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    assert isinstance(value, (int, float))
    if not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{label} must be in [{low}, {high}], got {value!r}")


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
        self.validate()

    def validate(self) -> None:
        """Every numeric setting within its bounds (finite), and the warm counts within capacity where they are
        used; a ConfigError naming the setting otherwise. Run for every config (``__post_init__``, so
        ``dataclasses.replace`` and ``with_`` too), not only for one read from the environment."""
        for name, (ilow, ihigh) in INT_BOUNDS.items():
            check_number(setting_name(name), getattr(self, name), int, ilow, ihigh)
        for name, (flow, fhigh) in FLOAT_BOUNDS.items():
            check_number(setting_name(name), getattr(self, name), float, flow, fhigh)
        for name, (ilow, ihigh) in LIMIT_INT_BOUNDS.items():
            check_number(f"limits.{name} ({ENV_PREFIX}CONTAINER_{name.upper()})", getattr(self.limits, name), int,
                         ilow, ihigh)
        for name, (flow, fhigh) in LIMIT_FLOAT_BOUNDS.items():
            check_number(f"limits.{name} ({ENV_PREFIX}CONTAINER_{name.upper()})", getattr(self.limits, name), float,
                         flow, fhigh)
        # The container's user and memory go to the engine as they are: a name would need the image's passwd
        # (the workdir is chowned by number: a name became uid 0, a root-owned workdir the function cannot write),
        # and a bad size fails every container start, not the agent's.
        if not CONTAINER_USER_RE.fullmatch(self.limits.user):
            raise ConfigError(f"limits.user ({ENV_PREFIX}CONTAINER_USER) must be UID or UID:GID in numbers, "
                              f"got {self.limits.user!r}")
        if not CONTAINER_MEMORY_RE.fullmatch(self.limits.memory):
            raise ConfigError(f"limits.memory ({ENV_PREFIX}CONTAINER_MEMORY) must be a size such as 512m or 2g, "
                              f"got {self.limits.memory!r}")
        # Per pool: more than the node holds could never be started. min_warm applies to any function whose
        # policy is `function` (a function can ask for it on any node); runtime_warm and oneshot_spares only matter
        # under their node policy (their defaults, 2, must not refuse a node of capacity 1 that never uses them).
        if self.min_warm > self.capacity:
            raise ConfigError(f"{setting_name('min_warm')} must not exceed capacity ({self.capacity}), "
                              f"got {self.min_warm}")
        for name, policy in (("runtime_warm", Policy.RUNTIME), ("oneshot_spares", Policy.NONE)):
            value = getattr(self, name)
            if self.policy == policy and value > self.capacity:
                raise ConfigError(f"{setting_name(name)} must not exceed capacity ({self.capacity}) under the "
                                  f"{policy.value} policy, got {value}")

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
        p = ENV_PREFIX
        values: dict[str, object] = {
            "controller": env_str(p + "CONTROLLER", "tcp://127.0.0.1:5555"),
            "node_id": env_str(p + "NODE_ID", socket.gethostname().split(".")[0]),
            "state_dir": Path(env_str(p + "STATE_DIR", "/var/tmp/shoal/agents")),
            "status_host": env_str(p + "STATUS_HOST", "127.0.0.1"),
            "status_port": env_int(p + "STATUS_PORT", 9100, *INT_BOUNDS["status_port"]),
            "policy": Policy(env_choice(p + "POLICY", "function", [x.value for x in Policy])),
            "docker_url": env_str("DOCKER_HOST", "unix:///var/run/docker.sock"),
            "capacity": env_int(p + "CAPACITY", 8, *INT_BOUNDS["capacity"]),
            "min_warm": env_int(p + "MIN_WARM", 1, *INT_BOUNDS["min_warm"]),
            "runtime_warm": env_int(p + "RUNTIME_WARM", 2, *INT_BOUNDS["runtime_warm"]),
            "oneshot_spares": env_int(p + "ONESHOT_SPARES", 2, *INT_BOUNDS["oneshot_spares"]),
            "keepalive": env_float(p + "KEEPALIVE", 600.0, *FLOAT_BOUNDS["keepalive"]),
            "queue_limit": env_int(p + "QUEUE_LIMIT", 256, *INT_BOUNDS["queue_limit"]),
            "pipeline_max_run": env_float(p + "PIPELINE_MAX_RUN", 0.005, *FLOAT_BOUNDS["pipeline_max_run"]),
            "heartbeat": env_float(p + "HEARTBEAT", 1.0, *FLOAT_BOUNDS["heartbeat"]),
            "liveness": env_int(p + "LIVENESS", 3, *INT_BOUNDS["liveness"]),
            "retries_on_loss": env_int(p + "RETRIES_ON_LOSS", 1, *INT_BOUNDS["retries_on_loss"]),
            "drain_timeout": env_float(p + "DRAIN_TIMEOUT", 60.0, *FLOAT_BOUNDS["drain_timeout"]),
            "orphan_sweep": env_float(p + "ORPHAN_SWEEP", 60.0, *FLOAT_BOUNDS["orphan_sweep"]),
            "retire_after": env_float(p + "RETIRE_AFTER", 3600.0, *FLOAT_BOUNDS["retire_after"]),
            "log_level": env_choice(p + "LOG_LEVEL", "info", ["debug", "info", "warning", "error"]),
            "node_token": token_from_env("SHOAL_NODE_TOKEN"),  # the controller's name for it too
            "limits": ContainerLimits(
                memory=env_str(p + "CONTAINER_MEMORY", "512m"),
                cpus=env_float(p + "CONTAINER_CPUS", 1.0, *LIMIT_FLOAT_BOUNDS["cpus"]),
                pids=env_int(p + "CONTAINER_PIDS", 256, *LIMIT_INT_BOUNDS["pids"]),
                user=env_str(p + "CONTAINER_USER", "65534:65534"),
                disk_mb=env_int(p + "CONTAINER_DISK_MB", 1024, *LIMIT_INT_BOUNDS["disk_mb"]),
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

