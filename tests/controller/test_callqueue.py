"""The controller's waiting calls: one FIFO lane per function version."""

from __future__ import annotations

from dataclasses import dataclass

from controller.callqueue import CallQueue


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
