"""The pipelined RESP connection behind the store's call writes, against a real Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import hiredis
import pytest
import redis

from controller.errors import StoreError
from controller.resp import RespConnection, pack
from shoal.devenv.redis_server import RedisServer, start_redis


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = start_redis("resp-test", appendonly=False, unix_socket=True)
    yield srv
    srv.stop(remove=True)


def test_pack_writes_resp_arrays_of_bulk_strings() -> None:
    assert pack([("SET", "k", b"v\r\n", 7), ("EXPIRE", "k", 1.5)]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n7\r\n"
        b"*3\r\n$6\r\nEXPIRE\r\n$1\r\nk\r\n$3\r\n1.5\r\n"
    )
    assert pack([("SET", "ключ", "значение")]).count(b"$8\r\n") == 1  # lengths are in bytes, not characters


def test_a_batch_gets_its_replies_in_order_and_an_error_reply_is_a_value(server: RedisServer) -> None:
    async def run() -> list[object]:
        conn = RespConnection(server.url)
        try:
            return await conn.execute([("DEL", "h"), ("HSET", "h", "a", "1", "b", "x" * 100_000), ("INCR", "h"),
                                       ("HGET", "h", "a"), ("HLEN", "h")])
        finally:
            await conn.close()

    _, added, wrong, value, length = asyncio.run(run())
    assert added == 2 and value == b"1" and length == 2
    assert isinstance(wrong, hiredis.ReplyError) and "WRONGTYPE" in str(wrong)


def test_a_dropped_connection_raises_once_and_the_next_batch_reconnects(server: RedisServer) -> None:
    admin = redis.Redis(port=server.port)

    async def run() -> object:
        conn = RespConnection(server.url)
        try:
            assert await conn.execute([("PING",)]) == [b"PONG"]
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            with pytest.raises((ConnectionError, OSError)):
                for _ in range(3):  # the first write may land in the socket before the close is seen
                    await conn.execute([("PING",)])
            return (await conn.execute([("PING",)]))[0]
        finally:
            await conn.close()

    assert asyncio.run(run()) == b"PONG"
    admin.close()


def test_a_connection_redis_closed_while_idle_is_not_used_again(server: RedisServer) -> None:
    """Closed by Redis between two batches (a restart, its idle `timeout`, CLIENT KILL): the next batch was written
    to the dead socket and failed (a 503, a DISPATCHED write lost) though nothing had been sent."""
    admin = redis.Redis(port=server.port)

    async def run() -> list[object]:
        conn = RespConnection(server.url)
        try:
            assert await conn.execute([("PING",)]) == [b"PONG"]
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            for _ in range(500):  # until the close has reached this end
                if conn._reader is None or conn._reader.at_eof():
                    break
                await asyncio.sleep(0.01)
            return await conn.execute([("SET", "idle-closed", "1")])
        finally:
            await conn.close()

    assert asyncio.run(run()) == [b"OK"]
    admin.close()


def test_password_and_database_from_the_url_and_a_wrong_password_is_a_store_error(server: RedisServer) -> None:
    admin = redis.Redis(port=server.port)
    admin.config_set("requirepass", "s3cret")
    try:
        async def run(url: str) -> None:
            conn = RespConnection(url)
            try:
                await conn.execute([("SET", "in-db-3", "yes")])
            finally:
                await conn.close()

        asyncio.run(run(f"redis://:s3cret@127.0.0.1:{server.port}/3"))
        assert redis.Redis(port=server.port, password="s3cret", db=3).get("in-db-3") == b"yes"
        # Read as redis-py reads the same URL (the store's other connections): the database and password in the
        # query, and a unix socket's database. Both were ignored (writes went to db 0, or were refused).
        for url, db in [(f"redis://127.0.0.1:{server.port}?db=5&password=s3cret", 5),
                        (f"{server.unix_url}?db=6&password=s3cret", 6)]:
            asyncio.run(run(url))
            assert redis.Redis.from_url(url).get("in-db-3") == b"yes", url
            assert redis.Redis(port=server.port, password="s3cret", db=db).get("in-db-3") == b"yes", url
        with pytest.raises(StoreError, match="refused"):
            asyncio.run(run(f"redis://:wrong@127.0.0.1:{server.port}/0"))
    finally:
        redis.Redis(port=server.port, password="s3cret").config_set("requirepass", "")
        admin.close()


def test_a_redis_that_stops_answering_is_a_connection_error_and_the_next_batch_reconnects(server: RedisServer) -> None:
    """A paused server (or a network that drops packets) used to hold the store's writer for ever: every
    invoke waited instead of being told the store is unavailable."""
    admin = redis.Redis(port=server.port)
    try:
        async def run() -> tuple[str, list[object]]:
            conn = RespConnection(server.url, timeout=0.3)
            await conn.execute([("PING",)])
            admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # every client's commands wait 1 s
            try:
                await conn.execute([("SET", "paused", "1")])
                error = ""
            except ConnectionError as exc:
                error = str(exc)
            await asyncio.sleep(1)
            replies = await conn.execute([("GET", "paused"), ("PING",)])
            await conn.close()
            return error, replies

        error, replies = asyncio.run(run())
        assert "did not answer within 0.3 s" in error
        assert replies[1] == b"PONG"  # a new connection; the timed-out write may or may not have landed
    finally:
        admin.close()


class HoldingProxy:
    """A TCP proxy to Redis whose first connection can be made to hold what the client sends (a network that
    delays it), and that keeps its Redis side open when the client gives it up (its close never got there)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.holding = False
        self.held: list[bytes] = []
        self.first: asyncio.StreamWriter | None = None  # the first connection's Redis side
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.port)
        first = self.first is None
        if first:
            self.first = redis_w

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if first and self.holding:
                    self.held.append(data)
                else:
                    redis_w.write(data)
            if not first:
                redis_w.close()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                client_w.write(data)
            client_w.close()

        for work in (upstream(), downstream()):
            task = asyncio.ensure_future(work)
            self.tasks.add(task)

    def release(self) -> None:
        assert self.first is not None
        for data in self.held:
            self.first.write(data)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()


