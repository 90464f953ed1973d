"""The seeds' routes, verbatim: the main seed's API and the forwarder seed's.

Main seed: POST /registerRuntime, POST /registerFunction/:runtime/:funcName (multipart field `module`),
POST /invokeFunction, GET /runtimes, /functions, /calls, /call/:callNum, with its shapes: integer
`callNum`, `"c1"` keys, status strings (PENDING until a call starts, RUNNING, then DONE, FAILED, TIMEOUT or
CANCELLED), `result` a string ("" until done). GET /calls lists the newest SEED_CALLS_LIMIT calls, fewer if
they hold more than the store's LIST_BYTES_MAX (the seed kept every call in one document; all of them, paged, are
on GET /v1/calls).
Forwarder seed: POST /register, GET /list_endpoints, GET /ping -> pong, GET /version.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from controller.api.common import (
    check_upload_length,
    json_object,
    json_response,
    multipart_file,
    part_chunks,
    service,
    upload_name,
)
from controller.errors import BadRequest, Missing
from controller.service import Service
from controller.store import MAX_ENDPOINTS
from shoal import __version__
from shoal.logs import get_logger
from shoal.models import check_name

log = get_logger("compat")

SEED_STATUS = {"QUEUED": "PENDING", "DISPATCHED": "PENDING", "RUNNING": "RUNNING"}
SEED_CALLS_LIMIT = 1000


def seed_call(call: dict[str, Any]) -> dict[str, Any]:
    result = call.get("result")
    if result is None:
        text = ""
    elif isinstance(result, str):
        text = result
    else:
        text = json.dumps(result, separators=(",", ":"))
    out = {"funcName": call.get("function"), "params": call.get("params"), "callNum": call.get("num"),
           "status": SEED_STATUS.get(str(call.get("status")), call.get("status")), "result": text}
    if call.get("error"):
        out["error"] = call["error"]
    return out


async def register_runtime(request: web.Request) -> web.Response:
    runtime = await service(request).register_runtime(await json_object(request))
    return json_response(runtime.to_dict())


async def register_function(request: web.Request) -> web.Response:
    runtime = check_name(request.match_info["runtime"], "runtime")
    name = check_name(request.match_info["funcName"], "function name")
    check_upload_length(request, service(request).config.max_archive_bytes)
    upload = await multipart_file(request, ("module",))  # (the seed's form has the one file field)
    record = await service(request).upload_function(name, runtime, part_chunks(upload.part), {},
                                                    upload_name(upload.part))
    return json_response({
        "fieldname": "module", "originalname": record["original_name"], "size": record["size"],
        "functionName": name, "runtimeName": runtime, "sha256": record["sha256"], "version": record["version"],
    })


async def invoke_function(request: web.Request) -> web.Response:
    body = await json_object(request)
    name = body.get("funcName")
    if not isinstance(name, str):
        raise BadRequest("funcName must be a string")
    call, _ = await service(request).invoke(check_name(name, "funcName"), body.get("params"))
    return json_response(seed_call(call))


async def runtimes(request: web.Request) -> web.Response:
    return json_response([r.name for r in await service(request).store.list_runtimes()])


async def functions(request: web.Request) -> web.Response:
    return json_response([f["name"] for f in await service(request).store.list_functions()])


async def calls(request: web.Request) -> web.Response:
    found, _ = await service(request).store.list_calls(None, None, None, SEED_CALLS_LIMIT)
    # (A call whose number cannot be read, its record damaged in Redis, has no key here: it is left out.)
    ordered = sorted((c for c in found if isinstance(c.get("num"), int)), key=lambda c: c["num"])
    return json_response({f"c{c['num']}": seed_call(c) for c in ordered})


async def call(request: web.Request) -> web.Response:
    raw = request.match_info["callNum"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²" is a digit to str.isdigit, not to int()
        raise BadRequest("callNum must be a positive integer")
    svc = service(request)
    call_id = await svc.store.call_id_by_num(int(raw))
    if call_id is None:
        raise Missing(f"no call number {raw}")
    return json_response(seed_call(await svc.get_call(call_id)))


# ---- forwarder seed ----------------------------------------------------------------------------
async def register_endpoint(request: web.Request) -> web.Response:
    body = await json_object(request)
    endpoint = body.get("endpoint_id")
    if not isinstance(endpoint, str):
        raise BadRequest("endpoint_id must be a string")
    check_name(endpoint, "endpoint_id")
    svc = service(request)
    if forgotten := await svc.store.register_endpoint(endpoint, time.time()):
        log.warning("endpoints_forgotten", count=forgotten, keep=MAX_ENDPOINTS)
    # `curve`: the link is encrypted with keys derived from the node token (shoal/auth.py).
    return json_response({"endpoint_id": endpoint, **link_urls(svc), "curve": bool(svc.config.node_token)})


def link_urls(svc: Service) -> dict[str, str]:
    """Where a node connects: the address the link is advertised at (its bound one when not set; the port picked
    when bound to port 0). Every role of the forwarder seed's three is the one ZMQ link."""
    url = svc.config.node_url
    hub_url = svc.hub.url if url.endswith(":0") else url
    return {"task_url": hub_url, "result_url": hub_url, "command_port": hub_url}


async def list_endpoints(request: web.Request) -> web.Response:
    """The endpoint mappings: every endpoint that registered (``registered``, the last time, unix seconds) and
    every node the controller knows, with its state (``registered`` for one that has not connected yet)."""
    svc = service(request)
    registered = await svc.store.list_endpoints()
    nodes = {n.node_id: n.to_dict()["state"] for n in svc.hub.nodes.values()}
    return json_response({endpoint: {**link_urls(svc), "state": nodes.get(endpoint, "registered"),
                                     "registered": registered.get(endpoint)}
                          for endpoint in sorted({*registered, *nodes})})


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": __version__, "api": "v1"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/registerRuntime", register_runtime)
    r.add_post("/registerFunction/{runtime}/{funcName}", register_function)
    r.add_post("/invokeFunction", invoke_function)
    r.add_get("/runtimes", runtimes)
    r.add_get("/functions", functions)
    r.add_get("/calls", calls)
    r.add_get("/call/{callNum}", call)
    r.add_post("/register", register_endpoint)
    r.add_get("/list_endpoints", list_endpoints)
    r.add_get("/ping", ping)
    r.add_get("/version", version)
