"""The controller's waiting calls: one FIFO lane per function version."""

from __future__ import annotations

from dataclasses import dataclass

from controller.callqueue import CallQueue


@dataclass
class Item:
    key: str
    n: int
    queued: bool = False


def test_each_function_keeps_its_own_order_and_the_total_is_counted() -> None:
    q: CallQueue[Item] = CallQueue()
    assert not q and len(q) == 0 and q.head("a@1") is None
    for n in range(3):
        q.append(Item("a@1", n))
        q.append(Item("b@1", n))
    q.append(Item("a@1", -1), front=True)  # a call coming back (rejected, or its node lost) goes first
    assert len(q) == 7 and q.lanes() == ["a@1", "b@1"]
    assert [q.popleft("a@1").n for _ in range(4)] == [-1, 0, 1, 2]  # type: ignore[union-attr]
    assert q.lanes() == ["b@1"] and q.head("a@1") is None and len(q) == 3
    assert [i.n for i in q] == [0, 1, 2]
    assert q.head("b@1") == Item("b@1", 0, queued=True)


def test_an_item_discarded_from_anywhere_is_never_handed_out_and_is_in_at_most_once() -> None:
    q: CallQueue[Item] = CallQueue()
    items = [Item("a@1", n) for n in range(4)]
    for item in items:
        q.append(item)
    q.append(items[2])  # waiting already: not twice
    q.discard(items[1])  # taken over by its node
    q.discard(items[1])
    assert len(q) == 3 and [i.n for i in q] == [0, 2, 3]
    q.discard(items[0])
    assert q.head("a@1") is items[2]
    q.append(items[0], front=True)  # back again (its node lost): first, once
    assert [q.popleft("a@1") for _ in range(4)] == [items[0], items[2], items[3], None]
    assert not q and q.lanes() == [] and not any(i.queued for i in items)
