"""The broker's state machine where the node's registry changes under it or miniworkers fail (real ZMQ socket,
messages captured; stand-in processes): no crash, no call left unanswered, no start storm."""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from node_agent.broker import LOAD_FAILURES_MAX, OVERRUN_GRACE, Broker
from node_agent.config import AgentConfig
from node_agent.functions import FnState, Registry
from node_agent.metrics import AgentMetrics
from node_agent.miniworkers import MwHandle, MwState
from node_agent.tickets import Ticket
from shoal import protocol
from shoal.models import FunctionSpec, Policy
from shoal.protocol import Msg
from tests.node_agent.helpers import close_rig


class Rig:
    def __init__(self, tmp_path: Path, policy: Policy = Policy.FUNCTION) -> None:
        config = AgentConfig(controller="tcp://127.0.0.1:1", node_id="t2", state_dir=tmp_path)
        config.node_dir.mkdir(parents=True)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.registry = Registry(policy)
        fn = self.registry.add_function(FunctionSpec.from_dict(
            {"name": "f", "version": 1, "runtime": "rt", "sha256": "0" * 64, "size": 1}))
        fn.state = FnState.READY
        self.outcomes: list[tuple[str, str, str]] = []
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self.loads: dict[str, Any] = {}
        self.broker = Broker(config, self.registry, AgentMetrics(), self.ctx, self.on_outcome,
                             self.load_for, lambda h: None, lambda t: None)
        self.broker.send = self.capture  # type: ignore[method-assign]
        self.broken: list[tuple[str, str]] = []
        self.broker.on_load_failures = lambda key, reason: self.broken.append((key, reason))

    def load_for(self, key: str) -> Any:
        return self.loads[key]  # KeyError: as the agent's when the function or its runtime is gone

    def on_outcome(self, ticket: Ticket, header: dict[str, Any]) -> None:
        self.outcomes.append((ticket.call_id, header["status"], (header.get("error") or {}).get("type", "")))

    def capture(self, h: MwHandle, mtype: bytes, header: dict[str, Any]) -> bool:
        self.sent.append((mtype, header))
        return True

    def handle(self, mw_id: str, mode: str = "bound", function: str | None = "f@1",
               state: MwState = MwState.STARTING) -> MwHandle:
        proc: Any = SimpleNamespace(poll=lambda: None, send_signal=lambda sig: None)
        h = MwHandle(mw_id, mode, "rt", function, proc, state=state)
        self.broker.mws[mw_id] = h
        return h


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    close_rig(r)


def failed(reason: str, error: dict[str, Any] | None = None) -> protocol.Message:
    header: dict[str, Any] = {"reason": reason}
    if error is not None:
        header["error"] = error
    return protocol.decode(protocol.encode(Msg.MW_FAILED, header))


def test_start_failures_after_a_function_was_forgotten_do_not_crash_the_broker(rig: Rig) -> None:
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))  # no miniworker: it waits (a queue for f@1 exists)
    rig.broker.fail_queued("f@1", {"type": "x", "message": "x"})
    rig.registry.forget(rig.registry.functions["f@1"])
    rig.broker.queues["f@1"] = deque()  # what submit() leaves behind once its calls are gone
    for n in range(3):  # the third used to look up every queued key in the registry: KeyError
        rig.broker._on_failed(rig.handle(f"m{n}", "runtime", None), failed("image missing"))
    rig.broker.forget("f@1")
    assert "f@1" not in rig.broker.queues and "f@1" not in rig.broker.run_s


def test_a_call_whose_function_or_runtime_is_gone_when_its_miniworker_is_ready_fails_with_the_reason(
        rig: Rig) -> None:
    h = rig.handle("g1", "runtime", None, state=MwState.IDLE)
    rig.broker.make_idle(h)
    rig.broker.registry.node_policy = Policy.RUNTIME
    rig.broker.dispatch(h, Ticket("c1", "f@1", 1, 5.0))  # load_for raises: the runtime was deleted
    assert rig.outcomes == [("c1", "FAILED", "FunctionUnavailable")]
    assert h.state == MwState.IDLE and h.function is None and "c1" not in rig.broker.running


