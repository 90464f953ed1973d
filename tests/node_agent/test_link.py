"""The agent's link to the controller (a real ZMQ DEALER; a ROUTER in this test stands for the controller)."""

from __future__ import annotations

import threading
from typing import Any

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
