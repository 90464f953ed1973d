"""Calls waiting for a node: one FIFO lane per function version.

Whether a node can take a call depends only on the call's function version (a node must have it ready and
room for it), so placement looks at each lane's head and stops a lane at the first call no node can take.
A round of placement costs one step per function with work waiting plus one per call placed, however long
the backlog is. (A single FIFO had to be walked whole on every round: with 20,000 async calls accepted
ahead of execution, every result paid for 20,000 steps.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queueable(Protocol):
    queued: bool  # whether it waits here; set by the queue only

    @property
    def key(self) -> str: ...  # its lane


T = TypeVar("T", bound=Queueable)


class CallQueue(Generic[T]):
    """Lanes of waiting items. An item leaves either from its lane's head (``popleft``) or from anywhere
    (``discard``: its node took it over, or it ended); a discarded item's entry is dropped when it reaches
    the head, so it costs nothing to remove, and it is never handed out. An item is in the queue at most once:
    appending one that is waiting already does nothing."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[T]] = {}
        self._len = 0  # items waiting (entries of discarded items not counted)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        for lane in list(self._lanes.values()):
            yield from (item for item in lane if item.queued)

    def append(self, item: T, front: bool = False) -> None:
        if item.queued:
            return
        item.queued = True
        lane = self._lanes.get(item.key)
        if lane is None:
            lane = self._lanes[item.key] = deque()
        if front:
            lane.appendleft(item)
        else:
            lane.append(item)
        self._len += 1

    def discard(self, item: T) -> None:
        if item.queued:
            item.queued = False
            self._len -= 1

    def lanes(self) -> list[str]:
        """The function versions with calls waiting (a snapshot: lanes may empty while it is walked)."""
        return list(self._lanes)

    def head(self, key: str) -> T | None:
        lane = self._lanes.get(key)
        while lane and not lane[0].queued:
            lane.popleft()  # a discarded item's entry (or a second entry of one waiting again)
        if lane is not None and not lane:
            del self._lanes[key]
            return None
        return lane[0] if lane else None

    def popleft(self, key: str) -> T | None:
        item = self.head(key)
        if item is not None:
            self._lanes[key].popleft()
            if not self._lanes[key]:
                del self._lanes[key]
            item.queued = False
            self._len -= 1
        return item
