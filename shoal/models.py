"""The objects Shoal stores and moves: runtimes, functions, calls. Standard library only."""

from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shoal.errors import ValidationError

# Used with fullmatch: ``$`` alone also matches before a trailing newline ("echo\n" was a second "echo").
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Policy(enum.StrEnum):
    """Preload policy: what a node keeps started ahead of calls."""

    NONE = "none"  # a fresh container per call, removed after it
    RUNTIME = "runtime"  # containers of the runtime image started ahead; code put in at first use
    FUNCTION = "function"  # containers with code, dependencies and runner loaded, ready


class CallStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({CallStatus.DONE, CallStatus.FAILED, CallStatus.TIMEOUT, CallStatus.CANCELLED})

#: A node's answer for a call it did not run (queue full, draining): the controller places it again.
REJECTED = "REJECTED"


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValidationError(
            f"{what} must be 1-128 characters of letters, digits, '_', '.', '-' (got {value!r})"
        )
    return value


def _check_str(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ValidationError(f"field {key!r} must be a string")
    return value


def _check_number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValidationError(f"field {key!r} must be a number in [{low}, {high}] (got {value!r})")
    return float(value)


def _check_int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"field {key!r} must be an integer in [{low}, {high}] (got {value!r})")
    return value


def image_name(image: str) -> str:
    """An image reference's name: ``[registry[:port]/]path/name[:tag][@digest]`` -> ``name``."""
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


#: The bounds (inclusive) of a function's numeric options; the OpenAPI document shows these same numbers.
FUNCTION_BOUNDS: dict[str, tuple[Any, Any]] = {
    "timeout": (0.01, 86400.0),  # seconds
    "keepalive": (0.0, 7 * 86400.0),  # seconds
    "min_warm": (0, 64),  # and at most max_warm
    "max_warm": (1, 256),
}


@dataclass(frozen=True, slots=True)
class Runtime:
    """How to run functions: an image, where the code goes, how to install its deps, how to run it."""

    name: str
    image: str
    path: str = "/ws"
    dependencies: str = ""
    run: str = ""

    #: Where Shoal mounts its own things in a container (a runtime's code path must not hide them).
    RESERVED_PATHS = ("/shoal", "/opt/shoal", "/tmp", "/proc", "/sys", "/dev")
    #: Longest ``run`` / ``dependencies`` command and ``path``: they travel in a miniworker's command line,
    #: which the kernel caps (128 KiB per argument).
    MAX_COMMAND = 8192
    MAX_PATH = 1024

    @classmethod
    def from_dict(cls, data: Any) -> Runtime:
        if not isinstance(data, dict):
            raise ValidationError("a runtime must be a JSON object")
        image = _check_str(data, "image")
        if not image or len(image) > 256 or any(c.isspace() for c in image):
            raise ValidationError("field 'image' must be a non-empty image reference without spaces")
        # The main seed registers runtimes without a name: they are known by their image's name.
        name = check_name(data.get("name", image_name(image)), "runtime name")
        raw_path = _check_str(data, "path", "/ws")
        path = posixpath.normpath(raw_path) if raw_path.startswith("/") else ""
        if (not path or ".." in raw_path.split("/") or path in ("/", "//") or len(raw_path) > cls.MAX_PATH
                or not raw_path.isprintable()):
            raise ValidationError("field 'path' must be an absolute directory path inside the container, "
                                  f"at most {cls.MAX_PATH} printable characters")
        path = "/" + path.lstrip("/")  # normpath keeps a leading "//"
        if any(path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in cls.RESERVED_PATHS):
            raise ValidationError(f"field 'path' must not be or contain {', '.join(cls.RESERVED_PATHS)} "
                                  "(Shoal mounts its own files there)")
        commands = {key: _check_str(data, key, "") for key in ("dependencies", "run")}
        for key, value in commands.items():
            if len(value) > cls.MAX_COMMAND:
                raise ValidationError(f"field {key!r} must be at most {cls.MAX_COMMAND} characters")
        return cls(name=name, image=image, path=path, **commands)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One version of a function: its archive (by sha256), its runtime and how to keep it warm."""

    name: str
    version: int
    runtime: str
    sha256: str
    size: int
    entrypoint: str | None = None  # "module:function" -> handler style; None -> the runtime's `run`
    timeout: float = 30.0
    preload: str | None = None  # overrides the node's policy
    min_warm: int = 0
    max_warm: int = 4
    keepalive: float | None = None  # None: the node's keepalive
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def style(self) -> str:
        return "handler" if self.entrypoint else "command"

    @classmethod
    def from_dict(cls, data: Any) -> FunctionSpec:
        if not isinstance(data, dict):
            raise ValidationError("a function must be a JSON object")
        entry = data.get("entrypoint")
        if entry is not None and (not isinstance(entry, str) or not ENTRYPOINT_RE.fullmatch(entry)):
            raise ValidationError("field 'entrypoint' must look like 'module:function'")
        preload = data.get("preload")
        if preload is not None and preload not in {p.value for p in Policy}:
            raise ValidationError("field 'preload' must be one of none, runtime, function")
        sha = _check_str(data, "sha256")
        if not SHA256_RE.fullmatch(sha):
            raise ValidationError("field 'sha256' must be 64 lowercase hex digits")
        min_warm = _check_int(data, "min_warm", 0, *FUNCTION_BOUNDS["min_warm"])
        max_warm = _check_int(data, "max_warm", 4, *FUNCTION_BOUNDS["max_warm"])
        if min_warm > max_warm:
            raise ValidationError("min_warm must not exceed max_warm")
        return cls(
            name=check_name(data.get("name"), "function name"),
            version=_check_int(data, "version", 1, 1, 2**31),
            runtime=check_name(data.get("runtime"), "runtime name"),
            sha256=sha,
            size=_check_int(data, "size", 0, 0, 2**40),
            entrypoint=entry,
            timeout=_check_number(data, "timeout", 30.0, *FUNCTION_BOUNDS["timeout"]),
            preload=preload,
            min_warm=min_warm,
            max_warm=max_warm,
            keepalive=None if data.get("keepalive") is None
            else _check_number(data, "keepalive", 600.0, *FUNCTION_BOUNDS["keepalive"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return out
