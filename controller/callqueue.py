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

#: Entries of discarded items the lanes may hold before they are compacted (when they also outnumber the live ones).
COMPACT_AT = 1024


class CallQueue(Generic[T]):
    """Lanes of waiting items. An item leaves either from its lane's head (``popleft``) or from anywhere
    (``discard``: its node took it over, or it ended); a discarded item's entry is dropped when it reaches
    the head, so it costs nothing to remove, and it is never handed out. An item is in the queue at most once:
    appending one that is waiting already does nothing."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[T]] = {}
        self._len = 0  # items waiting (entries of discarded items not counted)
        self._entries = 0  # entries in the lanes, those of discarded items (not at a head yet) included

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
        self._entries += 1

    def discard(self, item: T) -> None:
        if item.queued:
            item.queued = False
            self._len -= 1
            if self._entries - self._len > max(COMPACT_AT, self._len):
                self._compact()

    def _compact(self) -> None:
        """Drop the entries of discarded items. They go when they reach their lane's head, but a lane whose head
        does not move (no node takes its function now) kept every call cancelled behind it, params and all, and
        outside the queue's bound: submitting and cancelling grew the controller without limit. Costs a walk of
        the entries, once they are mostly dead, so each discard pays for one step of it."""
        for key in list(self._lanes):
            seen: set[int] = set()
            kept: deque[T] = deque()
            for item in self._lanes[key]:
                if item.queued and id(item) not in seen:  # (an item waiting again has a second entry: the first
                    seen.add(id(item))  # one is where it waits, as ``head`` would find it)
                    kept.append(item)
            if kept:
                self._lanes[key] = kept
            else:
                del self._lanes[key]
        self._entries = self._len

    def lanes(self) -> list[str]:
        """The function versions with calls waiting (a snapshot: lanes may empty while it is walked)."""
        return list(self._lanes)

    def head(self, key: str) -> T | None:
        lane = self._lanes.get(key)
        while lane and not lane[0].queued:
            lane.popleft()  # a discarded item's entry (or a second entry of one waiting again)
            self._entries -= 1
        if lane is not None and not lane:
            del self._lanes[key]
            return None
        return lane[0] if lane else None

    def popleft(self, key: str) -> T | None:
        item = self.head(key)
        if item is not None:
            self._lanes[key].popleft()
            self._entries -= 1
            if not self._lanes[key]:
                del self._lanes[key]
            item.queued = False
            self._len -= 1
        return item
