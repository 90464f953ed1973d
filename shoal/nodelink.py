"""The controller's side of the node link: a ZMQ ROUTER that node agents connect to.

It keeps track of nodes (HELLO, heartbeats), serves archive chunks with credit-based flow control, sends
runtimes, functions and calls, and collects call states and results. It is driven by ``pump()``, so it can
run inside any loop; the blocking helpers (``call``, ``wait``...) make it a small synchronous client for
tests, the demo and benchmarks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq

from shoal import protocol
from shoal.archive_server import CHUNK_SIZE, ArchiveServer
from shoal.auth import CurveKeys
from shoal.blobs import BlobStore
from shoal.errors import NotFound, ShoalError
from shoal.logs import get_logger
from shoal.models import FunctionSpec, Runtime
from shoal.protocol import Buffer, Message, Msg, ProtocolError, zmq_readable


class LinkTimeout(ShoalError):
    """Waited too long for a node."""


@dataclass
class NodeInfo:
    node_id: str
    hello: dict[str, Any]
    last_seen: float = field(default_factory=time.monotonic)
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> FSTATE header
    hellos: int = 1  # HELLOs received from it


def bind_router(ctx: zmq.Context[Any], url: str, curve: CurveKeys | None = None) -> zmq.Socket[Any]:
    """The controller's side of node links: a ROUTER addressed by node id, reconnects handed over; a CURVE
    server if ``curve`` is given (the context's ZAP handler must be running)."""
    sock = ctx.socket(zmq.ROUTER)
    if curve is not None:
        curve.serve(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.RCVHWM, 1_000_000)
    sock.bind(url)
    return sock


class NodeLink:
    def __init__(self, blobs: BlobStore, bind: str = "tcp://127.0.0.1:0", heartbeat: float = 1.0,
                 chunk_size: int = CHUNK_SIZE) -> None:
        self.blobs = blobs
        self.heartbeat = heartbeat
        self.chunk_size = chunk_size
        self.log = get_logger("nodelink")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = bind_router(self.ctx, bind)
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.nodes: dict[str, NodeInfo] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.states: dict[str, list[dict[str, Any]]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}  # node id -> its last STATUS
        self.archives = ArchiveServer(blobs, chunk_size)
        self.protocol_errors = 0
        self.next_heartbeat = 0.0

    # ---- plumbing ------------------------------------------------------------------------------
    def send(self, node_id: str, mtype: bytes, header: dict[str, Any], *payload: Buffer) -> None:
        try:
            self.sock.send_multipart([node_id.encode(), *protocol.encode(mtype, header, *payload)])
        except zmq.ZMQError as exc:
            raise NotFound(f"node {node_id!r} is not connected ({exc.strerror})") from None

    def pump(self, timeout: float = 0.0) -> int:
        """Handle what arrived (waiting up to ``timeout`` s for the first message); return the count."""
        handled = 0
        if self.sock.poll(int(timeout * 1000)):
            while zmq_readable(self.sock):
                self.on_frames(self.sock.recv_multipart(zmq.NOBLOCK))
                handled += 1
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat
            for node_id in list(self.nodes):
                try:
                    self.send(node_id, Msg.HEARTBEAT, {})
                except NotFound:
                    self.log.warning("node_unreachable", node_id=node_id)
        return handled

    def on_frames(self, frames: list[bytes]) -> None:
        node_id = frames[0].decode("utf-8", "replace")
        try:
            msg = protocol.decode(frames[1:])
        except ProtocolError as exc:
            self.protocol_errors += 1
            self.log.error("protocol_error", node_id=node_id, error=str(exc))
            return
        node = self.nodes.get(node_id)
        if node is not None:
            node.last_seen = time.monotonic()
        if msg.type == Msg.HELLO:
            if node is None:
                self.nodes[node_id] = NodeInfo(node_id, msg.header)
            else:
                node.hello = msg.header
                node.hellos += 1
            self.send(node_id, Msg.WELCOME, {"v": protocol.PROTOCOL_VERSION})
        elif msg.type == Msg.RESULT:
            self.results.setdefault(msg.header["call_id"], msg.header)
        elif msg.type == Msg.CALL_STATE:
            self.states.setdefault(msg.header["call_id"], []).append(msg.header)
        elif msg.type == Msg.STATUS:
            self.statuses[node_id] = msg.header
        elif msg.type == Msg.FETCH:
            self.on_fetch(node_id, msg)
        elif msg.type == Msg.FUNCTION_STATE and node is not None:
            node.functions[f"{msg.header['name']}@{msg.header['version']}"] = msg.header

    def on_fetch(self, node_id: str, msg: Message) -> None:
        for mtype, header, data in self.archives.on_fetch(node_id, msg.header):
            self.send(node_id, mtype, header, *([] if data is None else [data]))

    # ---- blocking helpers ----------------------------------------------------------------------
    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkTimeout(f"timed out after {timeout:g} s waiting for {what}")
            self.pump(min(remaining, 0.05))

    def wait_node(self, node_id: str, timeout: float = 30.0) -> NodeInfo:
        self.wait_for(lambda: node_id in self.nodes, timeout, f"node {node_id} to say hello")
        return self.nodes[node_id]

    def put_runtime(self, node_id: str, runtime: Runtime) -> None:
        self.send(node_id, Msg.RUNTIME, runtime.to_dict())

    def put_function(self, node_id: str, spec: FunctionSpec, wait: float | None = 120.0) -> dict[str, Any]:
        """Send a function version (its archive must be in ``blobs``); wait until the node reports it."""
        self.nodes[node_id].functions.pop(spec.key, None)
        self.send(node_id, Msg.FUNCTION, spec.to_dict())
        if wait is None:
            return {}
        self.wait_for(lambda: spec.key in self.nodes[node_id].functions, wait, f"{spec.key} on {node_id}")
        return self.nodes[node_id].functions[spec.key]

    def submit(self, node_id: str, function: str, params: Any, timeout: float | None = None,
               call_id: str | None = None, version: int | None = None) -> str:
        call_id = call_id or uuid.uuid4().hex
        header: dict[str, Any] = {"call_id": call_id, "function": function, "params": params}
        if timeout is not None:
            header["timeout"] = timeout
        if version is not None:
            header["version"] = version
        self.send(node_id, Msg.CALL, header)
        return call_id

    def result(self, call_id: str, timeout: float = 60.0) -> dict[str, Any]:
        self.wait_for(lambda: call_id in self.results, timeout, f"the result of call {call_id}")
        return self.results.pop(call_id)

    def call(self, node_id: str, function: str, params: Any, timeout: float | None = None,
             wait: float = 120.0) -> dict[str, Any]:
        return self.result(self.submit(node_id, function, params, timeout), wait)

    def wait_all(self, call_ids: list[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        self.wait_for(lambda: all(c in self.results for c in call_ids), timeout, f"{len(call_ids)} results")
        return {c: self.results.pop(c) for c in call_ids}

    def close(self) -> None:
        self.archives.close()
        self.sock.close()
        self.ctx.term()
