"""The OpenAPI 3 document for /v1, served at /openapi.json. Tests check it against the real behaviour."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shoal import __version__
from shoal.models import FUNCTION_BOUNDS

NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}
ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "A token is set and the request does not carry it (Authorization: Bearer)",
            404: "Not found", 408: "The body stalled (nothing of it came for 30 s)",
            409: "Conflict", 413: "Body or archive too large",
            415: "Unsupported media type",
            429: "Busy: the queue, or the uploads being received, are full (see Retry-After)",
            503: "The store (Redis) is unavailable: nothing was accepted",
            507: "The controller cannot store or check the archive now (its disk is full): nothing was kept"}
    return {str(c): _resp(text[c], ERROR) for c in codes}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": NAME}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes a retry safe: the same request with the same key answers with the call(s) the first one "
                   "made. The key is bound to that request (function, version and timeout as asked, params): used "
                   "for another one, it is a 409.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
}

def _bounded(kind: str, option: str) -> dict[str, Any]:
    low, high = FUNCTION_BOUNDS[option]
    return {"type": kind, "minimum": low, "maximum": high}


#: A function upload's options (query parameters, or form fields): name, schema, description.
UPLOAD_OPTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("entrypoint", {"type": "string"}, "handler style: module:function (none: command style, the runtime's run)"),
    ("timeout", _bounded("number", "timeout"), "seconds a call may run (default 30)"),
    ("preload", {"type": "string", "enum": ["none", "runtime", "function"]},
     "what nodes keep ready for it (default: each node's own policy)"),
    ("min_warm", _bounded("integer", "min_warm"), "warm containers each node keeps for it (at most max_warm)"),
    ("max_warm", _bounded("integer", "max_warm"), "warm containers a node may have for it (default 4)"),
    ("keepalive", _bounded("number", "keepalive"), "seconds an idle warm container above min_warm is kept"),
]

INVOKE_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {
            "params": {"description": "Any JSON value, passed to the function"},
            "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 86400},
            "version": {"type": "integer", "minimum": 1},
            "wait": {"type": "number", "minimum": 0, "maximum": 3600},
        },
    }}},
}

BATCH_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object",
        "required": ["calls"],
        "properties": {
            "calls": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {
                "type": "object", "properties": {"params": {"description": "Any JSON value, passed to the function"}},
            }},
            "timeout": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 86400},
            "version": {"type": "integer", "minimum": 1},
        },
    }}},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Shoal", "version": __version__,
             "description": "Function-as-a-service: runtimes, functions, calls, nodes. A controller started with an "
                            "API token answers 401 (JSON error, WWW-Authenticate: Bearer) to any request without "
                            "it, on every route but /ping, /version and /openapi.json."},
    # No token (a local cluster), or the API token when the controller has one.
    "security": [{}, {"bearer": []}],
    "paths": {
        "/v1/runtimes": {
            "get": {"summary": "List runtimes", "responses": {"200": _resp("Runtimes", {
                "type": "array", "items": {"$ref": "#/components/schemas/Runtime"}})}},
            "post": {"summary": "Register a runtime",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/RuntimeIn"}}}},
                     "responses": {"201": _resp("Registered", {"$ref": "#/components/schemas/Runtime"}),
                                   **_errors(400, 413)}},
        },
        "/v1/runtimes/{name}": {
            "parameters": [_path_param("name")],
            "get": {"summary": "Get a runtime", "responses": {
                "200": _resp("Runtime", {"$ref": "#/components/schemas/Runtime"}), **_errors(404)}},
            "delete": {"summary": "Delete a runtime (refused while functions use it)",
                       "responses": {"204": _resp("Deleted"), **_errors(404, 409)}},
        },
        "/v1/functions": {
            "get": {"summary": "List functions (latest version of each)",
                    "responses": {"200": _resp("Functions", {"type": "array", "items": {"type": "object"}})}},
        },
        "/v1/functions/{name}": {
            "parameters": [_path_param("name")],
            "post": {
                "summary": "Upload a function archive (zip or tar.gz): a new version",
                "parameters": [
                    {"name": "runtime", "in": "query", "required": False, "schema": NAME,
                     "description": "required: here, or as a form field (multipart)"},
                    *({"name": name, "in": "query", "required": False, "schema": schema, "description": text}
                      for name, schema, text in UPLOAD_OPTIONS),
                ],
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {
                            "runtime": NAME,
                            **{name: schema for name, schema, _ in UPLOAD_OPTIONS},
                            "archive": {"type": "string", "format": "binary"},
                            "module": {"type": "string", "format": "binary",
                                       "description": "the archive, under the main seed's field name"}}},
                        "encoding": {"archive": {"contentType": "application/octet-stream"}},
                    },
                }, "description": "The archive as the raw body (runtime and options in the query), or multipart: "
                                  "the file part `archive` (or `module`) and the runtime and options as form fields, "
                                  "before or after it (those before it are checked before the archive is read), or in "
                                  "the query. An option given twice, or one not listed, is a 400."},
                "responses": {"201": _resp("Stored", {"type": "object"}),
                              **_errors(400, 404, 408, 413, 415, 429, 503, 507)},
            },
            "get": {"summary": "Get a function", "responses": {"200": _resp("Function", {"type": "object"}),
                                                               **_errors(404)}},
            "delete": {"summary": "Delete a function (every version)",
                       "description": "Its calls still waiting end CANCELLED (error type FunctionDeleted); those "
                                      "running on nodes end as they do. Then every node forgets the function: its "
                                      "warm containers are stopped and its archive, code and dependencies removed.",
                       "responses": {"204": _resp("Deleted"), **_errors(404)}},
        },
        "/v1/functions/{name}/invoke": {
            "parameters": [_path_param("name"), IDEMPOTENCY_KEY],
            "post": {"summary": "Invoke and wait for the outcome", "requestBody": INVOKE_BODY,
                     "responses": {"200": _resp("The call, ended", {"$ref": "#/components/schemas/Call"}),
                                   "202": _resp("Still running", {"$ref": "#/components/schemas/Accepted"}),
                                   **_errors(400, 404, 409, 413, 429, 503)}},
        },
        "/v1/functions/{name}/invoke-async": {
            "parameters": [_path_param("name"), IDEMPOTENCY_KEY],
            "post": {"summary": "Invoke without waiting", "requestBody": INVOKE_BODY,
                     "responses": {"202": _resp("Accepted", {"$ref": "#/components/schemas/Accepted"}),
                                   **_errors(400, 404, 409, 413, 429, 503)}},
        },
        "/v1/functions/{name}/invoke-batch": {
            "parameters": [_path_param("name"), IDEMPOTENCY_KEY],
            "post": {"summary": "Invoke many times without waiting: every call stored (one write) and queued",
                     "requestBody": BATCH_BODY,
                     "responses": {"202": _resp("Accepted, in the order given", {
                         "type": "object", "required": ["count", "calls"], "properties": {
                             "count": {"type": "integer"},
                             "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Accepted"}}}}),
                                   **_errors(400, 404, 409, 413, 429, 503)}},
        },
        "/v1/calls": {
            "get": {"summary": "List calls, newest first",
                    "parameters": [
                        {"name": "function", "in": "query", "required": False, "schema": NAME},
                        {"name": "status", "in": "query", "required": False, "schema": {
                            "type": "string", "enum": ["QUEUED", "DISPATCHED", "RUNNING", "DONE", "FAILED",
                                                       "TIMEOUT", "CANCELLED"]}},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "cursor", "in": "query", "required": False,
                         "description": "the next_cursor of the previous page. With a status filter a page may "
                                        "hold fewer calls than the limit (a request reads at most 10,000 calls): "
                                        "follow next_cursor until it is null",
                         "schema": {"type": "string", "pattern": "^[0-9]{1,15}-[0-9A-Za-z_.-]{1,128}$"}},
                    ],
                    "responses": {"200": _resp("A page of calls", {"type": "object", "properties": {
                        "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}},
                        "next_cursor": {"type": "string", "nullable": True}}}), **_errors(400)}},
        },
        "/v1/calls/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "Get a call", "responses": {
                "200": _resp("Call", {"$ref": "#/components/schemas/Call"}), **_errors(404)}},
        },
        "/v1/calls/{id}/cancel": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"summary": "Cancel a call", "responses": {"202": _resp("Cancelling", {"type": "object"}),
                                                               **_errors(404, 409)}},
        },
        "/v1/nodes": {"get": {"summary": "List nodes", "responses": {"200": _resp("Nodes", {
            "type": "array", "items": {"type": "object"}})}}},
        "/v1/nodes/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "Get a node", "responses": {"200": _resp("Node", {"type": "object"}),
                                                           **_errors(404)}},
        },
        "/v1/health": {"get": {"summary": "Health", "responses": {"200": _resp("Healthy", {
            "type": "object", "properties": {"redis_persistence": {
                "type": "object", "description": "Whether Redis keeps the durable queue across its own restart (AOF, "
                "`appendonly yes`), read at each request; `aof` is null, and `error` says why, where CONFIG is "
                "not allowed",
                "properties": {"aof": {"type": "boolean", "nullable": True},
                               "appendfsync": {"type": "string", "nullable": True}, "error": {"type": "string"}}}}})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)", "responses": {"200": {
            "description": "Calls accepted and finished, durations, requeues, queue depth, nodes, errors",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    },
    "components": {
      "securitySchemes": {"bearer": {
        "type": "http", "scheme": "bearer", "description": "The controller's API token (SHOAL_API_TOKEN)"}},
      "schemas": {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
        "RuntimeIn": {"type": "object", "required": ["image"], "properties": {
            "name": NAME, "image": {"type": "string"}, "path": {"type": "string"},
            "dependencies": {"type": "string"}, "run": {"type": "string"}}},
        "Runtime": {"type": "object", "required": ["name", "image", "path", "dependencies", "run"], "properties": {
            "name": NAME, "image": {"type": "string"}, "path": {"type": "string"},
            "dependencies": {"type": "string"}, "run": {"type": "string"}}},
        "Accepted": {"type": "object", "required": ["id", "status", "location"], "properties": {
            "id": {"type": "string"}, "status": {"type": "string"}, "location": {"type": "string"}}},
        "Call": {"type": "object", "required": ["id", "status", "function"], "properties": {
            "id": {"type": "string"}, "num": {"type": "integer"}, "function": {"type": "string"},
            "version": {"type": "integer"}, "status": {"type": "string"},
            "timestamps": {"type": "object"},
            "unreadable": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Only for a record damaged in the store: the fields that cannot be read "
                                          "(left out), and why"}}},
    }},
}


#: Operations that answer without the store (Redis): everything else answers 503 when it is unavailable.
STORELESS = frozenset({("/v1/nodes", "get"), ("/v1/nodes/{id}", "get"), ("/metrics", "get")})


def _add_common_errors(document: dict[str, Any]) -> None:
    """The statuses every operation can answer besides its own: 401 (a token is set and the request has not got
    it), 503 (the store is unavailable), 408 (a body that stalls)."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            codes = [401]
            if (path, method) not in STORELESS:
                codes.append(503)
            if "requestBody" in operation:
                codes.append(408)
            for code, response in _errors(*codes).items():
                operation["responses"].setdefault(code, response)


_add_common_errors(DOCUMENT)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
