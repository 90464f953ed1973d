"""The Shoal wire protocol: every message that crosses a process boundary.

Three links use it:

* controller <-> node agent: ZMQ ROUTER (controller) / DEALER (agent, identity = node id), tcp.
* broker <-> miniworker: ZMQ ROUTER (agent's broker) / DEALER (miniworker, identity = miniworker id), ipc.
* miniworker <-> runner: a unix stream socket in a directory bind-mounted into the container.

On ZMQ a message is the frames ``[type][header][payload...]``: ``type`` is a short ASCII tag from
:class:`Msg`, ``header`` a JSON object, and bulk bytes (archive chunks) travel as their own frames so
they are never copied into a dict. On the runner socket a message is ``[u32 length][type NUL header]``.

:func:`decode` validates the type and the header's fields against :data:`SCHEMAS` and raises exactly one
exception, :class:`ProtocolError`; receivers drop and log a bad message and carry on.

This module imports only the standard library (orjson too when present, for speed): it is mounted into
function containers, where the standard library's json serves.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

try:
    import orjson as _orjson
except ImportError:  # inside a function's container: the standard library serves
    _orjson = None  # type: ignore[assignment]

PROTOCOL_VERSION = 1

#: Largest header we accept (bulk data belongs in payload frames).
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Largest runner message (a call's params or result travel in the header there).
MAX_RUNNER_MESSAGE = 64 * 1024 * 1024
#: The longest path a unix socket (an ipc:// endpoint, a runner's socket) takes: sizeof(sun_path) less its NUL.
UNIX_PATH_MAX = 107
#: Largest result message a runner sends: its result goes on to the broker and the controller in ZMQ headers,
#: with a few fields added (node, timings), so it must leave room under MAX_HEADER_BYTES.
MAX_RESULT_MESSAGE = MAX_HEADER_BYTES - 64 * 1024
#: Deepest nesting of arrays and objects in a JSON document taken from outside (API bodies, runner messages).
#: Far below Python's recursion limit, so that every process on a call's way can encode and decode what was
#: accepted (the standard library's json recurses in C, and runs out of stack near 1,000 levels).
MAX_JSON_DEPTH = 200


#: Plain ints for ZMQ's EVENTS/POLLIN (pyzmq's IntFlag arithmetic costs microseconds per message).
ZMQ_EVENTS = 15
ZMQ_POLLIN = 1


def zmq_readable(sock: Any) -> bool:
    """Whether a ZMQ socket has a message waiting (no exception, no IntFlag arithmetic)."""
    return bool(sock.getsockopt(ZMQ_EVENTS) & ZMQ_POLLIN)


class ProtocolError(ValueError):
    """A message that does not follow this protocol. The receiver drops it and logs why."""


class MessageTooLarge(ProtocolError):
    """A message over the size its sender may send or its receiver takes (``size``: its size, in bytes)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class Msg:
    """Message type tags. Kept short: they are on every frame."""

    # --- controller <-> node agent -------------------------------------------------------------
    HELLO = b"HELLO"  # agent -> controller: who I am, what I hold
    WELCOME = b"WELCOME"  # controller -> agent: accepted
    HEARTBEAT = b"HB"  # both ways
    RUNTIME = b"RUNTIME"  # controller -> agent: a runtime definition
    FUNCTION = b"FUNC"  # controller -> agent: a function version (archive by sha256)
    FUNCTION_STATE = b"FSTATE"  # agent -> controller: function ready / failed on this node
    FUNCTION_GONE = b"FGONE"  # controller -> agent: a function was deleted: forget its versions up to this one
    RUNTIME_GONE = b"RGONE"  # controller -> agent: a runtime was deleted
    FETCH = b"FETCH"  # agent -> controller: send me chunks of an archive (credit-based)
    CHUNK = b"CHUNK"  # controller -> agent: one chunk (payload frame = bytes)
    FETCH_ERROR = b"FETCHERR"  # controller -> agent: cannot serve that archive
    CALL = b"CALL"  # controller -> agent: run this call
    CANCEL = b"CANCEL"  # controller -> agent: cancel this call
    CALL_STATE = b"CSTATE"  # agent -> controller: a call started running / progressed
    RESULT = b"RESULT"  # agent -> controller: a call ended (or was rejected by this node)
    STATUS = b"STATUS"  # agent -> controller: load and warm pools summary
    DRAIN = b"DRAIN"  # controller -> agent: take no new work, finish, exit

    # --- broker <-> miniworker -----------------------------------------------------------------
    MW_READY = b"MREADY"  # miniworker -> broker: container up (and function loaded if bound)
    MW_CALL = b"MCALL"  # broker -> miniworker: run a call (with what to load if not yet loaded)
    MW_RESULT = b"MRESULT"  # miniworker -> broker: outcome of a call
    MW_FAILED = b"MFAILED"  # miniworker -> broker: cannot serve (start failed, container lost)
    MW_HEARTBEAT = b"MHB"  # both ways
    MW_STOP = b"MSTOP"  # broker -> miniworker: remove your container and exit
    MW_DROP = b"MDROP"  # broker -> miniworker: forget the call you hold (not started): it was cancelled

    # --- miniworker <-> runner (unix socket) ---------------------------------------------------
    R_HELLO = b"RHELLO"  # runner -> miniworker: I am up
    R_LOAD = b"RLOAD"  # miniworker -> runner: install dependencies, load the function
    R_LOADED = b"RLOADED"  # runner -> miniworker: outcome of the load
    R_CALL = b"RCALL"  # miniworker -> runner: run one call
    R_RESULT = b"RRESULT"  # runner -> miniworker: outcome of one call


