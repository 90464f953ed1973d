"""What the controller knows about one node."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

#: A node's per-function queue bound when its HELLO does not say (the agent's default).
DEFAULT_QUEUE_LIMIT = 256


@dataclass
class NodeState:
    node_id: str
    hello: dict[str, Any]
    capacity: int
    last_seen: float = field(default_factory=time.monotonic)
    lost: bool = False
    draining: bool = False
    ready: set[str] = field(default_factory=set)  # function keys ready on the node
    failed: dict[str, str] = field(default_factory=dict)  # function key -> why it cannot run there
    inflight: set[str] = field(default_factory=set)  # call ids
    warm_busy: dict[str, int] = field(default_factory=dict)  # function key -> our calls running there
    warm_pool: dict[str, int] = field(default_factory=dict)  # function key -> warm miniworkers (last STATUS)
    dispatched: int = 0
    done: int = 0
    call_seq: int = 0  # the sequence number of the last CALL sent to the node (its STATUS echoes what it saw)
    connected_at: float = field(default_factory=time.time)
    peer_silence: float = 0.0  # how long the node says it may stay silent (its heartbeat x liveness, from HELLO)
    awaiting_hello: bool = False  # back from being taken for lost: no calls until its HELLO says what it holds
    hello_asked: float = 0.0  # (monotonic) when it was last asked for that HELLO

    @property
    def queue_limit(self) -> int:
        """Calls of one function the node holds waiting (beyond, it answers REJECTED)."""
        limit = self.hello.get("queue_limit")
        return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else DEFAULT_QUEUE_LIMIT

    def has_room(self, key: str, oversubscribe: int) -> bool:
        """Whether a call of ``key`` sent now would be taken: within the node's overall bound, and no more of
        this function in flight than its queue holds (the rest would come back REJECTED, at a round trip's
        cost each, and be placed again)."""
        return len(self.inflight) < self.capacity * oversubscribe and self.warm_busy.get(key, 0) < self.queue_limit

    def load(self) -> float:
        return len(self.inflight) / max(1, self.capacity)

    def idle_warm(self, key: str) -> int:
        return self.warm_pool.get(key, 0) - self.warm_busy.get(key, 0)

    def alive(self) -> bool:
        return not self.lost and not self.draining and not self.awaiting_hello

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "state": "lost" if self.lost else "draining" if self.draining else "ready",
            "capacity": self.capacity, "inflight": len(self.inflight), "dispatched": self.dispatched,
            "done": self.done, "functions_ready": sorted(self.ready), "functions_failed": self.failed,
            "warm_pool": self.warm_pool, "inflight_by_function": dict(self.warm_busy),
            "status_url": self.hello.get("status_url"),
            "runtimes": self.hello.get("runtimes", []), "version": self.hello.get("version"),
            "policy": self.hello.get("policy"), "connected_at": self.connected_at,
            "seen_s_ago": round(time.monotonic() - self.last_seen, 3), "peer_silence": self.peer_silence,
        }
