"""One middleware maps the error tree to HTTP status codes with a JSON body."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from controller.errors import ApiError, Busy
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
    except Busy as exc:
        return error_response(exc.status, exc.code, str(exc), {"Retry-After": str(exc.retry_after)})
    except ApiError as exc:
        return error_response(exc.status, exc.code, str(exc))
    except ValidationError as exc:
        return error_response(400, "bad_request", str(exc))
    except NotFound as exc:
        return error_response(404, "not_found", str(exc))
    except RedisError as exc:
        log.error("store_unavailable", path=request.path, error=str(exc))
        return error_response(503, "store_unavailable", f"the store (redis) is unavailable: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason,
                              {k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return error_response(500, "internal", "internal error; see the controller's log")
