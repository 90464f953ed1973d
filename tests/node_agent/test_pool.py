"""The pool manager's scale-up judgement for short functions (the rest is exercised on the real engine)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node_agent.miniworkers import MwState
from node_agent.pool import PoolManager
from shoal.models import Runtime
from shoal.protocol import Msg
from tests.node_agent.helpers import close_rig
from tests.node_agent.test_broker import Rig


def manager(run_s: dict[str, float]) -> PoolManager:
    stub: Any = SimpleNamespace(node_id="n1", run_s=run_s, pipeline_max_run=0.005)
    return PoolManager(stub, stub, stub, stub, lambda key: stub)


def test_a_short_functions_queue_that_drains_before_a_container_could_start_starts_none() -> None:
    pool = manager({"echo@1": 0.0002, "slow@1": 1.5})
    assert pool._drains_soon("echo@1", queued=16, serving=1)  # ~8 ms of work for the running miniworker
    assert not pool._drains_soon("echo@1", queued=400, serving=1)  # ~200 ms: another container helps
    assert pool._drains_soon("echo@1", queued=300, serving=2)
    assert not pool._drains_soon("slow@1", queued=1, serving=4)  # not short: demand starts miniworkers
    assert not pool._drains_soon("new@1", queued=1, serving=1)  # no run seen yet: as before
    assert not pool._drains_soon("echo@1", queued=1, serving=0)  # nothing serving it


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
