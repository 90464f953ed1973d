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


class Keyed(Protocol):
    @property
    def key(self) -> str: ...


T = TypeVar("T", bound=Keyed)


class CallQueue(Generic[T]):
    def __init__(self) -> None:
        self._lanes: dict[str, deque[T]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        for lane in list(self._lanes.values()):
            yield from lane

    def append(self, item: T, front: bool = False) -> None:
        lane = self._lanes.get(item.key)
        if lane is None:
            lane = self._lanes[item.key] = deque()
        if front:
            lane.appendleft(item)
        else:
            lane.append(item)
        self._len += 1

    def lanes(self) -> list[str]:
        """The function versions with calls waiting (a snapshot: lanes may empty while it is walked)."""
        return list(self._lanes)

    def head(self, key: str) -> T | None:
        lane = self._lanes.get(key)
        return lane[0] if lane else None

    def popleft(self, key: str) -> T:
        lane = self._lanes[key]
        item = lane.popleft()
        self._len -= 1
        if not lane:
            del self._lanes[key]
        return item