def test_a_miniworker_lost_while_starting_is_a_failed_start_with_a_back_off(rig: Rig) -> None:
    h = rig.handle("s1")
    rig.broker.lose(h, "did not start within 120 s")
    assert rig.broker.spawn_blocked_until.get("f@1", 0) > 0 and rig.broker.failures["f@1"] == 1


def test_a_function_that_does_not_load_is_failed_after_a_few_miniworkers(rig: Rig) -> None:
    error = {"type": "ModuleNotFoundError", "message": "No module named 'nope'"}
    for n in range(LOAD_FAILURES_MAX):
        assert rig.broken == []
        rig.broker._on_failed(rig.handle(f"b{n}"), failed("load failed", error))
    assert rig.broken == [("f@1", "ModuleNotFoundError: No module named 'nope'")]


def test_while_draining_a_call_that_would_wait_again_goes_back_to_the_controller(rig: Rig) -> None:
    h = rig.handle("d1", state=MwState.IDLE)
    rig.broker.make_idle(h)
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))
    assert h.state == MwState.BUSY and "c1" in rig.broker.running
    rig.broker.draining = True
    rig.broker.lose(h, "miniworker process exited with code 1")  # its call would be retried here
    assert rig.outcomes == [("c1", "REJECTED", "Draining")] and not any(rig.broker.queues.values())


def test_a_call_whose_miniworker_overran_its_timeout_ends_timeout_and_is_not_run_again(rig: Rig) -> None:
    """Its miniworker, heartbeating, was still killing the timed-out call's container (a loaded engine) or wedged:
    the call was run again, to wait out a whole timeout once more."""
    h = rig.handle("o1", state=MwState.IDLE)
    rig.broker.make_idle(h)
    rig.broker.submit(Ticket("c1", "f@1", 1, 2.0))
    assert h.ticket is not None
    now = h.ticket.dispatched + 2.0 + OVERRUN_GRACE + 0.5
    h.last_seen = now  # it heartbeats
    rig.broker.tick(now)
    assert rig.outcomes == [("c1", "TIMEOUT", "Timeout")] and h.state == MwState.FAILED
    assert "c1" not in rig.broker.running and not any(rig.broker.queues.values())


def test_calls_still_running_at_the_drain_timeout_go_back_to_the_controller(rig: Rig) -> None:
    """The agent then stops: its miniworkers' exits are never read, so these calls were left unanswered until the
    controller took the node for lost (on a call's last attempt, until the call's timeout had passed too)."""
    busy = rig.handle("r1", state=MwState.IDLE)
    rig.broker.make_idle(busy)
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))
    rig.broker.run_s["f@1"] = 0.001  # short: the next call is held by the same miniworker (pipelined)
    rig.broker.submit(Ticket("c2", "f@1", 1, 5.0))
    assert busy.ticket is not None and busy.ahead is not None and busy.ahead.call_id == "c2"
    rig.broker.draining = True
    assert rig.broker.give_back_running("drain timed out") == 1
    for h in list(rig.broker.mws.values()):
        rig.broker.stop(h, give_back=True)
    assert sorted(rig.outcomes) == [("c1", "REJECTED", "Draining"), ("c2", "REJECTED", "Draining")]
    assert rig.broker.running == {} and busy.ticket is None and (Msg.MW_STOP, {}) in rig.sent
    late = protocol.decode(protocol.encode(Msg.MW_RESULT, {"call_id": "c1", "status": "DONE", "result": 1}))
    rig.broker._on_result(busy, late)  # its run ended after all: answered already, ignored
    assert len(rig.outcomes) == 2


def test_a_short_functions_hung_call_neither_holds_the_next_call_nor_counts_as_serving(rig: Rig) -> None:
    """One hung call of a 2 ms function: 20 calls waited behind it (no new miniworker: "the running one drains
    them within 100 ms"), and the next call was pipelined onto it."""
    rig.broker.run_s["f@1"] = 0.002
    h = rig.handle("busy", state=MwState.BUSY)
    h.ticket = Ticket("hung", "f@1", 1, 30.0)
    now = h.ticket.dispatched = time.monotonic()
    assert rig.broker.serving("f@1", now) == 1 and rig.broker.take_pipelined("f@1", now) is h
    now += 5.0  # 2,500 times its average
    assert rig.broker.serving("f@1", now) == 0 and rig.broker.take_pipelined("f@1", now) is None


