"""The broker: a ZMQ ROUTER that miniworkers connect to, and the matching of calls to idle miniworkers.

* Idle miniworkers wait in one LRU queue per pool key (a function key, ``rt:<runtime>`` for started-ahead
  containers of a runtime, or ``oneshot``); a call takes the least recently used idle one of the first pool
  that can serve it.
* Calls with no idle miniworker wait in a bounded queue per function; the pool manager sees the queue
  and starts miniworkers; beyond the bound the node rejects the call (the controller places it elsewhere).
* Pipelining: when no miniworker is idle, a busy warm miniworker of a short function (recent runs under
  ``pipeline_max_run``, 5 ms by default) is given one more call to hold; it starts that call the moment it sends the
  current result, so the broker's round trip overlaps the run. A held call has not started: if its
  miniworker ends or is stopped first, it goes back to the head of its queue (not an attempt). A cancel
  asks the miniworker to drop it (``MW_DROP``) and the miniworker's answer decides: dropped (CANCELLED,
  never ran), or already started (its previous result arrives first: cancelled as a running call is).
* Liveness: the broker heartbeats every live miniworker; one that is silent past ``liveness`` heartbeats,
  whose process exits, or that overruns its call's timeout is lost: its call is retried once (at-least-
  once) or failed with the reason, and the pool manager starts a replacement.
"""

from __future__ import annotations

import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import zmq

from miniworker.spec import LoadSpec
from node_agent.config import AgentConfig
from node_agent.functions import FnState, Registry
from node_agent.metrics import AgentMetrics
from node_agent.miniworkers import LIVE, ONESHOT, MwHandle, MwState, generic_key
from node_agent.tickets import Ticket
from shoal import protocol
from shoal.logs import get_logger
from shoal.models import REJECTED, Policy
from shoal.protocol import Message, Msg, ProtocolError

Outcome = Callable[[Ticket, dict[str, Any]], None]
#: Seconds a busy miniworker may overrun its call's timeout before it is declared lost.
OVERRUN_GRACE = 10.0
#: A miniworker asked to stop (it removes its container) that has not exited after this long is killed; the agent
#: removes its container by label.
STOP_DEADLINE_S = 30.0
#: Seconds after which a running call is reported RUNNING to the controller (see tick()).
RUNNING_REPORT_AFTER = 0.05
#: Miniworkers in a row whose function would not load (import or dependency error) before the function is failed.
LOAD_FAILURES_MAX = 3
#: A call running this many times its function's average (and past pipeline_max_run) is stuck (see Broker.stuck).
STUCK_RUNS = 20
CANCELLED_BEFORE_START = {"type": "Cancelled", "message": "cancelled before it started"}
CANCELLED_RUNNING = {"type": "Cancelled", "message": "cancelled while running; its container was removed"}


