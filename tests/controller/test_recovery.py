"""The controller's recovery at start against a real Redis: the durable queue read in bounded chunks, what cannot
run taken out of it instead of stopping the start, and Redis's persistence checked and shown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis
from structlog.testing import capture_logs

from controller import keys
from controller.app import create_app
from controller.config import ControllerConfig
from controller.dispatcher import ANY_NODE, Dispatcher
from controller.metrics import ControllerMetrics
from controller.store import Store
from shoal.devenv.redis_server import RedisServer, free_port, start_redis
from tests.controller.test_dispatcher import FakeHub
from tests.controller.test_store import Wire, db_url

RETENTION = 60


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = start_redis("recovery-test", appendonly=False)
    yield srv
    srv.stop(remove=True)


def stored(call_id: str, num: int, created: float, **fields: Any) -> dict[str, Any]:
    """A call of f@1 as the controller stores it when it accepts it."""
    return {"id": call_id, "num": num, "function": "f", "version": 1, "params": {"n": num}, "status": "QUEUED",
            "created": created, "t_QUEUED": created, "timeout": 5.0, "attempts": 0, "node": "", "idem": "",
            **fields}


async def open_store(server: RedisServer, db: int) -> tuple[Redis, Store]:
    url = db_url(server, db)
    r = Redis.from_url(url, decode_responses=True)
    await r.flushdb()
    store = Store(Redis.from_url(url, decode_responses=True), RETENTION, url)
    store.start()
    await store.add_version({"name": "f", "sha256": "0" * 64})  # f@1
    return r, store


#: Records a call cannot run from, as a crash, a bug or a hand in Redis can leave them: each used to stop the
#: controller's start (KeyError, ValueError, UnicodeDecodeError out of recover()).
MALFORMED: dict[str, tuple[str, Any]] = {
    "no-id": ("-", "id"), "no-function": ("-", "function"), "no-version": ("-", "version"),
    "bad-version": ("version", "x"), "bad-attempts": ("attempts", "y"), "bad-timeout": ("timeout", "z"),
    "nan-timeout": ("timeout", "nan"), "bad-params": ("params", "{not json"), "not-utf8": ("params", b"\xff\xfe"),
    "other-id": ("id", "someone-else"),
}
#: Members of the queue without a call record: one expired or deleted (it stayed in the queue for good, and its
#: index entries were never pruned), and a key of another type (a WRONGTYPE error stopped the start).
NO_RECORD = ("gone", "not-a-hash")
#: A call whose outcome was stored but not its removal from the queue (a call's writes are not one transaction): it
#: ran again.
ENDED = ("ended",)


async def plant(r: Redis, store: Store, junk: tuple[str, ...], now: float) -> None:
    """What cannot run, as the queue of a previous lifetime holds it."""
    made = [stored(call_id, 10 + n, now - 30 + n, idem=f"shoal:idem:k-{call_id}")
            for n, call_id in enumerate(junk) if call_id in MALFORMED or call_id in ENDED]
    if made:
        await store.create_calls(made)
    for call in made:  # their clients gave idempotency keys (kept by the terminal write, from the call's end)
        await r.set(call["idem"], call["id"])
    for call_id in junk:
        if call_id in MALFORMED:
            field, value = MALFORMED[call_id]
            if field == "-":
                await r.hdel(keys.call(call_id), value)
            else:
                await r.hset(keys.call(call_id), field, value)
        elif call_id in ENDED:
            await r.hset(keys.call(call_id), mapping={"status": "DONE", "result": "1", "t_DONE": str(now)})
        elif call_id == "not-a-hash":
            await r.set(keys.call(call_id), "x")
            await r.zadd(keys.ACTIVE, {call_id: 2})
        else:
            await r.zadd(keys.ACTIVE, {call_id: 1})


@pytest.mark.parametrize("junk", [*([k] for k in (*MALFORMED, *NO_RECORD, *ENDED)), [*MALFORMED, *NO_RECORD, *ENDED]],
                         ids=[*MALFORMED, *NO_RECORD, *ENDED, "all-at-once"])
def test_recovery_takes_out_of_the_queue_what_cannot_run_and_queues_the_rest(server: RedisServer,
                                                                             junk: list[str]) -> None:
    """A malformed record made recover() raise (the controller could not start), an id whose record was gone stayed
    in the queue for good, and a call whose outcome was stored but not its removal from the queue ran again."""

    async def scenario() -> None:
        r, store = await open_store(server, 4)
        now = time.time()
        await store.create_calls([
            stored("g0", 1, now - 9), stored("g1", 2, now - 8, status="DISPATCHED", node="n1", attempts=1),
            stored("g2", 3, now - 7, status="RUNNING", node="n1", attempts=1)])
        await plant(r, store, tuple(junk), now)
        await r.hset(keys.NODES, "n2", json.dumps({"state": "ready"}))  # up before the restart: g0 may be on it
        hub = FakeHub(("n1",))
        hub.nodes["n1"].lost = True  # it has not said HELLO to this controller yet
        d = Dispatcher(ControllerConfig(heartbeat=60.0), store, hub, ControllerMetrics())  # type: ignore[arg-type]
        with capture_logs() as logs:
            assert await d.recover() == 3
        await store.settled()

        assert set(d.calls) == {"g0", "g1", "g2"} and hub.sent == []
        assert d.reserved == {"n1": {"g1", "g2"}, ANY_NODE: {"g0"}} and d.awaiting_hello == {"n2"}
        assert await r.zrange(keys.ACTIVE, 0, -1) == ["g0", "g1", "g2"]
        said = {(e["event"], e.get("call_id")) for e in logs}
        for call_id in junk:
            if call_id in MALFORMED:  # ended FAILED, with why, and kept for the retention like any ended call
                status, error = await r.hmget(keys.call(call_id), "status", "error")
                assert status == "FAILED" and json.loads(str(error))["type"] == "MalformedRecord", error
                assert ("call_record_malformed", call_id) in said
            elif call_id in ENDED:  # not run again: the rest of its terminal write is made
                assert await r.hget(keys.call(call_id), "status") == "DONE"
                assert ("recovered_call_already_ended", call_id) in said
            else:
                assert ("queued_call_without_record", call_id) in said
            if call_id in MALFORMED or call_id in ENDED:
                for key in (keys.call(call_id), keys.call_by_num(10 + junk.index(call_id)), f"shoal:idem:k-{call_id}"):
                    assert 0 < await r.ttl(key) <= RETENTION, key
        assert await r.exists(keys.call("gone")) == 0
        if "not-a-hash" in junk:
            assert await r.get(keys.call("not-a-hash")) == "x"  # (not ours to remove)
        if "bad-version" in junk:
            assert "version" in json.loads(str(await r.hget(keys.call("bad-version"), "error")))["message"]
        summary = next(e for e in logs if e["event"] == "recovery_took_out_of_the_queue")
        kinds = {"malformed": set(MALFORMED), "no_record": set(NO_RECORD), "ended": set(ENDED)}
        assert {k: v for k, v in summary.items() if k in kinds} == \
            {kind: len(ids & set(junk)) for kind, ids in kinds.items() if ids & set(junk)}

        # The next start finds only what can run.
        again = Dispatcher(ControllerConfig(heartbeat=60.0), store, FakeHub(("n1",)), ControllerMetrics())  # type: ignore[arg-type]
        with capture_logs() as logs:
            assert await again.recover() == 3
        assert not [e for e in logs if e["event"] == "recovery_took_out_of_the_queue"]
        await store.close()
        await r.aclose()

    asyncio.run(scenario())


def test_a_backlog_of_thousands_is_recovered_whole_in_order_and_in_chunks(server: RedisServer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every active call was read in one pipeline (50,000 calls: seconds, and hundreds of MB at once)."""

    async def scenario() -> tuple[list[str], list[str], list[int]]:
        r, store = await open_store(server, 5)
        now = time.time()
        calls = [stored(f"c{n:05d}", 100 + n, now - 100 + n / 100) for n in range(3200)]
        for at in range(0, len(calls), 800):
            await store.create_calls(calls[at:at + 800])
        d = Dispatcher(ControllerConfig(), store, FakeHub(("n1",)), ControllerMetrics())  # type: ignore[arg-type]
        wire = Wire(monkeypatch)
        assert await d.recover() == 3200
        queued = [pending.call_id for pending in d.queue]
        await store.close()
        await r.aclose()
        return queued, [c["id"] for c in calls], wire.pipelines("HGETALL", keys.call(""))

    queued, expected, pipelines = asyncio.run(scenario())
    assert queued == expected  # each once, oldest first
    assert sum(pipelines) == 3200 and max(pipelines) <= 1000 and len(pipelines) >= 4, pipelines