def test_stopping_a_miniworker_the_socket_does_not_know_yet_ends_it_without_calling_it_lost(rig: Rig) -> None:
    """A spare spawned a moment before the agent stops has not connected yet: MW_STOP cannot reach it. It used to
    be reported lost (a warning, a count, a back-off of its pool); it is killed instead, and once its exit is seen
    it is gone and its possible container handed to on_lost (removed by label)."""
    signals: list[int] = []
    exit_code: list[int | None] = [None]
    proc: Any = SimpleNamespace(poll=lambda: exit_code[0], send_signal=signals.append)
    h = MwHandle("never-connected", "oneshot", "rt", None, proc, state=MwState.STARTING)
    rig.broker.mws[h.mw_id] = h
    rig.broker.send = Broker.send.__get__(rig.broker)  # type: ignore[method-assign]  # the real socket
    left: list[MwHandle] = []
    rig.broker._on_lost = left.append
    rig.broker.stop(h)
    assert signals == [signal.SIGKILL] and h.state == MwState.STOPPING
    assert rig.broker.metrics.mw_lost.get(reason="lost") == 0 and not rig.broker.failures
    exit_code[0] = -signal.SIGKILL
    rig.broker.tick(time.monotonic())
    assert h.mw_id not in rig.broker.mws and left == [h]


def result(call_id: str, **extra: Any) -> protocol.Message:
    return protocol.decode(protocol.encode(Msg.MW_RESULT, {"call_id": call_id, "status": "DONE", "result": 1,
                                                           "retire": False, **extra}))


@pytest.mark.parametrize("reported", ["the miniworker's", "from the future", "before the hand-over", "not a number"])
def test_a_held_call_starts_when_its_miniworker_says_not_when_the_previous_result_arrives(rig: Rig,
                                                                                       reported: str) -> None:
    """A pipelined call starts as the miniworker sends the previous result; the broker reads that result a link's
    latency later (more when it is busy). The result says when; a value that cannot be that moment is not taken."""
    h = rig.handle("p1", state=MwState.IDLE)
    rig.broker.make_idle(h)
    rig.broker.submit(Ticket("first", "f@1", 1, 5.0))
    held = Ticket("held", "f@1", 1, 5.0)
    rig.broker.dispatch(h, held)
    assert h.ahead is held and held.ahead
    handed = time.time()
    started = {"the miniworker's": handed, "from the future": handed + 3600,
               "before the hand-over": handed - 3600, "not a number": "soon"}[reported]
    rig.broker._on_result(h, result("first", held_started_at=started))
    after = time.time()
    assert h.ticket is held and not held.ahead and rig.outcomes == [("first", "DONE", "")]
    if reported == "the miniworker's":
        assert held.started_at == started
    else:
        assert handed <= held.started_at <= after


def test_how_long_miniworkers_take_to_start_is_measured_per_pool(rig: Rig) -> None:
    h = rig.handle("r1")
    h.spawned = time.monotonic() - 0.3
    rig.broker._on_ready(h, protocol.decode(protocol.encode(Msg.MW_READY, {
        "v": protocol.PROTOCOL_VERSION, "mw_id": "r1", "container_id": "c", "function": "f@1", "mode": "bound",
        "pid": 1})))
    assert h.state == MwState.IDLE and 0.3 <= rig.broker.start_s["f@1"] < 60


def test_a_call_held_by_a_miniworker_already_stopping_goes_back_at_the_drain_timeout(rig: Rig) -> None:
    """A miniworker stopping (its call cancelled, or retiring) with the next call held: at the drain timeout only
    live miniworkers gave back what they held, and the agent exited with that call unanswered."""
    busy = rig.handle("r1", state=MwState.IDLE)
    rig.broker.make_idle(busy)
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))
    rig.broker.run_s["f@1"] = 0.001
    rig.broker.submit(Ticket("c2", "f@1", 1, 5.0))
    assert busy.ahead is not None and busy.ahead.call_id == "c2"
    rig.broker.stop(busy)  # stopping, c2 still held (it may have started: the miniworker will say)
    assert busy.ahead is not None and busy.state == MwState.STOPPING
    rig.broker.draining = True
    rig.broker.give_back_running("drain timed out")
    for h in list(rig.broker.mws.values()):
        rig.broker.stop(h, give_back=True)
    assert ("c2", "REJECTED", "Draining") in rig.outcomes and "c2" not in rig.broker.running


