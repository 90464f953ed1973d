"""Status requests (from the status server's thread) are answered by the agent's loop; once the loop has ended,
they are answered at once as 'stopping' (ready: false), including those it left unread: none waits for a
timeout, and /readyz still says the node is draining."""

from __future__ import annotations

import pytest

from node_agent.agent import Agent
from node_agent.errors import AgentStopping


def test_the_loop_answers_asks(agent: Agent) -> None:
    fut = agent.ask("ready")
    assert not fut.done()
    agent.drain_inbox()
    assert fut.result(timeout=0) == {"ready": False, "controller": False, "draining": False, "docker": True}
    assert agent.asks == {}


def test_asks_left_unread_and_asks_after_the_loop_ended_are_answered_as_stopping(agent: Agent) -> None:
    agent.start_drain()
    unread_ready, unread_status = agent.ask("ready"), agent.ask("status")
    agent.stop_answering()  # what shutdown does first
    assert unread_ready.result(timeout=0) == {"ready": False, "controller": False, "draining": True, "docker": True,
                                              "stopping": True}
    with pytest.raises(AgentStopping, match="n1 is stopping"):
        unread_status.result(timeout=0)
    later = agent.ask("metrics")
    with pytest.raises(AgentStopping):
        later.result(timeout=0)
    agent.drain_inbox()  # the loop's own answers to the unread asks find them answered: nothing raises
    assert agent.asks == {}


def test_an_ask_whose_asker_gave_up_is_dropped(agent: Agent) -> None:
    fut = agent.ask("status")
    assert fut.cancel()
    agent.stop_answering()
    agent.drain_inbox()
    assert fut.cancelled() and agent.asks == {}
