"""Shoal's own API under /v1 (described by /openapi.json)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from controller.api.common import (
    METRICS,
    STATES,
    check_upload_length,
    json_object,
    json_response,
    multipart_file,
    part_chunks,
    render_call,
    service,
    stream_chunks,
    upload_name,
)
from controller.api.openapi import UPLOAD_OPTIONS
from controller.errors import BadRequest
from controller.service import parse_options
from shoal.httpserver import cancelled_if_client_leaves
from shoal.models import check_name

MAX_WAIT = 3600.0


def runtime_json(runtime: Any) -> dict[str, Any]:
    return dict(runtime.to_dict())


async def create_runtime(request: web.Request) -> web.Response:
    runtime = await service(request).register_runtime(await json_object(request))
    return json_response(runtime_json(runtime), status=201)


async def list_runtimes(request: web.Request) -> web.Response:
    return json_response([runtime_json(r) for r in await service(request).store.list_runtimes()])


async def get_runtime(request: web.Request) -> web.Response:
    return json_response(runtime_json(await service(request).get_runtime(request.match_info["name"])))


async def delete_runtime(request: web.Request) -> web.Response:
    await service(request).delete_runtime(request.match_info["name"])
    return web.Response(status=204)


#: What a function upload takes, as query parameters or form fields: the runtime and the function's options.
UPLOAD_FIELDS = ("runtime", *(name for name, _, _ in UPLOAD_OPTIONS))


def _upload_options(raw: dict[str, str], where: str) -> dict[str, Any]:
    """The options of ``raw`` (query parameters or form fields), typed; a name not among UPLOAD_FIELDS is a 400
    (a mistyped `timout` was ignored, and the function ran with the default)."""
    unknown = sorted(k for k in raw if k not in UPLOAD_FIELDS)
    if unknown:
        raise BadRequest(f"unknown {where}: {', '.join(repr(k[:40]) for k in unknown[:5])} "
                         f"(known: {', '.join(UPLOAD_FIELDS)})")
    return parse_options(raw)


def _not_in_query(query: dict[str, str], fields: dict[str, str]) -> None:
    twice = sorted(set(query) & set(fields))
    if twice:
        raise BadRequest(f"{twice[0][:40]!r} is given both as a query parameter and as a form field")


async def upload_function(request: web.Request) -> web.Response:
    """Multipart (file field `archive` or `module`, the runtime and options as form fields, before or after the
    file, or as query parameters) or a raw body (the runtime and options in the query)."""
    name = check_name(request.match_info["name"], "function name")
    svc = service(request)
    check_upload_length(request, svc.config.max_archive_bytes)
    repeated = sorted({k for k in request.query if len(request.query.getall(k)) > 1})
    if repeated:
        raise BadRequest(f"query parameter {repeated[0][:40]!r} is given twice")
    if not request.content_type.startswith("multipart/"):
        runtime = request.query.get("runtime", "")
        options = _upload_options(dict(request.query), "query parameter")
        record = await svc.upload_function(name, check_name(runtime, "runtime"), stream_chunks(request), options)
        return json_response(record, status=201)
    upload = await multipart_file(request, ("archive", "module"))
    query = dict(request.query)
    _not_in_query(query, upload.fields)
    before = dict(query, **upload.fields)
    options = _upload_options(before, "query parameter or form field")
    given = before.get("runtime") or None

    async def after() -> tuple[str | None, dict[str, Any]]:
        """The form fields after the file part: the runtime if it was not given before, and more options."""
        late = await upload.rest()
        _not_in_query(query, late)
        if given is not None and "runtime" in late:
            raise BadRequest("'runtime' is given twice")
        late_runtime = late.pop("runtime", "") or None
        return (check_name(late_runtime, "runtime") if late_runtime else None,
                _upload_options(late, "form field"))

    record = await svc.upload_function(name, check_name(given, "runtime") if given else None,
                                       part_chunks(upload.part), options, upload_name(upload.part), after)
    return json_response(record, status=201)


async def list_functions(request: web.Request) -> web.Response:
    return json_response(await service(request).store.list_functions())


async def get_function(request: web.Request) -> web.Response:
    return json_response(await service(request).get_function(request.match_info["name"]))


async def delete_function(request: web.Request) -> web.Response:
    await service(request).delete_function(request.match_info["name"])
    return web.Response(status=204)


def _invoke_args(body: dict[str, Any]) -> dict[str, Any]:
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout <= 86400):
        raise BadRequest("timeout must be a number of seconds in (0, 86400]")
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise BadRequest("version must be a positive integer")
    wait = body.get("wait")
    if wait is not None and (isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT):
        raise BadRequest(f"wait must be a number of seconds in [0, {MAX_WAIT:g}]")
    return {"params": body.get("params"), "timeout": timeout, "version": version, "wait": wait}


async def invoke(request: web.Request) -> web.Response:
    """Sync: wait for the outcome (up to `wait`, default the function's timeout + margin); 202 if still going."""
    svc = service(request)
    args = _invoke_args(await json_object(request))
    call, pending = await svc.invoke(request.match_info["name"], args["params"], timeout=args["timeout"],
                                     version=args["version"],
                                     idempotency_key=request.headers.get("Idempotency-Key"))
    wait = args["wait"] if args["wait"] is not None else min(float(call["timeout"]) + 5.0,
                                                              svc.config.sync_timeout)
    with cancelled_if_client_leaves(request) as client_there:
        if not client_there:
            return accepted(request, call)  # nobody to answer: the call goes on
        done = await svc.wait(pending, call["id"], wait)
    if done is None or done["status"] not in ("DONE", "FAILED", "TIMEOUT", "CANCELLED"):
        return accepted(request, done or call)
    return json_response(render_call(done))


async def invoke_async(request: web.Request) -> web.Response:
    svc = service(request)
    args = _invoke_args(await json_object(request))
    call, _ = await svc.invoke(request.match_info["name"], args["params"], timeout=args["timeout"],
                               version=args["version"], idempotency_key=request.headers.get("Idempotency-Key"))
    return accepted(request, call)


MAX_BATCH = 1000  # calls per batch request
CURSOR_RE = re.compile(r"(\d{1,15})-([0-9A-Za-z_.-]{1,128})")  # a page's position: creation (ms), call id


async def invoke_batch(request: web.Request) -> web.Response:
    """Many calls of one function in one request: each stored (one write) and queued, as `invoke-async`."""
    body = await json_object(request)
    args = _invoke_args(body)
    calls = body.get("calls")
    if not isinstance(calls, list) or not 1 <= len(calls) <= MAX_BATCH:
        raise BadRequest(f"calls must be a list of 1 to {MAX_BATCH} objects")
    if not all(isinstance(c, dict) for c in calls):
        raise BadRequest('each entry of calls must be an object, e.g. {"params": ...}')
    made = await service(request).invoke_batch(
        request.match_info["name"], [c.get("params") for c in calls], timeout=args["timeout"],
        version=args["version"], idempotency_key=request.headers.get("Idempotency-Key"))
    return json_response({"count": len(made), "calls": [
        {"id": c["id"], "status": c["status"], "location": f"/v1/calls/{c['id']}"} for c in made]}, status=202)


def accepted(request: web.Request, call: dict[str, Any]) -> web.Response:
    location = f"/v1/calls/{call['id']}"
    return json_response({"id": call["id"], "status": call["status"], "location": location},
                         status=202, headers={"Location": location})


async def list_calls(request: web.Request) -> web.Response:
    q = {k: v for k, v in request.query.items() if v}  # an empty value is as if absent (`?status=&limit=`)
    status = q.get("status")
    if status is not None and status not in STATES:
        raise BadRequest(f"status must be one of {', '.join(STATES)}")
    function = q.get("function")
    if function is not None:
        check_name(function, "function")
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be in [1, 1000]")
    after = None
    if "cursor" in q:
        if (m := CURSOR_RE.fullmatch(q["cursor"])) is None:
            raise BadRequest("cursor must be a next_cursor this API gave")
        after = (int(m[1]), m[2])
    calls, position = await service(request).store.list_calls(function, status, after, limit)
    next_cursor = f"{position[0]}-{position[1]}" if position else None
    return json_response({"calls": [render_call(c) for c in calls], "next_cursor": next_cursor})


async def get_call(request: web.Request) -> web.Response:
    return json_response(render_call(await service(request).get_call(request.match_info["id"])))


async def cancel_call(request: web.Request) -> web.Response:
    call = await service(request).cancel(request.match_info["id"])
    return json_response({"id": call["id"], "status": "CANCELLING"}, status=202)


async def list_nodes(request: web.Request) -> web.Response:
    return json_response([n.to_dict() for n in sorted(service(request).hub.nodes.values(),
                                                          key=lambda n: n.node_id)])


async def get_node(request: web.Request) -> web.Response:
    from controller.errors import Missing

    node = service(request).hub.nodes.get(request.match_info["id"])
    if node is None:
        raise Missing(f"no node {request.match_info['id']!r}")
    return json_response(node.to_dict())


async def health(request: web.Request) -> web.Response:
    svc = service(request)
    await svc.store.redis.ping()
    # Whether Redis keeps the durable queue across its own restart (AOF), read now (see Store.persistence).
    return json_response({"ok": True, "nodes": sum(1 for n in svc.hub.nodes.values() if n.alive()),
                          **svc.dispatcher.snapshot(), "redis_persistence": await svc.store.persistence()})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (see controller/metrics.py)."""
    svc = service(request)
    text = request.app[METRICS].render(svc.hub.nodes.values(), svc.dispatcher.queued(), len(svc.dispatcher.calls),
                                       svc.hub.archives.bytes_sent, svc.hub.refused_links)
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/runtimes", create_runtime)
    r.add_get("/v1/runtimes", list_runtimes)
    r.add_get("/v1/runtimes/{name}", get_runtime)
    r.add_delete("/v1/runtimes/{name}", delete_runtime)
    r.add_post("/v1/functions/{name}", upload_function)
    r.add_get("/v1/functions", list_functions)
    r.add_get("/v1/functions/{name}", get_function)
    r.add_delete("/v1/functions/{name}", delete_function)
    r.add_post("/v1/functions/{name}/invoke", invoke)
    r.add_post("/v1/functions/{name}/invoke-async", invoke_async)
    r.add_post("/v1/functions/{name}/invoke-batch", invoke_batch)
    r.add_get("/v1/calls", list_calls)
    r.add_get("/v1/calls/{id}", get_call)
    r.add_post("/v1/calls/{id}/cancel", cancel_call)
    r.add_get("/v1/nodes", list_nodes)
    r.add_get("/v1/nodes/{id}", get_node)
    r.add_get("/v1/health", health)
    r.add_get("/metrics", metrics)
