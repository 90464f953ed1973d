"""The pool manager's scale-up judgement for short functions (the rest is exercised on the real engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from node_agent.pool import PoolManager


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
