"""The controller's waiting calls: one FIFO lane per function version."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from controller.callqueue import CallQueue
from controller.config import ControllerConfig
from controller.dispatcher import Dispatcher, Pending
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState


@dataclass
class Item:
    key: str
    n: int


def test_each_function_keeps_its_own_order_and_the_total_is_counted() -> None:
    q: CallQueue[Item] = CallQueue()
    assert not q and len(q) == 0 and q.head("a@1") is None
    for n in range(3):
        q.append(Item("a@1", n))
        q.append(Item("b@1", n))
    q.append(Item("a@1", -1), front=True)  # a call coming back (rejected, or its node lost) goes first
    assert len(q) == 7 and q.lanes() == ["a@1", "b@1"]
    assert [q.popleft("a@1").n for _ in range(4)] == [-1, 0, 1, 2]
    assert q.lanes() == ["b@1"] and q.head("a@1") is None and len(q) == 3
    assert [i.n for i in q] == [0, 1, 2]
    assert q.head("b@1") == Item("b@1", 0)


def test_placement_sends_what_nodes_take_and_a_blocked_backlog_keeps_its_order() -> None:
    """The dispatcher with a stand-in hub: a function no node can take does not hold up another's calls."""

    class FakeHub:
        def __init__(self) -> None:
            self.nodes = {"n1": NodeState("n1", {"v": 1, "node_id": "n1", "queue_limit": 2}, capacity=2)}
            self.sent: list[str] = []
            self.up = True

        def send(self, node_id: str, mtype: bytes, header: dict[str, Any]) -> bool:
            if self.up:
                self.sent.append(header["call_id"])
            return self.up

    class FakeStore:
        def update_call(self, *args: object) -> None:
            pass

    async def scenario() -> None:
        hub = FakeHub()
        d = Dispatcher(ControllerConfig(), FakeStore(), hub, ControllerMetrics())  # type: ignore[arg-type]
        node = hub.nodes["n1"]
        node.ready.add("fast@1")
        for n in range(10_000):
            d.enqueue(Pending(f"slow-{n}", "slow", 1, None, 1.0))
        d.enqueue(Pending("fast-0", "fast", 1, None, 1.0))
        await asyncio.sleep(0)
        assert hub.sent == ["fast-0"] and len(d.queue) == 10_000
        node.ready.add("slow@1")  # ready now, with room for 2 (its queue_limit)
        d.kick()
        await asyncio.sleep(0)
        assert hub.sent == ["fast-0", "slow-0", "slow-1"] and next(iter(d.queue)).call_id == "slow-2"
        hub.up, node.hello["queue_limit"] = False, 100  # the node's socket refuses: the call stays first
        d.kick()
        await asyncio.sleep(0)
        assert len(hub.sent) == 3 and next(iter(d.queue)).call_id == "slow-2" and len(d.queue) == 9_998
        hub.up = True
        d.kick()
        await asyncio.sleep(0)
        assert hub.sent[3:] == [f"slow-{n}" for n in range(2, 100)]

    asyncio.run(scenario())