class Broker:
    def __init__(
        self,
        config: AgentConfig,
        registry: Registry,
        metrics: AgentMetrics,
        ctx: zmq.Context[Any],
        on_outcome: Outcome,
        load_for: Callable[[str], LoadSpec],
        on_lost: Callable[[MwHandle], None],
        on_dispatch: Callable[[Ticket], None],
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.on_outcome = on_outcome
        self.load_for = load_for
        self._on_lost = on_lost
        self.on_dispatch = on_dispatch
        # Miniworkers gone (their handles dropped) whose container the agent is still removing: each still holds
        # a slot (see the pool), until ``cleaned``.
        self.removing: set[str] = set()
        self.log = get_logger("broker", node_id=config.node_id)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(config.broker_url)
        self.mws: dict[str, MwHandle] = {}
        self.idle: dict[str, OrderedDict[str, None]] = {}
        self.queues: dict[str, deque[Ticket]] = {}
        self.running: dict[str, Ticket] = {}
        self.next_heartbeat = 0.0
        self.spawn_blocked_until: dict[str, float] = {}
        self.failures: dict[str, int] = {}
        self.run_s: dict[str, float] = {}  # moving average of each function's run time (seconds)
        self.start_s: dict[str, float] = {}  # moving average of each pool's miniworker start (spawn to ready)
        # Pool key -> the pool that claimed its next slot (see PoolManager): the first of its miniworkers whose
        # call ends (none held after it) is stopped, and none of them is given a call to hold meanwhile.
        self.yield_from: dict[str, str] = {}
        self.draining = False  # set by the agent: calls that would wait here go back to the controller
        #: Told when a function fails to load in LOAD_FAILURES_MAX miniworkers in a row (key, reason).
        self.on_load_failures: Callable[[str, str], None] | None = None
        self.on_start_failures: Callable[[str, str], None] | None = None  # (the agent: see start_failed)

    # ---- sending -------------------------------------------------------------------------------
    def send(self, h: MwHandle, mtype: bytes, header: dict[str, Any]) -> bool:
        """Send to a miniworker; False (and the miniworker is lost) if it cannot be reached. One being stopped is
        not lost but ended here (the socket does not know one spawned a moment ago, not connected yet): killed,
        and its container, if it made one, removed by label once its exit is seen (tick)."""
        try:
            self.sock.send_multipart([h.mw_id.encode(), *protocol.encode(mtype, header)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: it is gone from the socket (or not there yet); EAGAIN: it stopped reading.
            if h.state == MwState.STOPPING:
                self.log.info("miniworker_stopped_unreached", mw_id=h.mw_id, pool=h.pool_key, error=exc.strerror)
                if h.proc.poll() is None:
                    h.killed = True
                    h.proc.send_signal(signal.SIGKILL)
            else:
                self.lose(h, f"cannot reach miniworker ({exc.strerror})")
            return False

    # ---- calls ---------------------------------------------------------------------------------
    def candidates(self, key: str) -> tuple[str, ...]:
        fn = self.registry.functions.get(key)
        if fn is None:
            return ()  # forgotten (deleted): no pool serves it
        policy = self.registry.policy_of(fn)
        if policy == Policy.NONE:
            return (ONESHOT,)
        if policy == Policy.RUNTIME:
            return (key, generic_key(fn.spec.runtime))
        return (key,)

    def submit(self, ticket: Ticket) -> None:
        """Dispatch now if a miniworker is idle, else queue (bounded), else reject."""
        fn = self.registry.functions[ticket.key]
        queue = self.queues.setdefault(ticket.key, deque())
        if fn.state == FnState.READY and not queue:
            h = self.take_idle(self.candidates(ticket.key)) or self.take_pipelined(ticket.key, time.monotonic())
            if h is not None:
                self.dispatch(h, ticket)
                return
        if len(queue) >= self.config.queue_limit:
            self.on_outcome(ticket, {"status": REJECTED, "error": {
                "type": "QueueFull",
                "message": f"node {self.config.node_id} has {len(queue)} calls waiting for {ticket.key}",
            }})
            return
        ticket.queued = True
        queue.append(ticket)

    def take_idle(self, keys: tuple[str, ...]) -> MwHandle | None:
        for key in keys:
            lru = self.idle.get(key)
            if lru:
                mw_id, _ = lru.popitem(last=False)
                return self.mws[mw_id]
        return None

    def stuck(self, h: MwHandle, now: float) -> bool:
        """Whether a busy miniworker's call has run far longer than its function's calls do (a hung call of a
        short function): it neither holds a next call nor counts as about to serve the queue."""
        run = self.run_s.get(h.function or "")
        if h.ticket is None or run is None:
            return False
        return now - h.ticket.dispatched > max(self.config.pipeline_max_run, STUCK_RUNS * run)

    def serving(self, key: str, now: float) -> int:
        """Miniworkers of ``key`` ready or about to be: idle, or busy with a call that is not stuck."""
        return sum(1 for h in self.mws.values() if h.function == key and (
            h.state == MwState.IDLE or (h.state == MwState.BUSY and not self.stuck(h, now))))

    def take_pipelined(self, key: str, now: float) -> MwHandle | None:
        """A busy warm miniworker of ``key`` that can hold one more call (the one busy longest, unless stuck),
        if the function is short enough to pipeline."""
        limit = self.config.pipeline_max_run
        if self.run_s.get(key, limit) >= limit:
            return None
        best: MwHandle | None = None
        for h in self.mws.values():
            if (h.state == MwState.BUSY and h.function == key and h.ahead is None and not h.loading
                    and not h.outdated and h.pool_key not in self.yield_from and h.ticket is not None
                    and h.mode != ONESHOT and not self.stuck(h, now)
                    and (best is None or h.ticket.dispatched < best.ticket.dispatched)):  # type: ignore[union-attr]
                best = h
        return best

    def make_idle(self, h: MwHandle) -> None:
        if h.outdated:
            self.stop(h)  # (ready, or done with its call) its runtime's image, path or commands have changed
            return
        h.state = MwState.IDLE
        h.idle_since = time.monotonic()
        self.idle.setdefault(h.pool_key, OrderedDict())[h.mw_id] = None

    def runtime_changed(self, name: str) -> None:
        """Runtime ``name`` was redefined (image, code path, commands): its miniworkers, started on the old
        definition, take no new call; the idle ones stop now, the others once their call ends (the pool starts new
        ones). They served on the old image for ever, and those started ahead failed each first call (the code is
        mounted at the old path)."""
        for h in list(self.mws.values()):
            if h.runtime == name and h.state in LIVE and not h.outdated:
                h.outdated = True
                if h.state == MwState.IDLE:
                    self.stop(h)
        self.log.info("runtime_changed", runtime=name)

    def forget_idle(self, h: MwHandle) -> None:
        lru = self.idle.get(h.pool_key)
        if lru is not None:
            lru.pop(h.mw_id, None)

    def dispatch(self, h: MwHandle, ticket: Ticket) -> None:
        header: dict[str, Any] = {"call_id": ticket.call_id, "params": ticket.params, "timeout": ticket.timeout}
        if h.state == MwState.BUSY:  # pipelined: it holds the call until its current one ends
            if not self.send(h, Msg.MW_CALL, header):
                self.requeue(ticket)
                self.pump()
                return
            h.ahead = ticket
            ticket.ahead = True
            ticket.mw_id = h.mw_id
            ticket.dispatched = time.monotonic()
            self.running[ticket.call_id] = ticket
            return
        h.loading = h.function is None
        if ticket.queued and h.calls_served == 0:
            ticket.cold_wait = True  # it waited for this miniworker's container to start
        if h.loading:
            try:
                header["load"] = _as_dict(self.load_for(ticket.key))
            except KeyError as exc:  # its function or runtime was deleted meanwhile
                self.make_idle(h)
                self.on_outcome(ticket, {"status": "FAILED", "error": {
                    "type": "FunctionUnavailable", "message": f"{ticket.key} cannot be loaded here: {exc} is unknown"}})
                return
            if h.mode == "runtime":
                self.forget_idle(h)
                h.function = ticket.key  # from now on it serves this function only
        # Read before the send: once sent, the call may be running while this process waits for a core.
        started_at, dispatched = time.time(), time.monotonic()
        if not self.send(h, Msg.MW_CALL, header):
            # It never reached the miniworker: not an attempt. Back to the head of its queue.
            self.requeue(ticket)
            self.pump()  # another idle miniworker may take it (each failed send loses one: this ends)
            return
        h.state = MwState.BUSY
        h.ticket = ticket
        ticket.mw_id = h.mw_id
        ticket.dispatched = dispatched
        ticket.started_at = started_at
        self.running[ticket.call_id] = ticket
        if ticket.queued or h.loading:
            self.on_dispatch(ticket)  # it waited or starts cold: say RUNNING now; warm calls see tick()

    def requeue(self, ticket: Ticket) -> None:
        """Back to the head of its queue: it did not start, so this is not an attempt. While the node drains
        (nothing new starts) it goes back to the controller instead, which places it on another node."""
        self.running.pop(ticket.call_id, None)
        if self.draining:
            self.on_outcome(ticket, {"status": REJECTED, "error": {
                "type": "Draining", "message": f"node {self.config.node_id} is draining"}})
            return
        ticket.mw_id = None
        ticket.ahead = False
        ticket.queued = True
        self.queues.setdefault(ticket.key, deque()).appendleft(ticket)

    def give_back_running(self, why: str) -> int:
        """The node stops with calls still running (its drain timed out): each goes back to the controller now,
        to be placed on another node, instead of waiting there until this node is taken for lost (and, on its
        last attempt, until its timeout has passed). Their miniworkers are told to stop, which ends the runs."""
        given = 0
        for h in list(self.mws.values()):
            ticket = h.ticket
            if ticket is None:
                continue
            # ``ran``: it started here (and may have done part of its work): the controller counts the attempt. Not
            # a call whose container was still starting or whose function was still loading.
            self.finish(h, ticket, {"status": REJECTED, "ran": not h.loading,
                                    "error": {"type": "Draining", "message": why}})
            given += 1
        return given

    def requeue_ahead(self, h: MwHandle) -> None:
        """The held call did not start (its miniworker ended or gave it back): queue it again, unless it was
        cancelled meanwhile, which then ends it."""
        ticket, h.ahead = h.ahead, None
        if ticket is None:
            return
        if ticket.cancelling:
            self.running.pop(ticket.call_id, None)
            self.on_outcome(ticket, {"status": "CANCELLED", "error": CANCELLED_BEFORE_START})
        else:
            self.requeue(ticket)

    def promote(self, h: MwHandle, started_at: Any = None) -> None:
        """The held call started when its miniworker sent the previous result (``started_at``: when, as that
        result says; this link's latency earlier than now). If it was cancelled while held, the drop came too
        late: it is cancelled as a running call is (its container goes)."""
        ticket, h.ahead = h.ahead, None
        assert ticket is not None
        ticket.ahead = False
        now, mono = time.time(), time.monotonic()
        held_since = now - (mono - ticket.dispatched)  # when it was handed over, on the wall clock
        ticket.dispatched = mono
        valid = isinstance(started_at, float | int) and not isinstance(started_at, bool)
        # The same host's clock, a moment ago: a value from the future or from before the hand-over is not that.
        ticket.started_at = started_at if valid and held_since <= started_at <= now else now
        h.ticket = ticket
        if ticket.cancelling:
            self.finish(h, ticket, {"status": "CANCELLED", "error": CANCELLED_RUNNING})
            self.stop(h)

    def pump(self) -> None:
        """Hand queued calls to idle miniworkers that can serve them, oldest call first."""
        pending = [(q[0].received, key) for key, q in self.queues.items() if q]
        for _, key in sorted(pending):
            fn = self.registry.functions.get(key)
            if fn is None or fn.state != FnState.READY:
                continue
            queue = self.queues[key]
            keys = self.candidates(key)
            while queue:
                h = self.take_idle(keys) or self.take_pipelined(key, time.monotonic())
                if h is None:
                    break
                self.dispatch(h, queue.popleft())

    def forget(self, key: str) -> None:
        """A function version is no longer known here: what the broker kept about it goes too."""
        self.fail_queued(key, {"type": "UnknownFunction", "message": f"{key} was deleted"})
        self.run_s.pop(key, None)
        self.start_s.pop(key, None)
        self.failures.pop(key, None)
        self.spawn_blocked_until.pop(key, None)
        self.yield_from.pop(key, None)

    def fail_queued(self, key: str, error: dict[str, Any], status: str = "FAILED") -> None:
        queue = self.queues.pop(key, None)
        while queue:
            self.on_outcome(queue.popleft(), {"status": status, "error": error})

    def cancel(self, call_id: str) -> bool:
        for queue in self.queues.values():
            for queued in queue:
                if queued.call_id == call_id:
                    queue.remove(queued)
                    self.on_outcome(queued, {"status": "CANCELLED", "error": CANCELLED_BEFORE_START})
                    return True
        ticket = self.running.get(call_id)
        if ticket is None or ticket.mw_id is None:
            return False
        h = self.mws.get(ticket.mw_id)
        if h is None:
            return False
        if h.ahead is ticket:
            # Held: the miniworker may already have started it (its previous result on the way here). It
            # answers the drop (CANCELLED, never started) or its previous result comes first (promote()).
            if not ticket.cancelling:
                ticket.cancelling = True
                self.send(h, Msg.MW_DROP, {"call_id": call_id})
            return True
        self.finish(h, ticket, {"status": "CANCELLED", "error": CANCELLED_RUNNING})
        self.stop(h)
        return True

    def finish(self, h: MwHandle, ticket: Ticket, header: dict[str, Any]) -> None:
        h.ticket = None
        h.loading = False
        self.running.pop(ticket.call_id, None)
        self.on_outcome(ticket, header)

    # ---- miniworker messages -------------------------------------------------------------------
    def on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0].decode("ascii", "replace")
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError as exc:
            self.log.error("protocol_error", source=identity, error=str(exc))
            self.metrics.protocol_errors.inc(socket="broker")
            return
        h = self.mws.get(identity)
        if h is None:
            self.log.warning("message_from_unknown_miniworker", mw_id=identity, type=msg.name)
            self.metrics.protocol_errors.inc(socket="broker")
            return
        h.last_seen = time.monotonic()
        handler = self._handlers.get(msg.type)
        if handler is None:
            self.log.error("unexpected_message", mw_id=identity, type=msg.name)
            return
        handler(self, h, msg)

    def _on_ready(self, h: MwHandle, msg: Message) -> None:
        if h.state != MwState.STARTING:
            self.log.error("ready_out_of_turn", mw_id=h.mw_id, state=h.state)
            return
        h.container_id = msg.header["container_id"]
        self.failures.pop(h.pool_key, None)
        took, last = time.monotonic() - h.spawned, self.start_s.get(h.pool_key)
        self.start_s[h.pool_key] = took if last is None else 0.8 * last + 0.2 * took
        fn = self.registry.functions.get(h.function) if h.function else None
        if fn is not None:
            fn.start_failures = 0
        self.make_idle(h)
        self.pump()

    def _on_result(self, h: MwHandle, msg: Message) -> None:
        header = msg.header
        call_id = header["call_id"]
        if h.ahead is not None and h.ahead.call_id == call_id:
            # A held call is answered REJECTED (its miniworker ended first) or CANCELLED (dropped on our
            # request) when it did not start; with its outcome when it ran before the previous result was
            # taken in (that call was ended here: cancelled, its miniworker stopped).
            if header["status"] == "CANCELLED":
                h.ahead.cancelling = True
            elif header["status"] != REJECTED:
                ticket, h.ahead = h.ahead, None
                ticket.ahead = False
                self.running.pop(ticket.call_id, None)
                self.on_outcome(ticket, header)
                return
            self.requeue_ahead(h)
        elif h.ticket is not None and h.ticket.call_id == call_id:
            ticket = h.ticket
            if header.get("container_id"):
                h.container_id = header["container_id"]
            if header["status"] == REJECTED:
                h.ticket = None
                self.requeue(ticket)
            else:
                h.calls_served += 1
                self._note_run_time(ticket.key, header.get("timings"))
                self.finish(h, ticket, header)
        else:
            self.log.warning("late_result_ignored", mw_id=h.mw_id, call_id=call_id)
            if h.ticket is None and h.ahead is not None and h.state == MwState.STOPPING:
                self.promote(h)  # that call was ended here (cancelled); its miniworker then started the held one
            return
        if header.get("retire"):
            if h.state in LIVE:  # (one stopped or lost already keeps its state and its stop clock)
                self._leave(h, MwState.STOPPING)  # it leaves on its own (its container removed first)
        elif h.state == MwState.STOPPING:
            pass  # it is on its way out: nothing more is handed to it
        elif h.ticket is None and h.ahead is None and h.pool_key in self.yield_from:
            del self.yield_from[h.pool_key]
            self.stop(h)  # its slot goes to a function that has no miniworker (see PoolManager)
        elif h.ticket is None:
            if h.ahead is not None:
                self.promote(h, header.get("held_started_at"))
            else:
                self.make_idle(h)
        self.pump()

    def _note_run_time(self, key: str, timings: Any) -> None:
        run = timings.get("run_s") if isinstance(timings, dict) else None
        if isinstance(run, int | float) and not isinstance(run, bool):
            last = self.run_s.get(key)
            self.run_s[key] = float(run) if last is None else 0.8 * last + 0.2 * float(run)

    def back_off(self, pool_key: str) -> int:
        """One more failed start in ``pool_key``: its next spawn waits (0.5 s, doubling, at most 30 s)."""
        failures = self.failures[pool_key] = self.failures.get(pool_key, 0) + 1
        self.spawn_blocked_until[pool_key] = time.monotonic() + min(30.0, 0.25 * 2**failures)
        return failures

    def _on_failed(self, h: MwHandle, msg: Message) -> None:
        reason = msg.header["reason"]
        if h.state not in LIVE:
            # Leaving already (stopped, retiring, failed or lost): not a start that failed. Counted as one, a
            # miniworker saying it more than once (a function's code flooding its runner) failed the function here.
            self.log.info("miniworker_failed_while_leaving", mw_id=h.mw_id, pool=h.pool_key, reason=reason[:200])
            self.requeue_ahead(h)
            return
        served = h.state in (MwState.IDLE, MwState.BUSY)  # it was ready: its container died while idle
        self._leave(h, MwState.FAILED)
        h.reason = reason
        self.forget_idle(h)
        self.metrics.mw_lost.inc(reason="died_idle" if served else "start_failed")
        self.log.warning("miniworker_failed", mw_id=h.mw_id, pool=h.pool_key, reason=reason)
        self.requeue_ahead(h)
        if served:
            # MFAILED carries no call: one sent to it as it died never started there, and the pool replaces
            # it. Not a failed start either, so no back-off.
            if h.ticket is not None:
                ticket, h.ticket = h.ticket, None
                self.requeue(ticket)
            self.pump()
            return
        if h.ticket is not None:
            self.finish(h, h.ticket, {"status": "FAILED", "error": {"type": "MiniworkerFailed", "message": reason}})
        failures = self.back_off(h.pool_key)
        error = msg.header.get("error") or {"type": "StartFailed", "message": reason}
        if "error" in msg.header and h.function:
            # The function itself does not load (import or dependency error): its waiting calls fail now, and
            # after LOAD_FAILURES_MAX in a row the function is failed on this node (no container is started for
            # it again until it is sent anew).
            self.fail_queued(h.function, dict(error, logs=msg.header.get("logs", "")))
            fn = self.registry.functions.get(h.function)
            if fn is not None:
                fn.start_failures += 1
                if fn.start_failures >= LOAD_FAILURES_MAX and self.on_load_failures is not None:
                    self.on_load_failures(h.function, f"{error.get('type')}: {error.get('message')}")
        else:
            self.start_failed(h.pool_key, failures, reason)

    def start_failed(self, pool_key: str, failures: int, reason: str) -> None:
        """Miniworkers of ``pool_key`` fail to start (not a function that does not load: the engine, the image, this
        host). From the third in a row, each function they would serve is failed here, for a while: the agent
        reports it, gives its waiting calls back to the controller, which places them on other nodes, and tries
        again later (they used to fail here, though another node could run them)."""
        if failures < 3:
            return
        message = f"{failures} miniworkers failed to start: {reason}"
        for key in [k for k, fn in self.registry.functions.items() if fn.state == FnState.READY]:
            if pool_key in self.candidates(key):
                if self.on_start_failures is not None:
                    self.on_start_failures(key, message)
                else:
                    self.fail_queued(key, {"type": "StartFailed", "message": message})

    def _on_heartbeat(self, h: MwHandle, msg: Message) -> None:
        pass  # last_seen was updated for every message

    _handlers: dict[bytes, Callable[[Broker, MwHandle, Message], None]] = {
        Msg.MW_READY: _on_ready,
        Msg.MW_RESULT: _on_result,
        Msg.MW_FAILED: _on_failed,
        Msg.MW_HEARTBEAT: _on_heartbeat,
    }

    # ---- liveness ------------------------------------------------------------------------------
    def add(self, h: MwHandle) -> None:
        self.mws[h.mw_id] = h
        self.metrics.mw_started.inc()

    @staticmethod
    def _leave(h: MwHandle, state: MwState) -> None:
        """``h`` stops being live (STOPPING or FAILED); its stop clock starts (see STOP_DEADLINE_S, and the pool:
        it holds its slot until its process exits)."""
        h.state = state
        h.stopped_at = time.monotonic()

    def stop(self, h: MwHandle, give_back: bool = False) -> None:
        """Ask a miniworker to remove its container and exit. A call it holds may have started already (its
        previous result on the way here): it stays held until the miniworker says (REJECTED: never started; its
        result: it ran) or exits (then it is queued again), unless ``give_back`` (the agent is about to exit:
        what is held goes back now, to be answered while the agent still can, from a miniworker already stopping
        too)."""
        if h.state not in LIVE:
            if give_back:
                self.requeue_ahead(h)
            return
        self.forget_idle(h)
        self._leave(h, MwState.STOPPING)
        h.reason = h.reason or "stopped by the pool"
        if give_back:
            self.requeue_ahead(h)
        self.send(h, Msg.MW_STOP, {})

    def lose(self, h: MwHandle, reason: str, outcome: dict[str, Any] | None = None) -> None:
        """``h`` is gone or wedged: killed, and its call retried (``retries_on_loss``), or ended ``outcome``."""
        if h.state == MwState.FAILED:
            return
        self.log.warning("miniworker_lost", mw_id=h.mw_id, pool=h.pool_key, reason=reason,
                         call_id=h.ticket.call_id if h.ticket else None)
        self.metrics.mw_lost.inc(reason="lost")
        self.forget_idle(h)
        if h.state == MwState.STARTING:
            # A failed start (it died, or did not start in time): not at once again.
            self.start_failed(h.pool_key, self.back_off(h.pool_key), reason)
        self._leave(h, MwState.FAILED)
        h.reason = reason
        if h.proc.poll() is None:
            h.killed = True
            h.proc.send_signal(signal.SIGKILL)
        self.requeue_ahead(h)  # before the retried call: that one goes first
        ticket = h.ticket
        if ticket is not None:
            h.ticket = None
            self.running.pop(ticket.call_id, None)
            ticket.attempts += 1
            if outcome is not None:
                self.on_outcome(ticket, outcome)
            elif ticket.attempts <= self.config.retries_on_loss and self.draining:
                self.on_outcome(ticket, {"status": REJECTED, "error": {
                    "type": "Draining", "message": f"node {self.config.node_id} is draining"}})
            elif ticket.attempts <= self.config.retries_on_loss:
                self.log.info("call_retried", call_id=ticket.call_id, attempt=ticket.attempts + 1)
                ticket.mw_id = None
                self.queues.setdefault(ticket.key, deque()).appendleft(ticket)
            else:
                self.on_outcome(ticket, {"status": "FAILED", "error": {
                    "type": "MiniworkerLost",
                    "message": f"its miniworker was lost ({reason}) after {ticket.attempts} attempt(s)",
                }})
        self.on_lost(h)
        self.pump()

    def on_lost(self, h: MwHandle) -> None:
        """Have the agent remove ``h``'s container and directory (once): it may have left them."""
        if not h.cleanup_asked:
            h.cleanup_asked = True
            self.removing.add(h.mw_id)
            self._on_lost(h)

    def cleaned(self, mw_id: str) -> None:
        """The agent is done removing what ``mw_id`` left (or gave up, logged): its slot is free."""
        self.removing.discard(mw_id)

    def held(self) -> set[str]:
        """The ids of every call on this node: running, held by a miniworker, or waiting in a queue."""
        return {*self.running, *(t.call_id for q in self.queues.values() for t in q)}

    def tick(self, now: float) -> None:
        cfg = self.config
        silence = cfg.heartbeat * cfg.liveness
        for h in list(self.mws.values()):
            code = h.proc.poll()
            if h.state in (MwState.STOPPING, MwState.FAILED):
                if code is not None:
                    if h.ahead is not None:
                        self.requeue_ahead(h)
                        self.pump()
                    if h.ticket is not None:  # a held call it started, ended by the stop: it never finished
                        ticket, h.ticket = h.ticket, None
                        self.requeue(ticket)
                        self.pump()
                    del self.mws[h.mw_id]
                    if code != 0 or h.overdue:
                        self.on_lost(h)  # it may not have removed its container (exit 4 says so)
                elif now - h.stopped_at > STOP_DEADLINE_S and not h.killed:
                    # Its teardown hangs (an engine that does not answer): it holds a slot while it lasts (see
                    # the pool), so it ends here; its container is removed by label once its exit is seen.
                    self.log.warning("miniworker_stop_overdue", mw_id=h.mw_id, pool=h.pool_key,
                                     seconds=round(now - h.stopped_at, 1), action="killed")
                    h.killed = h.overdue = True
                    h.proc.send_signal(signal.SIGKILL)
                continue
            if code is not None:
                self.lose(h, f"miniworker process exited with code {code}")
            elif h.state == MwState.STARTING and now - h.spawned > cfg.start_timeout:
                self.lose(h, f"did not start within {cfg.start_timeout:g} s")
            elif h.state == MwState.BUSY and h.ticket is not None:
                allowance = h.ticket.timeout + OVERRUN_GRACE + (cfg.start_timeout if h.loading else 0.0)
                if now - h.ticket.dispatched > allowance:
                    # The call had its time: it ends TIMEOUT (run again, it waited out a whole timeout once more;
                    # its miniworker heartbeats while it kills a timed-out call's container, and a loaded engine
                    # can take that long).
                    self.lose(h, "overran its call's timeout without answering", {"status": "TIMEOUT", "error": {
                        "type": "Timeout",
                        "message": f"call exceeded its timeout of {h.ticket.timeout:g} s, and its miniworker did not "
                                   f"answer within {OVERRUN_GRACE:g} s more; its container was removed"}})
                elif not h.loading and now - h.last_seen > silence:
                    self.lose(h, f"silent for {now - h.last_seen:.1f} s")
            elif h.state == MwState.IDLE and now - h.last_seen > silence:
                self.lose(h, f"silent for {now - h.last_seen:.1f} s")
        for ticket in self.running.values():
            # A warm call usually ends within a millisecond: its RESULT carries when it started. Only calls
            # still running a tick later are reported RUNNING, which keeps the hot path to two messages.
            if not ticket.state_sent and not ticket.ahead and now - ticket.dispatched >= RUNNING_REPORT_AFTER:
                self.on_dispatch(ticket)
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + cfg.heartbeat
            for h in list(self.mws.values()):
                if h.state in (MwState.IDLE, MwState.BUSY):
                    self.send(h, Msg.MW_HEARTBEAT, {})

    def close(self) -> None:
        for h in self.mws.values():
            if h.proc.poll() is None:
                h.proc.send_signal(signal.SIGTERM)
        self.sock.close()


def _as_dict(load: LoadSpec) -> dict[str, Any]:
    return {name: getattr(load, name) for name in load.__slots__}
