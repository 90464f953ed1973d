"""Errors of the miniworker package."""

from __future__ import annotations

from shoal.errors import ShoalError


class MiniworkerError(ShoalError):
    """Base of the miniworker's errors."""


class ContainerError(MiniworkerError):
    """The container could not be created or started, or died."""


class RunnerError(MiniworkerError):
    """The runner inside the container did not connect, or broke the protocol."""


class LoadError(MiniworkerError):
    """The function could not be loaded (dependencies, import). ``error`` is the runner's report."""

    def __init__(self, error: dict[str, object], logs: str = "") -> None:
        super().__init__(str(error.get("message", "load failed")))
        self.error = error
        self.logs = logs