_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_BOOL = (bool,)
_DICT = (dict,)
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))
_ANY: tuple[type, ...] = ()

#: Fields that count or locate bytes (a negative one is malformed, not merely unknown).
COUNT_FIELDS = frozenset({"offset", "credit", "size", "capacity", "version", "up_to"})

#: Required header fields per message type (name -> accepted types; empty tuple = any JSON value).
#: Extra fields are allowed (forward compatibility); missing or mistyped required fields are not.
SCHEMAS: dict[bytes, dict[str, tuple[type, ...]]] = {
    Msg.HELLO: {"v": _INT, "node_id": _STR, "capacity": _INT},
    Msg.WELCOME: {"v": _INT},
    Msg.HEARTBEAT: {},
    Msg.RUNTIME: {"name": _STR, "image": _STR, "path": _STR, "dependencies": _STR, "run": _STR},
    Msg.FUNCTION: {"name": _STR, "version": _INT, "runtime": _STR, "sha256": _STR, "size": _INT},
    Msg.FUNCTION_STATE: {"name": _STR, "version": _INT, "state": _STR},
    Msg.FUNCTION_GONE: {"name": _STR, "up_to": _INT},
    Msg.RUNTIME_GONE: {"name": _STR},
    Msg.FETCH: {"sha256": _STR, "offset": _INT, "credit": _INT},
    Msg.CHUNK: {"sha256": _STR, "offset": _INT, "last": _BOOL},
    Msg.FETCH_ERROR: {"sha256": _STR, "error": _STR},
    Msg.CALL: {"call_id": _STR, "function": _STR, "params": _ANY},
    Msg.CANCEL: {"call_id": _STR},
    Msg.CALL_STATE: {"call_id": _STR, "state": _STR},
    Msg.RESULT: {"call_id": _STR, "status": _STR},
    Msg.STATUS: {"node_id": _STR},
    Msg.DRAIN: {},
    Msg.MW_READY: {"v": _INT, "mw_id": _STR, "container_id": _STR},
    Msg.MW_CALL: {"call_id": _STR, "params": _ANY, "timeout": _NUM},
    Msg.MW_RESULT: {"call_id": _STR, "status": _STR},
    Msg.MW_FAILED: {"reason": _STR},
    Msg.MW_HEARTBEAT: {},
    Msg.MW_STOP: {},
    Msg.MW_DROP: {"call_id": _STR},
    Msg.R_HELLO: {"pid": _INT},
    Msg.R_LOAD: {"path": _STR, "style": _STR},
    Msg.R_LOADED: {"ok": _BOOL},
    Msg.R_CALL: {"call_id": _STR, "params": _ANY},
    Msg.R_RESULT: {"call_id": _STR, "ok": _BOOL},
}

MAX_SILENCE = 600.0  # seconds: the longest silence a peer may announce it keeps between heartbeats (see silence_of)


