"""Helpers shared by the route modules: typed app keys, JSON bodies, call rendering."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from controller.errors import BadRequest, RequestTimeout, TooLarge, UnsupportedMedia
from controller.metrics import ControllerMetrics
from controller.service import Service
from shoal.protocol import MAX_HEADER_BYTES, DepthError, dumps_str, loads_bounded

SERVICE: web.AppKey[Service] = web.AppKey("service")
METRICS: web.AppKey[ControllerMetrics] = web.AppKey("metrics")
#: Largest JSON body. A call's params travel to its node inside one message header (at most MAX_HEADER_BYTES),
#: and encoded again they can take 4.5 times their text (1e15 is written 1000000000000000.0): a fifth of the
#: header bound always fits.
MAX_JSON = MAX_HEADER_BYTES // 5
STATES = ("QUEUED", "DISPATCHED", "RUNNING", "DONE", "FAILED", "TIMEOUT", "CANCELLED")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """``web.json_response`` with the fast encoder the wire uses."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps_str)


def service(request: web.Request) -> Service:
    return request.app[SERVICE]


#: What reading a body the client controls can raise: a broken chunked or multipart framing, a
#: Content-Encoding whose data is not what it says (aiohttp decompresses as it reads), a charset Python does
#: not know, or the client closing the connection half-way.
BODY_ERRORS = (ValueError, AssertionError, HttpProcessingError, RequestPayloadError, zlib.error, LookupError,
               ConnectionResetError)


#: Seconds a client may send nothing of a body it is sending. Without a bound, a stalled upload held its
#: connection, its partial file (up to the archive limit) and its descriptor for ever.
BODY_IDLE_S = 30.0
T = TypeVar("T")


@contextmanager
def reading_body(what: str) -> Iterator[None]:
    try:
        yield
    except BODY_ERRORS as exc:
        raise BadRequest(f"malformed {what}: {exc or type(exc).__name__}") from None


async def body_read(read: Awaitable[T], what: str) -> T:
    """One read of a request's body, bounded by BODY_IDLE_S; a stalled one is a 408."""
    try:
        async with asyncio.timeout(BODY_IDLE_S):
            with reading_body(what):
                return await read
    except TimeoutError:
        raise RequestTimeout(f"the {what} stalled: nothing of it came for {BODY_IDLE_S:g} s") from None


