"""A pipelined Redis connection for the call writes on the hot path: commands packed here, replies parsed by
hiredis.

redis-py spends tens of microseconds per command packing arguments and building reply objects; a call
costs two pipelines of several commands each, so on the controller's one core that was a quarter of its
time per call. This connection does one thing: send a batch of commands in one write and read exactly that
many replies. Everything else (reads, function and runtime records) still goes through redis-py.
"""

from __future__ import annotations

import asyncio
import ssl

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from controller.errors import StoreError
from shoal.logs import get_logger

log = get_logger("resp")

Arg = str | bytes | int | float
Command = tuple[Arg, ...]


def pack(commands: list[Command]) -> bytes:
    """RESP arrays of bulk strings for ``commands``, in one buffer (hiredis packs, in C)."""
    # hiredis's stub types the argument as a 1-tuple; it takes any tuple of arguments.
    return b"".join([hiredis.pack_command(command) for command in commands])  # type: ignore[arg-type]


#: Connections given up that are remembered to be killed at the next connect (older ones are forgotten).
MAX_GIVEN_UP = 16


def _run_id(info: object) -> str | None:
    """The ``run_id`` in an ``INFO server`` reply (None if it is refused or has none)."""
    if isinstance(info, bytes):
        for line in info.splitlines():
            if line.startswith(b"run_id:"):
                return line[7:].decode("ascii", "replace").strip()
    return None


class RespConnection:
    """One connection; ``execute`` is not reentrant (the store's single writer task is its only user).

    Writes land in the order they are executed, across reconnects too. A connection given up with a batch on its way
    (a timeout, a reset on our side only) may still be open at Redis, its bytes still coming (a network that held
    them): they would run after the next connection's writes, and an undo or a terminal state would be overwritten
    by what it followed. So each connection learns its ``CLIENT ID``, and the next one kills at Redis every client
    given up before it writes anything (all of them until the kills are answered: a kill that fails leaves them for
    the next connection, with this one): whatever of the old batch ran, ran before; nothing of it can run after."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout  # seconds a batch (with the connection's setup) may take
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._current: tuple[int, str] | None = None  # this connection's CLIENT ID, and its Redis process's run_id
        self._given_up: list[tuple[int, str]] = []  # connections closed here, not yet known closed at Redis

    async def _connect(self) -> None:
        # The URL read as redis-py reads it (the rest of the store's connections): the same server, database
        # and credentials, whether they are in the path, the user part or the query (unix:///s.sock?db=2).
        try:
            options = parse_url(self.url)
        except ValueError as exc:
            raise StoreError(f"bad redis url: {exc}") from None
        if "path" in options:
            reader, writer = await asyncio.open_unix_connection(options["path"])
        else:
            tls = options.get("connection_class") is SSLConnection
            reader, writer = await asyncio.open_connection(options.get("host", "localhost"), options.get("port", 6379),
                                                           ssl=ssl.create_default_context() if tls else None)
        self._reader, self._writer = reader, writer
        setup: list[Command] = []
        if options.get("password"):
            user = options.get("username")
            setup.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if int(options.get("db") or 0):
            setup.append(("SELECT", int(options["db"])))
        replies = await self._roundtrip([*setup, ("CLIENT", "ID"), ("INFO", "server")])
        for reply in replies[:len(setup)]:
            if isinstance(reply, hiredis.ReplyError):
                await self.close()
                raise StoreError(f"redis refused the connection setup: {reply}")
        client_id, info = replies[len(setup):]
        run_id = _run_id(info)
        # Set before the kills: if they fail, this connection is given up too, and killed with the others next time.
        self._current = (client_id, run_id) if isinstance(client_id, int) and run_id is not None else None
        if run_id is None:
            if self._given_up:  # (INFO refused or cut: which Redis process this is cannot be told)
                log.warning("redis_previous_connection_not_killed", client_ids=[i for i, _ in self._given_up],
                            error="INFO server gave no run_id")
            return
        # Those of another Redis process are gone with it (and their ids may be other clients' now).
        left = [client for client in self._given_up if client[1] == run_id]
        if left:
            kills = await self._roundtrip([("CLIENT", "KILL", "ID", i) for i, _ in left])
            for (i, _), killed in zip(left, kills, strict=True):
                if isinstance(killed, hiredis.ReplyError) and "No such client" not in str(killed):
                    # (an ACL refusing CLIENT KILL: the order across this reconnect is not assured, and we say so)
                    log.warning("redis_previous_connection_not_killed", client_id=i, error=str(killed))
        self._given_up = []

    async def _roundtrip(self, commands: list[Command]) -> list[object]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(pack(commands))
        parser = hiredis.Reader()
        replies: list[object] = []
        while len(replies) < len(commands):
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        return replies

    async def execute(self, commands: list[Command]) -> list[object]:
        """Send ``commands`` in one write; their replies in order (a Redis error reply is a ReplyError value).

        A broken connection raises ConnectionError/OSError and is dropped; the next call reconnects.
        """
        try:
            async with asyncio.timeout(self.timeout):
                if self._reader is not None and self._reader.at_eof():
                    await self.close()  # Redis closed it while idle (restarted, its idle timeout, CLIENT KILL)
                if self._writer is None or self._writer.is_closing():
                    await self._connect()
                return await self._roundtrip(commands)
        except TimeoutError:
            await self.close()  # its replies may still come: the connection cannot be used again
            raise ConnectionError(f"redis did not answer within {self.timeout:g} s") from None
        except (ConnectionError, OSError, hiredis.ProtocolError):
            await self.close()
            raise

    async def close(self) -> None:
        if self._current is not None:
            self._given_up.append(self._current)
            del self._given_up[:-MAX_GIVEN_UP]
            self._current = None
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass  # it is closed either way
