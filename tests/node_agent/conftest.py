"""A real node agent, constructed and never run (its loop does not start; nothing is started)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.config import AgentConfig
from tests.node_agent.helpers import close_agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=tmp_path / "state", status_port=0)
    agent = Agent(config)
    try:
        yield agent
    finally:
        close_agent(agent)
