"""The dispatcher's placement and bookkeeping, with stand-ins for the hub and the store (no Redis, no nodes)."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher, Pending
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from shoal.protocol import Msg


class FakeHub:
    def __init__(self) -> None:
        self.nodes = {"n1": NodeState("n1", {"v": 1, "node_id": "n1", "queue_limit": 2}, capacity=2)}
        self.sent: list[tuple[bytes, str]] = []
        self.up = True

    def send(self, node_id: str, mtype: bytes, header: dict[str, Any]) -> bool:
        if self.up:
            self.sent.append((mtype, header["call_id"]))
        return self.up

    def calls_sent(self) -> list[str]:
        return [call_id for mtype, call_id in self.sent if mtype == Msg.CALL]


class FakeStore:
    def __init__(self) -> None:
        self.writes: list[tuple[str, Any]] = []
        self.fields: dict[str, dict[str, Any]] = {}

    def update_call(self, call_id: str, status: Any, fields: dict[str, Any]) -> asyncio.Future[None]:
        self.writes.append((call_id, status))
        self.fields.setdefault(call_id, {}).update(fields)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def make_dispatcher() -> tuple[Dispatcher, FakeHub, FakeStore, ControllerMetrics]:
    hub, store, metrics = FakeHub(), FakeStore(), ControllerMetrics()
    return Dispatcher(ControllerConfig(), store, hub, metrics), hub, store, metrics  # type: ignore[arg-type]


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
        for n, started in enumerate(("soon", float("nan"), True, 1_700_000_000.5)):
            d.enqueue(Pending(f"c{n}", "f", 1, None, 1.0))
            await asyncio.sleep(0)
            d.on_result(node, {"call_id": f"c{n}", "status": "DONE", "result": n, "started_at": started})
        await asyncio.sleep(0)
        assert [store.fields[f"c{n}"].get("t_RUNNING") for n in range(4)] == [None, None, None, 1_700_000_000.5]
        assert all(store.fields[f"c{n}"]["result"] == n for n in range(4))

    asyncio.run(scenario())
