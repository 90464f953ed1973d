"""The agent's link to the controller (a real ZMQ DEALER; a ROUTER in this test stands for the controller)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq

from node_agent.config import AgentConfig
from node_agent.link import ControllerLink
from shoal import protocol
from shoal.devenv.redis_server import free_port
from shoal.protocol import Msg


def test_what_is_queued_for_the_controller_goes_out_when_the_link_closes(tmp_path: Any) -> None:
    """Closed with LINGER 0, the link dropped what it still held: the results and the calls given back at the end
    of a drain, sent while the controller was briefly away, never reached it (they ran again elsewhere)."""
    port = free_port()
    ctx: zmq.Context[Any] = zmq.Context()
    config = AgentConfig(controller=f"tcp://127.0.0.1:{port}", node_id="n1", state_dir=tmp_path)
    link = ControllerLink(config, ctx, lambda: {})
    link.send(Msg.RESULT, {"call_id": "c1", "status": "DONE", "result": 1})  # no controller listening yet
    link.close()
    received: list[Any] = []

    def controller() -> None:  # comes up after the close, within the linger
        server = ctx.socket(zmq.ROUTER)
        server.bind(f"tcp://127.0.0.1:{port}")
        if server.poll(10_000):
            received.append(protocol.decode(server.recv_multipart()[1:]))
        server.close(0)

    thread = threading.Thread(target=controller)
    thread.start()
    thread.join(20)
    ctx.term()  # returns once the link's queue is out (or its linger is over)
    assert [(m.type, m.header["call_id"]) for m in received] == [(Msg.RESULT, "c1")]


def test_a_controller_that_heartbeats_less_often_is_judged_by_its_own_interval(tmp_path: Any) -> None:
    """The controller at 5 s and this agent at 1 s x 3: the agent took the controller for silent between any two
    of its heartbeats and said HELLO again and again (each HELLO restarts the node's archive transfers)."""
    ctx: zmq.Context[Any] = zmq.Context()
    config = AgentConfig(controller="tcp://127.0.0.1:1", node_id="n1", state_dir=tmp_path, heartbeat=1.0, liveness=3)
    link = ControllerLink(config, ctx, lambda: {})
    hellos: list[float] = []
    link.say_hello = lambda: hellos.append(0)  # type: ignore[method-assign]
    try:
        link.on_message(protocol.Message(Msg.WELCOME, {"v": protocol.PROTOCOL_VERSION, "heartbeat": 5.0,
                                                       "liveness": 3}, []))
        heard = link.last_heard
        link.tick(heard + 10)  # 10 s since the last heartbeat: within the controller's 15 s
        assert link.welcomed and hellos == []
        link.tick(heard + 16)
        assert not link.welcomed and hellos == [0]
    finally:
        link.close()
        ctx.term()


@pytest.mark.parametrize("header, silence", [
    ({"heartbeat": 0.5, "liveness": 4}, 2.0),
    ({"heartbeat": 1e9, "liveness": 3}, protocol.MAX_SILENCE),
    ({"heartbeat": float("nan"), "liveness": 3}, None),
    ({"heartbeat": True, "liveness": 3}, None),
    ({"heartbeat": 10**400, "liveness": 3}, None),
    ({"heartbeat": -1, "liveness": 3}, None),
    ({"heartbeat": 1}, None),
    ({}, None),
])
def test_what_a_peer_announces_of_its_silence_is_checked(header: dict[str, Any], silence: float | None) -> None:
    assert protocol.silence_of(header) == silence
