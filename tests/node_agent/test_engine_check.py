"""The agent's Docker engine check: one ping at a time, and an overdue one makes the node not ready. The agent is
real; its pool is a stand-in that holds the work (as a hung engine does) until told."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node_agent.agent import ENGINE_PING_LATE, Agent


def test_a_hung_engine_is_pinged_once_and_not_ready_once_the_ping_is_overdue(agent: Agent) -> None:
    held: list[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = []
    agent.run_in_pool = lambda work, done, executor=None: held.append((work, done))  # type: ignore[method-assign]
    agent.check_engine(100.0)
    for t in (105.0, 109.0):  # within the allowance: still ready, and no second ping queued
        agent.check_engine(t)
        assert agent.engine_ok and len(held) == 1
    agent.check_engine(100.0 + ENGINE_PING_LATE + 1)
    assert not agent.engine_ok and len(held) == 1
    _, done = held.pop()
    done(True, None)  # the engine answers at last
    assert agent.engine_ok
    agent.check_engine(200.0)
    assert len(held) == 1
