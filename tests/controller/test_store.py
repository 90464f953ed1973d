"""The store's call creation and call numbers, against a real Redis server."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from controller import keys
from controller.store import LIST_BYTES_MAX, WRITE_BATCH_BYTES, Store
from shoal.devenv.redis_server import RedisServer, start_redis
from shoal.models import CallStatus


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = start_redis("store-test", appendonly=False)
    yield srv
    srv.stop(remove=True)


def call(n: int, function: str, num: int) -> dict[str, object]:
    now = time.time()
    return {"id": f"id{n}", "num": num, "function": function, "version": 1, "params": {"n": n}, "status": "QUEUED",
            "created": now, "t_QUEUED": now, "timeout": 5.0, "attempts": 0, "node": ""}


def test_call_numbers_are_unique_and_in_order_across_blocks_and_restarts(server: RedisServer) -> None:
    async def scenario() -> list[int]:
        nums: list[int] = []
        for _ in range(2):  # two controller lifetimes: the second continues after the first's blocks
            store = Store(Redis.from_url(server.url, decode_responses=True), 60, server.url)
            nums += [await store.next_call_num() for _ in range(3)]
            nums += await store.next_call_nums(600)  # more than a block at once
            nums += [await store.next_call_num()]
            await store.redis.aclose()
        return nums

    nums = asyncio.run(scenario())
    assert len(nums) == len(set(nums)) == 2 * 604
    first, second = nums[:604], nums[604:]
    assert first == list(range(1, 605)) and first == sorted(first) and second == sorted(second)
    assert second[0] > first[-1]


def test_a_controller_stopping_gives_back_the_call_numbers_it_did_not_hand_out(server: RedisServer) -> None:
    """callNum jumped by up to a block (256) at every restart."""
    async def scenario() -> list[list[int]]:
        await Redis.from_url(server.url, decode_responses=True).delete(keys.CALL_NUM)
        lifetimes: list[list[int]] = []
        for _ in range(2):
            store = Store(Redis.from_url(server.url, decode_responses=True), 60, server.url)
            store.start()
            lifetimes.append([await store.next_call_num() for _ in range(3)])
            await store.close()
        # Another controller took numbers meanwhile: nothing is given back (they would be handed out twice).
        first = Store(Redis.from_url(server.url, decode_responses=True), 60, server.url)
        other = Store(Redis.from_url(server.url, decode_responses=True), 60, server.url)
        lifetimes.append([await first.next_call_num(), await other.next_call_num()])
        await first.close()
        lifetimes.append([await other.next_call_num()])
        await other.close()
        return lifetimes

    assert asyncio.run(scenario()) == [[1, 2, 3], [4, 5, 6], [7, 263], [264]]


def test_a_batch_of_calls_is_stored_with_every_index_in_one_write(server: RedisServer) -> None:
    async def scenario() -> tuple[Any, ...]:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        store.start()
        calls = [call(n, "f" if n % 2 else "g", 1000 + n) for n in range(10)]
        await store.create_calls(calls)
        got = [await store.get_call(f"id{n}") for n in range(10)]
        active = await r.zrange(keys.ACTIVE, 0, -1)
        of_f = await r.zrange(keys.calls_of("f"), 0, -1)
        by_num = [await store.call_id_by_num(1000 + n) for n in range(10)]
        statuses = await store.call_statuses(["id3", "nope"])
        await store.close()
        await r.aclose()
        return got, active, of_f, by_num, statuses

    got, active, of_f, by_num, statuses = asyncio.run(scenario())
    assert [g["params"] for g in got] == [{"n": n} for n in range(10)]
    assert set(active) >= {f"id{n}" for n in range(10)}
    assert set(of_f) >= {f"id{n}" for n in range(1, 10, 2)} and not set(of_f) & {f"id{n}" for n in range(0, 10, 2)}
    assert by_num == [f"id{n}" for n in range(10)]
    assert statuses == [{"id": "id3", "status": "QUEUED"}, {"id": "nope", "status": "UNKNOWN"}]


def test_idempotency_keys_bind_once_per_kind_and_release_only_their_own_call(server: RedisServer) -> None:
    async def scenario() -> None:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        store.start()
        assert await store.claim_idempotency("k1", "call-a") is None
        assert await store.claim_idempotency("k1", "call-b") == "call-a"  # one command: bound, or who holds it
        assert await store.claim_idempotency("k1", "a,b", batch=True) is None  # a batch's keys are their own
        assert await store.claim_idempotency("batch:k1", "call-c") is None  # (a prefix in the key does not meet)
        await store.release_idempotency("k1", "call-b")  # not its call: stays
        assert await store.claim_idempotency("k1", "call-d") == "call-a"
        await store.release_idempotency("k1", "call-a")
        assert await store.claim_idempotency("k1", "call-e") is None
        # settled(): every write queued before it has landed when it returns.
        pending = store.create_calls([call(n, "h", 2000 + n) for n in range(50)])
        await store.settled()
        assert pending.done() and await r.zcard(keys.calls_of("h")) == 50
        await store.close()

    asyncio.run(scenario())


def test_paging_lists_every_call_once_when_many_share_a_millisecond(server: RedisServer) -> None:
    """A batch's calls share their creation time: pages used to resume strictly before the last call's
    millisecond, and skipped the rest of the batch (950 of a 1,000-call batch listed 50 at a time)."""

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        store.start()
        now = time.time()
        batch = [dict(call(n, "paged", 5000 + n), id=f"p{n:04d}", created=now) for n in range(250)]
        older = [dict(call(n, "paged", 6000 + n), id=f"o{n:04d}", created=now - 1 - n / 1000) for n in range(30)]
        for n, c in enumerate(batch):
            c["status"] = "DONE" if n % 3 == 0 else "QUEUED"
        await store.create_calls(older)
        await store.create_calls(batch)
        pages: list[str] = []
        after = None
        while True:
            found, after = await store.list_calls("paged", None, after, 7)
            pages += [c["id"] for c in found]
            if after is None:
                break
        done: list[str] = []
        after = None
        while True:
            found, after = await store.list_calls("paged", "DONE", after, 4)
            done += [c["id"] for c in found]
            if after is None:
                break
        expected = sorted((str(c["id"]) for c in batch), reverse=True) + [str(c["id"]) for c in older]
        await store.close()
        await r.aclose()
        return pages, done, expected

    pages, done, expected = asyncio.run(scenario())
    assert pages == expected
    assert done == [i for i in expected if i.startswith("p") and int(i[1:]) % 3 == 0]


def test_listing_large_calls_is_bounded_in_bytes_and_a_filter_reads_only_statuses(server: RedisServer) -> None:
    """Every examined call was read whole (params, result, logs): `?status=DONE` read up to 10,000 full records to
    return a few, and a page of 1,000 calls of MBs each took GBs of the controller's memory."""

    async def scenario() -> None:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        store.start()
        now = time.time()
        big = [dict(call(n, "big", 7000 + n), id=f"b{n:03d}", created=now - n / 1000, params={"x": "y" * (1 << 20)})
               for n in range(30)]
        big[17]["status"] = "DONE"
        await store.create_calls(big)
        pages: list[list[str]] = []
        after = None
        while True:
            found, after = await store.list_calls("big", None, after, 100)
            pages.append([c["id"] for c in found])
            if after is None:
                break
        assert [i for page in pages for i in page] == [f"b{n:03d}" for n in range(30)]  # each once, in order
        assert len(pages) >= 4 and all(len(page) * (1 << 20) <= LIST_BYTES_MAX for page in pages)
        sent = int((await r.info("stats"))["total_net_output_bytes"])
        found, after = await store.list_calls("big", "DONE", None, 100)
        read = int((await r.info("stats"))["total_net_output_bytes"]) - sent
        assert [c["id"] for c in found] == ["b017"] and after is None
        assert read < 3 << 20, read  # the one DONE call, not 30 MB
        await store.close()
        await r.aclose()

    asyncio.run(scenario())