def silence_of(header: dict[str, Any]) -> float | None:
    """How long the peer that sent ``header`` (a HELLO or a WELCOME) may stay silent before it counts as lost:
    its ``heartbeat`` times its ``liveness``, if it announced them (positive finite numbers; at most
    MAX_SILENCE)."""
    heartbeat, liveness = header.get("heartbeat"), header.get("liveness")
    numbers: list[float] = []
    for value in (heartbeat, liveness):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            number = float(value)  # (an integer too large for a float raises)
        except OverflowError:
            return None
        if not math.isfinite(number) or number <= 0:
            return None
        numbers.append(number)
    return min(numbers[0] * numbers[1], MAX_SILENCE)


#: Message types that carry payload frames (all others must have none).
PAYLOAD_TYPES = frozenset({Msg.CHUNK})


#: A payload frame: bytes, or a zero-copy view of a received ZMQ frame (``recv_multipart(copy=False)``).
Buffer = bytes | memoryview


@dataclass(slots=True)
class Message:
    """A decoded message."""

    type: bytes
    header: dict[str, Any]
    payload: list[Buffer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.type.decode("ascii")


def _validate(mtype: bytes, header: Any) -> dict[str, Any]:
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"unknown message type {mtype[:32]!r}")
    if not isinstance(header, dict):
        raise ProtocolError(f"{mtype.decode()}: header must be a JSON object, got {type(header).__name__}")
    for name, types in schema.items():
        if name not in header:
            raise ProtocolError(f"{mtype.decode()}: missing field {name!r}")
        value = header[name]
        # bool is an int in Python: an int field must not accept true/false.
        if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            expected = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{mtype.decode()}: field {name!r} must be {expected}")
        if name in COUNT_FIELDS and value < 0:
            raise ProtocolError(f"{mtype.decode()}: field {name!r} must not be negative")
    return header


def dumps(value: Any, strict: bool = False) -> bytes:
    """Compact UTF-8 JSON. orjson when it can (5-10x faster); the standard library for what orjson refuses
    (integers beyond 64 bits, non-string keys, lone surrogates), so both give the same document.

    ``strict`` refuses NaN and the infinities (ValueError) instead of writing them (the standard library
    writes ``NaN``, which is not JSON; orjson writes ``null``): the standard library only, then."""
    if strict:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    if _orjson is not None:
        try:
            return _orjson.dumps(value)
        except TypeError:
            pass  # the standard library below handles what orjson refuses
    # ASCII: a lone surrogate is only expressible escaped (encoding it as UTF-8 would raise).
    return json.dumps(value, separators=(",", ":")).encode()


def dumps_str(value: Any) -> str:
    return dumps(value).decode()


#: Parsing stays with the standard library: orjson turns integers beyond 64 bits into floats, silently.
loads = json.loads


class DepthError(ValueError):
    """A JSON document nested deeper than :data:`MAX_JSON_DEPTH`."""


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has arrays/objects nested more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 opening, -1 (as a signed byte) closing


def text_nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether a valid JSON text nests deeper than ``limit``, from its bytes: strings dropped, brackets made
    +1/-1, the running sum's maximum. C loops only: a few tens of ms for a few MB of brackets, where walking the
    parsed value took over a second (and held the caller's event loop meanwhile)."""
    steps = _JSON_STRING.sub(b"", raw).translate(_BRACKET_STEP, delete=_NOT_BRACKET)
    return max(accumulate(array("b", steps)), default=0) > limit


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string (or key) in ``value`` holds a lone surrogate: text that no UTF-8 can carry."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads_bounded(raw: bytes, strict: bool = False) -> Any:
    """``json.loads`` that refuses documents nested deeper than :data:`MAX_JSON_DEPTH` (:class:`DepthError`;
    malformed JSON raises ``ValueError`` as json does). The depth is only walked when the document has more
    brackets than the limit, so ordinary documents pay two byte counts.

    ``strict`` also refuses what Python's json takes but JSON has not: ``NaN``, ``Infinity`` and numbers
    beyond a float's range (they would go on as ``null``), and strings with a lone surrogate (``"\\ud800"``:
    valid JSON text, but no UTF-8 can carry it on; looked for only when the text has such an escape)."""
    # UTF-8 only: json.loads takes UTF-16 and UTF-32 too, where the checks below, made on the bytes as UTF-8, see
    # nothing (no bracket is a bracket, no ``\ud`` a surrogate): a body nested 976 deep went in, and was a 500.
    text = raw.decode("utf-8")  # (UnicodeDecodeError: a ValueError, as malformed JSON is)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark (Windows tools write one), as json.loads(bytes) took it
        text = text[1:]
    try:
        if strict:
            value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        else:
            value = json.loads(text)
    except RecursionError:
        raise DepthError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if (raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and isinstance(value, (dict, list))
            and text_nested_deeper_than(bytes(raw), MAX_JSON_DEPTH)):
        raise DepthError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if strict and (b"\\ud" in raw or b"\\uD" in raw) and has_lone_surrogate(value):
        raise ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff not in a pair)")
    return value


