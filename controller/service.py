"""What the API does, independent of its routes: the v1 API and the seed-compatible routes both call this."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, BinaryIO

from redis.exceptions import RedisError

from controller import keys
from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher, Pending
from controller.errors import BadRequest, Busy, Conflict, InsufficientStorage, Missing, StoreError, TooLarge
from controller.hub import Hub, function_message
from controller.metrics import ControllerMetrics
from controller.store import Store
from shoal.archive import RESOURCE_ERRNOS, ArchiveLimits, extract_archive
from shoal.blobs import BlobStore
from shoal.errors import ArchiveError, ValidationError
from shoal.fstree import TreeError, remove_tree
from shoal.logs import get_logger
from shoal.models import FunctionSpec, Runtime, check_name
from shoal.protocol import Msg

log = get_logger("service")

#: What an upload learns once its archive is received (see Service.upload_function): a runtime, if it comes
#: then (else None), and more options.
LateOptions = Callable[[], Awaitable[tuple[str | None, dict[str, Any]]]]


def request_fingerprint(name: str, version: int | None, timeout: float | None, params: Any) -> str:
    """What an invoke request asked, as an Idempotency-Key is bound to it (the version and timeout as asked: a
    retry after a new version was uploaded is still the same request)."""
    text = json.dumps([name, version, timeout, params], sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def bound_ids(bound: str, fingerprint: str) -> str:
    """The call id(s) an Idempotency-Key is bound to, if it was bound by the same request (a Conflict if not). A
    key bound before requests were fingerprinted is taken as is."""
    made_by, sep, ids = bound.partition(" ")
    if not sep:
        return bound
    if made_by and made_by != fingerprint:
        raise Conflict("this Idempotency-Key was used for another request (another function, version, timeout or "
                       "params); use a new key")
    return ids


class Service:
    def __init__(self, config: ControllerConfig, store: Store, blobs: BlobStore, hub: Hub,
                 dispatcher: Dispatcher, metrics: ControllerMetrics) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.hub = hub
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.limits = ArchiveLimits(max_archive_bytes=config.max_archive_bytes)
        self.verifying = asyncio.Semaphore(VERIFY_AT_ONCE)
        self.uploading = 0
        self.uploading_for: Counter[str] = Counter()  # runtime -> uploads under way of functions that use it
        self.collecting = asyncio.Lock()
        self.collect_pending = False
        self.background: set[asyncio.Task[int]] = set()
        self.undoing: set[str] = set()  # calls whose creation (maybe applied, no id given) is still being undone

    # ---- runtimes ------------------------------------------------------------------------------
    async def register_runtime(self, data: Any) -> Runtime:
        runtime = Runtime.from_dict(data)
        await self.store.put_runtime(runtime)
        self.hub.broadcast(Msg.RUNTIME, runtime.to_dict())
        return runtime

    async def get_runtime(self, name: str) -> Runtime:
        runtime = await self.store.get_runtime(name)
        if runtime is None:
            raise Missing(f"no runtime named {name!r}")
        return runtime

    async def delete_runtime(self, name: str) -> None:
        if name not in await self.store.runtime_names():  # (a stored one that is not valid any more goes too)
            raise Missing(f"no runtime named {name!r}")
        users = [f["name"] for f in await self.store.list_functions() if f["runtime"] == name]
        if users:
            raise Conflict(f"runtime {name!r} is used by functions: {', '.join(sorted(users))}")
        # Checked after the awaits (no await from here to the delete): an upload counts itself before it checks the
        # runtime, and uncounts itself once its version is stored, which the listing above then saw.
        if self.uploading_for[name]:
            raise Conflict(f"runtime {name!r} is used by {self.uploading_for[name]} upload(s) under way")
        await self.store.delete_runtime(name)
        self.hub.broadcast(Msg.RUNTIME_GONE, {"name": name})  # nodes stop the containers started ahead for it

    # ---- functions -----------------------------------------------------------------------------
    async def upload_function(self, name: str, runtime: str | None, chunks: AsyncIterator[bytes],
                              options: dict[str, Any], original_name: str = "",
                              more_options: LateOptions | None = None) -> dict[str, Any]:
        """Store a new version of ``name`` from the archive ``chunks``. ``more_options``: awaited once the archive
        is received, for what comes after it (a multipart body's form fields after its file part): the runtime
        if it comes there (``runtime`` is None then), and more options. What comes before is checked before a
        byte of the archive is read."""
        check_name(name, "function name")
        async with AsyncExitStack() as stack:
            if runtime is not None:
                await self._use_runtime(stack, name, runtime, options)
            if self.uploading >= UPLOADS_AT_ONCE:  # each can take the archive limit on disk: bounded
                raise Busy(f"{UPLOADS_AT_ONCE} uploads are being received; try again shortly", retry_after=5)
            self.uploading += 1
            stack.callback(self._upload_ended)
            return await self._upload(stack, name, runtime, options, chunks, original_name, more_options)
        raise AssertionError("unreachable")  # (mypy: AsyncExitStack may swallow an exception)

    def _upload_ended(self) -> None:
        self.uploading -= 1

    async def _use_runtime(self, stack: AsyncExitStack, name: str, runtime: str, options: dict[str, Any]) -> None:
        """Count an upload for ``runtime`` until ``stack`` closes, then check the runtime and the options: a refused
        upload keeps nothing."""
        self.uploading_for[runtime] += 1  # before the runtime's check: a delete meanwhile sees it (delete_runtime)
        stack.callback(self._uncount_upload, runtime)
        await self.get_runtime(runtime)
        _check_options(name, runtime, options)

    def _uncount_upload(self, runtime: str) -> None:
        self.uploading_for[runtime] -= 1
        if not self.uploading_for[runtime]:
            del self.uploading_for[runtime]

    async def _upload(self, stack: AsyncExitStack, name: str, runtime: str | None, options: dict[str, Any],
                      chunks: AsyncIterator[bytes], original_name: str,
                      more_options: LateOptions | None) -> dict[str, Any]:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.blobs.root, prefix=".upload-")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                sha, size = await self._receive_archive(chunks, tmp)
                if more_options is not None:
                    late_runtime, late = await more_options()
                    options = dict(options, **late)
                    if runtime is None:
                        if not late_runtime:
                            raise BadRequest("no runtime: give it as the `runtime` query parameter or form field")
                        runtime = late_runtime
                        await self._use_runtime(stack, name, runtime, options)
                    elif late:
                        _check_options(name, runtime, options)
                if runtime is None:
                    raise BadRequest("no runtime: give it as the `runtime` query parameter or form field")
                async with self.verifying:  # each check expands the archive: bounded, so is the disk it takes
                    await asyncio.to_thread(self._verify_archive, tmp)
                await asyncio.to_thread(self.blobs.adopt, tmp, sha)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno not in RESOURCE_ERRNOS:
                raise
            # The controller's disk (full, failing): not the client's archive, and it may pass.
            log.error("archive_not_stored", function=name, error=str(exc))
            raise InsufficientStorage(f"the controller cannot store the archive now: {exc.strerror or exc}") from None
        record = await self.store.add_version(dict(options, name=name, runtime=runtime, sha256=sha, size=size,
                                                   original_name=original_name))
        self.hub.broadcast(Msg.FUNCTION, function_message(record))
        return record

    async def _receive_archive(self, chunks: AsyncIterator[bytes], tmp: Path) -> tuple[str, int]:
        """Stream the upload to ``tmp`` (never held in memory), hashing it on the way; (sha256, size)."""
        limit = self.config.max_archive_bytes
        digest = hashlib.sha256()
        size = 0
        with open(tmp, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"archive exceeds the limit of {limit} bytes")
                await asyncio.to_thread(_write_and_hash, out, digest, chunk)  # off the loop: ~1 ms per MB
        if size == 0:
            raise BadRequest("the archive is empty")
        return digest.hexdigest(), size

    def _verify_archive(self, archive: Path) -> None:
        """Refuse a hostile or broken archive at upload (the nodes check again when they extract)."""
        scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=self.blobs.root))
        try:
            extract_archive(archive, scratch / "tree", self.limits)
        except ArchiveError as exc:
            raise BadRequest(f"archive refused: {exc}") from None
        finally:
            try:
                remove_tree(scratch)
            except TreeError as exc:  # (a .verify-* tree: swept at the next start)
                log.error("verify_scratch_not_removed", error=str(exc))

    async def get_function(self, name: str) -> dict[str, Any]:
        record = await self.store.get_function(name)
        if record is None:
            raise Missing(f"no function named {name!r}")
        nodes = {n.node_id: ("ready" if record_key(record) in n.ready else
                             "failed" if record_key(record) in n.failed else "pending")
                 for n in self.hub.nodes.values() if not n.lost}
        return dict(record, versions=[v["version"] for v in await self.store.list_versions(name)], nodes=nodes)

    async def delete_function(self, name: str) -> int:
        """Delete a function (every version). Its calls still waiting end CANCELLED; those running on nodes end
        as they do; then the nodes forget it (warm containers, code, dependencies). Returns how many calls were
        cancelled."""
        record = await self.store.get_function(name)
        if record is None or not await self.store.delete_function(name):
            raise Missing(f"no function named {name!r}")
        cancelled = self.dispatcher.function_deleted(name, int(record["version"]))
        self.collect_blobs_soon()
        return cancelled

    def collect_blobs_soon(self) -> None:
        """Collect archives no version names any more, in the background (a delete answers at once). One
        collection not begun yet serves every delete made meanwhile (a script deleting many functions)."""
        if self.collect_pending:
            return
        self.collect_pending = True
        task = asyncio.get_running_loop().create_task(self.collect_blobs())
        self.background.add(task)
        task.add_done_callback(self._collected)

    def _collected(self, task: asyncio.Task[int]) -> None:
        self.background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, RedisError | StoreError | OSError):
            log.warning("archives_not_collected", error=str(exc))  # the next delete, or start, collects them
        elif exc is not None:
            log.error("archives_collection_crashed", error=repr(exc), exc_info=(type(exc), exc, exc.__traceback__))

    async def collect_blobs(self) -> int:
        """Remove the archives no stored version names (deleted functions', uploads whose version could not be
        recorded), except those being sent to a node and those written within BLOB_GRACE_S (an upload in
        progress records its version a moment after its blob is in place). Returns how many."""
        async with self.collecting:
            self.collect_pending = False  # a delete from now on needs a collection after this one
            keep = await self.store.referenced_shas()
            keep |= {sha for _, sha in self.hub.archives.transfers}
            removed = await asyncio.to_thread(self.blobs.collect, keep, time.time() - BLOB_GRACE_S)
        if removed:
            log.info("archives_removed", count=removed)
        return removed

    # ---- calls ---------------------------------------------------------------------------------
    async def _callable(self, name: str, version: int | None,
                        timeout: float | None) -> tuple[dict[str, Any], float]:
        """The function version a new call runs (the latest, or the one asked for) and the call's timeout."""
        record = await self.store.get_function(name)
        if record is None:
            raise Missing(f"no function named {name!r}")
        if version is not None and version != record["version"]:
            record = await self.store.get_version(name, version)
            if record is None:
                raise Missing(f"function {name!r} has no version {version}")
            key = record_key(record)
            if any(key not in n.ready and key not in n.failed for n in self.hub.nodes.values() if not n.lost):
                # Nodes are sent the latest version of a function; a node that restarted since knows no other.
                self.hub.broadcast(Msg.FUNCTION, function_message(record))
        return record, timeout if timeout is not None else float(record.get("timeout") or 30.0)

    async def _recheck_room(self, count: int, idempotency_key: str | None, claimed: str, batch: bool = False) -> None:
        """The queue bound, checked again once the request's waits are over (other requests queued calls
        meanwhile: checked only before them, the bound was passed by as many requests as waited at once). A
        refusal gives back the idempotency key this request claimed. Nothing is awaited unless it refuses."""
        try:
            self.dispatcher.check_room(count)
        except Busy:
            if idempotency_key is not None:
                await self._release_key(idempotency_key, claimed, batch=batch)
            raise

    @staticmethod
    def _check_key(idempotency_key: str) -> None:
        if not 1 <= len(idempotency_key) <= 200 or not idempotency_key.isascii() or not idempotency_key.isprintable():
            raise BadRequest("Idempotency-Key must be 1-200 printable ASCII characters")

    @staticmethod
    def _new_call(record: dict[str, Any], params: Any, timeout: float, call_id: str, num: int,
                  now: float, idem: str = "") -> tuple[dict[str, Any], Pending]:
        """A new call; ``idem``: the Redis key of its idempotency key (kept as long as the call, from its end)."""
        name, version = record["name"], int(record["version"])
        call = {"id": call_id, "num": num, "function": name, "version": version, "idem": idem,
                "params": params, "status": "QUEUED", "created": now, "t_QUEUED": now, "timeout": timeout,
                "attempts": 0, "node": ""}
        return call, Pending(call_id, name, version, params, timeout, record=call, stamps={"QUEUED": now})

    async def _store_and_queue(self, made: list[tuple[dict[str, Any], Pending]]) -> None:
        """Queue new calls (of one function) and store them in one write; the caller hears of them only once
        they are stored.

        The write and the dispatch start together: enqueue only schedules the placement, so the creation is
        queued to the writer first and the writer keeps each call's writes in order (an outcome cannot be
        overwritten by its creation). If the write fails, the calls are withdrawn and nothing is given an id."""
        created = self.store.create_calls([call for call, _ in made])  # (if it raises, nothing was queued)
        for _, pending in made:
            self.dispatcher.enqueue(pending)
        try:
            await created
        except StoreError as exc:
            # Sent to a node at least once (it may be there still, or have run to its end already: then the
            # dispatcher let it go and it is on no node now).
            reached = [call["id"] for call, pending in made if pending.last_node]
            for call, _ in made:
                self.dispatcher.withdraw(call["id"])
            self._uncreate([call for call, _ in made], UNCREATE_RETRY_FIRST)
            if reached:  # (the write and the dispatch start together: a short function may have run already)
                raise StoreError(f"{exc}; not accepted (no id), but {len(reached)} of the calls had reached a node, "
                                 "which was asked to cancel them: they may have run") from None
            raise
        self.metrics.accepted.inc(len(made), function=made[0][1].function)

    async def invoke(self, name: str, params: Any, *, timeout: float | None = None, version: int | None = None,
                     idempotency_key: str | None = None) -> tuple[dict[str, Any], Pending | None]:
        """Store a new call (QUEUED) and queue it; return (call, pending). Existing call on a replayed key (the
        same request: a key used for another one is a 409)."""
        fingerprint = ""
        if idempotency_key is not None:  # a replay is answered first: whatever happened since (the function
            self._check_key(idempotency_key)  # deleted, the queue full), the call it made stands
            fingerprint = request_fingerprint(name, version, timeout, params)
            if (bound := await self.store.get_idempotency(idempotency_key)) is not None:
                return await self._replayed(bound_ids(bound, fingerprint))
        record, timeout = await self._callable(name, version, timeout)
        self.dispatcher.check_room()
        call_id = new_call_id()
        num = await self.store.next_call_num()
        claimed = f"{fingerprint} {call_id}"
        if idempotency_key is not None:
            existing = await self.store.claim_idempotency(idempotency_key, claimed)
            if existing is not None and existing != claimed:  # claimed meanwhile by a request like this one
                # (our own value: the claim was tried again after a lost connection, and had landed)
                self.store.give_back_call_nums([num])
                return await self._replayed(bound_ids(existing, fingerprint))
        # No await from the claim to the queueing: a replay that finds the key finds the call in the dispatcher.
        try:
            await self._recheck_room(1, idempotency_key, claimed)
        except Busy:
            self.store.give_back_call_nums([num])
            raise
        idem = keys.idempotency(idempotency_key) if idempotency_key is not None else ""
        call, pending = self._new_call(record, params, timeout, call_id, num, time.time(), idem)
        try:
            await self._store_and_queue([(call, pending)])
        except StoreError:
            if idempotency_key is not None:
                await self._release_key(idempotency_key, claimed)
            raise
        return call, pending

    def _uncreate(self, calls: list[dict[str, Any]], retry_after: float) -> None:
        """Undo a creation write that failed as far as we know, until the undo lands: a timeout or a lost
        connection does not say whether Redis applied the write."""

        ids = [call["id"] for call in calls]
        self.undoing.update(ids)

        def landed(write: asyncio.Future[None]) -> None:
            if write.cancelled():
                return  # the controller is stopping
            if write.exception() is not None:
                log.warning("creation_not_undone", calls=len(calls), retry_in_s=retry_after,
                            error=str(write.exception()))
                asyncio.get_running_loop().call_later(retry_after, self._uncreate, calls, min(retry_after * 2, 10.0))
                return
            self.undoing.difference_update(ids)

        self.store.uncreate_calls(calls).add_done_callback(landed)

    async def settle_undos(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the undos still being retried: at stop, one left undone would leave its
        call in the store's active set, and the next start would run a call whose client got a 503 and no id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.undoing and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.undoing:
            log.error("creations_not_undone_at_stop", calls=len(self.undoing))

    async def _settle_claim(self) -> None:
        """Wait until the request that claimed a replayed key has stored its calls or given up: the first wait
        lets it queue its creation write (its claim's answer may be handled after ours), the second lets that
        write land (or fail, and the calls be withdrawn). Only then is a replay answered, so it never names a
        call that does not exist."""
        await self.store.settled()
        await self.store.settled()

    def _check_not_undoing(self, call_ids: list[str]) -> None:
        """A replayed key whose call(s) could not be stored and are being removed (the creation may have landed
        although it failed here): not named as if they stood, as they are about to go (a 503: try again)."""
        if any(call_id in self.undoing for call_id in call_ids):
            raise StoreError("the call this Idempotency-Key names could not be stored and is being removed; "
                             "retry in a moment")

    async def _replayed(self, call_id: str) -> tuple[dict[str, Any], Pending | None]:
        """The call a replayed Idempotency-Key names, as it stands now."""
        await self._settle_claim()
        self._check_not_undoing([call_id])
        pending = self.dispatcher.calls.get(call_id)
        if pending is not None:
            return dict(pending.record, status=pending.status), pending
        call = await self.store.get_call(call_id)
        if call is None:
            raise Conflict("this Idempotency-Key was given to a call that could not be stored; use a new key")
        return call, None

    async def _replayed_batch(self, call_ids: list[str]) -> list[dict[str, Any]]:
        """The calls of the batch a replayed Idempotency-Key names (``{id, status}``), as they stand now."""
        await self._settle_claim()
        self._check_not_undoing(call_ids)
        statuses = await self.store.call_statuses(call_ids)
        for entry in statuses:
            if entry["status"] == "UNKNOWN" and (pending := self.dispatcher.calls.get(entry["id"])) is not None:
                entry["status"] = pending.status
        if any(entry["status"] == "UNKNOWN" for entry in statuses):
            raise Conflict("this Idempotency-Key was given to a batch that could not be stored, or that is no "
                           "longer kept; use a new key")
        return statuses

    async def _release_key(self, key: str, value: str, batch: bool = False) -> None:
        try:
            await self.store.release_idempotency(key, value, batch=batch)
        except RedisError as exc:  # the store is failing anyway: a replay of this key will say so (409)
            log.warning("idempotency_key_not_released", error=str(exc))

    async def invoke_batch(self, name: str, params: list[Any], *, timeout: float | None = None,
                           version: int | None = None, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """Store and queue one call per entry of ``params`` (all or none: one write); return them as stored, in
        order. A replayed key returns the calls of its first batch, as they stand now."""
        fingerprint = ""
        if idempotency_key is not None:  # (see invoke)
            self._check_key(idempotency_key)
            fingerprint = request_fingerprint(name, version, timeout, params)
            if (bound := await self.store.get_idempotency(idempotency_key, batch=True)) is not None:
                return await self._replayed_batch(bound_ids(bound, fingerprint).split(","))
        record, timeout = await self._callable(name, version, timeout)
        self.dispatcher.check_room(len(params))
        ids = [new_call_id() for _ in params]
        nums = await self.store.next_call_nums(len(params))
        claimed = f"{fingerprint} {','.join(ids)}"
        if idempotency_key is not None:
            existing = await self.store.claim_idempotency(idempotency_key, claimed, batch=True)
            if existing is not None and existing != claimed:  # (see invoke)
                self.store.give_back_call_nums(nums)
                return await self._replayed_batch(bound_ids(existing, fingerprint).split(","))
        # No await from the claim to the queueing (see _settle_claim).
        try:
            await self._recheck_room(len(params), idempotency_key, claimed, batch=True)
        except Busy:
            self.store.give_back_call_nums(nums)
            raise
        now = time.time()
        idem = keys.batch_idempotency(idempotency_key) if idempotency_key is not None else ""
        made = [self._new_call(record, p, timeout, call_id, num, now, idem)
                for p, call_id, num in zip(params, ids, nums, strict=True)]
        try:
            await self._store_and_queue(made)
        except StoreError:
            if idempotency_key is not None:  # a retry with the key must store the batch, not name this one
                await self._release_key(idempotency_key, claimed, batch=True)
            raise
        return [call for call, _ in made]

    async def wait(self, pending: Pending | None, call_id: str, timeout: float) -> dict[str, Any] | None:
        """The call's stored record once it ends, or None if ``timeout`` passes first."""
        if pending is None:
            return await self.get_call(call_id)
        fut = self.dispatcher.wait(pending)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            if not fut.done() or fut.cancelled():  # timed out, or its client went away: not kept with the call
                with contextlib.suppress(ValueError):
                    pending.waiters.remove(fut)

    async def get_call(self, call_id: str) -> dict[str, Any]:
        call = await self.store.get_call(call_id)
        if call is None:
            raise Missing(f"no call {call_id!r}")
        return call

    async def cancel(self, call_id: str) -> dict[str, Any]:
        call = await self.get_call(call_id)
        if call["status"] not in TERMINAL_STATES and not self.dispatcher.cancel(call_id):
            # Not held here: it ended, and its outcome is on its way to the store.
            await self.store.settled()
            call = await self.get_call(call_id)
        if call["status"] in TERMINAL_STATES:
            raise Conflict(f"call {call_id} already ended ({call['status']})")
        return call


TERMINAL_STATES = ("DONE", "FAILED", "TIMEOUT", "CANCELLED")
BLOB_GRACE_S = 3600.0  # an archive written this recently is not collected (see Service.collect_blobs)
UPLOADS_AT_ONCE = 8  # uploads received at the same time (each a temporary file of up to the archive limit)
VERIFY_AT_ONCE = 2  # uploads checked at the same time (each expands its archive in a scratch tree)
UNCREATE_RETRY_FIRST = 0.25  # seconds before a failed undo of a creation is tried again (doubling, up to 10 s)


def _write_and_hash(out: BinaryIO, digest: Any, chunk: bytes) -> None:
    out.write(chunk)
    digest.update(chunk)


def _check_options(name: str, runtime: str, options: dict[str, Any]) -> None:
    """Refuse (ValidationError) options a version of ``name`` could not be stored with."""
    FunctionSpec.from_dict(dict(options, name=name, runtime=runtime, version=1, sha256="0" * 64, size=1))


def new_call_id() -> str:
    """128 random bits as 32 hex digits (what ``uuid.uuid4().hex`` gives, less the version bits, at a third
    of its cost on the ingest path)."""
    return os.urandom(16).hex()


def record_key(record: dict[str, Any]) -> str:
    return f"{record['name']}@{record['version']}"


def parse_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Function options from query/form strings: typed and checked (FunctionSpec re-checks ranges)."""
    out: dict[str, Any] = {}
    for key in ("entrypoint", "preload"):
        if raw.get(key):
            out[key] = str(raw[key])
    for key in ("timeout", "keepalive"):
        if raw.get(key) not in (None, ""):
            try:
                out[key] = float(raw[key])
            except (TypeError, ValueError):
                raise ValidationError(f"{key} must be a number") from None
    for key in ("min_warm", "max_warm"):
        if raw.get(key) not in (None, ""):
            try:
                out[key] = int(raw[key])
            except (TypeError, ValueError):
                raise ValidationError(f"{key} must be an integer") from None
    return out
