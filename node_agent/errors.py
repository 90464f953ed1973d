"""Errors of the node agent."""

from __future__ import annotations

from shoal.errors import ShoalError


class AgentError(ShoalError):
    """Base of the node agent's errors."""


class ControllerUnreachable(AgentError):
    """The controller never answered /register: the agent exits 1 (worth another try), not 2 (refused)."""


class DependencyError(AgentError):
    """A function's requirements could not be resolved into a wheelhouse on the host."""


class FetchError(AgentError):
    """An archive could not be fetched from the controller, or failed verification."""


class AgentStopping(AgentError):
    """The agent's loop has ended (it is shutting down): it answers no more status requests."""
