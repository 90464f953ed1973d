"""What this node knows: runtimes, function versions and how far each is from being callable."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.models import FunctionSpec, Policy, Runtime


class FnState(enum.StrEnum):
    FETCHING = "fetching"  # archive being streamed from the controller
    PREPARING = "preparing"  # extracting and resolving dependencies
    READY = "ready"
    FAILED = "failed"


@dataclass
class NodeFunction:
    spec: FunctionSpec
    state: FnState = FnState.FETCHING
    error: str = ""
    code_dir: Path | None = None
    wheels_dir: Path | None = None
    calls_served: int = 0
    start_failures: int = 0  # consecutive miniworker start failures
    retries: int = 0  # preparations tried again after a failure that may pass
    retry_at: float = 0.0  # monotonic time of the next one (0: none planned)
    gone: bool = False  # deleted on the controller: forgotten once no call of it is on this node
    last_used: float = field(default_factory=time.monotonic)  # when it was sent here or last called

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass
class Registry:
    node_policy: Policy
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    functions: dict[str, NodeFunction] = field(default_factory=dict)  # by key name@version
    latest: dict[str, int] = field(default_factory=dict)  # name -> newest version known

    def add_function(self, spec: FunctionSpec) -> NodeFunction:
        existing = self.functions.get(spec.key)
        if existing is not None and existing.spec.sha256 == spec.sha256 and existing.state != FnState.FAILED:
            existing.spec = spec
            return existing
        fn = NodeFunction(spec)
        self.functions[spec.key] = fn
        if spec.version >= self.latest.get(spec.name, 0):
            self.latest[spec.name] = spec.version
        return fn

    def resolve(self, name: str, version: int | None) -> NodeFunction | None:
        if version is None:
            version = self.latest.get(name)
            if version is None:
                return None
        return self.functions.get(f"{name}@{version}")

    def policy_of(self, fn: NodeFunction) -> Policy:
        return Policy(fn.spec.preload) if fn.spec.preload else self.node_policy

    def by_sha(self, sha: str) -> list[NodeFunction]:
        return [fn for fn in self.functions.values() if fn.spec.sha256 == sha]

    def forget(self, fn: NodeFunction) -> None:
        """Drop a function version (its files are the cache's to collect once nothing refers to them)."""
        if self.functions.get(fn.key) is fn:
            del self.functions[fn.key]
        name = fn.spec.name
        versions = [f.spec.version for f in self.functions.values() if f.spec.name == name]
        if versions:
            self.latest[name] = max(versions)
        else:
            self.latest.pop(name, None)