def test_retention_counts_from_a_calls_end_and_pruning_keeps_calls_still_waiting(server: RedisServer) -> None:
    """Index entries used to be pruned, and a call's number and idempotency key to expire, a retention after
    its creation, even while it still waited or ran; and the indexes of deleted functions were never pruned."""

    async def scenario() -> None:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 30, server.url)
        store.start()
        old = time.time() - 3600  # created an hour ago, past the 30 s retention
        calls = [dict(call(n, "gone-fn", 7000 + n), id=f"r{n}", created=old, idem=f"shoal:idem:k{n}")
                 for n in range(4)]
        await store.create_calls(calls)
        for c in calls:
            await r.set(str(c["idem"]), str(c["id"]), ex=5)
        await store.update_call("r0", CallStatus.DONE, {"result": 1}, calls[0])
        await store.update_call("r1", CallStatus.FAILED, {}, calls[1])  # r2, r3 are still waiting
        assert await r.ttl(keys.call_by_num(7000)) > 5 and await r.ttl("shoal:idem:k0") > 5  # from their end
        assert 0 < await r.ttl("shoal:idem:k2") <= 5
        await store.prune()
        left = set(await r.zrange(keys.CALLS, 0, -1)) & {"r0", "r1", "r2", "r3"}
        assert left == {"r2", "r3"}
        assert set(await r.zrange(keys.calls_of("gone-fn"), 0, -1)) == {"r2", "r3"}  # no function of that name
        await store.close()
        await r.aclose()

    asyncio.run(scenario())