def test_a_batch_held_on_a_connection_given_up_never_lands_after_the_next_connections(server: RedisServer) -> None:
    """A timeout gives the connection up and the next batch goes on a new one; the old one's bytes, still on their
    way, ran after the new one's writes (an undone creation came back, a terminal state was overwritten)."""
    admin = redis.Redis(port=server.port)

    async def run() -> None:
        proxy = HoldingProxy(server.port)
        conn = RespConnection(await proxy.start(), timeout=0.5)
        try:
            assert await conn.execute([("SET", "order", "first")]) == [b"OK"]
            proxy.holding = True
            with pytest.raises(ConnectionError):
                await conn.execute([("SET", "order", "old")])  # held on the way: times out, given up
            assert await conn.execute([("SET", "order", "new")]) == [b"OK"]  # on a new connection
            proxy.release()  # the old batch arrives at last
            await asyncio.sleep(0.3)
            assert admin.get("order") == b"new"
        finally:
            await conn.close()
            await proxy.close()

    asyncio.run(run())


def test_connections_given_up_stay_to_be_killed_until_a_kill_of_them_is_answered(server: RedisServer) -> None:
    """The kill itself can fail (the network that made the reconnect): the connection it was to kill was forgotten,
    and its held batch could land after later writes."""
    admin = redis.Redis(port=server.port)

    async def run() -> None:
        proxy = HoldingProxy(server.port)
        conn = RespConnection(await proxy.start(), timeout=0.5)
        real = conn._roundtrip
        failing = [True]

        async def kill_fails_once(commands: list[Any]) -> list[object]:
            if commands and commands[0][:2] == ("CLIENT", "KILL") and failing[0]:
                failing[0] = False
                raise ConnectionError("the kill's answer never came")
            return await real(commands)

        conn._roundtrip = kill_fails_once  # type: ignore[method-assign]
        try:
            assert await conn.execute([("SET", "order2", "first")]) == [b"OK"]
            proxy.holding = True
            with pytest.raises(ConnectionError):
                await conn.execute([("SET", "order2", "old")])  # held: given up
            with pytest.raises(ConnectionError):
                await conn.execute([("SET", "order2", "never")])  # the new connection's kill fails: given up too
            assert await conn.execute([("SET", "order2", "new")]) == [b"OK"]
            proxy.release()
            await asyncio.sleep(0.3)
            assert admin.get("order2") == b"new"
        finally:
            await conn.close()
            await proxy.close()

    asyncio.run(run())
