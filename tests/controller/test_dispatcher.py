"""The dispatcher's placement and bookkeeping, with stand-ins for the hub and the store (no Redis, no nodes)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher, Pending
from controller.errors import StoreError
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from controller.store import ActiveEntry
from shoal.models import REJECTED
from shoal.protocol import Msg


class FakeHub:
    def __init__(self, nodes: tuple[str, ...] = ("n1",)) -> None:
        self.nodes = {n: NodeState(n, {"v": 1, "node_id": n, "queue_limit": 2}, capacity=2) for n in nodes}
        self.sent: list[tuple[bytes, str]] = []
        self.placed: dict[str, list[str]] = {}  # call id -> the nodes it was sent to
        self.up = True
        self.refusing: set[str] = set()  # nodes whose socket refuses a send (they went away)
        self.broadcasts: list[tuple[bytes, dict[str, Any]]] = []
        self.resent: list[tuple[str, str]] = []
        self.archives = SimpleNamespace(transfers={})  # (node id, sha256) -> transfer: archives being sent

    def send(self, node_id: str, mtype: bytes, header: dict[str, Any]) -> bool:
        if not self.up or node_id in self.refusing:
            return False
        self.sent.append((mtype, header["call_id"]))
        if mtype == Msg.CALL:
            self.placed.setdefault(header["call_id"], []).append(node_id)
        return True

    def broadcast(self, mtype: bytes, header: dict[str, Any]) -> None:
        self.broadcasts.append((mtype, header))

    def resend_function(self, node_id: str, name: str, version: int) -> None:
        self.resent.append((node_id, f"{name}@{version}"))

    def calls_sent(self) -> list[str]:
        return [call_id for mtype, call_id in self.sent if mtype == Msg.CALL]


class FakeStore:
    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []
        self.fields: dict[str, dict[str, Any]] = {}
        self.failing = 0  # this many writes fail next
        self.active: list[dict[str, Any]] = []  # what active_entries() reads (calls of a previous lifetime)
        self.deleted: set[tuple[str, int]] = set()  # function versions get_version does not find
        self.nodes: dict[str, dict[str, Any]] = {}  # what list_nodes() returns (nodes of a previous lifetime)

    def update_call(self, call_id: str, status: Any, fields: dict[str, Any],
                    record: dict[str, Any] | None = None) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.failing:
            self.failing -= 1
            fut.set_exception(StoreError("redis is unavailable"))
            return fut
        self.writes.append((call_id, status))
        self.fields.setdefault(call_id, {}).update(fields)
        fut.set_result(None)
        return fut

    async def active_entries(self) -> AsyncGenerator[list[ActiveEntry], None]:
        yield [ActiveEntry(c["id"], c["id"].encode(), kind="call", call=c)
               for c in sorted(self.active, key=lambda c: c.get("created") or 0)]

    def drop_active(self, entries: list[ActiveEntry]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def get_version(self, name: str, version: int) -> dict[str, Any] | None:
        return None if (name, version) in self.deleted else {"name": name, "version": version}

    async def list_nodes(self) -> dict[str, dict[str, Any]]:
        return self.nodes

    async def settled(self) -> None:
        pass


def make_dispatcher(nodes: tuple[str, ...] = ("n1",)) -> tuple[Dispatcher, FakeHub, FakeStore, ControllerMetrics]:
    hub, store, metrics = FakeHub(nodes), FakeStore(), ControllerMetrics()
    return Dispatcher(ControllerConfig(), store, hub, metrics), hub, store, metrics  # type: ignore[arg-type]


def ready(hub: FakeHub, key: str = "f@1") -> None:
    for node in hub.nodes.values():
        node.ready.add(key)


def stored_call(call_id: str, **fields: Any) -> dict[str, Any]:
    """A call of function f@1 as a previous controller left it in the store: dispatched once, not finished."""
    return {"id": call_id, "function": "f", "version": 1, "params": None, "timeout": 5.0, "attempts": 1,
            "created": 1.0, "t_QUEUED": 1.0, "status": "DISPATCHED", **fields}


def status_of(store: FakeStore, call_id: str) -> Any:
    return [s for c, s in store.writes if c == call_id][-1]


def test_placement_sends_what_nodes_take_and_a_blocked_backlog_keeps_its_order() -> None:
    """A function no node can take does not hold up another's calls."""

    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher()
        node = hub.nodes["n1"]
        node.ready.add("fast@1")
        for n in range(10_000):
            d.enqueue(Pending(f"slow-{n}", "slow", 1, None, 1.0))
        d.enqueue(Pending("fast-0", "fast", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.calls_sent() == ["fast-0"] and len(d.queue) == 10_000
        node.ready.add("slow@1")  # ready now, with room for 2 (its queue_limit)
        d.kick()
        await asyncio.sleep(0)
        assert hub.calls_sent() == ["fast-0", "slow-0", "slow-1"] and next(iter(d.queue)).call_id == "slow-2"
        hub.up, node.hello["queue_limit"] = False, 100  # the node's socket refuses: the call stays first
        d.kick()
        await asyncio.sleep(0)
        assert len(hub.sent) == 3 and next(iter(d.queue)).call_id == "slow-2" and len(d.queue) == 9_998
        hub.up = True
        d.kick()
        await asyncio.sleep(0)
        assert hub.calls_sent()[3:] == [f"slow-{n}" for n in range(2, 100)]

    asyncio.run(scenario())


def test_a_call_whose_creation_was_not_stored_is_withdrawn_without_a_trace() -> None:
    """Its caller got an error, not an id: no state of it is written or counted, the node is asked to cancel
    it, and the node's answer is ignored."""

    async def scenario() -> None:
        d, hub, store, metrics = make_dispatcher()
        node = hub.nodes["n1"]
        node.ready.add("f@1")
        node.hello["queue_limit"] = 1
        d.enqueue(Pending("sent", "f", 1, None, 1.0))
        d.enqueue(Pending("waiting", "f", 1, None, 1.0))  # no room on the node: it waits in the queue
        await asyncio.sleep(0)
        assert hub.calls_sent() == ["sent"] and len(d.queue) == 1
        d.withdraw("sent")
        d.withdraw("waiting")
        assert hub.sent[-1] == (Msg.CANCEL, "sent") and not node.inflight and not d.calls
        d.on_result(node, {"call_id": "sent", "status": "CANCELLED"})  # the node's answer to the cancel
        d.enqueue(Pending("next", "f", 1, None, 1.0))
        await asyncio.sleep(0.05)  # past the delayed DISPATCHED write
        assert hub.calls_sent() == ["sent", "next"]  # the withdrawn queued call was skipped
        assert [w for w in store.writes if w[0] != "next"] == []
        assert not metrics.finished.values and not metrics.duration.series

    asyncio.run(scenario())


def test_a_result_whose_start_time_is_not_a_number_is_stored_without_it() -> None:
    """Stored, a ``t_RUNNING`` that is not a number made the call unreadable (every GET of it a 500)."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        node = hub.nodes["n1"]
        node.ready.add("f@1")
        # 10**400 made math.isfinite raise (OverflowError) after the call had left its node: held for ever.
        starts = ("soon", float("nan"), True, 10**400, -5, 1_700_000_000.5)
        for n, started in enumerate(starts):
            d.enqueue(Pending(f"c{n}", "f", 1, None, 1.0))
            await asyncio.sleep(0)
            d.on_result(node, {"call_id": f"c{n}", "status": "DONE", "result": n, "started_at": started})
        await asyncio.sleep(0)
        assert [store.fields[f"c{n}"].get("t_RUNNING") for n in range(len(starts))] == [None] * 5 + [1_700_000_000.5]
        assert all(store.fields[f"c{n}"]["result"] == n for n in range(len(starts)))
        assert d.calls == {}

    asyncio.run(scenario())


def test_a_node_whose_socket_refuses_is_placed_around_in_the_same_round() -> None:
    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        hub.refusing.add("n1")  # its agent died: the controller has not noticed yet
        for n in range(3):
            d.enqueue(Pending(f"c{n}", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.placed == {"c0": ["n2"], "c1": ["n2"]} and len(d.queue) == 1  # n2 holds 2 (its queue_limit)
        d.on_node_lost(hub.nodes["n1"])  # and a node's loss places what waits (no other event may come)
        hub.nodes["n1"].lost = True
        d.on_result(hub.nodes["n2"], {"call_id": "c0", "status": "DONE"})
        await asyncio.sleep(0)
        assert hub.placed["c2"] == ["n2"]

    asyncio.run(scenario())


def test_a_cancel_asked_while_on_a_node_holds_when_the_node_gives_the_call_back() -> None:
    """The API answered 202 CANCELLING: a call its node rejects, loses or forgets ends CANCELLED, not placed
    again (it used to run to DONE elsewhere)."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2", "n3"))
        ready(hub)
        for node in hub.nodes.values():
            node.hello["queue_limit"] = 1  # one call each: three calls, three nodes
        calls = ("rejected", "lost", "forgotten")
        for call_id in calls:
            d.enqueue(Pending(call_id, "f", 1, None, 1.0))
        await asyncio.sleep(0)
        for call_id in calls:
            assert d.cancel(call_id)
        assert [c for m, c in hub.sent if m == Msg.CANCEL] == list(calls)
        holder = {c: hub.nodes[hub.placed[c][0]] for c in calls}
        assert len({n.node_id for n in holder.values()}) == 3
        d.on_result(holder["rejected"], {"call_id": "rejected", "status": "REJECTED"})
        d.on_node_lost(holder["lost"])
        d.on_node_hello(holder["forgotten"], set())  # it restarted: it holds nothing now
        await asyncio.sleep(0.01)
        assert [status_of(store, c) for c in calls] == ["CANCELLED"] * 3, store.writes
        assert all(len(hub.placed[c]) == 1 for c in calls) and not d.calls
        assert not any(n.inflight for n in hub.nodes.values())

    asyncio.run(scenario())