@pytest.mark.parametrize("appendonly", [False, True])
def test_the_controller_says_at_start_and_in_health_whether_redis_keeps_its_queue(appendonly: bool,
                                                                                  tmp_path: Path) -> None:
    """Pointed at a stock Redis (no AOF), accepted calls could be lost at a Redis restart without a word. The
    controller starts either way (tests and benchmarks run without AOF), whatever its store holds."""
    srv = start_redis("recovery-aof-test", appendonly=appendonly)

    async def scenario() -> tuple[list[Any], dict[str, Any]]:
        r = Redis.from_url(srv.url, decode_responses=True)
        await r.hset(keys.NODES, mapping={"junk": "{not json", "list": "[1]"})
        await r.hset(keys.call("half"), mapping={"id": "half", "status": "QUEUED"})  # no function, no version
        await r.zadd(keys.ACTIVE, {"half": 1, "gone": 2})
        config = ControllerConfig(redis_url=srv.url, zmq_bind=f"tcp://127.0.0.1:{free_port()}",
                                  blob_dir=tmp_path / "blobs")
        with capture_logs() as logs:
            async with TestClient(TestServer(create_app(config))) as client:
                answer = await client.get("/v1/health")
                assert answer.status == 200
                health = await answer.json()
        assert await r.zcard(keys.ACTIVE) == 0
        await r.aclose()
        return logs, health

    try:
        logs, health = asyncio.run(scenario())
    finally:
        srv.stop(remove=True)
    assert {e.get("node_id") for e in logs if e["event"] == "node_record_malformed"} == {"junk", "list"}
    assert {e.get("call_id") for e in logs if e["event"] in ("call_record_malformed", "queued_call_without_record")} \
        == {"half", "gone"}
    warned = [e for e in logs if e["event"] == "redis_aof_off"]
    started = next(e for e in logs if e["event"] == "controller_started")
    assert health["redis_persistence"] == {"aof": appendonly, "appendfsync": "everysec"}
    assert started["redis_aof"] is appendonly
    if appendonly:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0]["log_level"] == "warning" and "appendonly yes" in warned[0]["hint"]


