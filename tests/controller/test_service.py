"""Idempotency keys through the service: a real Redis store and dispatcher, a stand-in hub (no nodes needed),
and the creation write failing on cue (the claim and the release go to the real server)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from controller import service as service_module
from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher
from controller.errors import Conflict, StoreError
from controller.metrics import ControllerMetrics
from controller.service import Service
from controller.store import Store
from shoal.blobs import BlobStore
from shoal.devenv.redis_server import RedisServer, start_redis
from tests.controller.test_dispatcher import FakeHub


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    srv = start_redis("service-test", appendonly=False)
    yield srv
    srv.stop(remove=True)


class Rig:
    def __init__(self, server: RedisServer, tmp: Path) -> None:
        self.redis = Redis.from_url(server.url, decode_responses=True)
        self.store = Store(self.redis, 60, server.url)
        self.hub = FakeHub()
        self.dispatcher = Dispatcher(ControllerConfig(), self.store, self.hub, ControllerMetrics())  # type: ignore[arg-type]
        self.service = Service(ControllerConfig(), self.store, BlobStore(tmp / "blobs"), self.hub,  # type: ignore[arg-type]
                               self.dispatcher, ControllerMetrics())
        self.failing = 0  # creation writes that fail next
        self.holding: asyncio.Future[None] | None = None  # set: the next creation write ends as the test says
        self.landing_unanswered = 0  # creation writes that Redis applies but whose answer is lost (a timeout)
        self.created: list[dict[str, Any]] = []  # every call a creation write was asked for
        real = self.store.create_calls

        def create_calls(calls: list[dict[str, Any]]) -> asyncio.Future[None]:
            self.created += calls
            if self.holding is not None:
                held, self.holding = self.holding, None
                return held
            if self.landing_unanswered:
                self.landing_unanswered -= 1
                applied = real(calls)
                lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                applied.add_done_callback(lambda _: lost.set_exception(StoreError("redis timed out")))
                return lost
            if self.failing:
                self.failing -= 1
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                fut.set_exception(StoreError("redis refused the write"))
                return fut
            return real(calls)

        self.store.create_calls = create_calls  # type: ignore[method-assign]

    async def start(self, name: str) -> None:
        self.store.start()
        await self.store.add_version({"name": name, "runtime": "rt", "sha256": "0" * 64, "size": 1})

    async def close(self) -> None:
        await self.store.close()
        await self.redis.aclose()


def run(server: RedisServer, tmp: Path, scenario: Any) -> Any:
    async def main() -> Any:
        rig = Rig(server, tmp)
        try:
            return await scenario(rig)
        finally:
            await rig.close()
    return asyncio.run(main())


def test_a_batch_not_stored_leaves_its_key_free_for_the_retry(server: RedisServer, tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.start("bf")
        rig.failing = 1
        with pytest.raises(StoreError):
            await rig.service.invoke_batch("bf", [1, 2], idempotency_key="retry-me")
        assert rig.dispatcher.calls == {}  # withdrawn
        made = await rig.service.invoke_batch("bf", [1, 2], idempotency_key="retry-me")  # the client's retry
        assert [c["status"] for c in made] == ["QUEUED", "QUEUED"]
        again = await rig.service.invoke_batch("bf", [1, 2], idempotency_key="retry-me")
        assert again == [{"id": c["id"], "status": "QUEUED"} for c in made]

    run(server, tmp_path, scenario)


def test_a_replay_while_the_first_request_is_being_stored_names_only_stored_calls(server: RedisServer,
                                                                                 tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.start("rf")
        # Stored: the replay, sent while the first is in flight, answers the same call, stored.
        first, second = await asyncio.gather(rig.service.invoke("rf", 1, idempotency_key="k-ok"),
                                             rig.service.invoke("rf", 1, idempotency_key="k-ok"))
        assert first[0]["id"] == second[0]["id"] and await rig.store.get_call(first[0]["id"]) is not None
        # Not stored: the replay must not hand out the id of a call that was withdrawn.
        rig.failing = 1
        outcomes = await asyncio.gather(rig.service.invoke("rf", 1, idempotency_key="k-bad"),
                                        rig.service.invoke("rf", 1, idempotency_key="k-bad"),
                                        return_exceptions=True)
        ids = [o[0]["id"] for o in outcomes if isinstance(o, tuple)]
        assert any(isinstance(o, StoreError) for o in outcomes), outcomes
        for call_id in ids:  # a retry after the failure may make the call anew: then it is stored
            assert await rig.store.get_call(call_id) is not None, outcomes
        assert all(isinstance(o, tuple | StoreError | Conflict) for o in outcomes), outcomes
        # Batches likewise.
        rig.failing = 1
        batches = await asyncio.gather(rig.service.invoke_batch("rf", [1], idempotency_key="b-bad"),
                                       rig.service.invoke_batch("rf", [1], idempotency_key="b-bad"),
                                       return_exceptions=True)
        assert any(isinstance(o, StoreError) for o in batches), batches
        for o in batches:
            if isinstance(o, list):
                assert all([await rig.store.get_call(c["id"]) is not None for c in o]), batches
            else:
                assert isinstance(o, StoreError | Conflict), batches

    run(server, tmp_path, scenario)


def test_sync_waits_that_time_out_or_are_cancelled_are_not_kept_with_the_call(server: RedisServer,
                                                                            tmp_path: Path) -> None:
    """A sync caller replaying its key while the call waits (no node has room) adds a wait per request: one that
    ended unanswered used to stay in the call's waiters until the call ended."""

    async def scenario(rig: Rig) -> None:
        await rig.start("wf")
        call, pending = await rig.service.invoke("wf", 1, idempotency_key="k-wait")
        assert pending is not None
        for _ in range(3):
            _, again = await rig.service.invoke("wf", 1, idempotency_key="k-wait")
            assert again is pending and await rig.service.wait(again, call["id"], 0.001) is None
        assert pending.waiters == []
        waiting = asyncio.ensure_future(rig.service.wait(pending, call["id"], 60))
        await asyncio.sleep(0)
        assert len(pending.waiters) == 1  # a caller still waiting is kept
        waiting.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert pending.waiters == []

    run(server, tmp_path, scenario)