def test_a_hello_that_does_not_list_a_call_places_it_again_without_failing_it() -> None:
    """A HELLO may be written before a CALL on its way arrives: the call is sent again (the node ignores a
    CALL it holds), never failed for it, however many HELLOs come."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        ready(hub)
        d.enqueue(Pending("c", "f", 1, None, 1.0))
        for _ in range(10):
            await asyncio.sleep(0)
            d.on_node_hello(hub.nodes["n1"], set())
        await asyncio.sleep(0)
        assert len(hub.placed["c"]) == 11 and "c" in d.calls
        assert all(status in ("DISPATCHED", None) for _, status in store.writes)  # nothing but its dispatch
        d.on_result(hub.nodes["n1"], {"call_id": "c", "status": "DONE", "result": 1})
        await asyncio.sleep(0.01)
        assert status_of(store, "c") == "DONE"

    asyncio.run(scenario())


def test_after_a_restart_a_node_keeps_the_recovered_calls_it_holds() -> None:
    """Recovered calls that a node says it holds (running or queued there) are not placed again: it answers."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        store.active = [stored_call(f"c{n}", params=n, node="n1") for n in range(3)]
        hub.nodes["n1"].lost = hub.nodes["n2"].lost = True  # no node has said HELLO to this controller yet
        assert await d.recover() == 3 and d.calls["c0"].record["id"] == "c0"
        ready(hub)
        hub.nodes["n1"].lost = False
        d.on_node_hello(hub.nodes["n1"], {"c0", "c1"})  # c2 was lost with the old controller's messages
        hub.nodes["n2"].lost = False
        d.kick()
        await asyncio.sleep(0)
        assert hub.placed == {"c2": [hub.placed["c2"][0]]}  # only the call no node holds runs again
        d.on_result(hub.nodes["n1"], {"call_id": "c0", "status": "DONE", "result": 0})
        await asyncio.sleep(0)
        assert status_of(store, "c0") == "DONE"

    asyncio.run(scenario())