def check_upload_length(request: web.Request, limit: int) -> None:
    """Refuse (413) an upload whose declared length is past what its archive may be, before any byte is read (a
    multipart body's form fields and framing take up to MULTIPART_SLACK more)."""
    slack = MULTIPART_SLACK if request.content_type.startswith("multipart/") else 0
    if request.content_length is not None and request.content_length > limit + slack:
        raise TooLarge(f"archive exceeds the limit of {limit} bytes (the body declares {request.content_length})")


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_JSON:
        raise TooLarge(f"JSON body larger than {MAX_JSON} bytes")
    # read(n) returns what has arrived so far, not n bytes: a body larger than a segment or two came in cut.
    buf = bytearray()
    content = request.content
    while True:
        with reading_body("request body"):
            chunk = content.read_nowait(1 << 16)  # what has come already (a small body, usually): no timer
        if not chunk:
            if content.at_eof():
                break
            chunk = await body_read(content.read(1 << 16), "request body")
            if not chunk:
                break
        buf += chunk
        if len(buf) > MAX_JSON:
            raise TooLarge(f"JSON body larger than {MAX_JSON} bytes")
    raw = bytes(buf)
    if not raw.strip():
        raise BadRequest("a JSON body is required")
    try:
        return loads_bounded(raw, strict=True)
    except DepthError as exc:
        raise BadRequest(f"the body's {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"malformed JSON: {exc}") from None


async def json_object(request: web.Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


async def stream_chunks(request: web.Request) -> AsyncIterator[bytes]:
    while True:
        chunk = await body_read(request.content.read(1 << 20), "request body")
        if not chunk:
            return
        yield chunk


async def part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await body_read(part.read_chunk(1 << 20), "multipart body")
        if not chunk:
            return
        yield chunk


MAX_FORM_FIELDS = 16  # form fields of an upload, before and after its file part (the function's options)
MAX_FORM_FIELD = 4096  # bytes of one form field
MULTIPART_SLACK = MAX_FORM_FIELDS * (MAX_FORM_FIELD + 1024) + 64 * 1024  # fields, their headers, the framing


@dataclass
class MultipartUpload:
    """A multipart upload: its file part (to be read first), the form fields before it, and what reads the
    fields after it once the file part has been read (:meth:`rest`)."""

    part: BodyPartReader
    fields: dict[str, str]
    reader: MultipartReader
    field_names: tuple[str, ...]

    async def rest(self) -> dict[str, str]:
        """The form fields after the file part (read to the end of the body): at most ``MAX_FORM_FIELDS`` in all,
        none named twice, and no second file."""
        after: dict[str, str] = {}
        while True:
            part = await body_read(self.reader.next(), "multipart body")
            if part is None:
                return after
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            if part.name in self.field_names:
                raise BadRequest(f"the multipart body has more than one file field ({part.name!r})")
            if len(self.fields) + len(after) >= MAX_FORM_FIELDS:
                raise BadRequest(f"at most {MAX_FORM_FIELDS} form fields")
            if part.name in self.fields or part.name in after:
                raise BadRequest(f"form field {part.name[:40]!r} is given twice")
            after[part.name] = await _form_field(part)


async def multipart_file(request: web.Request, field_names: tuple[str, ...]) -> MultipartUpload:
    """The multipart file part named one of ``field_names``, with the form fields before it (at most
    ``MAX_FORM_FIELDS`` of at most ``MAX_FORM_FIELD`` bytes each: they are held in memory)."""
    if not request.content_type.startswith("multipart/"):
        raise UnsupportedMedia(f"expected multipart/form-data with a file field {field_names[0]!r}")
    reader = await body_read(request.multipart(), "multipart body")
    fields: dict[str, str] = {}
    while True:
        part = await body_read(reader.next(), "multipart body")
        if part is None:
            raise BadRequest(f"multipart body has no file field {field_names[0]!r}")
        if not isinstance(part, BodyPartReader):
            continue
        if part.name in field_names:
            return MultipartUpload(part, fields, reader, field_names)
        if part.name:
            if len(fields) >= MAX_FORM_FIELDS:
                raise BadRequest(f"at most {MAX_FORM_FIELDS} form fields")
            if part.name in fields:
                raise BadRequest(f"form field {part.name[:40]!r} is given twice")
            fields[part.name] = await _form_field(part)


async def _form_field(part: BodyPartReader) -> str:
    name = (part.name or "")[:40]
    data = b""
    what = f"multipart field {name!r}"
    while chunk := await body_read(part.read_chunk(MAX_FORM_FIELD), what):
        data += chunk
        if len(data) > MAX_FORM_FIELD:
            break
    with reading_body(what):
        try:
            decoded = part.decode(data)
        except RuntimeError as exc:  # aiohttp: a Content-Encoding it does not know
            raise BadRequest(f"malformed multipart field {name!r}: {exc}") from None
    if len(data) > MAX_FORM_FIELD:
        raise BadRequest(f"form field {name!r} is longer than {MAX_FORM_FIELD} bytes")
    return decoded.decode("utf-8", "replace")


def upload_name(part: BodyPartReader) -> str:
    """The uploaded file's name as sent, made safe to store and show: bytes that are not UTF-8 (aiohttp
    passes them on as lone surrogates), and lone surrogates a name spells out itself (``filename*=`` with
    ``\ud800`` escaped), become U+FFFD, and it is cut at 255 characters."""
    name = part.filename or ""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the bytes as sent
    except UnicodeEncodeError:  # a surrogate no byte stands for: spelt out
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")[:255]


def render_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call as the v1 API shows it."""
    shown = {
        "id": call.get("id"), "num": call.get("num"), "function": call.get("function"), "version": call.get("version"),
        "status": call.get("status"), "progress": call.get("progress"), "params": call.get("params"),
        "result": call.get("result"), "error": call.get("error"), "logs": call.get("logs"),
        "node": call.get("node") or None, "attempts": call.get("attempts"), "cold": call.get("cold"),
        "timeout": call.get("timeout"), "created": call.get("created"),
        "timestamps": {s: call[f"t_{s}"] for s in STATES if call.get(f"t_{s}")},
        "timings": call.get("timings"),
    }
    if "unreadable" in call:
        shown["unreadable"] = call["unreadable"]
    return shown