def test_damaged_records_end_their_calls_or_show_what_is_readable_and_stop_nothing(server: RedisServer,
                                                                                 tmp_path: Path) -> None:
    """A function version's record that was not JSON stopped the controller's start (recovery raised), and one
    damaged field of a call made its GET and every listing page holding it a bare 500."""
    url = db_url(server, 6)

    async def scenario() -> None:
        r, store = await open_store(server, 6)
        now = time.time()
        await store.add_version({"name": "f", "sha256": "1" * 64})  # f@2, about to be damaged
        await store.create_calls([stored("ok", 1, now - 2), stored("on-bad-version", 2, now - 1, version=2)])
        await store.close()
        await r.hset(keys.versions("f"), "2", "{not json")
        config = ControllerConfig(redis_url=url, zmq_bind=f"tcp://127.0.0.1:{free_port()}", blob_dir=tmp_path / "b")
        with capture_logs() as logs:
            async with TestClient(TestServer(create_app(config))) as client:
                call = await (await client.get("/v1/calls/on-bad-version")).json()
                assert call["status"] == "FAILED" and call["error"]["type"] == "MalformedRecord", call
                assert "function 'f' version 2" in call["error"]["message"]
                assert (await (await client.get("/v1/calls/ok")).json())["status"] == "QUEUED"  # (no node)

                await r.hset(keys.call("ok"), mapping={"params": "{not json", "progress": "x"})
                answer = await client.get("/v1/calls/ok")
                assert answer.status == 200
                call = await answer.json()
                assert call["status"] == "QUEUED" and call["function"] == "f" and call["params"] is None
                assert set(call["unreadable"]) == {"params", "progress"}, call
                page = await client.get("/v1/calls")
                assert page.status == 200
                listed = {c["id"]: c for c in (await page.json())["calls"]}
                assert set(listed) == {"ok", "on-bad-version"} and "unreadable" in listed["ok"]
                assert "unreadable" not in listed["on-bad-version"]
                seed = await client.get(f"/call/{call['num']}")
                assert seed.status == 200 and (await seed.json())["status"]

                answer = await client.get("/v1/functions/f")  # its version 2 cannot be read: said so
                assert answer.status == 500
                body = await answer.json()
                assert body["error"]["code"] == "corrupt_record" and "version 2" in body["error"]["message"]

                # A listing of functions or runtimes leaves a damaged one out (it stopped the listing, and every
                # node's sync: a node saying HELLO got no functions).
                await r.hset(keys.FUNCTIONS, "g", "{not json")
                await r.hset(keys.RUNTIMES, "bad", "[")
                for path in ("/v1/functions", "/functions", "/v1/runtimes", "/runtimes"):
                    assert (await client.get(path)).status == 200, path
                assert [f["name"] for f in await (await client.get("/v1/functions")).json()] == ["f"]

                # A call number that cannot be read leaves that call out of the seed's listing (KeyError: 500).
                await r.hset(keys.call("ok"), "num", "x")
                seed_calls = await client.get("/calls")
                assert seed_calls.status == 200 and len(await seed_calls.json()) == 1

                # A record that is not UTF-8 (redis-py cannot decode it): its GET says so, and a listing shows it
                # by its id.
                await r.hset(keys.call("ok"), "node", b"\xff\xfe")
                answer = await client.get("/v1/calls/ok")
                assert answer.status == 500 and (await answer.json())["error"]["code"] == "corrupt_record"
                page = await client.get("/v1/calls")
                assert page.status == 200
                listed = {c["id"]: c for c in (await page.json())["calls"]}
                assert listed["ok"]["unreadable"] == {"record": "it is not UTF-8"}
                assert listed["on-bad-version"]["status"] == "FAILED"
        assert any(e["event"] == "function_version_record_corrupt" for e in logs)
        assert {e["name"] for e in logs if e["event"] == "record_unreadable"} >= {"g", "bad"}
        await r.aclose()

    asyncio.run(scenario())
