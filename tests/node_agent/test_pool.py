"""The pool manager's scale-up judgement for short functions (the rest is exercised on the real engine)."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node_agent.broker import STOP_DEADLINE_S
from node_agent.functions import FnState
from node_agent.miniworkers import MwHandle, MwState
from node_agent.pool import ROOM_IDLE_S, PoolManager
from node_agent.tickets import Ticket
from shoal import protocol
from shoal.models import FunctionSpec, Runtime
from shoal.protocol import Msg
from tests.node_agent.helpers import close_rig
from tests.node_agent.test_broker import Rig


def manager(run_s: dict[str, float], start_s: dict[str, float] | None = None) -> PoolManager:
    stub: Any = SimpleNamespace(node_id="n1", run_s=run_s, start_s=start_s or {}, pipeline_max_run=0.005)
    return PoolManager(stub, stub, stub, stub, lambda key: stub)


def test_a_short_functions_queue_that_drains_before_a_container_could_start_starts_none() -> None:
    pool = manager({"echo@1": 0.0002, "slow@1": 1.5})
    assert pool._drains_soon("echo@1", "echo@1", queued=16, serving=1)  # ~8 ms of work for the running miniworker
    assert not pool._drains_soon("echo@1", "echo@1", queued=400, serving=1)  # ~200 ms: another container helps
    assert pool._drains_soon("echo@1", "echo@1", queued=300, serving=2)
    assert not pool._drains_soon("slow@1", "slow@1", queued=1, serving=4)  # not short: demand starts miniworkers
    assert not pool._drains_soon("new@1", "new@1", queued=1, serving=1)  # no run seen yet: as before
    assert not pool._drains_soon("echo@1", "echo@1", queued=1, serving=0)  # nothing serving it
    # Its miniworkers take 0.5 s to start (measured): a queue of 0.2 s is gone before one would be ready.
    assert manager({"echo@1": 0.0005}, {"echo@1": 0.5})._drains_soon("echo@1", "echo@1", queued=400, serving=1)
    assert not manager({"echo@1": 0.0005}, {"echo@1": 0.5})._drains_soon("echo@1", "echo@1", queued=1200, serving=1)


def test_a_miniworker_the_kernel_will_not_start_backs_its_pool_off_instead_of_ending_the_agent() -> None:
    class Refusing:
        def spawn(self, *args: Any) -> Any:
            raise OSError(7, "Argument list too long")

    lost: list[str] = []
    mw_lost = SimpleNamespace(inc=lambda reason: lost.append(reason))
    broker: Any = SimpleNamespace(spawn_blocked_until={}, back_off=lambda key: lost.append(key),
                                  metrics=SimpleNamespace(mw_lost=mw_lost))
    stub: Any = SimpleNamespace(node_id="n1")
    pool = PoolManager(stub, stub, broker, Refusing(), lambda key: stub)  # type: ignore[arg-type]
    assert pool._spawn("oneshot", None, None) is False
    assert lost == ["spawn_failed", "oneshot"]


def test_containers_started_ahead_for_a_burst_and_oneshot_spares_are_stopped_past_their_keep_alive(
        tmp_path: Path) -> None:
    """Only a deleted runtime's containers were ever stopped: the rest held their slots for ever, and a function
    that had one miniworker could not get another (room is made only for a function with none)."""
    rig = Rig(tmp_path)
    try:
        check_keep_alive(rig)
    finally:
        close_rig(rig)


def check_keep_alive(rig: Rig) -> None:
    rig.registry.runtimes["rt"] = Runtime(name="rt", image="img", path="/ws", dependencies="", run="")
    spawner: Any = SimpleNamespace(spawn=lambda *args: pytest.fail("nothing is to be started here"))
    config = dataclasses.replace(rig.broker.config, min_warm=0)  # no warm container wanted for f@1
    pool = PoolManager(config, rig.registry, rig.broker, spawner, lambda key: None)  # type: ignore[arg-type,return-value]
    old = time.monotonic() - config.keepalive - 1
    handles = [rig.handle(f"g{n}", "runtime", None, state=MwState.IDLE) for n in range(3)]
    handles += [rig.handle("o1", "oneshot", None, state=MwState.IDLE)]
    handles += [rig.handle("fresh", "runtime", None, state=MwState.IDLE)]
    for h in handles:
        rig.broker.make_idle(h)
        h.idle_since = old if h.mw_id != "fresh" else time.monotonic()
    pool.reconcile()  # the node's policy is `function`: no runtime containers nor spares are wanted
    assert {h.mw_id for h in handles if h.state == MwState.STOPPING} == {"g0", "g1", "g2", "o1"}
    assert [m for m, _ in rig.sent] == [Msg.MW_STOP] * 4


class Sharing:
    """A full node of capacity 2 shared by f@1 and g@1: a real broker (sends captured) and pool, processes
    stood in for."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        rig.registry.runtimes["rt"] = Runtime(name="rt", image="img", path="/ws", dependencies="", run="")
        g = rig.registry.add_function(FunctionSpec.from_dict(
            {"name": "g", "version": 1, "runtime": "rt", "sha256": "1" * 64, "size": 1}))
        g.state = FnState.READY
        self.spawned: list[str] = []
        spawner: Any = SimpleNamespace(spawn=self.spawn)
        config = dataclasses.replace(rig.broker.config, capacity=2, min_warm=0)
        rig.broker.config = config
        self.pool = PoolManager(config, rig.registry, rig.broker, spawner, lambda key: key)  # type: ignore[arg-type,return-value]

    def spawn(self, mode: str, runtime: Any, load: Any) -> MwHandle:
        self.spawned.append(load)
        proc: Any = SimpleNamespace(poll=lambda: None, send_signal=lambda sig: None)
        return MwHandle(f"new-{len(self.spawned)}", mode, "rt", load, proc)

    def busy(self, mw_id: str, key: str, call_id: str) -> MwHandle:
        h = self.rig.handle(mw_id, function=key, state=MwState.IDLE)
        self.rig.broker.make_idle(h)
        self.rig.broker.submit(Ticket(call_id, key, None, 30.0))
        assert h.ticket is not None and h.ticket.call_id == call_id
        return h

    def exit(self, h: MwHandle) -> None:
        """``h``'s process exits (a stopped miniworker, its container removed), and the broker sees it."""
        h.proc = SimpleNamespace(poll=lambda: 0, send_signal=lambda sig: None)  # type: ignore[assignment]
        self.rig.broker.tick(time.monotonic())
        assert h.mw_id not in self.rig.broker.mws

    def idle(self, mw_id: str, key: str, for_s: float) -> MwHandle:
        h = self.rig.handle(mw_id, function=key, state=MwState.IDLE)
        self.rig.broker.make_idle(h)
        h.idle_since = time.monotonic() - for_s
        return h


