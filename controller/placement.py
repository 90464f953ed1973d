"""Placement policies: which node gets a call. One interface, three implementations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from controller.nodestate import NodeState


class Placement(Protocol):
    name: str

    def choose(self, key: str, nodes: Sequence[NodeState]) -> NodeState | None:
        """Pick one of ``nodes`` (all alive, with the function ready and room for a call)."""


class LeastLoaded:
    name = "least-loaded"

    def choose(self, key: str, nodes: Sequence[NodeState]) -> NodeState | None:
        return min(nodes, key=lambda n: (n.load(), n.dispatched), default=None)


class WarmFirst:
    """A node with an idle warm miniworker for the function first, then the least loaded."""

    name = "warm-first"

    def choose(self, key: str, nodes: Sequence[NodeState]) -> NodeState | None:
        warm = [n for n in nodes if n.idle_warm(key) > 0]
        return LeastLoaded().choose(key, warm or nodes)


class RoundRobin:
    """Each function's calls go to its nodes in turn: the node after (by id) the one its last call went to.

    The turn is kept per function: one counter for all of them tied each function to one node as soon as
    calls of two functions alternated (A's calls took the odd turns, B's the even ones). A node that has no
    room is skipped without shifting the others' turns."""

    name = "round-robin"
    KEEP = 4096  # functions whose last node is remembered (the oldest forgotten first)

    def __init__(self) -> None:
        self.last: dict[str, str] = {}  # function version -> node its last call went to

    def choose(self, key: str, nodes: Sequence[NodeState]) -> NodeState | None:
        if not nodes:
            return None
        last = self.last.pop(key, "")
        after = [n for n in nodes if n.node_id > last]
        chosen = min(after or nodes, key=lambda n: n.node_id)
        self.last[key] = chosen.node_id
        if len(self.last) > self.KEEP:
            del self.last[next(iter(self.last))]
        return chosen


def make_placement(name: str) -> Placement:
    if name == "warm-first":
        return WarmFirst()
    if name == "least-loaded":
        return LeastLoaded()
    return RoundRobin()