def test_a_creation_redis_applied_but_did_not_answer_is_undone(server: RedisServer, tmp_path: Path) -> None:
    """The client got a 503 and no id, and its key was released; left in the store's active set, the call would run
    after a restart (and a retry with the key would make a second one)."""

    async def scenario(rig: Rig) -> None:
        await rig.start("uf")
        rig.landing_unanswered = 2
        with pytest.raises(StoreError):
            await rig.service.invoke("uf", 1, idempotency_key="k-lost")
        with pytest.raises(StoreError):
            await rig.service.invoke_batch("uf", [1, 2])
        await rig.store.settled()  # the undo went after the creation, on the same connection
        assert [c["id"] for c in rig.created] and rig.dispatcher.calls == {}
        for call in rig.created:
            assert await rig.store.get_call(call["id"]) is None
        assert [c for c in await rig.store.active_calls() if c["function"] == "uf"] == []  # (the server is shared)
        again, _ = await rig.service.invoke("uf", 1, idempotency_key="k-lost")  # the client's retry
        assert again["id"] not in {c["id"] for c in rig.created[:1]}
        assert [c["id"] for c in await rig.store.active_calls() if c["function"] == "uf"] == [again["id"]]

    run(server, tmp_path, scenario)


def test_an_undo_that_fails_is_retried_until_it_lands(server: RedisServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis still failing when the undo goes out (down, or timing out): the undo is tried again, later and later,
    until it lands; the call is then gone from the store."""
    monkeypatch.setattr(service_module, "UNCREATE_RETRY_FIRST", 0.01)

    async def scenario(rig: Rig) -> None:
        await rig.start("rtf")
        real = rig.store.uncreate_calls
        tries: list[int] = []

        def uncreate_calls(calls: list[dict[str, Any]]) -> asyncio.Future[None]:
            loop = asyncio.get_running_loop()
            tries.append(len(calls))
            if len(tries) <= 3:
                fut: asyncio.Future[None] = loop.create_future()
                fut.set_exception(StoreError("redis is down"))
                return fut
            return real(calls)

        rig.store.uncreate_calls = uncreate_calls  # type: ignore[method-assign]
        waits: list[float] = []
        undo = rig.service._uncreate

        def recorded(calls: list[dict[str, Any]], retry_after: float) -> None:
            waits.append(retry_after)
            undo(calls, retry_after)

        rig.service._uncreate = recorded  # type: ignore[method-assign]
        rig.landing_unanswered = 1
        with pytest.raises(StoreError):
            await rig.service.invoke("rtf", 1)
        call_id = rig.created[0]["id"]
        for _ in range(500):  # each retry waits twice as long as the one before: 0.01, 0.02, 0.04 s
            if len(tries) > 3:
                break
            await asyncio.sleep(0.01)
        await rig.store.settled()
        assert len(tries) == 4 and await rig.store.get_call(call_id) is None
        assert waits == [0.01, 0.02, 0.04, 0.08]  # backing off, not hammering a failing store
        assert [c for c in await rig.store.active_calls() if c["function"] == "rtf"] == []

    run(server, tmp_path, scenario)


def test_archives_no_version_names_are_collected_and_a_delete_collects_its_own(server: RedisServer,
                                                                             tmp_path: Path) -> None:
    """Every archive was kept for ever, deleted functions' too. Kept: one a version names, one being sent to a node,
    one written within the grace (an upload records its version a moment after its blob is in place)."""

    async def scenario(rig: Rig) -> None:
        blobs = rig.service.blobs
        old = time.time() - service_module.BLOB_GRACE_S - 60

        def blob(data: bytes, aged: bool = True) -> str:
            sha, _ = blobs.put_bytes(data)
            if aged:
                os.utime(blobs.path(sha), (old, old))
            return sha

        named, orphan, fresh, sending = blob(b"named"), blob(b"orphan"), blob(b"fresh", aged=False), blob(b"sending")
        await rig.store.add_version({"name": "kf", "runtime": "rt", "sha256": named, "size": 5})
        rig.hub.archives.transfers[("n1", sending)] = object()
        assert await rig.service.collect_blobs() == 1
        assert not blobs.has(orphan) and all(blobs.has(s) for s in (named, fresh, sending))
        await rig.service.delete_function("kf")
        rig.service.collect_blobs_soon()  # another delete meanwhile: the collection not begun yet serves both
        assert len(rig.service.background) == 1
        await asyncio.gather(*rig.service.background)
        assert not blobs.has(named) and blobs.has(fresh) and blobs.has(sending)

    run(server, tmp_path, scenario)


def test_the_queue_bound_holds_for_requests_that_waited_at_once(server: RedisServer, tmp_path: Path) -> None:
    """The bound was checked before a request's awaits (its callNum, its idempotency claim) only: every request
    waiting there at once passed it together. A request refused after its claim gives its key back."""
    import dataclasses

    from controller.errors import Busy

    async def scenario(rig: Rig) -> None:
        await rig.start("qb")
        rig.dispatcher.config = dataclasses.replace(rig.dispatcher.config, queue_limit=5)  # no node: calls wait
        outcomes = await asyncio.gather(*(rig.service.invoke("qb", n, idempotency_key=f"q-{n}") for n in range(30)),
                                        return_exceptions=True)
        accepted = [o for o in outcomes if isinstance(o, tuple)]
        refused = [n for n, o in enumerate(outcomes) if isinstance(o, Busy)]
        assert len(accepted) == 5 and len(refused) == 25 and len(rig.dispatcher.queue) == 5
        for n in refused:  # their keys are free: a retry later makes the call
            assert await rig.redis.get(f"shoal:idem:q-{n}") is None

    run(server, tmp_path, scenario)


def test_a_replayed_key_answers_where_the_call_stands_now(server: RedisServer, tmp_path: Path) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.start("rs")
        call, _ = await rig.service.invoke("rs", 1, idempotency_key="where")
        for node in rig.hub.nodes.values():
            node.ready.add("rs@1")
        rig.dispatcher.kick()
        await asyncio.sleep(0)
        assert rig.hub.placed == {call["id"]: ["n1"]}
        again, _ = await rig.service.invoke("rs", 1, idempotency_key="where")
        assert again["id"] == call["id"] and again["status"] == "DISPATCHED"  # it said QUEUED

    run(server, tmp_path, scenario)


def test_a_key_used_for_another_request_is_a_conflict_and_a_replay_comes_first(server: RedisServer,
                                                                                tmp_path: Path) -> None:
    """A key answered with whatever call it was first given: another function's (its result as if this one's),
    other params. A replay also reserved a callNum (the seed's listing showed gaps) and was checked against the
    queue bound first (a retry got 429 instead of its call)."""
    import dataclasses

    async def scenario(rig: Rig) -> None:
        await rig.start("ik")
        await rig.store.add_version({"name": "other", "runtime": "rt", "sha256": "0" * 64, "size": 1})
        rig.dispatcher.config = dataclasses.replace(rig.dispatcher.config, queue_limit=2)  # no node: calls wait
        first, _ = await rig.service.invoke("ik", {"a": 1}, idempotency_key="k")
        for name, params, timeout in (("other", {"a": 1}, None), ("ik", {"a": 2}, None), ("ik", {"a": 1}, 5.0)):
            with pytest.raises(Conflict, match="another request"):
                await rig.service.invoke(name, params, timeout=timeout, idempotency_key="k")
        batch = await rig.service.invoke_batch("ik", [1], idempotency_key="b")
        assert len(rig.dispatcher.queue) == 2  # full
        again, _ = await rig.service.invoke("ik", {"a": 1}, idempotency_key="k")
        assert again["id"] == first["id"]  # not a 429
        assert await rig.service.invoke_batch("ik", [1], idempotency_key="b") == [
            {"id": batch[0]["id"], "status": "QUEUED"}]
        with pytest.raises(Conflict, match="another request"):
            await rig.service.invoke_batch("ik", [2], idempotency_key="b")
        rig.dispatcher.config = dataclasses.replace(rig.dispatcher.config, queue_limit=10)
        later, _ = await rig.service.invoke("ik", {"a": 3})
        assert [first["num"], batch[0]["num"], later["num"]] == [first["num"] + n for n in range(3)]  # no gap

    run(server, tmp_path, scenario)


def test_numbers_of_requests_refused_after_their_claim_are_handed_out_again(server: RedisServer,
                                                                             tmp_path: Path) -> None:
    import dataclasses

    from controller.errors import Busy

    async def scenario(rig: Rig) -> None:
        await rig.start("gb")
        rig.dispatcher.config = dataclasses.replace(rig.dispatcher.config, queue_limit=3)
        outcomes = await asyncio.gather(*(rig.service.invoke("gb", n, idempotency_key=f"g-{n}") for n in range(12)),
                                        return_exceptions=True)
        nums = [o[0]["num"] for o in outcomes if isinstance(o, tuple)]
        assert len(nums) == 3 and sum(isinstance(o, Busy) for o in outcomes) == 9
        rig.dispatcher.config = dataclasses.replace(rig.dispatcher.config, queue_limit=10)
        more = [(await rig.service.invoke("gb", n))[0]["num"] for n in range(3)]
        # The refused ones' numbers are handed out again, lowest first: no number below the last one handed out
        # is missing. (Which 3 requests were accepted depends on the order their claims landed: not always the
        # lowest numbers, as this test first assumed.)
        assert more == sorted(more)
        assert set(range(min(nums + more), max(more) + 1)) <= set(nums + more), (nums, more)

    run(server, tmp_path, scenario)


def test_a_key_naming_a_call_being_undone_is_not_answered_with_it(server: RedisServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The creation landed but its answer was lost (503), its undo and the key's release failed: the client's
    retry was answered 202 with that call, which never ran and was deleted by the undo a moment later. And a
    controller stopping before the undo landed left the call to run at the next start."""
    from redis.exceptions import RedisError

    monkeypatch.setattr(service_module, "UNCREATE_RETRY_FIRST", 0.05)

    async def scenario(rig: Rig) -> None:
        await rig.start("ud")
        real_uncreate, real_release = rig.store.uncreate_calls, rig.store.release_idempotency
        failing = {"undo": 2, "release": 1}

        def uncreate_calls(calls: list[dict[str, Any]]) -> asyncio.Future[None]:
            if failing["undo"]:
                failing["undo"] -= 1
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                fut.set_exception(StoreError("redis is down"))
                return fut
            return real_uncreate(calls)

        async def release_idempotency(key: str, value: str, batch: bool = False) -> None:
            if failing["release"]:
                failing["release"] -= 1
                raise RedisError("redis is down")
            await real_release(key, value, batch)

        rig.store.uncreate_calls = uncreate_calls  # type: ignore[method-assign]
        rig.store.release_idempotency = release_idempotency  # type: ignore[method-assign]
        rig.landing_unanswered = 1
        with pytest.raises(StoreError):
            await rig.service.invoke("ud", 1, idempotency_key="k-undo")
        call_id = rig.created[0]["id"]
        assert await rig.store.get_call(call_id) is not None  # (applied, and not undone yet)
        with pytest.raises(StoreError, match="being removed"):
            await rig.service.invoke("ud", 1, idempotency_key="k-undo")  # the client's retry
        await rig.service.settle_undos(10)  # (as the controller does when it stops)
        assert not rig.service.undoing and await rig.store.get_call(call_id) is None
        assert [c for c in await rig.store.active_calls() if c["function"] == "ud"] == []

    run(server, tmp_path, scenario)


def test_a_503_for_a_call_that_had_reached_a_node_says_it_may_have_run(server: RedisServer, tmp_path: Path) -> None:
    """The write and the dispatch start together: a short function can run before the creation's failure is known.
    The 503 said only that Redis was unavailable, inviting a retry as if nothing had happened."""

    async def scenario(rig: Rig) -> None:
        await rig.start("mr")
        for node in rig.hub.nodes.values():
            node.ready.add("mr@1")
        rig.landing_unanswered = 1
        with pytest.raises(StoreError, match="may have run"):
            await rig.service.invoke("mr", 1)
        assert rig.hub.placed and (b"CANCEL", rig.created[0]["id"]) in rig.hub.sent
        await rig.service.settle_undos(10)

    run(server, tmp_path, scenario)


def test_a_503_for_a_call_that_already_ran_to_its_end_says_it_may_have_run(server: RedisServer, tmp_path: Path) -> None:
    """Only a call still on a node counted as reached: one whose result came before the creation's failure was
    known (a short function, a slow write) was on no node by then, and its 503 said it was not accepted."""

    async def scenario(rig: Rig) -> None:
        await rig.start("ran")
        node = rig.hub.nodes["n1"]
        node.ready.add("ran@1")
        rig.holding = asyncio.get_running_loop().create_future()
        held = rig.holding
        invoke = asyncio.ensure_future(rig.service.invoke("ran", 1))
        while not rig.hub.placed:
            await asyncio.sleep(0)
        call_id = rig.created[0]["id"]
        rig.dispatcher.on_result(node, {"call_id": call_id, "status": "DONE", "result": 1})  # it ran, and ended
        await asyncio.sleep(0.05)
        held.set_exception(StoreError("redis timed out"))
        with pytest.raises(StoreError, match="may have run"):
            await invoke
        await rig.service.settle_undos(10)

    run(server, tmp_path, scenario)


def test_a_runtime_stored_under_older_rules_is_left_out_and_can_still_be_deleted(server: RedisServer,
                                                                                tmp_path: Path) -> None:
    """A runtime stored before its rules were tightened (a reserved code path): listing runtimes was a 400 blaming
    the client, so was its delete (it could not be removed), and every node's sync died on it."""
    import json as json_module

    from controller import keys
    from controller.errors import CorruptRecord, Missing

    async def scenario(rig: Rig) -> None:
        await rig.redis.hset(keys.RUNTIMES, "old", json_module.dumps(
            {"name": "old", "image": "img", "path": "/tmp", "dependencies": "", "run": ""}))
        await rig.service.register_runtime({"name": "ok", "image": "img"})
        assert [r.name for r in await rig.store.list_runtimes()] == ["ok"]
        assert await rig.store.runtime_names() >= {"old", "ok"}
        with pytest.raises(CorruptRecord, match="register it again"):
            await rig.store.get_runtime("old")
        await rig.service.delete_runtime("old")
        assert "old" not in await rig.store.runtime_names()
        with pytest.raises(Missing):
            await rig.service.delete_runtime("old")
        await rig.service.delete_runtime("ok")

    run(server, tmp_path, scenario)


def test_a_runtime_is_not_deleted_while_an_upload_for_it_is_under_way(server: RedisServer, tmp_path: Path) -> None:
    """The upload checked its runtime before receiving its archive (up to 1 GiB); a delete meanwhile saw no function
    using it, and the function was stored naming a runtime gone."""
    from controller.errors import Conflict
    from shoal.archive import build_tar_gz

    async def scenario(rig: Rig) -> None:
        rig.store.start()
        await rig.service.register_runtime({"name": "rt-up", "image": "img"})
        archive = build_tar_gz({"handler.py": "def handler(p):\n    return p\n"})
        halfway = asyncio.Event()
        go_on = asyncio.Event()

        async def chunks() -> Any:
            yield archive[:10]
            halfway.set()
            await go_on.wait()
            yield archive[10:]

        upload = asyncio.ensure_future(rig.service.upload_function("fn-up", "rt-up", chunks(), {}, "f.tgz"))
        await halfway.wait()
        with pytest.raises(Conflict, match="upload"):
            await rig.service.delete_runtime("rt-up")
        go_on.set()
        record = await upload
        assert record["runtime"] == "rt-up" and await rig.store.get_runtime("rt-up") is not None
        assert not rig.service.uploading_for

    run(server, tmp_path, scenario)


def test_a_creation_that_cannot_even_be_written_queues_nothing(server: RedisServer, tmp_path: Path) -> None:
    """The calls were queued before their write was made: a write that raised as it was made (a record that would
    not encode) left them queued, held and placed, never stored nor withdrawn."""

    async def scenario(rig: Rig) -> None:
        await rig.start("unwritable")

        def create_calls(calls: list[dict[str, Any]]) -> asyncio.Future[None]:
            raise RecursionError("maximum recursion depth exceeded while encoding")

        rig.store.create_calls = create_calls  # type: ignore[method-assign]
        with pytest.raises(RecursionError):
            await rig.service.invoke("unwritable", 1)
        await asyncio.sleep(0)
        assert not rig.dispatcher.calls and not rig.dispatcher.queued() and not rig.hub.placed

    run(server, tmp_path, scenario)


def test_an_upload_counts_itself_before_it_checks_its_runtime(server: RedisServer, tmp_path: Path) -> None:
    """An upload counted itself once its runtime was checked: a delete between that check's request and its answer
    saw no upload, and the function was stored naming the runtime it deleted."""
    from controller.errors import Conflict
    from shoal.archive import build_tar_gz

    async def scenario(rig: Rig) -> None:
        rig.store.start()
        await rig.service.register_runtime({"name": "rt-race", "image": "img"})
        checking = asyncio.Event()
        answer = asyncio.Event()
        real = rig.store.get_runtime

        async def slow_get_runtime(name: str) -> Any:
            checking.set()
            await answer.wait()
            return await real(name)

        rig.store.get_runtime = slow_get_runtime  # type: ignore[method-assign]
        archive = build_tar_gz({"handler.py": "def handler(p):\n    return p\n"})

        async def chunks() -> Any:
            yield archive

        upload = asyncio.ensure_future(rig.service.upload_function("fn-race", "rt-race", chunks(), {}, "f.tgz"))
        await checking.wait()
        with pytest.raises(Conflict, match="upload"):
            await rig.service.delete_runtime("rt-race")
        answer.set()
        assert (await upload)["runtime"] == "rt-race"
        rig.store.get_runtime = real  # type: ignore[method-assign]
        assert await rig.store.get_runtime("rt-race") is not None

    run(server, tmp_path, scenario)