def test_a_call_a_node_takes_over_is_checked_against_that_nodes_numbering_not_anothers() -> None:
    """x went to n2 as n2's CALL number 500; n2 was lost, and n1 said it held x. Kept with number 500, a STATUS
    from n1 (which had seen its own 3 messages) could never show x dropped there: x stayed DISPATCHED."""

    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        hub.nodes["n1"].lost = True
        hub.nodes["n2"].call_seq = 499
        d.enqueue(Pending("x", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.placed == {"x": ["n2"]} and d.calls["x"].seq == 500
        hub.nodes["n2"].lost = True
        d.on_node_lost(hub.nodes["n2"])
        assert d.calls["x"].node_id is None  # waiting: no node is alive
        hub.nodes["n1"].lost = False
        d.on_node_hello(hub.nodes["n1"], {"x"})
        assert d.calls["x"].node_id == "n1" and d.calls["x"].seq == 0
        d.on_node_status(hub.nodes["n1"], 3, set())  # n1 no longer holds it
        await asyncio.sleep(0)
        assert hub.placed == {"x": ["n2", "n1"]}  # found dropped, and placed again

    asyncio.run(scenario())


def test_recovered_calls_are_kept_for_the_node_the_store_records_until_it_says_hello() -> None:
    """After a restart, the first node to say HELLO (n2) was given the calls n1 was running: they ran twice."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        store.active = [stored_call("c0", node="n1"), stored_call("c1", node="n1", status="RUNNING"),
                        stored_call("c2", node="n2"), stored_call("c3", status="QUEUED", attempts=0)]
        hub.nodes["n1"].lost = hub.nodes["n2"].lost = True  # no node has said HELLO to this controller yet
        assert await d.recover() == 4
        assert d.reserved == {"n1": {"c0", "c1"}, "n2": {"c2"}} and len(d.queue) == 1
        ready(hub)
        hub.nodes["n2"].lost = False
        d.on_node_hello(hub.nodes["n2"], set())  # n2 lost c2 (it restarted)
        await asyncio.sleep(0)
        assert hub.placed == {"c3": ["n2"], "c2": ["n2"]}  # n1's calls wait for n1
        d.on_result_before_hello("n1", {"call_id": "c0", "status": "DONE", "result": 0})  # held while we were away
        d.on_result_before_hello("n2", {"call_id": "c1", "status": "DONE", "result": 0})  # not n2's: ignored
        assert status_of(store, "c0") == "DONE" and "c1" in d.calls
        hub.nodes["n1"].lost = False
        d.on_node_hello(hub.nodes["n1"], {"c1"})
        await asyncio.sleep(0)
        assert d.calls["c1"].node_id == "n1" and d.reserved == {} and "c1" not in hub.placed
        d.on_result(hub.nodes["n1"], {"call_id": "c1", "status": "DONE", "result": 1})
        assert status_of(store, "c1") == "DONE"

    asyncio.run(scenario())


def test_recovered_calls_kept_for_a_node_that_does_not_come_back_are_placed_after_the_grace() -> None:
    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        store.active = [stored_call("c0", node="n9"), stored_call("c1", node="n9")]  # n9 is gone for good
        hub.nodes["n1"].lost = hub.nodes["n2"].lost = True
        assert await d.recover() == 2 and d.reserved == {"n9": {"c0", "c1"}}
        assert d.cancel("c1")  # n9 may be running it: it is told, in case it is there
        assert status_of(store, "c1") == "CANCELLED" and hub.sent == [(Msg.CANCEL, "c1")]
        assert d.reserved == {"n9": {"c0"}}
        ready(hub)
        hub.nodes["n1"].lost = False
        d.on_node_hello(hub.nodes["n1"], set())
        await asyncio.sleep(0)
        assert hub.placed == {}
        d.release_reserved()  # what the timer recover() set does, liveness + 1 heartbeats on
        await asyncio.sleep(0)
        assert hub.placed == {"c0": ["n1"]} and d.reserved == {}

    asyncio.run(scenario())


def test_a_recovered_call_a_node_took_over_is_never_placed_again_after_it_ends() -> None:
    """The node's HELLO holds c1 and c2 while c0, ahead of them in the queue, waits for room. c1's queue entry
    outlived its adoption: once c1 ended it was placed again (run twice, its DONE overwritten by DISPATCHED,
    and the node's slot kept for it for ever)."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        store.active = [stored_call("c0"), stored_call("c1", created=2.0), stored_call("c2", created=3.0)]
        hub.nodes["n1"].lost = True
        await d.recover()
        ready(hub)
        n1 = hub.nodes["n1"]
        n1.lost = False
        d.on_node_hello(n1, {"c1", "c2"})  # it holds as many calls as it takes: c0 waits
        await asyncio.sleep(0)
        assert hub.placed == {} and len(d.queue) == 1
        for call_id in ("c1", "c0", "c2"):
            d.on_result(n1, {"call_id": call_id, "status": "DONE", "result": call_id})
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # past the DISPATCHED write
        assert list(hub.placed) == ["c0"] and len(hub.placed["c0"]) == 1
        assert {c: status_of(store, c) for c in ("c0", "c1", "c2")} == dict.fromkeys(("c0", "c1", "c2"), "DONE")
        assert n1.inflight == set() and n1.warm_busy == {} and d.calls == {} and len(d.queue) == 0

    asyncio.run(scenario())


def test_calls_of_a_function_every_node_failed_to_prepare_fail_instead_of_waiting() -> None:
    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        d.enqueue(Pending("c", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        hub.nodes["n1"].failed["f@1"] = "dependency install failed"
        d.on_function_state(hub.nodes["n1"], "f@1", "failed")
        await asyncio.sleep(0)
        assert "c" in d.calls  # one node may still prepare it
        hub.nodes["n2"].failed["f@1"] = "dependency install failed"
        d.on_function_state(hub.nodes["n2"], "f@1", "failed")
        await asyncio.sleep(0.01)
        assert status_of(store, "c") == "FAILED"
        assert "dependency install failed" in store.fields["c"]["error"]["message"]

    asyncio.run(scenario())


def test_an_outcome_the_store_did_not_take_is_written_again_and_answered_once_stored() -> None:
    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        ready(hub)
        pending = Pending("c", "f", 1, None, 1.0)
        d.enqueue(pending)
        await asyncio.sleep(0)
        waiter = d.wait(pending)
        store.failing = 2
        d.on_result(hub.nodes["n1"], {"call_id": "c", "status": "DONE", "result": 7})
        await asyncio.sleep(0.1)
        assert not waiter.done() and store.writes == []  # not stored yet: the sync caller waits
        outcome = await asyncio.wait_for(waiter, 5)
        assert outcome["status"] == "DONE" and outcome["result"] == 7 and store.writes == [("c", "DONE")]

    asyncio.run(scenario())


def test_a_call_a_live_node_no_longer_holds_is_placed_again_then_failed_past_max_attempts() -> None:
    """A connection reset loses what was in flight to a node that stays alive: its STATUS (the last CALL
    sequence number it received, the calls it holds) shows the call missing, and the call runs again."""

    async def scenario() -> None:
        d, hub, store, metrics = make_dispatcher()
        ready(hub)
        node = hub.nodes["n1"]
        d.enqueue(Pending("a", "f", 1, None, 1.0))
        d.enqueue(Pending("b", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert (d.calls["a"].seq, d.calls["b"].seq, node.call_seq) == (1, 2, 2)
        d.on_node_status(node, 2, {"b"})  # a was dropped; b is held
        await asyncio.sleep(0)
        assert hub.placed["a"] == ["n1", "n1"] and hub.placed["b"] == ["n1"]
        assert d.calls["a"].seq == 3 and d.calls["a"].attempts == 2
        assert metrics.requeued.get(reason="node_dropped") == 1
        d.on_node_status(node, 2, {"b"})  # sent after that STATUS was written: not missing
        await asyncio.sleep(0)
        assert hub.placed["a"] == ["n1", "n1"]
        for _ in range(2):
            d.on_node_status(node, node.call_seq, {"b"})
            await asyncio.sleep(0)
        assert status_of(store, "a") == "FAILED" and "a" not in d.calls and len(hub.placed["a"]) == 3
        assert store.fields["a"]["error"]["type"] == "NodeDropped"
        assert "after 3 attempt(s)" in store.fields["a"]["error"]["message"]
        assert node.inflight == {"b"}
        d.on_result(node, {"call_id": "b", "status": "DONE", "result": 1})
        await asyncio.sleep(0.01)
        assert status_of(store, "b") == "DONE"

    asyncio.run(scenario())


def test_a_status_keeps_the_recovered_calls_its_node_holds() -> None:
    """Calls adopted from a HELLO after a controller restart were never sent by this controller (sequence 0):
    a STATUS that lists them keeps them; one that does not places them again."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        store.active = [stored_call(c) for c in ("kept", "gone")]
        node = hub.nodes["n1"]
        node.lost = True
        await d.recover()
        ready(hub)
        node.lost = False
        d.on_node_hello(node, {"kept", "gone"})
        await asyncio.sleep(0)
        assert not hub.placed and node.inflight == {"kept", "gone"}
        d.on_node_status(node, 0, {"kept"})
        await asyncio.sleep(0)
        assert hub.placed == {"gone": ["n1"]} and d.calls["kept"].node_id == "n1"

    asyncio.run(scenario())


def test_deleting_a_function_cancels_its_waiting_calls_and_nodes_forget_it_once_none_is_left() -> None:
    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        ready(hub)
        calls = [Pending(f"c{n}", "f", 1, n, 5.0) for n in range(4)]
        for pending in calls:
            d.enqueue(pending)
        await asyncio.sleep(0)
        assert sorted(hub.placed) == ["c0", "c1"]  # the node takes two; c2 and c3 wait here
        assert d.function_deleted("f", 1) == 2
        assert [status_of(store, c) for c in ("c2", "c3")] == ["CANCELLED", "CANCELLED"]
        assert store.fields["c2"]["error"]["type"] == "FunctionDeleted" and len(d.queue) == 0
        assert hub.broadcasts == []  # c0 and c1 still run on the node
        d.on_result(hub.nodes["n1"], {"call_id": "c0", "status": "DONE", "result": 0})
        assert hub.broadcasts == []
        d.on_result(hub.nodes["n1"], {"call_id": "c1", "status": "DONE", "result": 1})
        assert hub.broadcasts == [(Msg.FUNCTION_GONE, {"name": "f", "up_to": 1})]
        await asyncio.sleep(0.05)
        assert sorted(hub.placed) == ["c0", "c1"]

    asyncio.run(scenario())


def test_a_call_of_a_deleted_function_that_comes_to_wait_again_ends_cancelled() -> None:
    """c0 ran on n1 as f was deleted; n1 gave it back (it drained) and no node would ever have f@1 again: it waited
    for ever. And c1, accepted while the deletion was on its way, was queued after it: the same."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        ready(hub)
        d.enqueue(Pending("c0", "f", 1, 0, 5.0))
        await asyncio.sleep(0)
        assert d.function_deleted("f", 1) == 0  # c0 is on the node: it runs to its end there
        d.on_result(hub.nodes["n1"], {"call_id": "c0", "status": "REJECTED",
                                      "error": {"type": "Draining", "message": "node is draining"}})
        d.enqueue(Pending("c1", "f", 1, 1, 5.0))
        d.enqueue(Pending("c2", "f", 2, 2, 5.0))  # a version made after the deletion waits as calls do
        await asyncio.sleep(0)
        assert [status_of(store, c) for c in ("c0", "c1")] == ["CANCELLED", "CANCELLED"]
        assert store.fields["c1"]["error"]["type"] == "FunctionDeleted"
        assert list(d.calls) == ["c2"] and hub.placed == {"c0": ["n1"]}  # no node has f@2 yet
        hub.nodes["n1"].ready.add("f@2")
        d.kick()
        await asyncio.sleep(0)
        assert hub.placed == {"c0": ["n1"], "c2": ["n1"]}

    asyncio.run(scenario())


def test_recovered_calls_of_a_deleted_function_end_cancelled() -> None:
    async def scenario() -> None:
        d, _, store, _ = make_dispatcher(("n1",))
        store.active = [stored_call("c0"), stored_call("c1", version=2)]
        store.deleted = {("f", 2)}
        assert await d.recover() == 1
        assert status_of(store, "c1") == "CANCELLED" and list(d.calls) == ["c0"] and len(d.queue) == 1

    asyncio.run(scenario())


def test_an_old_version_a_node_retired_is_sent_back_to_it_while_calls_of_it_wait() -> None:
    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1",))
        n1 = hub.nodes["n1"]
        d.on_function_state(n1, "f@1", "retired")  # no call of it: nothing to do
        assert hub.resent == []
        d.enqueue(Pending("c1", "f", 1, None, 5.0))  # not ready anywhere: it waits
        d.on_function_state(n1, "f@1", "retired")
        assert hub.resent == [("n1", "f@1")]

    asyncio.run(scenario())


def test_functions_with_calls_waiting_take_turns_for_the_slots_that_free() -> None:
    """A function with a standing backlog took every slot a result freed (lanes were walked in order): another
    function's calls waited for the whole backlog."""

    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1",))
        d.config = dataclasses.replace(d.config, node_oversubscribe=1)
        ready(hub, "a@1")
        ready(hub, "b@1")
        for n in range(20):
            d.enqueue(Pending(f"a{n}", "a", 1, None, 1.0))
        for n in range(3):
            d.enqueue(Pending(f"b{n}", "b", 1, None, 1.0))
        await asyncio.sleep(0)
        node = hub.nodes["n1"]
        order = list(hub.placed)
        for _ in range(8):  # a result frees one slot at a time
            finished = next(call_id for call_id in order if call_id in node.inflight)
            d.on_result(node, {"call_id": finished, "status": "DONE", "result": None})
            await asyncio.sleep(0)
            order = list(hub.placed)
        assert [c for c in order if c.startswith("b")] == ["b0", "b1", "b2"]  # not after a0..a19
        assert order.index("b2") < 8

    asyncio.run(scenario())


def test_round_robin_alternates_each_functions_calls_over_the_nodes() -> None:
    """One turn counter for all functions: with calls of a and b alternating, a's went to one node, b's to the
    other."""
    from controller.placement import RoundRobin

    nodes = [NodeState(n, {"v": 1, "node_id": n}, capacity=4) for n in ("n1", "n2")]
    rr = RoundRobin()
    picks: dict[str, list[str]] = {"a@1": [], "b@1": []}
    for _ in range(4):
        for key in picks:
            chosen = rr.choose(key, nodes)
            assert chosen is not None
            picks[key].append(chosen.node_id)
    assert picks == {"a@1": ["n1", "n2", "n1", "n2"], "b@1": ["n1", "n2", "n1", "n2"]}
    assert rr.choose("a@1", nodes[:1]) is nodes[0]  # the node whose turn it is has no room: the next one


def test_a_result_from_a_node_taken_for_lost_is_the_calls_outcome() -> None:
    """n1 was only slow to be heard (its heartbeats sat unread): its calls were placed again, and the result it
    sent for one of them was ignored as late; the call ran twice."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        hub.nodes["n2"].lost = True
        d.enqueue(Pending("x", "f", 1, None, 1.0))
        d.enqueue(Pending("y", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.placed == {"x": ["n1"], "y": ["n1"]}
        hub.nodes["n1"].lost = True
        d.on_node_lost(hub.nodes["n1"])
        hub.nodes["n2"].lost = False
        d.kick()
        await asyncio.sleep(0)
        assert hub.placed == {"x": ["n1", "n2"], "y": ["n1", "n2"]}
        hub.nodes["n1"].lost = False
        d.on_result(hub.nodes["n1"], {"call_id": "x", "status": "DONE", "result": 1})
        await asyncio.sleep(0)
        assert status_of(store, "x") == "DONE" and store.fields["x"]["node"] == "n1"
        assert (Msg.CANCEL, "x") in hub.sent and "x" not in hub.nodes["n2"].inflight  # the second run is stopped
        d.on_result(hub.nodes["n2"], {"call_id": "x", "status": "CANCELLED"})  # its answer: ignored
        assert status_of(store, "x") == "DONE"
        d.on_result(hub.nodes["n1"], {"call_id": "y", "status": REJECTED})  # never ran there: stays on n2
        assert d.calls["y"].node_id == "n2"

    asyncio.run(scenario())


def test_recovered_waiting_calls_wait_for_every_node_that_was_up_to_say_hello() -> None:
    """A call the store records as waiting may be running: its DISPATCHED write had not landed when the
    controller died. Placed at the first HELLO, it ran on n2 while n1, which said HELLO next, was running it."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        d.config = dataclasses.replace(d.config, heartbeat=60.0)  # (no release by the grace timer meanwhile)
        store.nodes = {"n1": {"state": "ready"}, "n2": {"state": "ready"}, "n3": {"state": "lost"}}
        store.active = [stored_call("c0", status="QUEUED", attempts=0), stored_call("c1", status="QUEUED")]
        hub.nodes = {}  # no node has said HELLO to this controller yet
        assert await d.recover() == 2 and len(d.queue) == 0
        hub.nodes = FakeHub(("n1", "n2")).nodes
        ready(hub)
        d.on_node_hello(hub.nodes["n2"], set())
        await asyncio.sleep(0)
        assert hub.placed == {}  # n1 may hold them
        d.on_result_before_hello("n1", {"call_id": "c1", "status": "DONE", "result": 1})  # held while we were away
        assert status_of(store, "c1") == "DONE"
        d.on_node_hello(hub.nodes["n1"], {"c0"})
        await asyncio.sleep(0)
        assert hub.placed == {} and d.calls["c0"].node_id == "n1" and d.reserved == {} and not d.awaiting_hello

    asyncio.run(scenario())


def test_recovered_waiting_calls_are_placed_once_every_node_said_hello() -> None:
    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        store.nodes = {"n1": {"state": "ready"}}
        store.active = [stored_call("c0", status="QUEUED", attempts=0)]
        hub.nodes = {}
        assert await d.recover() == 1
        hub.nodes = FakeHub(("n1",)).nodes
        ready(hub)
        d.on_node_hello(hub.nodes["n1"], set())
        await asyncio.sleep(0)
        assert hub.placed == {"c0": ["n1"]}

    asyncio.run(scenario())


def test_a_stopping_dispatcher_places_nothing_and_writes_what_waits() -> None:
    """At stop, the DISPATCHED writes that waited were dropped (a restart placed those calls on another node as
    well), and outcomes whose write was being retried were never stored (their calls ran again)."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        ready(hub)
        d.enqueue(Pending("x", "f", 1, None, 1.0))
        d.enqueue(Pending("y", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        store.failing = 1
        d.on_result(hub.nodes["n1"], {"call_id": "y", "status": "DONE", "result": 1})  # its first write fails
        assert d.unstored == {"y"}
        await d.stop(5.0)
        assert ("x", "DISPATCHED") in store.writes and status_of(store, "y") == "DONE" and not d.unstored
        d.enqueue(Pending("z", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert "z" not in hub.placed

    asyncio.run(scenario())


def test_a_deleted_functions_calls_are_counted_not_searched() -> None:
    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1",))
        ready(hub)
        for n in range(3):
            d.enqueue(Pending(f"x{n}", "f", 1, None, 1.0))
        d.enqueue(Pending("new", "f", 2, None, 1.0))
        await asyncio.sleep(0)
        assert d.has_calls("f", 1) and d.has_calls("f", 2) and not d.has_calls("g", 9)
        d.forget_when_idle("f", 1)
        for n in range(2):
            d.on_result(hub.nodes["n1"], {"call_id": f"x{n}", "status": "DONE", "result": None})
        assert d.gone == {"f": 1}
        await asyncio.sleep(0)  # x2 placed (the node had room for two calls of f@1)
        d.on_result(hub.nodes["n1"], {"call_id": "x2", "status": "DONE", "result": None})
        assert d.gone == {} and d.has_calls("f", 2) and not d.has_calls("f", 1)

    asyncio.run(scenario())


def test_recovered_calls_are_kept_as_long_as_the_slowest_node_may_take_to_say_hello() -> None:
    """A node that heartbeats every 10 s says HELLO up to 10 s after a restart (its next heartbeat draws our
    WELCOME{hello}): kept only for our own 4 s, its calls were placed elsewhere while it ran them."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1",))
        store.nodes = {"n1": {"state": "ready", "peer_silence": 30.0}, "gone": {"state": "lost", "peer_silence": 99.0},
                       "odd": {"state": "ready", "peer_silence": "soon"}}
        store.active = [stored_call("c0", status="QUEUED", attempts=0)]
        hub.nodes = {}
        await d.recover()
        assert d.grace == 30.0 + d.config.heartbeat and d.awaiting_hello == {"n1", "odd"}

    asyncio.run(scenario())


def lost_on_last_attempt(nodes: tuple[str, ...] = ("n1", "n2"), timeout: float = 5.0,
                         **config: Any) -> tuple[Dispatcher, FakeHub, FakeStore]:
    """A dispatcher whose calls get one attempt, with call "x" (``timeout`` s) queued for n1."""
    d, hub, store, _ = make_dispatcher(nodes)
    d.config = dataclasses.replace(d.config, max_attempts=1, **config)
    ready(hub)
    for other in nodes[1:]:
        hub.nodes[other].lost = True  # (so that x goes to n1)
    d.enqueue(Pending("x", "f", 1, None, timeout))
    return d, hub, store


async def lose_n1(d: Dispatcher, hub: FakeHub) -> None:
    await asyncio.sleep(0)
    assert hub.placed == {"x": ["n1"]}
    for node in hub.nodes.values():
        node.lost = node.node_id == "n1"
    d.on_node_lost(hub.nodes["n1"])
    await asyncio.sleep(0.01)


def test_a_call_lost_on_its_last_attempt_waits_for_its_node_and_takes_its_result() -> None:
    """A node taken for lost may only have been slow to be heard: the call it ran on its last attempt is not
    failed at once (its result, arriving later, used to be ignored as late), and is not placed again."""

    async def scenario() -> None:
        d, hub, store = lost_on_last_attempt()
        await lose_n1(d, hub)
        assert "x" in d.calls and d.calls["x"].awaiting == "n1" and hub.placed == {"x": ["n1"]}
        assert "FAILED" not in [s for _, s in store.writes] and d.snapshot()["awaiting_lost_nodes"] == 1
        d.on_result(hub.nodes["n1"], {"call_id": "x", "status": "DONE", "result": 42})
        await asyncio.sleep(0.01)
        assert status_of(store, "x") == "DONE" and store.fields["x"]["result"] == 42
        assert "x" not in d.calls and d.awaiting == {} and d.calls == {}

    asyncio.run(scenario())


def test_a_call_waiting_for_its_lost_node_is_settled_by_the_nodes_hello() -> None:
    """The node back: a HELLO that lists the call keeps it there (its result then ends it); a HELLO without it
    fails it NodeLost at once (a result would have come before the HELLO)."""

    async def scenario() -> None:
        d, hub, store = lost_on_last_attempt()
        d.enqueue(Pending("y", "f", 1, None, 5.0))
        await asyncio.sleep(0)
        assert hub.placed == {"x": ["n1"], "y": ["n1"]}
        for node in hub.nodes.values():
            node.lost = node.node_id == "n1"
        d.on_node_lost(hub.nodes["n1"])
        await asyncio.sleep(0.01)
        assert {d.calls["x"].awaiting, d.calls["y"].awaiting} == {"n1"}
        hub.nodes["n1"].lost = False
        d.on_node_hello(hub.nodes["n1"], {"y"})
        await asyncio.sleep(0.01)
        assert status_of(store, "x") == "FAILED" and store.fields["x"]["error"]["type"] == "NodeLost"
        assert "came back without the call" in store.fields["x"]["error"]["message"]
        assert d.calls["y"].node_id == "n1" and not d.calls["y"].awaiting and d.calls["y"].await_timer is None
        assert hub.nodes["n1"].inflight == {"y"} and hub.placed["y"] == ["n1"]
        d.on_result(hub.nodes["n1"], {"call_id": "y", "status": "DONE", "result": 1})
        await asyncio.sleep(0.01)
        assert status_of(store, "y") == "DONE" and d.awaiting == {} and d.calls == {}

    asyncio.run(scenario())


def test_a_call_waiting_for_a_node_that_never_comes_back_fails_node_lost() -> None:
    """Once its run could no longer be going on there (its timeout) and the node had one more liveness window
    to be heard, the call fails with the reason."""

    async def scenario() -> None:
        d, hub, store = lost_on_last_attempt(timeout=0.05, heartbeat=0.05, liveness=1)
        await lose_n1(d, hub)
        assert d.calls["x"].awaiting == "n1"
        for _ in range(100):
            if "x" not in d.calls:
                break
            await asyncio.sleep(0.02)
        assert status_of(store, "x") == "FAILED" and store.fields["x"]["error"]["type"] == "NodeLost"
        assert "not heard from within" in store.fields["x"]["error"]["message"]
        assert "after 1 attempt(s)" in store.fields["x"]["error"]["message"] and d.awaiting == {}
        d.on_result(hub.nodes["n1"], {"call_id": "x", "status": "DONE", "result": 1})  # too late: ignored
        await asyncio.sleep(0.01)
        assert status_of(store, "x") == "FAILED"

    asyncio.run(scenario())


def test_a_call_waiting_for_its_lost_node_can_be_cancelled_or_given_back() -> None:
    """A cancel ends it at once and is sent to the node; a REJECTED from the node (it never ran there) places
    it again, on a node that is up."""

    async def scenario() -> None:
        d, hub, store = lost_on_last_attempt()
        d.enqueue(Pending("y", "f", 1, None, 5.0))
        await asyncio.sleep(0)
        for node in hub.nodes.values():
            node.lost = node.node_id == "n1"
        d.on_node_lost(hub.nodes["n1"])
        await asyncio.sleep(0.01)
        assert d.cancel("x")
        await asyncio.sleep(0.01)
        assert status_of(store, "x") == "CANCELLED" and (Msg.CANCEL, "x") in hub.sent
        assert "out of reach" in store.fields["x"]["error"]["message"]
        d.on_result(hub.nodes["n1"], {"call_id": "y", "status": REJECTED})
        await asyncio.sleep(0.01)
        assert hub.placed["y"] == ["n1", "n2"] and d.calls["y"].node_id == "n2" and not d.calls["y"].awaiting
        assert d.calls["y"].attempts == 1 and d.awaiting == {}

    asyncio.run(scenario())


def test_a_cancel_lost_on_the_way_is_sent_again_while_the_node_still_holds_the_call() -> None:
    """A CANCEL is not sequenced: one dropped by a reset (or refused while the node reconnected) left the call to
    run to its end, DONE. A cancelled call its node lists, and a call it lists that ended here (cancelled while it
    was away: its result would be ignored), are cancelled there again at each STATUS and HELLO."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        ready(hub)
        node = hub.nodes["n1"]
        d.enqueue(Pending("a", "f", 1, None, 1.0))
        d.enqueue(Pending("b", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        hub.up = False  # the CANCEL is refused (the node reconnects)
        assert d.cancel("a")
        hub.up = True
        assert not [c for m, c in hub.sent if m == Msg.CANCEL]
        d.on_node_status(node, node.call_seq, {"a", "b", "ended-here"})
        assert sorted(c for m, c in hub.sent if m == Msg.CANCEL) == ["a", "ended-here"]  # b is wanted
        d.on_node_hello(node, {"a", "b", "ended-here"})
        assert sorted(c for m, c in hub.sent if m == Msg.CANCEL) == ["a", "a", "ended-here", "ended-here"]
        d.on_result(node, {"call_id": "a", "status": "CANCELLED"})
        await asyncio.sleep(0.01)
        assert status_of(store, "a") == "CANCELLED"

    asyncio.run(scenario())


def test_a_call_cancelled_on_its_last_attempt_ends_cancelled_when_its_node_goes() -> None:
    """On earlier attempts a cancelled call its node lost or dropped ended CANCELLED; on its last it ended FAILED
    NodeLost/NodeDropped."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        d.enqueue(Pending("lost", "f", 1, None, 1.0, attempts=2))
        d.enqueue(Pending("dropped", "f", 1, None, 1.0, attempts=2))
        await asyncio.sleep(0)
        assert d.calls["lost"].attempts == d.calls["dropped"].attempts == 3  # their last
        for call_id in ("lost", "dropped"):
            assert d.cancel(call_id)
        on = {c: hub.nodes[hub.placed[c][0]] for c in ("lost", "dropped")}
        if on["lost"] is on["dropped"]:
            d.on_node_status(on["dropped"], on["dropped"].call_seq, {"lost"})
            d.on_node_lost(on["lost"])
        else:
            d.on_node_lost(on["lost"])
            d.on_node_status(on["dropped"], on["dropped"].call_seq, set())
        await asyncio.sleep(0.01)
        assert [status_of(store, c) for c in ("lost", "dropped")] == ["CANCELLED", "CANCELLED"], store.writes
        assert not d.calls

    asyncio.run(scenario())


def test_a_call_given_back_mid_run_keeps_its_attempt_and_fails_past_the_last() -> None:
    """A node whose drain timed out gives its running calls back REJECTED: those had started, so the attempt
    counts (it was undone as for a call that never ran, and a call cut short by each rolling drain ran again and
    again without end)."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher()
        ready(hub)
        node = hub.nodes["n1"]
        d.enqueue(Pending("c", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        d.on_result(node, {"call_id": "c", "status": REJECTED})  # never ran there: not an attempt
        await asyncio.sleep(0)
        assert d.calls["c"].attempts == 1 and hub.placed["c"] == ["n1", "n1"]
        for attempt in (1, 2):
            d.on_result(node, {"call_id": "c", "status": REJECTED, "ran": True})
            await asyncio.sleep(0)
            assert d.calls["c"].attempts == attempt + 1
        d.on_result(node, {"call_id": "c", "status": REJECTED, "ran": True})  # on its third and last attempt
        await asyncio.sleep(0.01)
        assert status_of(store, "c") == "FAILED" and store.fields["c"]["error"]["type"] == "NodeStopped"
        assert "after 3 attempt(s)" in store.fields["c"]["error"]["message"] and len(hub.placed["c"]) == 4

    asyncio.run(scenario())


def test_a_call_given_back_as_unavailable_there_is_not_placed_on_that_node_again() -> None:
    """A node gives back a call of a function it failed (a failure that may pass): its FSTATE failed, lost on the
    way (a reset), left it ready here, and the call went back to it at once, over and over."""

    async def scenario() -> None:
        d, hub, store, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        hub.nodes["n2"].inflight.update({"x1", "x2", "x3"})  # n2 the busier: the call goes to n1 first
        d.enqueue(Pending("c", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.placed["c"] == ["n1"]
        unavailable = {"type": "FunctionUnavailable", "message": "pip failed (preparing it again in 15 s)"}
        d.on_result(hub.nodes["n1"], {"call_id": "c", "status": REJECTED, "error": unavailable})
        await asyncio.sleep(0)
        assert hub.placed["c"] == ["n1", "n2"] and "f@1" not in hub.nodes["n1"].ready
        assert "pip failed" in hub.nodes["n1"].failed["f@1"]
        d.on_result(hub.nodes["n2"], {"call_id": "c", "status": REJECTED, "error": unavailable})
        await asyncio.sleep(0.01)  # no node can run it now: it fails with their reason, not bouncing
        assert status_of(store, "c") == "FAILED" and store.fields["c"]["error"]["type"] == "FunctionUnavailable"
        assert len(hub.placed["c"]) == 2

    asyncio.run(scenario())


def test_a_cancelled_call_still_running_on_a_node_taken_for_lost_is_cancelled_there_when_it_is_back() -> None:
    """Placed again on n2 after n1 was taken for lost, then cancelled: the CANCEL went to n2 only, and n1, back
    and still running it, could end it DONE (its result is the outcome of a call a lost node ran)."""

    async def scenario() -> None:
        d, hub, _, _ = make_dispatcher(("n1", "n2"))
        ready(hub)
        d.enqueue(Pending("c", "f", 1, None, 1.0))
        await asyncio.sleep(0)
        first = hub.nodes[hub.placed["c"][0]]
        d.on_node_lost(first)
        first.lost = True
        await asyncio.sleep(0)
        assert len(hub.placed["c"]) == 2
        d.cancel("c")
        first.lost = False
        d.on_node_status(first, first.call_seq, {"c"})  # back, and still running it
        assert [c for m, c in hub.sent if m == Msg.CANCEL] == ["c", "c"]

    asyncio.run(scenario())
