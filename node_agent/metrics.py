"""Every metric the node agent exports (served at ``GET /metrics`` by the status endpoints)."""

from __future__ import annotations

from shoal.metrics import Counter, Gauge, Histogram, Registry


class AgentMetrics:
    """Every metric the node agent exports."""

    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.calls = add(Counter("shoal_calls_total", "Calls finished on this node, by function and outcome."))
        self.duration = add(Histogram("shoal_call_duration_seconds",
                                      "Time from a call's arrival on the node to its outcome."))
        self.cold_starts = add(Counter("shoal_cold_starts_total",
                                       "Calls that had to start a container or load their function."))
        self.mw_started = add(Counter("shoal_miniworkers_started_total", "Miniworker processes started."))
        self.mw_lost = add(Counter("shoal_miniworkers_lost_total",
                                   "Miniworkers that died, went silent or failed to start, by reason."))
        self.pool = add(Gauge("shoal_warm_pool_size", "Miniworkers by pool and state."))
        self.queue = add(Gauge("shoal_queue_depth", "Calls waiting for a miniworker, by function."))
        self.orphans_removed = add(Counter("shoal_orphan_containers_removed_total",
                                           "Containers of this node no live miniworker owned, removed by the sweep."))
        self.messages_lost = add(Counter("shoal_controller_messages_lost_total",
                                         "Gaps in the controller's numbered messages (each answered by a HELLO)."))
        self.protocol_errors = add(Counter("shoal_protocol_errors_total",
                                           "Messages dropped as malformed or from an unknown peer, by socket."))

    def render(self) -> str:
        return self.registry.render()