@pytest.fixture
def sharing(tmp_path: Path) -> Iterator[Sharing]:
    rig = Rig(tmp_path)
    yield Sharing(rig)
    close_rig(rig)


def done(call_id: str) -> protocol.Message:
    return protocol.decode(protocol.encode(Msg.MW_RESULT, {"call_id": call_id, "status": "DONE", "result": 1,
                                                           "retire": False}))


def test_a_function_with_no_miniworker_gets_the_next_slot_that_frees_on_a_busy_full_node(sharing: Sharing) -> None:
    """Every slot busy with f, f's backlog took each freed miniworker's next call: g waited as long as it lasted."""
    broker = sharing.rig.broker
    first, second = sharing.busy("f1", "f@1", "a1"), sharing.busy("f2", "f@1", "a2")
    for n in range(5):
        broker.submit(Ticket(f"a{n + 3}", "f@1", None, 30.0))  # f's backlog
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    sharing.pool.reconcile()
    assert sharing.spawned == [] and broker.yield_from == {"f@1": "g@1"}
    assert broker.take_pipelined("f@1", time.monotonic()) is None  # no call is held by a pool that yields
    sharing.pool.reconcile()  # one slot claimed at a time
    assert broker.yield_from == {"f@1": "g@1"}
    broker._on_result(second, done("a2"))  # the first of f's calls to end: its slot goes, not f's next call
    assert second.state == MwState.STOPPING and second.ticket is None and first.state == MwState.BUSY
    assert broker.yield_from == {}
    sharing.pool.reconcile()
    assert sharing.spawned == []  # its slot is g's once its container is gone
    sharing.exit(second)
    sharing.pool.reconcile()
    assert sharing.spawned == ["g@1"]


def test_a_claimed_slot_is_not_taken_once_nobody_waits_for_it(sharing: Sharing) -> None:
    broker = sharing.rig.broker
    sharing.busy("f1", "f@1", "a1")
    sharing.busy("f2", "f@1", "a2")
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    sharing.pool.reconcile()
    assert broker.yield_from == {"f@1": "g@1"}
    assert broker.cancel("b1")  # g's call is cancelled while it waits
    sharing.pool.reconcile()
    assert broker.yield_from == {}