def test_a_calls_number_and_idempotency_key_live_while_it_waits(server: RedisServer) -> None:
    """They expired a retention after the key's claim or the call's creation: a call still waiting past it (a
    short retention, a long backlog) could no longer be found by its number, and a replay of its key made a
    second call."""

    async def scenario() -> None:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 2, server.url)
        store.start()
        assert await store.claim_idempotency("live", "fp w1") is None
        waiting = dict(call(1, "lw", 8100), id="w1", idem=keys.idempotency("live"))
        await store.create_calls([waiting])
        assert await r.ttl(keys.idempotency("live")) == -1 and await r.ttl(keys.call_by_num(8100)) == -1
        await store.update_call("w1", CallStatus.DONE, {"result": 1}, waiting)
        assert 0 < await r.ttl(keys.idempotency("live")) <= 2 and 0 < await r.ttl(keys.call_by_num(8100)) <= 2
        await store.close()
        await r.aclose()

    asyncio.run(scenario())


def test_a_status_filter_that_matches_few_gives_short_pages_and_a_way_on(server: RedisServer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.store.LIST_SCAN_MAX", 150)

    async def scenario() -> list[int]:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        store.start()
        now = time.time()
        calls = [dict(call(n, "sparse", 9000 + n), id=f"s{n:04d}", created=now - n / 100) for n in range(500)]
        for n, c in enumerate(calls):
            c["status"] = "FAILED" if n in (10, 420) else "DONE"
        await store.create_calls(calls)
        sizes, found, after = [], [], None
        while True:
            page, after = await store.list_calls("sparse", "FAILED", after, 10)
            sizes.append(len(page))
            found += [c["id"] for c in page]
            if after is None:
                break
        assert found == ["s0010", "s0420"]
        await store.close()
        await r.aclose()
        return sizes

    sizes = asyncio.run(scenario())
    assert len(sizes) > 2 and sum(sizes) == 2  # short pages, each bounded, until the end


def test_the_endpoint_registry_keeps_the_latest_and_never_refuses(server: RedisServer) -> None:
    """Full (10,000), it refused every new node's /register with 429 for good: anyone who could reach the route
    (open without a node token) filled it once, and the agents then gave up and exited."""

    async def scenario() -> None:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        await r.delete(keys.ENDPOINTS, keys.ENDPOINTS_BY_TIME)
        forgotten = [await store.register_endpoint(f"e{n}", 1000.0 + n, keep=3) for n in range(5)]
        assert forgotten == [0, 0, 0, 1, 1]
        assert await store.list_endpoints() == {"e2": 1002.0, "e3": 1003.0, "e4": 1004.0}
        assert await store.register_endpoint("e2", 2000.0, keep=3) == 0  # registered again: the newest now
        assert await store.register_endpoint("node-new", 2001.0, keep=3) == 1
        assert await store.list_endpoints() == {"e4": 1004.0, "e2": 2000.0, "node-new": 2001.0}
        await r.aclose()

    asyncio.run(scenario())


def test_the_writer_bounds_a_pipeline_in_bytes(server: RedisServer) -> None:
    """Every queued write went into one pipeline (up to 1,024 of them): 40 batches of MBs of params at once took
    over a command's 10 s, and every write in it failed, though Redis had stored the calls."""

    async def scenario() -> list[int]:
        r = Redis.from_url(server.url, decode_responses=True)
        store = Store(r, 60, server.url)
        batches: list[int] = []
        real = store._conn.execute

        async def execute(commands: list[Any]) -> list[object]:
            batches.append(sum(1 for c in commands if c[0] == "HSET"))
            return await real(commands)

        store._conn.execute = execute  # type: ignore[method-assign]
        store.start()
        big = [dict(call(n, "wb", 8200 + n), id=f"wb{n}", params="x" * (3 << 20)) for n in range(5)]
        await asyncio.gather(*(store.create_calls([c]) for c in big))
        assert await r.hget(keys.call("wb4"), "function") == "wb"
        await store.close()
        return batches

    batches = asyncio.run(scenario())
    assert batches == [3, 2], batches  # (all 5 in one before) up to the first write past WRITE_BATCH_BYTES
    assert 2 * (3 << 20) < WRITE_BATCH_BYTES < 3 * (3 << 20)


class Wire:
    """What the test's process writes to its sockets (Redis here), one entry per write: a pipeline is one write,
    whichever client sends it (redis-py's pipelines and the store's own connections alike)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[bytes] = []
        write, writelines = asyncio.StreamWriter.write, asyncio.StreamWriter.writelines

        def recorded_write(writer: asyncio.StreamWriter, data: Any) -> None:
            self.writes.append(bytes(data))
            write(writer, data)

        def recorded_writelines(writer: asyncio.StreamWriter, data: Any) -> None:
            data = list(data)
            self.writes.append(b"".join(bytes(d) for d in data))
            writelines(writer, data)

        monkeypatch.setattr(asyncio.StreamWriter, "write", recorded_write)
        monkeypatch.setattr(asyncio.StreamWriter, "writelines", recorded_writelines)

    def pipelines(self, command: str, key: str) -> list[int]:
        """How many ``command``s of a key that starts with ``key`` each write that carried any held."""
        sent = re.compile(re.escape(f"${len(command)}\r\n{command}\r\n".encode()) + rb"\$\d+\r\n"
                          + re.escape(key.encode()))
        return [n for data in self.writes if (n := len(sent.findall(data)))]


def db_url(server: RedisServer, db: int) -> str:
    """A database of the module's server of the test's own (the other tests' calls are in database 0's queue)."""
    return f"redis://127.0.0.1:{server.port}/{db}"


def test_the_durable_queue_is_read_in_bounded_pipelines(server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start every active call was read in one pipeline: 50,000 calls took seconds and hundreds of MB at once,
    and a large enough backlog could not be read within the store's timeout (the controller could not start). Now
    at most RECOVER_CALLS records a pipeline, and at most RECOVER_BYTES of params (MB each can be a call's)."""

    async def scenario() -> None:
        url = db_url(server, 3)
        r = Redis.from_url(url, decode_responses=True)
        await r.flushdb()
        store = Store(r, 60, url)
        store.start()
        now = time.time()
        calls = [dict(call(n, "many", 10_000 + n), id=f"m{n:05d}", created=now - 100 + n / 1000) for n in range(2500)]
        for at in range(0, len(calls), 500):
            await store.create_calls(calls[at:at + 500])
        wire = Wire(monkeypatch)
        found = await store.active_calls()
        assert [c["id"] for c in found] == [c["id"] for c in calls]  # every one, oldest first
        small = wire.pipelines("HGETALL", keys.call(""))
        assert sum(small) == 2500 and max(small) <= 1000 and len(small) >= 3, small
        chunks = [len(chunk) async for chunk in store.active_entries()]

        await r.flushdb()
        big = [dict(call(n, "big", 20_000 + n), id=f"b{n:02d}", created=now + n, params={"x": "y" * (1 << 20)})
               for n in range(20)]
        await store.create_calls(big)
        wire.writes.clear()
        found = await store.active_calls()
        assert [c["id"] for c in found] == [c["id"] for c in big] and found[7]["params"] == big[7]["params"]
        large = wire.pipelines("HGETALL", keys.call(""))
        assert sum(large) == 20 and max(large) <= 8, large  # 8 MiB of params a pipeline at most
        await r.flushdb()
        await store.close()
        assert chunks == [1000, 1000, 500]

    asyncio.run(scenario())


def test_redis_persistence_is_read_from_its_configuration(server: RedisServer) -> None:
    """The durable queue relies on AOF: the controller now reads it (and says when it cannot)."""
    durable = start_redis("store-aof-test", appendonly=True)

    async def scenario() -> list[dict[str, Any]]:
        out = []
        for url in (server.url, durable.url):
            store = Store(Redis.from_url(url, decode_responses=True), 60, url)
            out.append(await store.persistence())
            await store.close()
        admin = Redis.from_url(server.url, decode_responses=True)
        await admin.execute_command("ACL", "SETUSER", "no-config", "on", ">secret-0123", "~*", "&*", "+@all",
                                    "-config")
        url = f"redis://no-config:secret-0123@127.0.0.1:{server.port}/0"
        store = Store(Redis.from_url(url, decode_responses=True), 60, url)
        out.append(await store.persistence())
        await store.close()
        await admin.execute_command("ACL", "DELUSER", "no-config")
        await admin.aclose()
        return out

    try:
        off, on, refused = asyncio.run(scenario())
    finally:
        durable.stop(remove=True)
    assert off == {"aof": False, "appendfsync": "everysec"}
    assert on == {"aof": True, "appendfsync": "everysec"}
    assert refused["aof"] is None and "config" in refused["error"].lower(), refused