def encode(mtype: bytes, header: dict[str, Any] | None = None, *payload: Buffer) -> list[Buffer]:
    """Frames for a ZMQ message. Validates outgoing messages too: a bug shows where it is made."""
    head = _validate(mtype, {} if header is None else header)
    return [mtype, dumps(head), *payload]


def decode(frames: list[Any]) -> Message:
    """Decode and validate the frames of a ZMQ message (routing envelope already removed).

    Frames are bytes, or ZMQ frames (``copy=False``): payload frames then stay zero-copy views.
    """
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames [type][header], got {len(frames)}")
    if len(frames[0]) > 64:
        raise ProtocolError(f"message type of {len(frames[0])} bytes")
    mtype = bytes(frames[0])
    raw = frames[1]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    header = _parse_header(mtype, raw)
    _validate(mtype, header)
    payload: list[Buffer] = [f if isinstance(f, bytes) else memoryview(f) for f in frames[2:]]
    if payload and mtype not in PAYLOAD_TYPES:
        raise ProtocolError(f"{mtype.decode()}: carries {len(payload)} unexpected payload frame(s)")
    return Message(mtype, header, payload)


# --- the runner socket: length-prefixed [type NUL header-json] -----------------------------------

_LEN = struct.Struct("!I")


def pack_runner(mtype: bytes, header: dict[str, Any], strict: bool = False) -> bytes:
    """One runner-socket message, ready for ``sendall`` (``strict``: see :func:`dumps`)."""
    _validate(mtype, header)
    body = mtype + b"\0" + dumps(header, strict)
    if len(body) > MAX_RUNNER_MESSAGE:
        raise MessageTooLarge(f"{mtype.decode()}: message of {len(body)} bytes exceeds {MAX_RUNNER_MESSAGE}",
                              len(body))
    return _LEN.pack(len(body)) + body


def unpack_runner_body(body: bytes) -> Message:
    mtype, sep, raw = body.partition(b"\0")
    if not sep:
        raise ProtocolError("runner message has no type separator")
    return Message(mtype, _validate(mtype, _parse_header(mtype, raw)))


def _parse_header(mtype: bytes, raw: bytes) -> Any:
    try:
        return loads_bounded(raw)
    except DepthError as exc:
        raise ProtocolError(f"{mtype[:32]!r}: header {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(f"{mtype[:32]!r}: header is not JSON ({exc})") from None


#: Bytes one read from a runner socket takes at most (into a buffer kept for the stream).
RUNNER_READ_SIZE = 1 << 20


class RunnerStream:
    """Reassembles length-prefixed runner messages from a byte stream (either side of the socket), each at most
    ``limit`` bytes (the miniworker takes no more than a result may be from the runner, whose process runs the
    function's code: what the runner checks, that code can undo)."""

    def __init__(self, limit: int = MAX_RUNNER_MESSAGE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._view: memoryview | None = None  # of the read buffer, made at the first read

    def read(self, sock: socket.socket) -> bytes | memoryview:
        """One read from ``sock`` (empty at the end of the stream), to :meth:`feed` before the next read. Into a
        buffer kept for the stream: ``sock.recv(1 MiB)`` maps and unmaps a fresh MiB for every message."""
        if self._view is None:
            self._view = memoryview(bytearray(RUNNER_READ_SIZE))
        return self._view[:sock.recv_into(self._view)]

    def feed(self, data: bytes | memoryview) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self.limit:
                raise MessageTooLarge(f"runner message of {size} bytes exceeds {self.limit}", size)
            end = _LEN.size + size
            if len(self._buf) < end:
                break
            body = bytes(self._buf[_LEN.size:end])
            del self._buf[:end]
            out.append(unpack_runner_body(body))
        return out
