"""The controller's state in Redis: runtimes, function versions, calls and nodes (keys in ``keys.py``).

Call writes go through a single writer task that folds every write waiting at that moment into one
pipeline on its own connection (:mod:`controller.resp`): under load, hundreds of concurrent requests share
a round trip to Redis, and each still awaits its own write before answering (a call id is only given out
once its call is stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from controller import keys
from controller.errors import CorruptRecord, StoreError
from controller.metrics import ControllerMetrics
from controller.resp import Command, RespConnection
from shoal.errors import ValidationError
from shoal.logs import get_logger
from shoal.models import TERMINAL, CallStatus, Runtime
from shoal.protocol import dumps_str

Write = list[Command]
JSON_FIELDS = ("params", "result", "error", "logs", "timings")


log = get_logger("store")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# Record an endpoint's registration; past ARGV[3] endpoints, those that registered longest ago are forgotten (a full
# registry refused every new node: anyone who can reach /register filled it once, for good).
_REGISTER = """
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('zadd', KEYS[2], ARGV[2], ARGV[1])
local over = redis.call('zcard', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('zrange', KEYS[2], 0, over - 1)
  redis.call('zremrangebyrank', KEYS[2], 0, over - 1)
  redis.call('hdel', KEYS[1], unpack(old))
end
return over > 0 and over or 0
"""
MAX_ENDPOINTS = 10_000
_GIVE_BACK = ("if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2]) return 1 end "
              "return 0")  # endpoints /register records (a node registers as itself each time it starts)


def _flat(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_call(fields: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in fields.items():
        if key in JSON_FIELDS:
            out[key] = dumps_str(value)
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        elif value is None:
            out[key] = ""
        else:
            out[key] = str(value)
    return out


def decode_call(raw: dict[str, str]) -> dict[str, Any]:
    call: dict[str, Any] = {}
    for key, value in raw.items():
        if key in JSON_FIELDS:
            call[key] = json.loads(value) if value else None
        elif key in ("num", "version", "attempts", "progress"):
            call[key] = int(value) if value else None
        elif key in ("created", "timeout") or key.startswith("t_"):
            call[key] = float(value) if value else None
        elif key == "cold":
            call[key] = value == "1"
        else:
            call[key] = value
    return call


def load_record(raw: str | bytes, where: str) -> Any:
    """A JSON record the controller wrote, read back; ``CorruptRecord`` naming ``where`` if it cannot be (a record
    damaged in Redis was a bare 500, and stopped recovery at start)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptRecord(f"the stored record of {where} cannot be read ({type(exc).__name__})") from None


def _stored_runtime(name: str, record: Any) -> Runtime:
    """A stored runtime, checked as a new one is: one stored under older rules that today's refuse (a reserved code
    path, a longer command) is a CorruptRecord naming what to do, not the client's 400 (a listing of runtimes, its
    delete, and every node's sync broke on it)."""
    try:
        return Runtime.from_dict(record)
    except ValidationError as exc:
        raise CorruptRecord(f"the stored runtime {name!r} is not valid any more ({exc}): register it again") from None


def _readable(raw: dict[str, str], kind: str) -> list[dict[str, Any]]:
    """The records of a whole listing that can be read; a damaged one is left out and logged (one stopped the
    listing, and every node's sync: a node that said HELLO got no runtimes nor functions)."""
    out = []
    for name, value in raw.items():
        try:
            record = load_record(value, f"{kind} {name!r}")
        except CorruptRecord as exc:
            log.error("record_unreadable", kind=kind, name=name[:200], error=str(exc), action="left out")
            continue
        out.append(record)
    return out


def read_call(raw: dict[str, str]) -> dict[str, Any]:
    """A stored call as the API shows it: like ``decode_call``, but a field that cannot be read (a record damaged
    in Redis) is left out and named in ``unreadable`` with why, so the rest of the call, and of a listing that
    holds it, is still shown (it was a 500 for the whole page)."""
    try:
        return decode_call(raw)
    except (ValueError, TypeError, RecursionError):
        call: dict[str, Any] = {}
        unreadable: dict[str, str] = {}
        for name, value in raw.items():
            try:
                call.update(decode_call({name: value}))
            except (ValueError, TypeError, RecursionError) as exc:
                unreadable[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
        call["unreadable"] = unreadable
        return call


PRUNE_CHUNK = 5000  # index entries looked at per round trip when pruning
#: Bytes of call records one listing page holds at most (at least one call): params and results can be MBs each,
#: and a page of 1,000 of them took GBs of the controller's memory and its loop's time.
LIST_BYTES_MAX = 8 << 20
LIST_SCAN_MAX = 10_000  # calls one listing request reads at most (a status filter reads past non-matching ones)
#: Bytes of calls' fields one pipeline of the writer carries at most (one write larger than that goes alone).
WRITE_BATCH_BYTES = 8 << 20

#: Recovery at start reads the durable queue in chunks of at most this many calls (one pipeline for their small
#: fields), ...
RECOVER_CALLS = 1000
#: ... and their records by pipelines of at most this many bytes of params (at least one call; a call's params can
#: be MBs; each round trip must end within the store's timeout). All active calls were read in one pipeline: 20,000
#: of 20 KB each took 9 s and twice their size in memory at once.
RECOVER_BYTES = 8 << 20
#: The keys of the calls' records, as bytes (recovery reads members as they are stored: they may not be UTF-8).
_CALL_KEY = keys.call("").encode()
_TERMINAL = frozenset(status.value for status in TERMINAL)


@dataclass
class ActiveEntry:
    """A member of the durable queue as recovery reads it. ``kind``: ``call`` (``call`` holds it, decoded: it can
    run again), ``ended`` (its stored status is terminal: its outcome was written but not its removal from the
    queue, as a call's writes are not one transaction), ``no_record`` (its record is gone, or its key holds
    something else) or ``malformed`` (its record lacks a field a call cannot run without, or holds one that cannot
    be read: ``problem`` says which)."""

    call_id: str  # (the member, decoded for logs)
    member: bytes  # as stored
    kind: str = ""
    call: dict[str, Any] | None = None
    status: str = ""  # (ended) its terminal status
    problem: str = ""
    num: bytes | None = None  # its callNum and idempotency key (its terminal write gives them its retention)
    idem: bytes | None = None


def _runnable(member: bytes, flat: list[bytes]) -> tuple[dict[str, Any] | None, str]:
    """A record read at recovery (HGETALL, as bytes) as a call that can run again, or why it cannot."""
    try:
        call_id = member.decode()
        raw = {name.decode(): value.decode() for name, value in zip(flat[::2], flat[1::2], strict=True)}
    except UnicodeDecodeError as exc:
        return None, f"it is not UTF-8 ({exc})"
    call = read_call(raw)
    if call.get("unreadable"):
        name, why = next(iter(call["unreadable"].items()))
        return None, f"its {name} cannot be read ({why})"
    for name in ("id", "function", "version"):
        if call.get(name) in (None, ""):
            return None, f"it has no {name}"
    if call["id"] != call_id:
        return None, f"its id field is {call['id'][:80]!r}"
    timeout = call.get("timeout")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        return None, f"its timeout is {timeout!r}"
    return call, ""


class Store:
    def __init__(self, redis: Redis, retention: float, url: str, metrics: ControllerMetrics | None = None,
                 timeout: float = 10.0) -> None:
        self.redis: Any = redis  # redis-py's stubs type replies as bytes | str; we decode responses
        self.retention = int(retention)
        self._conn = RespConnection(url, timeout)
        self.metrics = metrics if metrics is not None else ControllerMetrics()
        # Writes to make, each with its future and about how many bytes its calls' fields take (see write()).
        self._writes: asyncio.Queue[tuple[Write, asyncio.Future[None], int]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._num_next = 0
        self._num_end = 0
        self._num_returned: list[int] = []  # handed out and given back (a heap): handed out again first
        self._num_lock = asyncio.Lock()
        # Latest record per function: this controller is the only writer, so it can answer from memory.
        self._functions: dict[str, dict[str, Any] | None] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def close(self) -> None:
        try:
            await self.release_call_nums()
        except RedisError as exc:
            log.warning("call_numbers_not_released", error=str(exc))  # a gap in callNum, nothing else
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass  # the writer was told to stop
        await self._conn.close()
        await self.redis.aclose()

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._writes.get()]
            await asyncio.sleep(0)  # one loop turn: the handlers ready now add their writes to this batch
            size = batch[0][2]
            # Bounded in writes and in bytes: one pipeline of 40 batches of MBs of params took over the 10 s a
            # command may take, and every write in it failed (a 503 for calls Redis had stored), GBs held meanwhile.
            while not self._writes.empty() and len(batch) < 1024 and size < WRITE_BATCH_BYTES:
                batch.append(self._writes.get_nowait())
                size += batch[-1][2]
            commands = [command for write, _, _ in batch for command in write]
            try:
                replies = await self._conn.execute(commands)
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure; the writer lives on
                log.error("store_write_failed", error=str(exc), writes=len(batch))
                self.metrics.store_write_failures.inc(len(batch))
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(StoreError(f"redis is unavailable: {exc}"))
                continue
            at = 0
            for write, fut, _ in batch:
                errors = [r for r in replies[at:at + len(write)] if isinstance(r, hiredis.ReplyError)]
                at += len(write)
                if fut.done():
                    continue
                if errors:
                    log.error("store_write_refused", error=str(errors[0]), command=str(write[0][0]))
                    self.metrics.store_write_failures.inc()
                    fut.set_exception(StoreError(f"redis refused a write: {errors[0]}"))
                else:
                    fut.set_result(None)

    def write(self, write: Write, size: int = 0) -> asyncio.Future[None]:
        """Queue ``write`` for the writer; ``size``: about how many bytes its calls' fields take (params, results:
        what can be large; the rest of a write is small), which bounds how many writes go in one pipeline."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.put_nowait((write, fut, size))
        return fut

    # ---- runtimes ------------------------------------------------------------------------------
    async def put_runtime(self, runtime: Runtime) -> None:
        await self.redis.hset(keys.RUNTIMES, runtime.name, json.dumps(runtime.to_dict()))

    async def get_runtime(self, name: str) -> Runtime | None:
        raw = await self.redis.hget(keys.RUNTIMES, name)
        return _stored_runtime(name, load_record(raw, f"runtime {name!r}")) if raw else None

    async def list_runtimes(self) -> list[Runtime]:
        """The stored runtimes that are valid (one that is not is left out, and logged)."""
        raw = await self.redis.hgetall(keys.RUNTIMES)
        runtimes = []
        for record in _readable(raw, "runtime"):
            try:
                runtimes.append(_stored_runtime(str(record.get("name")), record))
            except CorruptRecord as exc:
                log.error("record_unreadable", kind="runtime", name=str(record.get("name"))[:200], error=str(exc),
                          action="left out")
        return sorted(runtimes, key=lambda r: r.name)

    async def runtime_names(self) -> set[str]:
        """The names of every stored runtime, valid or not."""
        return set(await self.redis.hkeys(keys.RUNTIMES))

    async def delete_runtime(self, name: str) -> bool:
        return bool(await self.redis.hdel(keys.RUNTIMES, name))

    # ---- functions -----------------------------------------------------------------------------
    async def add_version(self, record: dict[str, Any]) -> dict[str, Any]:
        name = record["name"]
        version = int(await self.redis.incr(keys.version_counter(name)))
        record = dict(record, version=version, created=time.time())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.versions(name), str(version), json.dumps(record))
        pipe.hset(keys.FUNCTIONS, name, json.dumps(record))
        await pipe.execute()
        self._functions[name] = record
        return record

    async def get_function(self, name: str) -> dict[str, Any] | None:
        if name in self._functions:
            return self._functions[name]
        raw = await self.redis.hget(keys.FUNCTIONS, name)
        record = load_record(raw, f"function {name!r}") if raw else None
        if record is not None:
            self._functions[name] = record
        return record

    async def get_version(self, name: str, version: int) -> dict[str, Any] | None:
        raw = await self.redis.hget(keys.versions(name), str(version))
        return load_record(raw, f"function {name!r} version {version}") if raw else None

    async def list_versions(self, name: str) -> list[dict[str, Any]]:
        raw = await self.redis.hgetall(keys.versions(name))
        return sorted((load_record(v, f"function {name!r} version {k}") for k, v in raw.items()),
                      key=lambda r: r["version"])

    async def referenced_shas(self) -> set[str]:
        """The archives (sha256) every stored version of every function names."""
        names = await self.redis.hkeys(keys.FUNCTIONS)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hvals(keys.versions(name))
            found = await pipe.execute()
        return {load_record(raw, f"a version of function {name!r}")["sha256"]
                for name, values in zip(names, found, strict=True) for raw in values}

    async def list_functions(self) -> list[dict[str, Any]]:
        raw = await self.redis.hgetall(keys.FUNCTIONS)
        return sorted(_readable(raw, "function"), key=lambda r: r["name"])

    async def delete_function(self, name: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(keys.FUNCTIONS, name)
        pipe.delete(keys.versions(name))
        removed, _ = await pipe.execute()
        self._functions.pop(name, None)
        return bool(removed)

    # ---- calls ---------------------------------------------------------------------------------
    async def release_call_nums(self) -> None:
        """Give back the numbers of the block reserved and not handed out (a controller stopping): unless another
        controller has reserved some since, the counter goes back to the last number given, and the seed API's
        callNum goes on without a gap after a restart (it jumped by up to a block, 256)."""
        async with self._num_lock:
            if self._num_next >= self._num_end:
                return
            end, last_given = self._num_end - 1, self._num_next - 1
            self._num_next = self._num_end  # none handed out after this
            await self.redis.eval(_GIVE_BACK, 1, keys.CALL_NUM, str(end), str(last_given))

    async def next_call_num(self) -> int:
        return (await self.next_call_nums(1))[0]

    def give_back_call_nums(self, nums: list[int]) -> None:
        """Numbers handed out for calls that were never made (their request found its Idempotency-Key taken, or
        the queue full): handed out again first, so that the seed API's callNum has no gap."""
        for num in nums:
            heapq.heappush(self._num_returned, num)

    async def next_call_nums(self, count: int) -> list[int]:
        """The seed API's integer callNums: reserved from Redis in blocks, handed out in order."""
        async with self._num_lock:
            nums: list[int] = []
            while self._num_returned and len(nums) < count:
                nums.append(heapq.heappop(self._num_returned))
            while len(nums) < count:
                if self._num_next >= self._num_end:
                    block = max(256, count - len(nums))
                    end = int(await self.redis.incrby(keys.CALL_NUM, block))
                    self._num_next, self._num_end = end - block + 1, end + 1
                take = min(count - len(nums), self._num_end - self._num_next)
                nums.extend(range(self._num_next, self._num_next + take))
                self._num_next += take
            return nums

    async def get_idempotency(self, key: str, batch: bool = False) -> str | None:
        """What ``key`` is bound to, if anything."""
        return await self.redis.get(keys.batch_idempotency(key) if batch else keys.idempotency(key)) or None

    async def claim_idempotency(self, key: str, value: str, batch: bool = False) -> str | None:
        """Bind ``key`` to ``value`` (a call id, or a batch's ids); return what it was already bound to, if
        anything (one command: SET NX GET)."""
        name = keys.batch_idempotency(key) if batch else keys.idempotency(key)
        existing = await self.redis.set(name, value, nx=True, ex=self.retention, get=True)
        return existing or None

    async def release_idempotency(self, key: str, value: str, batch: bool = False) -> None:
        """Unbind ``key`` if it is still bound to ``value`` (its calls could not be stored)."""
        name = keys.batch_idempotency(key) if batch else keys.idempotency(key)
        await self.redis.eval(_RELEASE, 1, name, value)

    async def settled(self) -> None:
        """Return once every write queued before this call has landed (reads after it see them)."""
        await self.write([])

    def create_calls(self, calls: list[dict[str, Any]]) -> asyncio.Future[None]:
        """Store new calls in one write (they are in the durable queue, ``ACTIVE``, once it is done); the
        indexes take the whole batch in one command each. The keys that lead to a call (its number, its
        idempotency key) are kept as long as the call: their retention starts at its end, with its own (they
        expired a retention after the call's creation, or the key's claim, even while it still waited)."""
        write: Write = []
        scored: list[Any] = []
        by_function: dict[str, list[Any]] = {}
        idems: set[str] = set()
        size = 0
        for call in calls:
            call_id, created_ms = call["id"], int(call["created"] * 1000)
            mapping = encode_call(call)
            size += sum(map(len, mapping.values()))
            write.append(("HSET", keys.call(call_id), *_flat(mapping)))
            write.append(("SET", keys.call_by_num(call["num"]), call_id))
            if call.get("idem"):
                idems.add(str(call["idem"]))
            scored += (created_ms, call_id)
            by_function.setdefault(call["function"], []).extend((created_ms, call_id))
        write += [("PERSIST", idem) for idem in sorted(idems)]
        write.append(("ZADD", keys.CALLS, *scored))
        write += [("ZADD", keys.calls_of(function), *members) for function, members in by_function.items()]
        write.append(("ZADD", keys.ACTIVE, *scored))
        return self.write(write, size)

    def uncreate_calls(self, calls: list[dict[str, Any]]) -> asyncio.Future[None]:
        """Remove what ``create_calls`` may have stored of ``calls`` (its answer was an error or never came, yet
        Redis may have applied it): left in ``ACTIVE``, a call its client never got an id for would run after a
        restart. Queued after that write on the same connection, so it lands after it."""
        write: Write = []
        for call in calls:
            call_id = call["id"]
            write += [("DEL", keys.call(call_id), keys.call_by_num(call["num"])), ("ZREM", keys.ACTIVE, call_id),
                      ("ZREM", keys.CALLS, call_id), ("ZREM", keys.calls_of(call["function"]), call_id)]
        return self.write(write)

    async def call_statuses(self, call_ids: list[str]) -> list[dict[str, Any]]:
        """``{id, status}`` of each call, in order (``UNKNOWN`` for a call no longer kept)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for call_id in call_ids:
                pipe.hget(keys.call(call_id), "status")
            statuses = await pipe.execute()
        return [{"id": i, "status": status or "UNKNOWN"} for i, status in zip(call_ids, statuses, strict=True)]

    def update_call(self, call_id: str, status: CallStatus | None, fields: dict[str, Any],
                    record: dict[str, Any] | None = None) -> asyncio.Future[None]:
        """Write a call's new state and fields. A terminal one starts its retention: the call's hash, and the
        keys that lead to it (``record``: the call as created: its number, its idempotency key), are kept that
        long from its end, not from its creation (a call can wait or run long)."""
        mapping = encode_call(fields)
        if status is not None:
            mapping["status"] = status.value
            mapping[f"t_{status.value}"] = repr(time.time())
        write: Write = [("HSET", keys.call(call_id), *_flat(mapping))]
        if status in TERMINAL:
            write += [("ZREM", keys.ACTIVE, call_id), ("EXPIRE", keys.call(call_id), self.retention)]
            if record is not None:
                if isinstance(record.get("num"), int):
                    write.append(("EXPIRE", keys.call_by_num(record["num"]), self.retention))
                if record.get("idem"):
                    write.append(("EXPIRE", str(record["idem"]), self.retention))
        return self.write(write, sum(map(len, mapping.values())))

    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        try:
            raw = await self.redis.hgetall(keys.call(call_id))
        except UnicodeDecodeError:  # (the API stores none; a hand in Redis can)
            raise CorruptRecord(f"the stored record of call {call_id!r} is not UTF-8") from None
        return read_call(raw) if raw else None

    async def call_id_by_num(self, num: int) -> str | None:
        value = await self.redis.get(keys.call_by_num(num))
        return value or None

    async def list_calls(self, function: str | None, status: str | None, after: tuple[int, str] | None,
                         limit: int) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
        """Newest first: by creation (ms), then by id, descending. ``after`` is the position (ms, id) of the
        last call of the previous page, and the position returned is the next page's (None: no more). Calls
        created in the same millisecond (a whole batch is) are all listed, across pages. A request reads at most
        about LIST_SCAN_MAX calls: with a status filter that matches few, a page may be short (even empty) with
        a position to go on from. A page also ends once it holds LIST_BYTES_MAX of call records (with at least
        one call), and only the status of calls a status filter leaves out is read."""
        index = keys.calls_of(function) if function else keys.CALLS
        out: list[dict[str, Any]] = []
        position: tuple[int, str] | None = None
        examined = size = 0
        async for chunk in self._walk(index, after, max(limit, 100)):
            if examined >= LIST_SCAN_MAX and position is not None:
                return out, position  # a filter that matches few: a short page, and where to go on from
            examined += len(chunk)
            if status:  # only the status is read of the calls the filter leaves out (a call can hold MBs)
                pipe = self.redis.pipeline(transaction=False)
                for call_id, _ in chunk:
                    pipe.hget(keys.call(call_id), "status")
                statuses = await pipe.execute()
            else:
                statuses = [status] * len(chunk)
            wanted = [call_id for (call_id, _), found in zip(chunk, statuses, strict=True) if found == status]
            rows = await self._records(wanted)
            for call_id, score in chunk:
                raw = rows.get(call_id)
                if raw:
                    size += sum(len(k) + len(v) for k, v in raw.items())
                    if out and size > LIST_BYTES_MAX:
                        return out, position  # a page of large calls ends early; the next one starts here
                position = (score, call_id)
                if not raw:
                    continue  # filtered out, or expired since the index was read
                call = read_call(raw)
                if status and call.get("status") != status:
                    continue  # (its state changed between the two reads)
                out.append(call)
                if len(out) >= limit:
                    return out, position
        return out, None

    async def _records(self, call_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored fields of each call (empty: no record). A record that is not UTF-8 (the API stores none; a
        hand in Redis can) fails the whole pipeline: the calls are then read one by one, and such a one is shown
        by its id, named unreadable."""
        pipe = self.redis.pipeline(transaction=False)
        for call_id in call_ids:
            pipe.hgetall(keys.call(call_id))
        try:
            return dict(zip(call_ids, await pipe.execute(), strict=True))
        except UnicodeDecodeError:
            rows: dict[str, dict[str, Any]] = {}
            for call_id in call_ids:
                try:
                    rows[call_id] = await self.redis.hgetall(keys.call(call_id))
                except UnicodeDecodeError:
                    rows[call_id] = {"id": call_id, "unreadable": {"record": "it is not UTF-8"}}
            return rows

    async def _walk(self, index: str, after: tuple[int, str] | None,
                    scan: int) -> AsyncIterator[list[tuple[str, int]]]:
        """The index's (id, ms) after position ``after``, newest first, in chunks. The members sharing the
        millisecond where a chunk ends are fetched whole (a range by score cannot start inside one)."""

        async def same_ms(ms: int, below: str | None) -> list[tuple[str, int]]:
            ids = await self.redis.zrevrangebyscore(index, ms, ms)  # descending ids
            return [(call_id, ms) for call_id in ids if below is None or call_id < below]

        if after is not None:
            if chunk := await same_ms(after[0], after[1]):
                yield chunk
            top = f"({after[0]}"
        else:
            top = "+inf"
        while True:
            found = await self.redis.zrevrangebyscore(index, top, "-inf", start=0, num=scan, withscores=True)
            if not found:
                return
            last = int(found[-1][1])
            chunk = [(call_id, int(score)) for call_id, score in found if int(score) != last]
            chunk += await same_ms(last, None)
            yield chunk
            top = f"({last}"

    async def active_calls(self) -> list[dict[str, Any]]:
        """Every call of the durable queue that can run, decoded, oldest first, in one list (read as
        ``active_entries`` reads them; recovery walks those chunks instead of holding them all at once)."""
        out: list[dict[str, Any]] = []
        async with contextlib.aclosing(self.active_entries()) as chunks:
            async for chunk in chunks:
                out += [entry.call for entry in chunk if entry.call is not None]
        return out

    async def active_entries(self, calls: int = 0, size: int = 0) -> AsyncGenerator[list[ActiveEntry], None]:
        """The members of the durable queue (``ACTIVE``), oldest first, in chunks of at most ``calls``
        (``RECOVER_CALLS``), their records read by pipelines of at most ``size`` (``RECOVER_BYTES``) bytes of params
        (at least one call). Every round trip is bounded, on a connection of its own and within the store's timeout,
        so a backlog of any size only makes the start longer; the ids are read first (ZSCAN), the records a chunk at
        a time. Read only: an entry that cannot run (see ``ActiveEntry``) is for the caller to ``drop_active``. The
        records are read as bytes, and one that is not UTF-8 is malformed (decoded by redis-py, it failed the
        whole read)."""
        calls, size = calls or RECOVER_CALLS, size or RECOVER_BYTES
        conn = RespConnection(self._conn.url, self._conn.timeout)
        try:
            members = await self._active_members(conn, calls)
            for at in range(0, len(members), calls):
                yield await self._read_active(conn, members[at:at + calls], size)
        finally:
            await conn.close()

    @staticmethod
    async def _active_members(conn: RespConnection, count: int) -> list[bytes]:
        """Every member of ``ACTIVE``, oldest first (by score, then id). ZSCAN: each reply is bounded (about
        ``count`` members), and it returns every member that stays in the set while it goes, whatever else changes
        (a ZRANGE by rank skips members when earlier ones leave)."""
        found: dict[bytes, float] = {}
        cursor = b"0"
        while True:
            [reply] = await conn.execute([("ZSCAN", keys.ACTIVE, cursor, "COUNT", count)])
            if not isinstance(reply, list):
                raise StoreError(f"cannot read {keys.ACTIVE}: {reply}")
            cursor, flat = reply
            for member, score in zip(flat[::2], flat[1::2], strict=True):
                found[member] = float(score)
            if cursor == b"0":
                return sorted(found, key=lambda m: (found[m], m))

    async def _read_active(self, conn: RespConnection, members: list[bytes], size: int) -> list[ActiveEntry]:
        """One chunk: first each call's status, number, idempotency key and params' size (small replies), then the
        records of the calls not ended, in pipelines of at most ``size`` bytes of params."""
        probe: list[Command] = []
        for member in members:
            key = _CALL_KEY + member
            probe += [("HMGET", key, "status", "num", "idem"), ("HSTRLEN", key, "params")]
        replies = await conn.execute(probe)
        entries: list[ActiveEntry] = []
        unread: list[tuple[ActiveEntry, int]] = []
        for n, member in enumerate(members):
            head, length = replies[2 * n], replies[2 * n + 1]
            entry = ActiveEntry(member.decode(errors="backslashreplace"), member)
            entries.append(entry)
            if isinstance(head, hiredis.ReplyError):  # the key holds something else than a hash
                entry.kind, entry.problem = "no_record", f"its key is not a call record ({head})"
                continue
            assert isinstance(head, list)
            status, entry.num, entry.idem = head
            if status is not None and status.decode(errors="replace") in _TERMINAL:
                entry.kind, entry.status = "ended", status.decode()
            else:
                unread.append((entry, length if isinstance(length, int) else 0))
        group: list[ActiveEntry] = []
        held = 0
        for entry, length in unread:
            if group and held + length > size:
                await self._read_records(conn, group)
                group, held = [], 0
            group.append(entry)
            held += length
        if group:
            await self._read_records(conn, group)
        return entries

    @staticmethod
    async def _read_records(conn: RespConnection, entries: list[ActiveEntry]) -> None:
        replies = await conn.execute([("HGETALL", _CALL_KEY + entry.member) for entry in entries])
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError) or not reply:
                entry.kind = "no_record"
                entry.problem = f"its key is not a call record ({reply})" if reply else "its record is gone"
                continue
            assert isinstance(reply, list)
            entry.call, entry.problem = _runnable(entry.member, reply)
            entry.kind = "call" if entry.call is not None else "malformed"

    def drop_active(self, entries: list[ActiveEntry]) -> asyncio.Future[None]:
        """Take out of the durable queue the entries recovery found cannot run (one write): an ended call gets the
        rest of its terminal write (its retention), a malformed one is ended FAILED (``MalformedRecord``, with why)
        and kept as long, and an id without a record just leaves (its index entries are pruned as ended ones)."""
        write: Write = []
        now = repr(time.time())
        for entry in entries:
            key = _CALL_KEY + entry.member
            if entry.kind == "malformed":
                error = {"type": "MalformedRecord", "message": f"the call's record cannot be run: {entry.problem}"}
                write.append(("HSET", key, "status", CallStatus.FAILED.value, f"t_{CallStatus.FAILED.value}", now,
                              "error", dumps_str(error)))
            write.append(("ZREM", keys.ACTIVE, entry.member))
            if entry.kind in ("ended", "malformed"):
                write.append(("EXPIRE", key, self.retention))
                if entry.num is not None and entry.num.isdigit():
                    write.append(("EXPIRE", keys.call_by_num(int(entry.num)), self.retention))
                if entry.idem:
                    write.append(("EXPIRE", entry.idem, self.retention))
        return self.write(write)

    async def persistence(self) -> dict[str, Any]:
        """How Redis keeps what it is given, from CONFIG GET: ``aof`` (``appendonly``: only with it does the durable
        queue outlive a restart of Redis; RDB snapshots keep what the last one had) and ``appendfsync``. Where CONFIG
        is not allowed (renamed, or an ACL refuses it) ``aof`` is None and ``error`` says why."""
        try:
            found = await self.redis.config_get("append*")
        except ResponseError as exc:
            return {"aof": None, "appendfsync": None, "error": str(exc)}
        appendonly = found.get("appendonly")
        if appendonly is None:
            return {"aof": None, "appendfsync": None, "error": "CONFIG GET did not report appendonly"}
        return {"aof": appendonly == "yes", "appendfsync": found.get("appendfsync")}

    async def prune(self) -> int:
        """Drop from the indexes the calls created longer than the retention ago that have ended (their hashes
        expire a retention after their end; a call still waiting or running stays listed), in every function's
        index, deleted functions' too. Returns how many left the index of all calls."""
        cutoff = now_ms() - self.retention * 1000
        removed = await self._prune_index(keys.CALLS, cutoff)
        async for index in self.redis.scan_iter(match=keys.calls_of("*"), count=500):
            await self._prune_index(index, cutoff)
        return removed

    async def _prune_index(self, index: str, cutoff: int) -> int:
        removed = offset = 0
        while True:
            old = await self.redis.zrangebyscore(index, "-inf", cutoff, start=offset, num=PRUNE_CHUNK)
            if not old:
                return removed
            live = await self.redis.zmscore(keys.ACTIVE, old)
            ended = [call_id for call_id, score in zip(old, live, strict=True) if score is None]
            if ended:
                removed += int(await self.redis.zrem(index, *ended))
            offset += len(old) - len(ended)  # the live ones stay ahead of the next chunk

    # ---- nodes ---------------------------------------------------------------------------------
    async def save_node(self, node_id: str, info: dict[str, Any]) -> None:
        await self.redis.hset(keys.NODES, node_id, json.dumps(info))

    async def list_nodes(self) -> dict[str, dict[str, Any]]:
        """Every node's last record; one that is not a JSON object is left out and logged (read at start: it must
        not keep the controller from starting)."""
        out: dict[str, dict[str, Any]] = {}
        for node_id, value in (await self.redis.hgetall(keys.NODES)).items():
            try:
                info = json.loads(value)
            except (ValueError, RecursionError):
                info = None
            if isinstance(info, dict):
                out[node_id] = info
            else:
                log.warning("node_record_malformed", node_id=node_id, value=value[:80])
        return out

    async def register_endpoint(self, endpoint_id: str, at: float, keep: int = MAX_ENDPOINTS) -> int:
        """Record that ``endpoint_id`` registered (the forwarder seed's mapping), keeping the ``keep`` endpoints
        that registered last; returns how many older ones were forgotten."""
        return int(await self.redis.eval(_REGISTER, 2, keys.ENDPOINTS, keys.ENDPOINTS_BY_TIME, endpoint_id, repr(at),
                                         keep))

    async def list_endpoints(self) -> dict[str, float]:
        """Every registered endpoint and when it last registered."""
        return {k: float(v) for k, v in (await self.redis.hgetall(keys.ENDPOINTS)).items()}
