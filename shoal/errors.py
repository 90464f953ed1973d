"""The error tree shared by every Shoal package. Each package's own errors derive from these."""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""


class ValidationError(ShoalError):
    """Input that does not describe a valid object (a runtime, a function, a call)."""


class ArchiveError(ValidationError):
    """A function archive that is unreadable, too large, or hostile (zip-slip, links, bombs)."""


class NotFound(ShoalError):
    """A named object that does not exist."""


class ConfigError(ShoalError):
    """A configuration value that is missing or wrong. Raised at start, never defaulted silently."""
