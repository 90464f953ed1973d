"""One middleware maps the error tree to HTTP status codes with a JSON body; another checks tokens."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from redis.exceptions import RedisError

from controller.api.common import METRICS
from controller.config import ControllerConfig
from controller.errors import ApiError, Busy, Unauthorized
from shoal.auth import bearer_ok, registration_credential
from shoal.errors import NotFound, ValidationError
from shoal.logs import get_logger

log = get_logger("api")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, headers=headers, content_type="application/json",
                        text=json.dumps({"error": {"code": code, "message": message}}))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - mapped to an answer below; an unknown error is logged there
        status, code, message, headers = _describe(request, exc)
    request.app[METRICS].http_errors.inc(status=str(status), code=code)
    return error_response(status, code, message, headers)


def _describe(request: web.Request, exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, code, message, headers) of the answer for ``exc``; re-raises what is not an error."""
    if isinstance(exc, Busy):
        return exc.status, exc.code, str(exc), {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, Unauthorized):
        return exc.status, exc.code, str(exc), {"WWW-Authenticate": 'Bearer realm="shoal"'}
    if isinstance(exc, ApiError):
        return exc.status, exc.code, str(exc), None
    if isinstance(exc, ValidationError):
        return 400, "bad_request", str(exc), None
    if isinstance(exc, NotFound):
        return 404, "not_found", str(exc), None
    if isinstance(exc, RedisError):
        log.error("store_unavailable", path=request.path, error=str(exc))
        return 503, "store_unavailable", f"the store (redis) is unavailable: {exc}", None
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return (exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason,
                {k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    log.error("unhandled_error", path=request.path, method=request.method, exc_info=exc)
    return 500, "internal", "internal error; see the controller's log", None


OPEN_PATHS = frozenset({"/ping", "/version", "/openapi.json"})  # probes and the API's description
NODE_PATHS = frozenset({"/register"})  # node agents: the node token


def token_check(config: ControllerConfig) -> Middleware | None:
    """The middleware that wants the API token (on ``/register``: the node token's registration credential);
    None if neither token is set."""
    if not config.api_token and not config.node_token:
        return None
    registration = registration_credential(config.node_token) if config.node_token else ""

    @web.middleware
    async def tokens(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in NODE_PATHS:
            token, what = registration, "a credential derived from the node token"
        elif path in OPEN_PATHS:
            token, what = "", ""
        else:
            token, what = config.api_token, "the API token"
        if token and not bearer_ok(request.headers.get("Authorization"), token):
            raise Unauthorized(f"{path} needs {what}, missing or wrong: send Authorization: Bearer <token>")
        return await handler(request)

    return tokens