def test_miniworkers_of_a_redefined_runtime_take_no_new_call_and_stop_once_idle(rig: Rig) -> None:
    """A runtime registered again with another image or path: its warm miniworkers went on serving on the old
    image for ever, and those started ahead failed their first call (the code was mounted at the old path)."""
    idle = rig.handle("i1", state=MwState.IDLE)
    rig.broker.make_idle(idle)
    busy = rig.handle("b1", state=MwState.IDLE)
    rig.broker.make_idle(busy)
    ahead = rig.handle("g1", "runtime", None, state=MwState.IDLE)
    rig.broker.make_idle(ahead)
    other = rig.handle("o1", state=MwState.IDLE)
    other.runtime = "other"
    rig.broker.make_idle(other)
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))
    running = [h for h in (idle, busy) if h.state == MwState.BUSY]
    assert len(running) == 1
    running_h = running[0]
    rig.broker.runtime_changed("rt")
    assert {h.mw_id for h in rig.broker.mws.values() if h.state == MwState.STOPPING} == {
        h.mw_id for h in (idle, busy, ahead) if h is not running_h}
    assert running_h.state == MwState.BUSY and other.state == MwState.IDLE
    rig.broker.run_s["f@1"] = 0.001  # short: it would be pipelined onto a busy miniworker
    assert rig.broker.take_pipelined("f@1", time.monotonic()) is None  # not onto the outdated one
    done = protocol.decode(protocol.encode(Msg.MW_RESULT, {"call_id": "c1", "status": "DONE", "result": 1}))
    rig.broker._on_result(running_h, done)
    assert ("c1", "DONE", "") in rig.outcomes and running_h.state == MwState.STOPPING


def test_a_call_given_back_at_the_drain_timeout_says_whether_it_had_started(rig: Rig) -> None:
    """All were marked as run: one whose container was still starting (or whose function was loading) used up an
    attempt it never had, and on its last one ended FAILED NodeStopped."""
    headers: dict[str, dict[str, Any]] = {}

    def outcome(ticket: Ticket, header: dict[str, Any]) -> None:
        headers[ticket.call_id] = header

    rig.broker.on_outcome = outcome
    warm = rig.handle("w1", state=MwState.IDLE)
    rig.broker.make_idle(warm)
    rig.broker.submit(Ticket("warm", "f@1", 1, 5.0))
    cold = rig.handle("c1", state=MwState.BUSY)
    cold.loading = True
    cold.ticket = Ticket("cold", "f@1", 1, 5.0)
    rig.broker.running["cold"] = cold.ticket
    rig.broker.draining = True
    assert rig.broker.give_back_running("drain timed out") == 2
    assert headers["warm"]["ran"] is True and headers["cold"]["ran"] is False


def test_a_miniworker_leaving_that_says_it_failed_is_not_a_failed_start(rig: Rig) -> None:
    """A miniworker whose runner was flooded said MW_FAILED again and again as it left: each one counted as a
    failed start, and three of them failed the function on the node (for every policy-none function at once, as
    oneshot miniworkers share one pool)."""
    h = rig.handle("f1", state=MwState.IDLE)
    rig.broker.make_idle(h)
    rig.broker.submit(Ticket("c1", "f@1", 1, 5.0))
    rig.broker._on_result(h, protocol.decode(protocol.encode(Msg.MW_RESULT, {
        "call_id": "c1", "status": "FAILED", "retire": True, "error": {"type": "RunnerProtocolError",
                                                                        "message": "flooded"}})))
    assert h.state == MwState.STOPPING
    for _ in range(5):
        rig.broker._on_failed(h, failed("the runner broke the protocol"))
    assert rig.broken == [] and rig.broker.failures.get("f@1", 0) == 0
    assert not rig.broker.spawn_blocked_until.get("f@1")
