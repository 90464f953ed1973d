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


def test_calls_discarded_behind_a_head_that_does_not_move_are_not_kept() -> None:
    """A lane no node takes now keeps its head; the calls cancelled behind it stayed in its deque, params and all,
    outside the bound (30,000 submitted and cancelled: 30,000 entries kept, with len() == 0)."""
    from controller.callqueue import COMPACT_AT

    q: CallQueue[Item] = CallQueue()
    head = Item("a@1", -1)
    q.append(head)
    back = Item("a@1", -2)
    q.append(back)
    q.discard(back)  # discarded, then waiting again (its node gave it back): it keeps its first place
    q.append(back, front=False)
    for n in range(30_000):
        item = Item("a@1" if n % 2 else "b@1", n)
        q.append(item)
        q.discard(item)
    entries = sum(len(lane) for lane in q._lanes.values())
    assert len(q) == 2 and entries <= COMPACT_AT + 2, entries
    assert [q.popleft("a@1").n for _ in range(2)] == [-1, -2]  # type: ignore[union-attr]
    assert q.popleft("a@1") is None and not q and q.head("b@1") is None
