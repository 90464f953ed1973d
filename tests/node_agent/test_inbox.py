"""What other threads post to the agent's loop (pool completions, status asks) runs in the loop's inbox drain."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.agent import Agent


class Recorder:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.errors.append((event, fields))

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: None


def test_a_callback_that_raises_is_logged_and_the_next_one_runs(agent: Agent,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception from one posted callable left drain_inbox, and so the agent's loop: the agent ended."""
    log = Recorder()
    monkeypatch.setattr(agent, "log", log)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in a completion")

    agent.post(lambda: ran.append("first"))
    agent.post(broken)
    agent.post(lambda: ran.append("after"))
    agent.drain_inbox()
    assert ran == ["first", "after"]
    [(event, fields)] = log.errors
    assert event == "inbox_callback_failed" and fields["exc_info"] is True
    assert "broken" in fields["callback"] and "a bug in a completion" in fields["error"]
    fut = agent.ask("ready")  # the loop still answers
    agent.drain_inbox()
    assert fut.result(timeout=0)["ready"] is False


def test_an_interrupt_is_not_taken_for_a_failed_callback(agent: Agent) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    agent.post(interrupted)
    with pytest.raises(KeyboardInterrupt):
        agent.drain_inbox()
