"""The broker's state machine around held (pipelined) calls and miniworker deaths: what the miniworker says decides.

The broker's state machine is driven directly (real ZMQ socket, messages captured instead of sent): the
race it settles (the miniworker starting the held call while the drop is on its way) cannot be timed from
outside on the real engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from node_agent.broker import Broker
from node_agent.config import AgentConfig
from node_agent.functions import Registry
from node_agent.metrics import AgentMetrics
from node_agent.miniworkers import MwHandle, MwState
from node_agent.tickets import Ticket
from shoal import protocol
from shoal.models import Policy
from shoal.protocol import Msg
from tests.node_agent.helpers import close_rig


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        config = AgentConfig(controller="tcp://127.0.0.1:1", node_id="t1", state_dir=tmp_path)
        config.node_dir.mkdir(parents=True)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.outcomes: list[tuple[str, str, str]] = []
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self.broker = Broker(config, Registry(Policy.FUNCTION), AgentMetrics(), self.ctx, self.on_outcome,
                             lambda key: None, lambda h: None, lambda t: None)  # type: ignore[arg-type,return-value]
        self.broker.send = self.capture  # type: ignore[method-assign]
        proc: Any = SimpleNamespace(poll=lambda: None, send_signal=lambda sig: None)
        self.mw = MwHandle("mw1", "bound", "rt", "f@1", proc, state=MwState.BUSY)
        self.broker.mws["mw1"] = self.mw
        self.head, self.held = Ticket("c1", "f@1", 1, 5.0), Ticket("c2", "f@1", 2, 5.0)
        self.mw.ticket, self.head.mw_id = self.head, "mw1"
        self.broker.running["c1"] = self.head
        self.broker.dispatch(self.mw, self.held)  # busy: it holds the call

    def on_outcome(self, ticket: Ticket, header: dict[str, Any]) -> None:
        self.outcomes.append((ticket.call_id, header["status"], (header.get("error") or {}).get("message", "")))

    def capture(self, h: MwHandle, mtype: bytes, header: dict[str, Any]) -> bool:
        self.sent.append((mtype, header))
        return True

    def result(self, header: dict[str, Any]) -> None:
        self.broker._on_result(self.mw, protocol.decode(protocol.encode(Msg.MW_RESULT, header)))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    close_rig(r)


def test_a_held_call_is_cancelled_once_its_miniworker_has_dropped_it(rig: Rig) -> None:
    assert rig.mw.ahead is rig.held and rig.sent[-1][0] == Msg.MW_CALL
    assert rig.broker.cancel("c2") and rig.broker.cancel("c2")
    assert [m for m, _ in rig.sent].count(Msg.MW_DROP) == 1
    assert rig.outcomes == []  # not yet: it may have started already
    rig.result({"call_id": "c2", "status": "CANCELLED"})
    assert rig.outcomes == [("c2", "CANCELLED", "cancelled before it started")]
    assert rig.mw.ahead is None and rig.mw.ticket is rig.head and rig.mw.state == MwState.BUSY
    rig.result({"call_id": "c1", "status": "DONE", "result": 1})
    assert rig.outcomes[-1][:2] == ("c1", "DONE") and rig.mw.state == MwState.IDLE


def test_a_held_call_that_started_before_the_drop_is_cancelled_as_a_running_call(rig: Rig) -> None:
    rig.broker.cancel("c2")
    rig.result({"call_id": "c1", "status": "DONE", "result": 1})  # sent just before it started c2
    assert rig.outcomes == [("c1", "DONE", ""),
                            ("c2", "CANCELLED", "cancelled while running; its container was removed")]
    assert rig.mw.state == MwState.STOPPING and rig.sent[-1][0] == Msg.MW_STOP
    rig.result({"call_id": "c2", "status": "DONE", "result": 2})  # it ran: its result comes to nothing
    assert len(rig.outcomes) == 2 and "c2" not in rig.broker.running


def test_a_cancelled_held_call_whose_miniworker_ends_first_is_not_queued_again(rig: Rig) -> None:
    rig.broker.cancel("c2")
    rig.result({"call_id": "c2", "status": "REJECTED", "retire": True})
    assert rig.outcomes == [("c2", "CANCELLED", "cancelled before it started")]
    assert not any(rig.broker.queues.values()) and "c2" not in rig.broker.running


def test_a_held_call_given_back_without_a_cancel_is_queued_again(rig: Rig) -> None:
    rig.result({"call_id": "c2", "status": "REJECTED", "retire": True})
    assert rig.outcomes == [] and list(rig.broker.queues["f@1"]) == [rig.held] and rig.held.mw_id is None


def test_a_miniworker_whose_container_died_idle_gives_back_the_calls_it_was_sent(rig: Rig) -> None:
    """MFAILED comes with no call: the calls sent to a ready miniworker as its container died never started
    there. They go back to their queue (not failed, not an attempt), and the death is no failed start."""
    died = protocol.decode(protocol.encode(Msg.MW_FAILED, {"reason": "container exited with code 137"}))
    rig.broker._on_failed(rig.mw, died)
    assert rig.outcomes == [] and [t.call_id for t in rig.broker.queues["f@1"]] == ["c1", "c2"]
    assert rig.mw.state == MwState.FAILED and rig.broker.failures.get(rig.mw.pool_key, 0) == 0
    for n in range(3):  # three idle deaths in a row do not fail what waits either
        h = MwHandle(f"idle{n}", "bound", "rt", "f@1", rig.mw.proc, state=MwState.IDLE)
        rig.broker.mws[h.mw_id] = h
        rig.broker._on_failed(h, died)
    assert rig.outcomes == [] and len(rig.broker.queues["f@1"]) == 2
    assert rig.broker.spawn_blocked_until.get(rig.mw.pool_key) is None


def test_a_held_call_whose_miniworker_is_stopped_is_queued_again_only_if_it_did_not_start(rig: Rig) -> None:
    """Cancelling the running call stops its miniworker. The call it held used to be queued again at once: if
    the miniworker had already started it, it ran twice and its own result was thrown away."""
    assert rig.broker.cancel("c1")
    assert rig.outcomes == [("c1", "CANCELLED", "cancelled while running; its container was removed")]
    assert rig.mw.state == MwState.STOPPING and rig.mw.ahead is rig.held and not rig.broker.queues.get("f@1")
    rig.result({"call_id": "c1", "status": "DONE", "result": 1})  # it had ended c1 and started c2 ...
    assert rig.mw.ticket is rig.held and rig.mw.ahead is None
    rig.result({"call_id": "c2", "status": "DONE", "result": 2})  # ... and ended c2 before the stop came
    assert rig.outcomes[-1] == ("c2", "DONE", "") and rig.mw.state == MwState.STOPPING
    assert not rig.broker.queues.get("f@1") and "c2" not in rig.broker.running


def test_a_held_call_the_stopped_miniworker_gives_back_or_takes_with_it_is_queued_again(rig: Rig) -> None:
    rig.broker.cancel("c1")
    rig.result({"call_id": "c2", "status": "REJECTED", "retire": True})  # never started: given back
    assert [t.call_id for t in rig.broker.queues["f@1"]] == ["c2"] and len(rig.outcomes) == 1


def test_a_held_call_started_then_killed_by_the_stop_is_queued_again_when_its_miniworker_exits(rig: Rig) -> None:
    rig.broker.cancel("c1")
    rig.result({"call_id": "c1", "status": "DONE", "result": 1})  # c2 started; then the stop ended it
    rig.mw.proc = SimpleNamespace(poll=lambda: 0, send_signal=lambda sig: None)  # type: ignore[assignment]
    rig.broker.tick(time.monotonic())
    assert [t.call_id for t in rig.broker.queues["f@1"]] == ["c2"] and "mw1" not in rig.broker.mws
