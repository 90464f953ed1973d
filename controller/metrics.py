"""Every metric the controller exports, served at ``GET /metrics`` (Prometheus text format).

Counters are counted where things happen (the service, the dispatcher, the hub, the store's writer, the error
middleware); gauges and the per-node counts are read from the dispatcher and the hub when the page is asked
for, so nothing on the call path keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.nodestate import NodeState
from shoal.metrics import Counter, Gauge, Histogram, Registry

#: Why a call was placed again (the ``reason`` label of ``shoal_controller_calls_requeued_total``).
REQUEUE_REASONS = ("node_lost", "node_dropped", "node_hello", "rejected", "controller_restarted")


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.accepted = add(Counter("shoal_controller_calls_accepted_total",
                                    "Calls stored and queued (their id given out), by function."))
        self.finished = add(Counter("shoal_controller_calls_finished_total",
                                    "Calls that reached a terminal state, by function and status."))
        self.duration = add(Histogram("shoal_controller_call_duration_seconds",
                                      "From a call's acceptance to its terminal state, by function."))
        self.requeued = add(Counter("shoal_controller_calls_requeued_total",
                                    "Calls placed again, by reason: " + ", ".join(REQUEUE_REASONS) + "."))
        self.protocol_errors = add(Counter("shoal_protocol_errors_total",
                                           "Messages dropped as malformed, by socket."))
        self.store_write_failures = add(Counter("shoal_controller_store_write_failures_total",
                                                "Call writes that Redis did not take (the writer's batches)."))
        self.http_errors = add(Counter("shoal_controller_http_errors_total",
                                       "Error answers, by HTTP status and error code."))
        self.queued = add(Gauge("shoal_controller_calls_queued", "Calls waiting for a node."))
        self.active = add(Gauge("shoal_controller_calls_active", "Calls accepted and not finished."))
        self.nodes = add(Gauge("shoal_controller_nodes", "Nodes by state (ready, draining, lost)."))
        self.inflight = add(Gauge("shoal_controller_node_inflight", "Calls in flight on each node."))
        self.dispatched = add(Counter("shoal_controller_node_dispatched_total", "Calls sent to each node."))
        self.archive_bytes = add(Counter("shoal_controller_archive_bytes_sent_total",
                                         "Function archive bytes streamed to nodes."))
        self.links_refused = add(Counter("shoal_controller_node_links_refused_total",
                                         "Node link handshakes refused: the peer's key is not the node token's."))

    def render(self, nodes: Iterable[NodeState], queued: int, active: int, archive_bytes: int,
               links_refused: int = 0) -> str:
        nodes = list(nodes)
        states = {"ready": 0, "draining": 0, "lost": 0}
        for node in nodes:
            states["lost" if node.lost else "draining" if node.draining else "ready"] += 1
        for state, count in states.items():
            self.nodes.set(count, state=state)
        self.inflight.replace({(("node", n.node_id),): len(n.inflight) for n in nodes})
        self.dispatched.replace({(("node", n.node_id),): float(n.dispatched) for n in nodes})
        self.queued.set(queued)
        self.active.set(active)
        self.archive_bytes.replace({(): float(archive_bytes)})
        self.links_refused.replace({(): float(links_refused)})  # counted by the hub's ZAP thread
        return self.registry.render()
