"""A runtime redefined under a running node: what was started on the old definition goes; a runtime sent again
unchanged (at every HELLO) touches nothing. The agent is real, constructed and never run."""

from __future__ import annotations

from node_agent.agent import Agent


def test_a_runtime_sent_again_unchanged_leaves_its_miniworkers_and_a_changed_one_retires_them(agent: Agent) -> None:
    """Every HELLO sends every runtime again: only a definition that differs retires what was started on it."""
    from shoal.models import Runtime
    from shoal.protocol import Message, Msg

    changed: list[str] = []
    agent.broker.runtime_changed = changed.append  # type: ignore[method-assign,assignment]
    agent.pool.reconcile = lambda: None  # type: ignore[method-assign]
    rt = Runtime(name="rt", image="img:1", path="/ws")
    for image in ("img:1", "img:1", "img:2", "img:2"):
        agent.on_runtime(Message(Msg.RUNTIME, dict(rt.to_dict(), image=image), []))
    assert changed == ["rt"] and agent.registry.runtimes["rt"].image == "img:2"
