"""What the node agent's tests share: closing a real agent, or a broker rig, without starting anything."""

from __future__ import annotations

from typing import Any

from node_agent.agent import Agent


def close_agent(agent: Agent) -> None:
    """Close what constructing an Agent opened (its loop never ran: nothing was started)."""
    agent.broker.close()
    agent.link.close()
    agent.executor.shutdown()
    agent.cleanups.shutdown()
    agent.docker.close()
    agent.ctx.term()


def close_rig(rig: Any) -> None:
    """Close a broker rig: its broker's socket, then its ZMQ context."""
    rig.broker.close()
    rig.ctx.term()
