"""The dispatcher: the call lifecycle from QUEUED to a terminal state.

* ``submit`` stores the call (QUEUED, in the durable ``active`` set) before its id is given out, then
  queues it; beyond ``queue_limit`` waiting calls the API answers 429.
* ``kick`` places waiting calls on nodes (the placement policy chooses among alive nodes where the
  function is ready and that have room; functions with calls waiting take turns, a call each) and marks them
  DISPATCHED. That write waits ``DISPATCH_WRITE_AFTER``:
  a warm call usually ends sooner, and its DISPATCHED stamp and node then go in its terminal write (one
  write per call instead of two; a restart re-queues calls that are active in the store either way).
* Nodes report RUNNING and results; a result for a call that is not in flight on that node (a late
  duplicate after a retry, a cancelled call) is ignored.
* A lost node's calls go back to the queue (at-least-once) until ``max_attempts`` dispatches; one lost on
  its last attempt waits for that node (it may only have been slow to be heard) until its result or HELLO
  settles it, or its timeout and one more liveness window have passed: then it FAILs ``NodeLost``.
  A node's REJECTED answer (queue full, draining) sends the call back to the queue as well.
* A live node can drop a call too (a connection reset loses what was in flight; its agent drops a result it
  cannot queue). Each CALL carries the node's next sequence number; every STATUS (once a heartbeat) echoes the
  last number the node received and lists the calls it holds. A call sent before that number that the node
  neither holds nor answered was dropped there: it is treated as lost on that node.
* At start, every call the store still holds as active is queued again: a controller restart loses none. A
  call the store records as on a node (DISPATCHED, RUNNING) is first kept for that node: it is not placed
  elsewhere until the node has said HELLO without it, or ``liveness + 1`` heartbeats have passed without a
  HELLO; a node that lists it keeps it, and a result it sends before its HELLO (it held the result while the
  controller was away) ends it. Otherwise the first node to say HELLO would be given the calls the others run.
  A call recorded as waiting may be on a node too (its DISPATCHED write had not landed): those are kept until
  every node recorded as up has said HELLO (or the same grace has passed).
* A node taken for lost that is heard from again is asked to say HELLO (it may have missed messages); a result
  it sends for a call it was running when taken for lost is that call's outcome (a run placed since is
  cancelled).
* At stop, placement ends, the nodes' messages are read, and the store's writes are waited for (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from controller.callqueue import CallQueue
from controller.config import ControllerConfig
from controller.errors import Busy, CorruptRecord, StoreError
from controller.hub import Hub
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from controller.placement import make_placement
from controller.store import ActiveEntry, Store
from shoal.logs import get_logger
from shoal.models import REJECTED, CallStatus
from shoal.protocol import MAX_SILENCE, Msg

#: Results a node may send and what they mean here.
STATUSES = {s.value: s for s in (CallStatus.DONE, CallStatus.FAILED, CallStatus.TIMEOUT, CallStatus.CANCELLED)}
#: Seconds after its dispatch that a call still in flight gets its DISPATCHED write (see the module doc).
DISPATCH_WRITE_AFTER = 0.02
#: ``reserved`` key of recovered calls kept until every node that was up has said HELLO (see ``recover``).
ANY_NODE = "*"
#: Seconds before a terminal write that failed is tried again (doubling, at most 10 s).
RETRY_WRITE_AFTER = 0.25
#: Entries of a kind recovery takes out of the queue that are logged one by one (then only counted).
DROPPED_LOGGED = 100


def timestamp(value: Any) -> float | None:
    """``value`` as a time in seconds, if it is one: a positive finite number (an integer too large for a float,
    which ``math.isfinite`` raises on, is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        stamp = float(value)
    except OverflowError:
        return None
    return stamp if math.isfinite(stamp) and stamp > 0 else None


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
    cancel_requested: bool = False  # cancelled while on a node: it must not be placed again
    waiters: list[asyncio.Future[dict[str, Any]]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # the call as first stored (for sync answers)
    stamps: dict[str, float] = field(default_factory=dict)  # state -> when, as written to the store
    last_node: str = ""
    dispatch_unwritten: bool = False  # dispatched, but its DISPATCHED state is not written yet
    outcome: dict[str, Any] | None = None  # the whole call once its terminal state is stored
    seq: int = 0  # the sequence number of its CALL to the node it is on (see the module doc)
    reserved_for: str = ""  # recovered, and recorded as on this node: kept for it (see the module doc)
    queued: bool = False  # waiting in the queue (set by CallQueue)
    lost_on: set[str] = field(default_factory=set)  # nodes taken for lost while it was on them (may still run it)
    awaiting: str = ""  # lost with this node on its last attempt: waits for the node's word (see _await_node)
    await_timer: asyncio.TimerHandle | None = None  # when waiting for that node ends (FAILED NodeLost)

    @property
    def key(self) -> str:
        return f"{self.function}@{self.version}"

    @property
    def status(self) -> str:
        """Where it stands now (not yet ended)."""
        if self.node_id is None:
            return CallStatus.QUEUED.value
        return (CallStatus.RUNNING if "RUNNING" in self.stamps else CallStatus.DISPATCHED).value


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
        self.gone: dict[str, int] = {}  # deleted function -> last version, while calls of it are still on nodes
        # Deleted function -> the last version deleted (versions go on from there if it is made again): a call of
        # such a version that comes to be queued (its node gave it back, or it was accepted as the function was
        # being deleted) ends CANCELLED instead of waiting for a node that will never have it.
        self.deleted: dict[str, int] = {}
        self.reserved: dict[str, set[str]] = {}  # node -> recovered calls kept for it until its HELLO
        self.awaiting_hello: set[str] = set()  # nodes up before a restart that have not said HELLO since
        self.grace = 0.0  # seconds recovered calls are kept for the nodes that may hold them (see recover)
        self.unstored: set[str] = set()  # calls ended whose terminal write has not landed yet
        self.stopping = False  # the controller is stopping: nothing is placed any more
        self._lane_turn = 0  # where the next placement round starts among the waiting functions
        # Function -> version -> calls held of it: whether a deleted function still has calls is asked at every
        # one of its calls' ends, and a walk of ``calls`` (100,000 of them) each time stalled the loop.
        self._versions_held: dict[str, dict[int, int]] = {}
        self.awaiting: dict[str, set[str]] = {}  # lost node -> calls lost with it on their last attempt

    # ---- submitting ----------------------------------------------------------------------------
    def queued(self) -> int:
        return len(self.queue)

    def check_room(self, count: int = 1) -> None:
        if len(self.queue) + count > self.config.queue_limit:
            raise Busy(f"{len(self.queue)} calls are waiting for a node (at most {self.config.queue_limit});"
                       " retry later", retry_after=1)

    def _hold(self, pending: Pending) -> None:
        if pending.call_id not in self.calls:
            self.calls[pending.call_id] = pending
            counts = self._versions_held.setdefault(pending.function, {})
            counts[pending.version] = counts.get(pending.version, 0) + 1

    def _let_go(self, call_id: str) -> Pending | None:
        pending = self.calls.pop(call_id, None)
        if pending is not None:
            counts = self._versions_held[pending.function]
            counts[pending.version] -= 1
            if not counts[pending.version]:
                del counts[pending.version]
                if not counts:
                    del self._versions_held[pending.function]
        return pending

    def enqueue(self, pending: Pending, front: bool = False) -> None:
        self._hold(pending)
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
        """One round of placement. Functions take turns, a call each, and the function that goes first changes
        from one round to the next: walked lane by lane, a function with a standing backlog took every slot a
        result freed, and another function's calls waited for that whole backlog."""
        self._kick_scheduled = False
        if not self.queue or self.stopping:
            return
        if self.deleted:
            self._cancel_deleted_lanes()
        nodes = [n for n in self.hub.nodes.values() if n.alive()]
        if not nodes:
            return
        lanes = self.queue.lanes()
        self._lane_turn = (self._lane_turn + 1) % max(1, len(lanes))
        lanes = lanes[self._lane_turn:] + lanes[:self._lane_turn]
        for key in list(lanes):
            if all(key in n.failed for n in nodes):
                self._fail_lane(key, nodes)
                lanes.remove(key)
        while lanes and nodes:
            for key in list(lanes):
                placed, nodes = self._place_head(key, nodes)
                if not placed:
                    lanes.remove(key)  # empty, or no node takes this function now: its later calls wait too
                if not nodes:
                    return

    def _place_head(self, key: str, nodes: list[NodeState]) -> tuple[bool, list[NodeState]]:
        """Place the call at the head of lane ``key``; returns whether one was placed, and the nodes left to
        place on (without one whose socket refused: it went away; its liveness check will mark it lost, and
        that places its calls again)."""
        limit = self.config.node_oversubscribe
        while (pending := self.queue.head(key)) is not None:
            if pending.cancelled or pending.node_id is not None:  # (discarded when that happened)
                self.log.error("stale_queue_entry", call_id=pending.call_id, node_id=pending.node_id)
                self.queue.popleft(key)
                continue
            node = self.placement.choose(key, [n for n in nodes if key in n.ready and n.has_room(key, limit)])
            if node is None:
                return False, nodes
            if not self._dispatch(pending, node):
                nodes = [n for n in nodes if n is not node]
                if not nodes:
                    return False, nodes
                continue
            self.queue.popleft(key)
            return True, nodes
        return False, nodes

    def _cancel_deleted_lanes(self) -> None:
        for key in self.queue.lanes():
            name, _, version = key.rpartition("@")
            if int(version) <= self.deleted.get(name, 0):
                while (pending := self.queue.popleft(key)) is not None:
                    self._cancel_deleted(pending)

    def _cancel_deleted(self, pending: Pending) -> None:
        pending.cancelled = True
        self.finish(pending, CallStatus.CANCELLED, {"error": {
            "type": "FunctionDeleted", "message": f"function {pending.function!r} was deleted before the call ran"}})

    def _fail_lane(self, key: str, nodes: list[NodeState]) -> None:
        """Every alive node reported that it cannot run ``key`` (its archive or dependencies failed there):
        its waiting calls fail with the nodes' reason instead of waiting for ever."""
        reason = nodes[0].failed.get(key, "")
        while (pending := self.queue.popleft(key)) is not None:
            self.finish(pending, CallStatus.FAILED, {"error": {
                "type": "FunctionUnavailable",
                "message": f"{key} cannot run on any node ({len(nodes)} alive): {reason}"}})

    def _dispatch(self, pending: Pending, node: NodeState) -> bool:
        seq = node.call_seq + 1
        header: dict[str, Any] = {"call_id": pending.call_id, "function": pending.function,
                                  "version": pending.version, "params": pending.params, "timeout": pending.timeout,
                                  "seq": seq}
        if not self.hub.send(node.node_id, Msg.CALL, header):
            return False
        node.call_seq = pending.seq = seq
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
        if (pending is not None and pending.node_id != node.node_id and node.node_id in pending.lost_on
                and h["status"] != REJECTED):
            self._result_from_lost(pending, node, h)
            return
        if pending is not None and pending.awaiting == node.node_id:  # (REJECTED: it never ran there)
            self._stop_awaiting(pending)
            node.done += 1
            self._take_result(pending, h, node.node_id)
            return
        if pending is None or pending.node_id != node.node_id:
            self.log.info("late_result_ignored", call_id=call_id, node_id=node.node_id)
            if call_id in node.inflight:  # (never meant to happen) the node's slot is not kept for it
                self.log.error("inflight_without_call", call_id=call_id, node_id=node.node_id)
                node.inflight.discard(call_id)
            return
        self._release(pending)
        if self.queue:
            self.kick()  # the node has room again: calls waiting for it (nothing else may come to wake them)
        node.done += 1
        self._take_result(pending, h, node.node_id)

    def _result_from_lost(self, pending: Pending, node: NodeState, h: dict[str, Any]) -> None:
        """A result from a node that was taken for lost while it ran the call (it was only slow to be heard):
        the call ran, so this is its outcome. If it was placed again meanwhile, that run is cancelled."""
        self.log.info("result_from_node_taken_for_lost", call_id=pending.call_id, node_id=node.node_id,
                      placed_again_on=pending.node_id)
        if pending.node_id is not None:
            self.hub.send(pending.node_id, Msg.CANCEL, {"call_id": pending.call_id})
            self._release(pending)
            self.kick()
        pending.last_node = node.node_id
        pending.dispatch_unwritten = True  # its stored node is the one that ran it
        node.done += 1
        self._take_result(pending, h, node.node_id)

    def on_result_before_hello(self, node_id: str, h: dict[str, Any]) -> None:
        """A result from a node that has not said HELLO to this controller yet: it ran the call while the
        controller was away (restarting). Taken if the call was recovered as on that node; else ignored."""
        pending = self.calls.get(h["call_id"])
        if pending is None or pending.node_id is not None or pending.reserved_for not in (node_id, ANY_NODE):
            self.log.info("late_result_ignored", call_id=h["call_id"], node_id=node_id)
            return
        self._unreserve(pending)
        self._take_result(pending, h, node_id)

    def _take_result(self, pending: Pending, h: dict[str, Any], node_id: str) -> None:
        call_id = pending.call_id
        if h["status"] == REJECTED:
            self._rejected_by(node_id, pending.key, h.get("error"))
            if h.get("ran") is not True:
                pending.attempts = max(0, pending.attempts - 1)  # it never ran there
            elif pending.attempts >= self.config.max_attempts and not pending.cancel_requested:
                # Given back mid-run (its node stopped before it ended): an attempt, and the last one.
                self.finish(pending, CallStatus.FAILED, {"error": {
                    "type": "NodeStopped", "message": f"node {node_id} stopped while running it (its drain timed "
                    f"out), after {pending.attempts} attempt(s)"}})
                return
            self._requeue(pending, "rejected")
            return
        status = STATUSES.get(h["status"])
        if status is None:
            self.log.error("unknown_result_status", call_id=call_id, status=h["status"])
            status = CallStatus.FAILED
        fields: dict[str, Any] = {k: h.get(k) for k in ("result", "error", "logs", "timings") if k in h}
        fields["cold"] = bool(h.get("cold"))
        started = h.get("started_at")
        if (stamp := timestamp(started)) is not None:
            fields["t_RUNNING"] = pending.stamps["RUNNING"] = stamp
        elif started is not None:  # stored, it would make the call unreadable (timestamps are numbers)
            self.log.error("bad_started_at", call_id=call_id, node_id=node_id, value=repr(started)[:64])
        self.finish(pending, status, fields)

    def _rejected_by(self, node_id: str, key: str, error: Any) -> None:
        """A node gave a call back because it cannot run its function version now (failed there, or retired): its
        FSTATE saying so comes first on the link, but may have been lost on the way, and the call, placed there
        again at once (that node the least loaded), went back and forth for as long as that lasted. Taken as that
        FSTATE: not placed there again until the node says the function is ready."""
        kind = error.get("type") if isinstance(error, dict) else None
        node = self.hub.nodes.get(node_id)
        if node is None or kind not in ("FunctionUnavailable", "VersionRetired"):
            return
        node.ready.discard(key)
        if kind == "FunctionUnavailable":
            node.failed[key] = str(error.get("message", ""))[:1000]
        else:
            self.on_function_state(node, key, "retired")  # sent back to it while calls of it wait

    def finish(self, pending: Pending, status: CallStatus, fields: dict[str, Any]) -> None:
        self._let_go(pending.call_id)
        self._stop_awaiting(pending)
        self.queue.discard(pending)
        if pending.function in self.gone:
            self._announce_gone(pending.function)
        fields.update(self._dispatch_fields(pending))
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
        self.unstored.add(pending.call_id)
        self._store_outcome(pending, status, fields, outcome, RETRY_WRITE_AFTER)

    def _store_outcome(self, pending: Pending, status: CallStatus, fields: dict[str, Any], outcome: dict[str, Any],
                       retry_after: float) -> None:
        """Write a call's terminal state; its sync caller is answered once it is stored. A failed write is
        retried until it lands: left unwritten, the store would hold the call as active, and a restart would
        run it again, maybe to another outcome than the one its caller was told."""

        def landed(write: asyncio.Future[None]) -> None:
            if write.cancelled():
                return  # the controller is stopping: on restart the call is recovered from the store
            if write.exception() is not None:
                self.log.error("outcome_not_stored", call_id=pending.call_id, retry_in_s=retry_after,
                               error=str(write.exception()))
                asyncio.get_running_loop().call_later(retry_after, self._store_outcome, pending, status, fields,
                                                      outcome, min(retry_after * 2, 10.0))
                return
            pending.outcome = outcome
            self.unstored.discard(pending.call_id)
            for fut in pending.waiters:
                if not fut.done():
                    fut.set_result(outcome)

        self.store.update_call(pending.call_id, status, fields, pending.record).add_done_callback(landed)

    def _requeue(self, pending: Pending, reason: str) -> None:
        """Place a call again that its node no longer holds, unless a cancel was asked meanwhile."""
        pending.dispatch_unwritten = False
        if pending.cancel_requested:
            self.finish(pending, CallStatus.CANCELLED, {"error": {"type": "Cancelled",
                                                                  "message": "cancelled before it ran again"}})
            return
        self.metrics.requeued.inc(reason=reason)
        self.enqueue(pending, front=True)

    def _lost_on(self, pending: Pending, node: NodeState, dropped: bool = False) -> None:
        """``node`` was lost with ``pending`` on it (or, ``dropped``, it is alive but no longer holds the call):
        placed again, or FAILED past ``max_attempts`` dispatches (at-least-once, bounded)."""
        self._release(pending)
        if not dropped:
            pending.lost_on.add(node.node_id)
        what = "dropped it" if dropped else "was lost while running it"
        if pending.cancel_requested:  # cancelled: it ends so, whatever its attempts (nothing places it again)
            self._requeue(pending, "node_dropped" if dropped else "node_lost")
            return
        if pending.attempts >= self.config.max_attempts:
            if not dropped:
                self._await_node(pending, node)
                return
            self.finish(pending, CallStatus.FAILED, {"error": {
                "type": "NodeDropped" if dropped else "NodeLost",
                "message": f"node {node.node_id} {what}, after {pending.attempts} attempt(s)",
            }})
            return
        self.log.info("call_requeued", call_id=pending.call_id, node_id=node.node_id, attempts=pending.attempts,
                      reason=what)
        self.store.update_call(pending.call_id, CallStatus.QUEUED, {"node": ""})
        self._requeue(pending, "node_dropped" if dropped else "node_lost")

    def _await_node(self, pending: Pending, node: NodeState) -> None:
        """``pending`` was on ``node`` when the node was taken for lost, on its last attempt. A node taken for
        lost may only be slow to be heard (a partition, a stalled host): its result would be the call's
        outcome, and failing the call at once would throw a finished run away. So the call waits for the node:
        its result, or its HELLO with or without the call, settles it. It fails ``NodeLost`` only once the
        run could no longer be going on there (the call's timeout, counted from its start) and the node has
        had one more liveness window to be heard."""
        loop = asyncio.get_running_loop()
        now = time.time()
        started = pending.stamps.get("RUNNING") or pending.stamps.get("DISPATCHED") or now
        window = max(self.config.heartbeat * self.config.liveness, min(node.peer_silence, MAX_SILENCE))
        wait = max(0.0, started + pending.timeout - now) + window + self.config.heartbeat
        pending.awaiting = node.node_id
        self.awaiting.setdefault(node.node_id, set()).add(pending.call_id)
        pending.await_timer = loop.call_later(wait, self._give_up_on, pending.call_id, wait)
        self.log.info("call_awaits_lost_node", call_id=pending.call_id, node_id=node.node_id,
                      attempts=pending.attempts, wait_s=round(wait, 3))

    def _stop_awaiting(self, pending: Pending) -> None:
        if pending.awaiting:
            calls = self.awaiting.get(pending.awaiting)
            if calls is not None:
                calls.discard(pending.call_id)
                if not calls:
                    del self.awaiting[pending.awaiting]
            pending.awaiting = ""
        if pending.await_timer is not None:
            pending.await_timer.cancel()
            pending.await_timer = None

    def _fail_lost(self, pending: Pending, node_id: str, why: str) -> None:
        self.finish(pending, CallStatus.FAILED, {"error": {
            "type": "NodeLost",
            "message": f"node {node_id} was lost while running it, after {pending.attempts} attempt(s); {why}",
        }})

    def _give_up_on(self, call_id: str, waited: float) -> None:
        pending = self.calls.get(call_id)
        if pending is not None and pending.awaiting:
            pending.await_timer = None
            self._fail_lost(pending, pending.awaiting, f"not heard from within {waited:.1f} s")

    def on_node_lost(self, node: NodeState) -> None:
        for call_id in list(node.inflight):
            pending = self.calls.get(call_id)
            if pending is not None:
                self._lost_on(pending, node)
        node.inflight.clear()
        node.warm_busy.clear()
        if self.queue:
            self.kick()  # calls that waited for a round may go to the nodes left

    def on_node_status(self, node: NodeState, seen: int, held: set[str]) -> None:
        """A node's STATUS: it had received our CALLs up to sequence number ``seen`` and holds ``held``. A call
        it should have by then, neither held nor answered (a result precedes the STATUS on the link), was
        dropped on the way or there: lost on that node."""
        dropped = [pending for call_id in node.inflight
                   if (pending := self.calls.get(call_id)) is not None and pending.node_id == node.node_id
                   and pending.seq <= seen and call_id not in held]
        for pending in dropped:
            self.log.warning("call_dropped_by_node", call_id=pending.call_id, node_id=node.node_id, seq=pending.seq,
                             seen=seen)
            self._lost_on(pending, node, dropped=True)
        if dropped:
            self.kick()
        self._cancel_unwanted(node, held)

    def _cancel_unwanted(self, node: NodeState, held: set[str]) -> None:
        """Ask ``node`` (again) to cancel the calls it holds that nothing waits for: ended here (cancelled while the
        node was away, or before it came back after a restart of ours: its result would be ignored) or cancelled
        while on it. A CANCEL is not sequenced: lost on the way (a reset, a send refused while the node
        reconnected), the node ran the call to its end. Once a STATUS (a heartbeat) or HELLO, while it holds them."""
        for call_id in held:
            pending = self.calls.get(call_id)
            if pending is None or (pending.cancel_requested
                                   and (pending.node_id == node.node_id or node.node_id in pending.lost_on)):
                self.hub.send(node.node_id, Msg.CANCEL, {"call_id": call_id})

    def on_node_hello(self, node: NodeState, running: set[str]) -> None:
        """A node (re)introduced itself with the calls it holds (running or queued there). Calls we think it
        holds but it does not list are placed again; calls it holds that we queued again (we restarted and
        recovered them) stay with it instead of running twice.

        A call placed again here is not failed, whatever its attempts: a HELLO may have been written before
        a CALL on its way arrived (after a controller restart, a node says HELLO to each WELCOME asking for
        one), so a call it does not list is not proof that the node lost it; the node ignores the CALL it
        then gets twice. The attempt still counts, so a call that takes its node down each time it runs ends
        FAILED when a node is lost with it past ``max_attempts``."""
        for call_id in list(node.inflight):
            if call_id not in running:
                pending = self.calls.get(call_id)
                if pending is not None and pending.node_id == node.node_id:
                    self._release(pending)
                    self._requeue(pending, "node_hello")  # (restarted, or it saw a gap in our messages)
        for call_id in running:
            pending = self.calls.get(call_id)
            if pending is not None and pending.node_id is None and not pending.cancelled:
                self.queue.discard(pending)  # it must not be placed a second time
                self._unreserve(pending)
                self._stop_awaiting(pending)
                pending.node_id = pending.last_node = node.node_id
                # Its sequence number, if any, was another node's: this one's numbering says nothing of it (as
                # a recovered call, it counts as sent before anything this node has seen).
                pending.seq = 0
                node.inflight.add(call_id)
                node.warm_busy[pending.key] = node.warm_busy.get(pending.key, 0) + 1
        for call_id in list(self.awaiting.get(node.node_id, ())):  # lost with it on their last attempt: it has not
            if (pending := self.calls.get(call_id)) is not None:  # them (their results would have come first)
                self._fail_lost(pending, node.node_id, "it came back without the call")
        for call_id in self.reserved.pop(node.node_id, set()):  # kept for it, and it does not hold them
            if (pending := self.calls.get(call_id)) is not None and pending.node_id is None and not pending.cancelled:
                pending.reserved_for = ""
                self.queue.append(pending)
        self._cancel_unwanted(node, running)
        self._heard_from(node.node_id)
        self.kick()

    def on_function_state(self, node: NodeState, key: str, state: str) -> None:
        if state in ("ready", "failed"):
            self.kick()  # ready: its calls can go there; failed everywhere: its calls fail
        elif state == "retired" and any(p.key == key for p in self.calls.values()):
            # The node dropped an old version that calls still want (one may be on its way to it and come back
            # REJECTED): it gets it again, and they are placed once it is ready.
            name, _, version = key.rpartition("@")
            self.hub.resend_function(node.node_id, name, int(version))

    # ---- deleted functions ---------------------------------------------------------------------
    def function_deleted(self, name: str, up_to: int) -> int:
        """A function was deleted: its calls still waiting here end CANCELLED (``FunctionDeleted``); those on
        nodes run to their end. Once none is left, the nodes are told to forget the function (its warm
        containers, code and dependencies). Returns how many calls were cancelled."""
        self.deleted[name] = max(up_to, self.deleted.get(name, 0))
        waiting = [p for p in self.calls.values()
                   if p.function == name and p.version <= up_to and p.node_id is None and not p.cancel_requested]
        for pending in waiting:
            self._cancel_deleted(pending)
        self.forget_when_idle(name, up_to)
        return len(waiting)

    def forget_when_idle(self, name: str, up_to: int) -> None:
        self.gone[name] = max(up_to, self.gone.get(name, 0))
        self._announce_gone(name)

    def has_calls(self, name: str, up_to: int) -> bool:
        return any(version <= up_to for version in self._versions_held.get(name, {}))

    def _announce_gone(self, name: str) -> None:
        up_to = self.gone.get(name)
        if up_to is None or self.has_calls(name, up_to):
            return
        del self.gone[name]
        self.log.info("function_forgotten_by_nodes", function=name, up_to=up_to)
        for node in self.hub.nodes.values():
            for key in [k for k in (*node.ready, *node.failed) if k.rpartition("@")[0] == name]:
                node.ready.discard(key)
                node.failed.pop(key, None)
        self.hub.broadcast(Msg.FUNCTION_GONE, {"name": name, "up_to": up_to})

    # ---- cancelling ----------------------------------------------------------------------------
    def cancel(self, call_id: str) -> bool:
        pending = self.calls.get(call_id)
        if pending is None:
            return False
        if pending.awaiting:  # its node was lost with it, and may still be running it
            self.hub.send(pending.awaiting, Msg.CANCEL, {"call_id": call_id})
            pending.cancelled = True
            self.finish(pending, CallStatus.CANCELLED, {"error": {
                "type": "Cancelled", "message": f"cancelled while its node {pending.awaiting} was out of reach"}})
        elif pending.node_id is None:
            if pending.reserved_for:  # recovered as on that node, which may be running it: told, if it is there
                for node_id in self.hub.nodes if pending.reserved_for == ANY_NODE else (pending.reserved_for,):
                    self.hub.send(node_id, Msg.CANCEL, {"call_id": call_id})
                self._unreserve(pending)
            pending.cancelled = True
            self.finish(pending, CallStatus.CANCELLED, {"error": {"type": "Cancelled",
                                                                  "message": "cancelled before it started"}})
        else:
            pending.cancel_requested = True  # if its node gives it back (rejected, lost), it ends CANCELLED
            self.hub.send(pending.node_id, Msg.CANCEL, {"call_id": call_id})
        return True

    def withdraw(self, call_id: str) -> None:
        """Forget a call whose creation was not stored: its caller gets an error, not an id, so nothing about
        it is written and it is not counted. If it was already sent to a node, the node is asked to cancel it
        and its result will be ignored."""
        pending = self._let_go(call_id)
        if pending is None:
            return
        pending.cancelled = True
        self.queue.discard(pending)
        self._stop_awaiting(pending)
        pending.dispatch_unwritten = False
        if pending.node_id is not None:
            self.hub.send(pending.node_id, Msg.CANCEL, {"call_id": call_id})
            self._release(pending)

    # ---- recovery ------------------------------------------------------------------------------
    async def recover(self) -> int:
        """Queue again every call the store holds as not finished (after a controller restart). The durable queue
        is read a chunk at a time (``Store.active_entries``), and an entry that cannot run is taken out of it and
        logged, never raised: a call whose outcome is stored (it ended; only its removal from the queue was lost),
        an id whose record is gone, a record without a field a call needs or with one that cannot be read. Nothing
        the store holds keeps the controller from starting."""
        count = 0
        # Per function version: "yes", "" (deleted while its calls waited: they end CANCELLED) or why its record cannot
        # be read (they end FAILED).
        exists: dict[tuple[str, int], str] = {}
        up = {node_id: info for node_id, info in (await self.store.list_nodes()).items()
              if info.get("state") != "lost" and node_id not in self.hub.nodes}
        self.awaiting_hello = set(up)
        # A node that heartbeats less often than we do says HELLO that much later (its next heartbeat draws our
        # WELCOME{hello}): the grace is the longest silence any of them announced, or ours.
        longest = max([min(s, MAX_SILENCE) for info in up.values() if (s := timestamp(info.get("peer_silence")))],
                      default=0.0)
        dropped: dict[str, int] = {}  # kind -> entries taken out of the queue
        async with contextlib.aclosing(self.store.active_entries()) as chunks:
            async for chunk in chunks:  # oldest first
                unrunnable = [entry for entry in chunk if entry.call is None]
                if unrunnable:
                    await self._drop_unrunnable(unrunnable, dropped)
                for entry in chunk:
                    call = entry.call
                    if call is None or call["id"] in self.calls:
                        continue
                    count += await self._recover_call(call, exists)
        if count:
            self.log.info("calls_recovered", count=count,
                          kept_for_their_nodes=sum(len(ids) for ids in self.reserved.values()))
            self.metrics.requeued.inc(count, reason="controller_restarted")
            self.kick()
        if dropped:
            self.log.warning("recovery_took_out_of_the_queue", **dropped)
        self.grace = max(self.config.heartbeat * self.config.liveness, longest) + self.config.heartbeat
        if self.reserved:
            asyncio.get_running_loop().call_later(self.grace, self.release_reserved)
        else:
            self.awaiting_hello.clear()
        return count

    async def _recover_call(self, call: dict[str, Any], exists: dict[tuple[str, int], str]) -> int:
        """Hold a call of the store's durable queue again: queued, or kept for the node that may hold it. Returns 1,
        or 0 if its function version is gone (the call ends CANCELLED) or its record damaged (FAILED)."""
        pending = Pending(call_id=call["id"], function=call["function"], version=call["version"],
                          params=call.get("params"), timeout=call.get("timeout") or 30.0,
                          attempts=call.get("attempts") or 0,
                          stamps={"QUEUED": call.get("t_QUEUED") or call.get("created") or time.time()},
                          record=call)
        version = (pending.function, pending.version)
        if version not in exists:
            try:
                exists[version] = "yes" if await self.store.get_version(*version) is not None else ""
            except CorruptRecord as exc:
                self.log.error("function_version_record_corrupt", function=pending.key, error=str(exc))
                exists[version] = str(exc)
        self._hold(pending)
        if exists[version] != "yes":
            if exists[version]:  # its version's record is damaged: it cannot be sent to a node
                self.finish(pending, CallStatus.FAILED,
                            {"error": {"type": "MalformedRecord", "message": exists[version]}})
            else:
                self.finish(pending, CallStatus.CANCELLED, {"error": {
                    "type": "FunctionDeleted", "message": f"function {pending.key} was deleted before the call ran"}})
            return 0
        node_id = call.get("node") or ""
        node = self.hub.nodes.get(node_id)
        if call.get("status") in ("DISPATCHED", "RUNNING") and node_id and (node is None or not node.alive()):
            self._reserve(pending, node_id)
        elif self.awaiting_hello:
            # Recorded as waiting, it may still be on a node: its DISPATCHED write waits a moment after the
            # dispatch (or did not land), and a call placed again after a lost node is recorded as waiting
            # until its next dispatch is. Kept until every node that was up has said which calls it holds.
            self._reserve(pending, ANY_NODE)
        else:
            self.queue.append(pending)
        return 1

    async def _drop_unrunnable(self, entries: list[ActiveEntry], dropped: dict[str, int]) -> None:
        """Take out of the durable queue what recovery found cannot run, saying which and why (each id, up to
        ``DROPPED_LOGGED`` of a kind; the counts once recovery is done)."""
        for entry in entries:
            seen = dropped[entry.kind] = dropped.get(entry.kind, 0) + 1
            if seen > DROPPED_LOGGED:
                continue
            if entry.kind == "ended":
                self.log.info("recovered_call_already_ended", call_id=entry.call_id, status=entry.status,
                              action="taken out of the queue, not run again")
            elif entry.kind == "malformed":
                self.log.error("call_record_malformed", call_id=entry.call_id, problem=entry.problem,
                               action="it cannot run: ended FAILED (MalformedRecord) and taken out of the queue")
            else:
                self.log.warning("queued_call_without_record", call_id=entry.call_id, problem=entry.problem,
                                 action="taken out of the queue")
        try:
            await self.store.drop_active(entries)
        except StoreError as exc:  # they are skipped all the same, and found again at the next start
            self.log.error("recovery_cleanup_not_stored", calls=len(entries), error=str(exc))

    def _reserve(self, pending: Pending, node_id: str) -> None:
        pending.reserved_for = node_id
        self.reserved.setdefault(node_id, set()).add(pending.call_id)

    def _heard_from(self, node_id: str) -> None:
        """``node_id`` said HELLO after a restart: once every node that was up has, the recovered calls no node
        claimed are placed."""
        self.awaiting_hello.discard(node_id)
        if not self.awaiting_hello and ANY_NODE in self.reserved:
            for call_id in self.reserved.pop(ANY_NODE):
                if (pending := self.calls.get(call_id)) is not None and pending.node_id is None \
                        and not pending.cancelled:
                    pending.reserved_for = ""
                    self.queue.append(pending)

    def _unreserve(self, pending: Pending) -> None:
        if pending.reserved_for:
            self.reserved.get(pending.reserved_for, set()).discard(pending.call_id)
            pending.reserved_for = ""

    def release_reserved(self) -> None:
        """The recovered calls still kept for nodes that have not said HELLO since: placed anywhere now."""
        for call_ids in self.reserved.values():
            for call_id in call_ids:
                pending = self.calls.get(call_id)
                if pending is not None and pending.node_id is None and not pending.cancelled:
                    pending.reserved_for = ""
                    self.queue.append(pending)
        self.awaiting_hello.clear()
        if self.reserved:
            self.reserved.clear()
            self.kick()

    # ---- stopping ------------------------------------------------------------------------------
    async def stop(self, timeout: float) -> None:
        """The controller is stopping: nothing is placed any more, the DISPATCHED writes that wait are made now,
        and the outcomes not stored yet are waited for (at most ``timeout`` seconds; a failed write is retried
        meanwhile). Left unwritten, a call ended here would be recovered as active at the next start and run
        again; a call on a node with no DISPATCHED write would be placed on another node as well."""
        self.stopping = True
        self._flush_dispatched()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.unstored and loop.time() < deadline:
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(self.store.settled(), max(0.0, deadline - loop.time()))
        except (TimeoutError, StoreError) as exc:
            self.log.warning("writes_not_settled_at_stop", error=repr(exc))
        if self.unstored:
            self.log.warning("outcomes_not_stored_at_stop", calls=len(self.unstored))

    def snapshot(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "active": len(self.calls),
                "awaiting_lost_nodes": sum(len(ids) for ids in self.awaiting.values()),
                "inflight": sum(len(n.inflight) for n in self.hub.nodes.values()), "time": time.time()}
