"""``create_app(config)``: the controller's aiohttp application, its resources opened in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from controller.api import compat, openapi, v1
from controller.api.common import METRICS, SERVICE
from controller.api.middleware import errors, token_check
from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher
from controller.hub import Hub
from controller.metrics import ControllerMetrics
from controller.service import Service
from controller.store import Store
from shoal.blobs import BlobStore
from shoal.logs import get_logger

log = get_logger("controller")
PRUNE_EVERY = 600.0
STOP_READ_SECONDS = 2.0  # at stop, what the nodes sent is read for at most this long
STOP_SETTLE_SECONDS = 5.0  # ... and the store's writes waited for at most this long


async def _prune_loop(store: Store) -> None:
    while True:
        await asyncio.sleep(PRUNE_EVERY)
        try:
            removed = await store.prune()
        except RedisError as exc:  # the next round prunes what this one could not
            log.error("prune_failed", error=str(exc))
            continue
        if removed:
            log.info("calls_pruned", count=removed)


async def check_persistence(store: Store) -> dict[str, Any]:
    """Whether Redis keeps the durable queue across its own restart (AOF), logged at start: a warning if it does not
    or if that cannot be read (CONFIG renamed or refused). Not a refusal: tests and benchmarks run without AOF."""
    found = await store.persistence()
    if found["aof"] is None:
        log.warning("redis_persistence_unchecked", reason=found.get("error", ""),
                    hint="the durable queue needs `appendonly yes` (AOF): without it, accepted calls can be lost "
                         "when Redis restarts; check that setting by hand")
    elif not found["aof"]:
        log.warning("redis_aof_off", appendonly="no",
                    hint="accepted calls not yet finished can be lost when Redis restarts (an RDB snapshot keeps "
                         "only what it had when taken): set `appendonly yes`")
    elif found.get("appendfsync") == "no":
        log.warning("redis_aof_not_synced", appendfsync="no",
                    hint="the kernel decides when the AOF reaches the disk: a host crash can lose the last tens "
                         "of seconds of accepted calls (`appendfsync everysec` loses at most about one)")
    return found


def create_app(config: ControllerConfig) -> web.Application:
    tokens = token_check(config)  # inside `errors`: a refusal is a 401 with a JSON body
    app = web.Application(middlewares=[errors] if tokens is None else [errors, tokens], client_max_size=16 << 20)
    metrics = app[METRICS] = ControllerMetrics()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Every command is bounded: a Redis that stops answering (paused, a network that drops packets) is an
        # unavailable store (503, retried writes), not requests and the liveness check waiting for ever.
        # A pooled connection Redis closed (it restarted) fails the command sent on it: tried once more, on a new
        # connection (each of them answered a 503 after a restart). Not after a timeout: that command may have run.
        redis = Redis.from_url(config.redis_url, decode_responses=True, socket_timeout=config.redis_timeout,
                               socket_connect_timeout=config.redis_timeout, retry=Retry(NoBackoff(), 1),
                               retry_on_error=[RedisConnectionError])
        await redis.ping()
        store = Store(redis, config.retention, config.redis_url, metrics, timeout=config.redis_timeout)
        store.start()
        persistence = await check_persistence(store)
        blobs = BlobStore(config.blob_dir)
        if swept := blobs.sweep():
            log.info("upload_leftovers_removed", count=swept)
        hub = Hub(config, store, blobs, metrics)
        dispatcher = Dispatcher(config, store, hub, metrics)
        # Recovered before the hub reads its socket: a HELLO handled while the store is read would find none of
        # the calls it lists, and they would be placed a second time.
        try:
            recovered = await dispatcher.recover()
        except BaseException:  # (Redis failing meanwhile) the start fails, its socket closed: left open, the
            await hub.close()  # ZMQ context held up the exit of a process that embeds the app (a test's)
            await store.close()
            raise
        hub.start(dispatcher)
        app[SERVICE] = service = Service(config, store, blobs, hub, dispatcher, metrics)
        service.collect_blobs_soon()  # what a delete left when the controller stopped before collecting it
        pruner = asyncio.get_running_loop().create_task(_prune_loop(store))
        if config.api_token and not config.node_token:
            log.warning("node_link_open", reason="an API token but no node token: /register and the ZMQ node "
                        "link accept anyone who reaches them (set SHOAL_NODE_TOKEN)")
        log.info("controller_started", zmq=hub.url, redis=config.redis_url_redacted, recovered=recovered,
                 placement=config.placement, api_token=bool(config.api_token), node_token=bool(config.node_token),
                 redis_aof=persistence["aof"])
        yield
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
        background = list(service.background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Results the nodes sent are read and stored before the link closes (unread, their calls would run again
        # after the restart), and so is every dispatch.
        hub.catch_up(STOP_READ_SECONDS)
        await service.settle_undos(STOP_SETTLE_SECONDS)
        await dispatcher.stop(STOP_SETTLE_SECONDS)
        await hub.close()
        await store.close()
        log.info("controller_stopped")

    app.cleanup_ctx.append(resources)
    v1.add_routes(app)
    compat.add_routes(app)
    openapi.add_routes(app)
    return app
