"""The dispatcher: the call lifecycle from QUEUED to a terminal state.

* ``submit`` stores the call (QUEUED, in the durable ``active`` set) before its id is given out, then
  queues it; beyond ``queue_limit`` waiting calls the API answers 429.
* ``kick`` places waiting calls on nodes (the placement policy chooses among alive nodes where the
  function is ready and that have room) and marks them DISPATCHED. That write waits ``DISPATCH_WRITE_AFTER``:
  a warm call usually ends sooner, and its DISPATCHED stamp and node then go in its terminal write (one
  write per call instead of two; a restart re-queues calls that are active in the store either way).
* Nodes report RUNNING and results; a result for a call that is not in flight on that node (a late
  duplicate after a retry, a cancelled call) is ignored.
* A lost node's calls go back to the queue (at-least-once) until ``max_attempts`` dispatches, then FAIL;
  a node's REJECTED answer (queue full, draining) sends the call back to the queue as well.
* At start, every call the store still holds as active is queued again: a controller restart loses none.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from controller.callqueue import CallQueue
from controller.config import ControllerConfig
from controller.errors import Busy
from controller.hub import Hub
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from controller.placement import make_placement
from controller.store import Store
from shoal.logs import get_logger
from shoal.models import REJECTED, CallStatus
from shoal.protocol import Msg

#: Results a node may send and what they mean here.
STATUSES = {s.value: s for s in (CallStatus.DONE, CallStatus.FAILED, CallStatus.TIMEOUT, CallStatus.CANCELLED)}
#: Seconds after its dispatch that a call still in flight gets its DISPATCHED write (see the module doc).
DISPATCH_WRITE_AFTER = 0.02


@dataclass
class Pending:
    call_id: str
    function: str
    version: int
    params: Any
    timeout: float
    attempts: int = 0
    node_id: str | None = None
    cancelled: bool = False
    waiters: list[asyncio.Future[dict[str, Any]]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # the call as first stored (for sync answers)
    stamps: dict[str, float] = field(default_factory=dict)  # state -> when, as written to the store
    last_node: str = ""
    dispatch_unwritten: bool = False  # dispatched, but its DISPATCHED state is not written yet
    outcome: dict[str, Any] | None = None  # the whole call once its terminal state is stored

    @property
    def key(self) -> str:
        return f"{self.function}@{self.version}"


class Dispatcher:
    def __init__(self, config: ControllerConfig, store: Store, hub: Hub, metrics: ControllerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.hub = hub
        self.placement = make_placement(config.placement)
        self.log = get_logger("dispatcher")
        self.queue: CallQueue[Pending] = CallQueue()
        self.calls: dict[str, Pending] = {}  # every non-terminal call this controller holds
        self._kick_scheduled = False
        self._unwritten: list[Pending] = []  # dispatched calls whose DISPATCHED write waits
        self._flush_scheduled = False

    # ---- submitting ----------------------------------------------------------------------------
    def queued(self) -> int:
        return len(self.queue)

    def check_room(self, count: int = 1) -> None:
        if len(self.queue) + count > self.config.queue_limit:
            raise Busy(f"{len(self.queue)} calls are waiting for a node (at most {self.config.queue_limit});"
                       " retry later", retry_after=1)

    def enqueue(self, pending: Pending, front: bool = False) -> None:
        self.calls[pending.call_id] = pending
        self.queue.append(pending, front)
        self.kick()

    @staticmethod
    def wait(pending: Pending) -> asyncio.Future[dict[str, Any]]:
        """The call's outcome once it is stored (at once if it already is)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if pending.outcome is not None:
            fut.set_result(pending.outcome)
        else:
            pending.waiters.append(fut)
        return fut

    # ---- placing -------------------------------------------------------------------------------
    def kick(self) -> None:
        """Place waiting calls soon (once per loop iteration, however many events asked)."""
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._place)

    def _place(self) -> None:
        self._kick_scheduled = False
        if not self.queue:
            return
        nodes = [n for n in self.hub.nodes.values() if n.alive()]
        if not nodes:
            return
        limit = self.config.node_oversubscribe
        for key in self.queue.lanes():
            while (pending := self.queue.head(key)) is not None:
                if pending.cancelled:
                    self.queue.popleft(key)
                    continue
                node = self.placement.choose(key, [n for n in nodes if key in n.ready and n.has_room(key, limit)])
                if node is None:
                    break  # no node takes this function now: its later calls wait too
                self.queue.popleft(key)
                if not self._dispatch(pending, node):
                    self.queue.append(pending, front=True)
                    break

    def _dispatch(self, pending: Pending, node: NodeState) -> bool:
        header: dict[str, Any] = {"call_id": pending.call_id, "function": pending.function,
                                  "version": pending.version, "params": pending.params, "timeout": pending.timeout}
        if not self.hub.send(node.node_id, Msg.CALL, header):
            return False
        pending.attempts += 1
        pending.node_id = pending.last_node = node.node_id
        pending.stamps["DISPATCHED"] = time.time()
        node.inflight.add(pending.call_id)
        node.warm_busy[pending.key] = node.warm_busy.get(pending.key, 0) + 1
        node.dispatched += 1
        pending.dispatch_unwritten = True
        self._unwritten.append(pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(DISPATCH_WRITE_AFTER, self._flush_dispatched)
        return True

    def _flush_dispatched(self) -> None:
        """Write DISPATCHED for the calls dispatched a moment ago that are still running."""
        self._flush_scheduled = False
        batch, self._unwritten = self._unwritten, []
        for pending in batch:
            if pending.dispatch_unwritten:
                self.store.update_call(pending.call_id, CallStatus.DISPATCHED, self._dispatch_fields(pending))

    @staticmethod
    def _dispatch_fields(pending: Pending) -> dict[str, Any]:
        """The dispatch's fields if not yet written (then they are: callers write them now), else none."""
        if not pending.dispatch_unwritten:
            return {}
        pending.dispatch_unwritten = False
        return {"node": pending.last_node, "attempts": pending.attempts,
                "t_DISPATCHED": pending.stamps.get("DISPATCHED")}

    def _release(self, pending: Pending) -> None:
        node = self.hub.nodes.get(pending.node_id or "")
        if node is not None:
            node.inflight.discard(pending.call_id)
            busy = node.warm_busy.get(pending.key, 0) - 1
            if busy > 0:
                node.warm_busy[pending.key] = busy
            else:
                node.warm_busy.pop(pending.key, None)
        pending.node_id = None

    # ---- node events ---------------------------------------------------------------------------
    def on_call_state(self, node: NodeState, h: dict[str, Any]) -> None:
        pending = self.calls.get(h["call_id"])
        if pending is None or pending.node_id != node.node_id:
            return
        fields: dict[str, Any] = {}
        if isinstance(h.get("progress"), int):
            fields["progress"] = max(0, min(100, h["progress"]))
        status = CallStatus.RUNNING if h["state"] == "RUNNING" else None
        if status is not None:
            pending.stamps["RUNNING"] = time.time()
        fields.update(self._dispatch_fields(pending))
        self.store.update_call(pending.call_id, status, fields)

    def on_result(self, node: NodeState, h: dict[str, Any]) -> None:
        call_id = h["call_id"]
        pending = self.calls.get(call_id)
        if pending is None or pending.node_id != node.node_id:
            self.log.info("late_result_ignored", call_id=call_id, node_id=node.node_id)
            return
        self._release(pending)
        if self.queue:
            self.kick()  # the node has room again: calls waiting for it (nothing else may come to wake them)
        node.done += 1
        if h["status"] == REJECTED:
            pending.attempts -= 1  # it never ran there
            pending.dispatch_unwritten = False
            self.metrics.requeued.inc(reason="rejected")
            self.enqueue(pending, front=True)
            return
        status = STATUSES.get(h["status"])
        if status is None:
            self.log.error("unknown_result_status", call_id=call_id, status=h["status"])
            status = CallStatus.FAILED
        fields: dict[str, Any] = {k: h.get(k) for k in ("result", "error", "logs", "timings") if k in h}
        fields["cold"] = bool(h.get("cold"))
        started = h.get("started_at")
        if isinstance(started, int | float) and not isinstance(started, bool) and math.isfinite(started) and started:
            fields["t_RUNNING"] = pending.stamps["RUNNING"] = float(started)
        elif started is not None:  # stored, it would make the call unreadable (timestamps are numbers)
            self.log.error("bad_started_at", call_id=call_id, node_id=node.node_id, value=repr(started)[:64])
        self.finish(pending, status, fields)

    def finish(self, pending: Pending, status: CallStatus, fields: dict[str, Any]) -> None:
        self.calls.pop(pending.call_id, None)
        fields.update(self._dispatch_fields(pending))
        write = self.store.update_call(pending.call_id, status, fields)
        now = time.time()
        pending.stamps[status.value] = now
        self.metrics.finished.inc(function=pending.function, status=status.value)
        if (accepted := pending.stamps.get("QUEUED")) is not None:
            self.metrics.duration.observe(now - accepted, function=pending.function)
        # The whole call as it now stands in the store: a sync caller is answered without reading it back.
        outcome = dict(pending.record)
        outcome.update({f"t_{k}": v for k, v in pending.stamps.items()})
        outcome.update(fields)
        outcome.update(status=status.value, node=pending.last_node, attempts=pending.attempts)

        def resolve(_: asyncio.Future[None]) -> None:
            pending.outcome = outcome
            for fut in pending.waiters:
                if not fut.done():
                    fut.set_result(outcome)

        write.add_done_callback(resolve)  # a sync caller is answered once the outcome is stored

    def on_node_lost(self, node: NodeState) -> None:
        for call_id in list(node.inflight):
            pending = self.calls.get(call_id)
            if pending is None:
                continue
            self._release(pending)
            if pending.attempts >= self.config.max_attempts:
                self.finish(pending, CallStatus.FAILED, {"error": {
                    "type": "NodeLost",
                    "message": f"node {node.node_id} was lost while running it, after {pending.attempts} attempt(s)",
                }})
            else:
                self.log.info("call_requeued", call_id=call_id, node_id=node.node_id, attempts=pending.attempts)
                pending.dispatch_unwritten = False
                self.metrics.requeued.inc(reason="node_lost")
                self.store.update_call(call_id, CallStatus.QUEUED, {"node": ""})
                self.enqueue(pending, front=True)
        node.inflight.clear()
        node.warm_busy.clear()

    def on_node_hello(self, node: NodeState, running: set[str]) -> None:
        """A node (re)introduced itself: calls we think it holds but it does not know are lost there."""
        for call_id in list(node.inflight):
            if call_id not in running:
                pending = self.calls.get(call_id)
                if pending is not None and pending.node_id == node.node_id:
                    self._release(pending)
                    pending.dispatch_unwritten = False
                    self.metrics.requeued.inc(reason="node_restarted")
                    self.enqueue(pending, front=True)
        self.kick()

    def on_function_state(self, node: NodeState, key: str, state: str) -> None:
        if state == "ready":
            self.kick()

    # ---- cancelling ----------------------------------------------------------------------------
    def cancel(self, call_id: str) -> bool:
        pending = self.calls.get(call_id)
        if pending is None:
            return False
        if pending.node_id is None:
            pending.cancelled = True
            self.finish(pending, CallStatus.CANCELLED, {"error": {"type": "Cancelled",
                                                                  "message": "cancelled before it started"}})
        else:
            self.hub.send(pending.node_id, Msg.CANCEL, {"call_id": call_id})
        return True

    def withdraw(self, call_id: str) -> None:
        """Forget a call whose creation was not stored: its caller gets an error, not an id, so nothing about
        it is written and it is not counted. If it was already sent to a node, the node is asked to cancel it
        and its result will be ignored."""
        pending = self.calls.pop(call_id, None)
        if pending is None:
            return
        pending.cancelled = True  # a queued call is skipped when its lane comes to it
        pending.dispatch_unwritten = False
        if pending.node_id is not None:
            self.hub.send(pending.node_id, Msg.CANCEL, {"call_id": call_id})
            self._release(pending)

    # ---- recovery ------------------------------------------------------------------------------
    async def recover(self) -> int:
        """Queue again every call the store holds as not finished (after a controller restart)."""
        count = 0
        for call in sorted(await self.store.active_calls(), key=lambda c: c.get("created") or 0):
            if call["id"] in self.calls:
                continue
            pending = Pending(call_id=call["id"], function=call["function"], version=int(call["version"]),
                              params=call.get("params"), timeout=float(call.get("timeout") or 30.0),
                              attempts=int(call.get("attempts") or 0),
                              stamps={"QUEUED": call.get("t_QUEUED") or call.get("created") or time.time()})
            self.calls[pending.call_id] = pending
            self.queue.append(pending)
            count += 1
        if count:
            self.log.info("calls_recovered", count=count)
            self.metrics.requeued.inc(count, reason="controller_restarted")
            self.kick()
        return count

    def snapshot(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "active": len(self.calls),
                "inflight": sum(len(n.inflight) for n in self.hub.nodes.values()), "time": time.time()}
