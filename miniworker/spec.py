"""What a miniworker is told at start: a JSON document passed by its agent on the command line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from shoal.errors import ConfigError

MODES = ("bound", "runtime", "oneshot")


@dataclass(frozen=True, slots=True)
class ContainerLimits:
    memory: str = "512m"
    cpus: float = 1.0
    pids: int = 256
    user: str = "65534:65534"
    tmpfs_size: str = "64m"
    disk_mb: int = 1024  # what a container may hold in its host-backed writable directories (code, deps)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """A function to put into the container: host paths of its code and wheelhouse, and how to run it."""

    key: str
    image: str
    path: str
    code_dir: str
    wheels_dir: str
    style: str
    entrypoint: str | None
    dependencies: str
    run: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadSpec:
        return cls(**{k: data.get(k) for k in cls.__slots__})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class MiniworkerSpec:
    mw_id: str
    node_id: str
    broker_url: str
    docker_url: str
    docker_api_version: str
    mode: str  # bound: loads `load` at start; runtime: loads at first call; oneshot: a container per call
    image: str
    runtime_path: str
    workdir: str  # host directory bind-mounted at /shoal (socket, deps, wheels) and code at runtime_path
    src_dirs: dict[str, str]  # host package dirs mounted read-only under /opt/shoal
    load: LoadSpec | None = None
    limits: ContainerLimits = field(default_factory=ContainerLimits)
    heartbeat: float = 1.0
    liveness: int = 3
    start_timeout: float = 60.0
    log_level: str = "info"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> MiniworkerSpec:
        try:
            data = json.loads(raw)
            data["limits"] = ContainerLimits(**data.get("limits", {}))
            if data.get("load") is not None:
                data["load"] = LoadSpec.from_dict(data["load"])
            spec = cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"bad miniworker spec: {exc}") from None
        if spec.mode not in MODES:
            raise ConfigError(f"miniworker mode must be one of {MODES}, got {spec.mode!r}")
        if spec.mode == "bound" and spec.load is None:
            raise ConfigError("a bound miniworker needs a function to load")
        return spec
