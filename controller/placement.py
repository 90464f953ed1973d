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
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, key: str, nodes: Sequence[NodeState]) -> NodeState | None:
        if not nodes:
            return None
        ordered = sorted(nodes, key=lambda n: n.node_id)
        self.turn += 1
        return ordered[self.turn % len(ordered)]


def make_placement(name: str) -> Placement:
    if name == "warm-first":
        return WarmFirst()
    if name == "least-loaded":
        return LeastLoaded()
    return RoundRobin()
