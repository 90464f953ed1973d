"""The controller's settings: a dataclass from ``SHOAL_*`` variables and the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from shoal.auth import check_token, read_token_file, token_from_env
from shoal.envconfig import env_choice, env_float, env_int, env_str
from shoal.errors import ConfigError

PLACEMENTS = ("warm-first", "least-loaded", "round-robin")


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    zmq_bind: str = "tcp://127.0.0.1:5555"
    zmq_advertise: str = ""  # the URL nodes connect to, if not zmq_bind (e.g. behind NAT)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 10.0  # seconds a Redis command may take before the store counts as unavailable
    blob_dir: Path = Path("/var/tmp/shoal/controller/blobs")
    heartbeat: float = 1.0
    liveness: int = 3
    placement: str = "warm-first"
    queue_limit: int = 100_000  # calls waiting for a node; beyond, HTTP 429
    node_oversubscribe: int = 64  # calls in flight per node per unit of capacity before it counts as full
    max_attempts: int = 3  # dispatches of a call whose node was lost, before it fails
    retention: float = 7 * 86400.0  # seconds a finished call is kept
    sync_timeout: float = 60.0  # default wait of a sync invoke
    max_archive_bytes: int = 1 << 30
    log_level: str = "info"
    # Off when empty; see shoal/auth.py. Kept out of repr (and so out of logs and tracebacks).
    api_token: str = field(default="", repr=False)  # HTTP clients: Authorization: Bearer ...
    node_token: str = field(default="", repr=False)  # POST /register, and CURVE keys of the node link

    def __post_init__(self) -> None:
        check_token(self.api_token, "api_token")
        check_token(self.node_token, "node_token")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not self.zmq_bind.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"zmq_bind must be tcp://HOST:PORT or ipc://PATH, got {self.zmq_bind!r}")
        if not self.redis_url.startswith(("redis://", "unix://", "rediss://")):
            raise ConfigError(f"redis_url must be redis://HOST:PORT/DB, got {self.redis_url!r}")

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL without its password, for logs."""
        parts = urlsplit(self.redis_url)
        if parts.password is None:
            return self.redis_url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    @classmethod
    def from_env(cls, **overrides: object) -> ControllerConfig:
        p = "SHOAL_"
        values: dict[str, object] = {
            "host": env_str(p + "HOST", "127.0.0.1"),
            "port": env_int(p + "PORT", 3000, 0, 65535),
            "zmq_bind": env_str(p + "ZMQ_BIND", "tcp://127.0.0.1:5555"),
            "zmq_advertise": env_str(p + "ZMQ_ADVERTISE", ""),
            "redis_url": env_str(p + "REDIS_URL", "redis://127.0.0.1:6379/0"),
            "redis_timeout": env_float(p + "REDIS_TIMEOUT", 10.0, 0.1, 600.0),
            "blob_dir": Path(env_str(p + "BLOB_DIR", "/var/tmp/shoal/controller/blobs")),
            "heartbeat": env_float(p + "HEARTBEAT", 1.0, 0.05, 60.0),
            "liveness": env_int(p + "LIVENESS", 3, 1, 100),
            "placement": env_choice(p + "PLACEMENT", "warm-first", PLACEMENTS),
            "queue_limit": env_int(p + "QUEUE_LIMIT", 100_000, 1, 10_000_000),
            "max_attempts": env_int(p + "MAX_ATTEMPTS", 3, 1, 100),
            "retention": env_float(p + "RETENTION", 7 * 86400.0, 1.0, 365 * 86400.0),
            "sync_timeout": env_float(p + "SYNC_TIMEOUT", 60.0, 0.01, 86400.0),
            "max_archive_bytes": env_int(p + "MAX_ARCHIVE_BYTES", 1 << 30, 1024, 1 << 40),
            "log_level": env_choice(p + "LOG_LEVEL", "info", ["debug", "info", "warning", "error"]),
            "api_token": token_from_env(p + "API_TOKEN"),
            "node_token": token_from_env(p + "NODE_TOKEN"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> ControllerConfig:
        parser = argparse.ArgumentParser(prog="shoal-controller", description="Run the Shoal controller.")
        parser.add_argument("--host")
        parser.add_argument("--port", type=int)
        parser.add_argument("--zmq-bind")
        parser.add_argument("--zmq-advertise", help="the ZMQ URL nodes are told to connect to, if not --zmq-bind")
        parser.add_argument("--redis-url")
        parser.add_argument("--blob-dir", type=Path)
        parser.add_argument("--placement", choices=PLACEMENTS)
        parser.add_argument("--heartbeat", type=float)
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        parser.add_argument("--api-token-file", type=Path, help="file holding the token HTTP clients must present")
        parser.add_argument("--node-token-file", type=Path, help="file holding the token node agents must know")
        args = vars(parser.parse_args(argv))
        for name in ("api_token", "node_token"):
            path = args.pop(name + "_file")
            if path is not None:
                args[name] = read_token_file(path, f"--{name.replace('_', '-')}-file")
        return cls.from_env(**{k: v for k, v in args.items() if v is not None})

    @property
    def node_url(self) -> str:
        return self.zmq_advertise or self.zmq_bind

    def with_(self, **changes: object) -> ControllerConfig:
        return replace(self, **changes)  # type: ignore[arg-type]