def test_a_backlog_takes_a_slot_idle_for_a_while_not_one_idle_between_calls(sharing: Sharing) -> None:
    """f had one container and a backlog, g an idle one: f stayed at one container (room was made only for a
    function with none) until g's keep-alive, minutes later."""
    broker = sharing.rig.broker
    sharing.busy("f1", "f@1", "a1")
    for n in range(5):
        broker.submit(Ticket(f"a{n + 2}", "f@1", None, 30.0))
    between_calls = sharing.idle("g1", "g@1", for_s=0.1)
    sharing.pool.reconcile()
    assert sharing.spawned == [] and between_calls.state == MwState.IDLE  # g is in use: its container stays
    between_calls.idle_since = time.monotonic() - ROOM_IDLE_S - 0.1
    sharing.pool.reconcile()
    assert between_calls.state == MwState.STOPPING and sharing.spawned == []
    sharing.exit(between_calls)
    sharing.pool.reconcile()
    assert sharing.spawned == ["f@1"]


def test_no_container_is_stopped_for_a_pool_backing_off_failed_starts(sharing: Sharing) -> None:
    """A container stopped for it only started again at the next tick: warm containers thrashed."""
    broker = sharing.rig.broker
    other = sharing.idle("f1", "f@1", for_s=60)
    sharing.idle("f2", "f@1", for_s=60)
    broker.spawn_blocked_until["g@1"] = time.monotonic() + 30
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    sharing.pool.reconcile()
    assert other.state == MwState.IDLE and sharing.spawned == []


def test_miniworkers_that_fail_to_start_fail_their_function_here_for_a_while(sharing: Sharing) -> None:
    """Their calls were failed on this node (StartFailed), though another node could run them."""
    broker = sharing.rig.broker
    failed: list[tuple[str, str]] = []
    broker.on_start_failures = lambda key, reason: failed.append((key, reason))
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    for n in range(3):
        h = sharing.rig.handle(f"s{n}", function="g@1")
        broker._on_failed(h, protocol.decode(protocol.encode(Msg.MW_FAILED, {"reason": "image missing"})))
    assert failed == [("g@1", "3 miniworkers failed to start: image missing")]
    assert sharing.rig.outcomes == []  # its calls are the agent's to give back (see test_prepare_retry)


def test_a_miniworker_that_holds_a_call_runs_it_before_it_yields_its_slot(sharing: Sharing) -> None:
    """The held call starts as the miniworker sends the previous result: stopped then, it was run a second time."""
    broker = sharing.rig.broker
    broker.run_s["f@1"] = 0.001  # short: the next calls are held by the busy miniworkers
    first, second = sharing.busy("f1", "f@1", "a1"), sharing.busy("f2", "f@1", "a2")
    broker.submit(Ticket("a3", "f@1", None, 30.0))
    broker.submit(Ticket("a4", "f@1", None, 30.0))
    assert first.ahead is not None and second.ahead is not None
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    sharing.pool.reconcile()
    assert broker.yield_from == {"f@1": "g@1"}
    held = second.ahead
    broker._on_result(second, done("a2"))
    assert second.state == MwState.BUSY and second.ticket is held  # it runs the call it held
    broker._on_result(second, done(held.call_id))
    assert second.state == MwState.STOPPING and broker.yield_from == {}


def test_a_miniworker_being_stopped_holds_its_slot_and_one_that_hangs_is_killed(sharing: Sharing) -> None:
    """A miniworker being stopped was not counted: on an engine slow to remove containers, each stop made room for
    another start (A1 stopped for B1, A2 for B2, B1 for C1...), and the node ran more containers than its
    capacity."""
    broker = sharing.rig.broker
    a1, a2 = sharing.idle("a1", "f@1", for_s=60), sharing.idle("a2", "f@1", for_s=60)
    signals: dict[str, list[int]] = {"a1": [], "a2": []}
    exits: dict[str, int | None] = {"a1": None, "a2": None}
    left: list[str] = []
    broker._on_lost = lambda h: left.append(h.mw_id)
    for h in (a1, a2):
        h.proc = SimpleNamespace(poll=lambda i=h.mw_id: exits[i], send_signal=signals[h.mw_id].append)  # type: ignore[assignment]
    broker.submit(Ticket("b1", "g@1", None, 30.0))
    broker.submit(Ticket("b2", "g@1", None, 30.0))
    sharing.pool.reconcile()  # a full node: one idle miniworker of f is stopped for g ...
    assert a1.state == MwState.STOPPING and a2.state == MwState.IDLE and sharing.spawned == []
    for _ in range(3):  # ... and g's miniworker starts once it has gone; no other stop is made meanwhile
        sharing.pool.reconcile()
        broker.tick(time.monotonic())
    assert a2.state == MwState.IDLE and sharing.spawned == [] and signals["a1"] == []
    exits["a1"] = 0  # it removed its container and exited
    broker.tick(time.monotonic())
    sharing.pool.reconcile()
    assert "a1" not in broker.mws and sharing.spawned == ["g@1"] and left == []
    assert len(broker.mws) == 2  # a2 and g's: the node's capacity

    # A stop that never ends (the engine hangs on the removal) is killed once, past its deadline; its container
    # is then removed by label, and its slot frees.
    broker.stop(a2)
    broker.tick(time.monotonic())
    assert signals["a2"] == []  # within its deadline
    a2.stopped_at = time.monotonic() - STOP_DEADLINE_S - 1
    broker.tick(time.monotonic())
    broker.tick(time.monotonic())
    assert signals["a2"] == [signal.SIGKILL]
    exits["a2"] = -signal.SIGKILL
    broker.tick(time.monotonic())
    assert "a2" not in broker.mws and left == ["a2"]
    # Its container is still there until the agent has removed it: its slot stays taken until then (it was freed
    # as the process exited, and a replacement ran beside the container being removed).
    spawned = len(sharing.spawned)
    broker.submit(Ticket("b3", "g@1", None, 30.0))
    broker.submit(Ticket("b4", "g@1", None, 30.0))
    sharing.pool.reconcile()
    assert len(sharing.spawned) == spawned and broker.removing == {"a2"}
    broker.cleaned("a2")
    sharing.pool.reconcile()
    assert len(sharing.spawned) == spawned + 1


def test_a_failed_miniworker_killed_past_its_deadline_has_its_container_removed(sharing: Sharing) -> None:
    """It reported a failed start and hung removing its container: killed at the deadline, it was forgotten
    without its container being removed (only a stopped one's was)."""
    broker = sharing.rig.broker
    h = sharing.rig.handle("s1", function="g@1")
    exit_code: list[int | None] = [None]
    h.proc = SimpleNamespace(poll=lambda: exit_code[0], send_signal=lambda sig: None)  # type: ignore[assignment]
    left: list[str] = []
    broker._on_lost = lambda m: left.append(m.mw_id)
    broker._on_failed(h, protocol.decode(protocol.encode(Msg.MW_FAILED, {"reason": "image missing"})))
    h.stopped_at = time.monotonic() - STOP_DEADLINE_S - 1
    broker.tick(time.monotonic())
    assert h.killed and left == []
    exit_code[0] = -signal.SIGKILL
    broker.tick(time.monotonic())
    assert "s1" not in broker.mws and left == ["s1"]


@pytest.mark.parametrize("way", ["retired", "failed", "stopped", "lost"])
def test_every_way_out_starts_the_stop_clock_and_none_is_killed_at_once(sharing: Sharing, way: str) -> None:
    broker = sharing.rig.broker
    signals: list[int] = []
    h = sharing.busy("f1", "f@1", "a1") if way == "retired" else sharing.idle("f1", "f@1", for_s=1)
    h.proc = SimpleNamespace(poll=lambda: None, send_signal=signals.append)  # type: ignore[assignment]
    before = time.monotonic()
    if way == "retired":  # it leaves on its own after this result (its container removed first)
        broker._on_result(h, protocol.decode(protocol.encode(Msg.MW_RESULT, {
            "call_id": "a1", "status": "DONE", "result": 1, "retire": True})))
    elif way == "failed":
        broker._on_failed(h, protocol.decode(protocol.encode(Msg.MW_FAILED, {"reason": "container died"})))
    elif way == "stopped":
        broker.stop(h)
    else:
        broker.lose(h, "silent")
    assert h.state not in (MwState.IDLE, MwState.BUSY) and h.stopped_at >= before
    broker.tick(time.monotonic())
    assert signals == ([signal.SIGKILL] if way == "lost" else [])  # (a lost one is killed by lose() itself)


def test_a_failed_miniworker_that_exits_saying_its_container_is_left_has_it_removed(sharing: Sharing) -> None:
    """A miniworker that reported a failure, then could not remove its container, exits 4 ("the agent removes it by
    its label"): only a stopping one's exit was read so, and the container stayed until the orphan sweep."""
    broker = sharing.rig.broker
    h = sharing.rig.handle("s2", function="g@1")
    exit_code: list[int | None] = [None]
    h.proc = SimpleNamespace(poll=lambda: exit_code[0], send_signal=lambda sig: None)  # type: ignore[assignment]
    left: list[str] = []
    broker._on_lost = lambda m: left.append(m.mw_id)
    broker._on_failed(h, protocol.decode(protocol.encode(Msg.MW_FAILED, {"reason": "its runner did not start"})))
    exit_code[0] = 4
    broker.tick(time.monotonic())
    assert "s2" not in broker.mws and left == ["s2"]
    broker.tick(time.monotonic())
    assert left == ["s2"]  # once
