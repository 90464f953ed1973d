"""The agent's link to the controller: a ZMQ DEALER (identity = node id) with heartbeats both ways.

The socket is never recreated: ZMQ reconnects underneath, and messages sent meanwhile (results above
all) wait in its queue. The link only tracks whether the controller is *listening*: silence for
``liveness`` heartbeats means "not welcomed", and HELLO is sent again with backoff until a WELCOME
comes back (a restarted controller learns the node again this way).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from node_agent.config import AgentConfig
from shoal import protocol
from shoal.auth import CurveKeys, HandshakeWatch
from shoal.logs import get_logger
from shoal.protocol import Message, Msg

HWM = 1_000_000
CLOSE_LINGER_MS = 3000  # at close, what is still queued for the controller may take this long to go out


class ControllerLink:
    def __init__(self, config: AgentConfig, ctx: zmq.Context[Any], hello: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.hello = hello
        self.log = get_logger("link", node_id=config.node_id)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, config.node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        if config.node_token:  # CURVE: encrypted, and only a peer that knows the token gets in (shoal/auth.py)
            CurveKeys.from_token(config.node_token).connect(self.sock)
        # A link whose security differs from the controller's fails every handshake in silence: say so (an agent
        # given a tcp:// URL skips /register, where the difference is otherwise caught).
        self.handshakes = HandshakeWatch(self.sock, self._handshake_failed)
        self.url = config.controller
        self.sock.connect(self.url)
        self.welcomed = False
        self.silent_since = time.monotonic()  # since when the controller has not welcomed us
        self.last_heard = 0.0
        self.next_heartbeat = 0.0
        self.next_hello = 0.0
        self.hello_backoff = 0.5
        self.dropped = 0
        self.peer_silence = 0.0  # how long the controller says it may stay silent (from its WELCOME)

    def send(self, mtype: bytes, header: dict[str, Any], *payload: bytes) -> None:
        try:
            self.sock.send_multipart(protocol.encode(mtype, header, *payload), zmq.NOBLOCK)
        except zmq.Again:
            # Only when a million messages wait for an absent controller; it re-dispatches what it lost.
            self.dropped += 1
            self.log.error("controller_queue_full_message_dropped", type=mtype.decode())

    def on_message(self, msg: Message) -> None:
        self.last_heard = time.monotonic()
        if msg.type == Msg.WELCOME:
            if msg.header["v"] != protocol.PROTOCOL_VERSION:
                self.log.error("protocol_version_mismatch", controller=msg.header["v"],
                               ours=protocol.PROTOCOL_VERSION)
                return
            # A controller that heartbeats less often than we do is judged by its own interval (set apart, a
            # controller at 5 s judged by our 1 s x 3 was silent between any two of its heartbeats: re-HELLO).
            self.peer_silence = protocol.silence_of(msg.header) or self.peer_silence
            if not self.welcomed:
                self.log.info("controller_welcomed", controller=self.config.controller)
            self.welcomed = True
            self.hello_backoff = 0.5

    def say_hello(self) -> None:
        self.send(Msg.HELLO, self.hello())
        self.next_hello = time.monotonic() + self.hello_backoff

    def tick(self, now: float) -> None:
        if now >= self.next_heartbeat:
            self.send(Msg.HEARTBEAT, {})
            self.next_heartbeat = now + self.config.heartbeat
        if self.welcomed and now - self.last_heard > max(self.config.heartbeat * self.config.liveness,
                                                         self.peer_silence):
            self.welcomed = False
            self.silent_since = now
            self.log.warning("controller_silent", seconds=round(now - self.last_heard, 1))
            self.next_hello = now
        if not self.welcomed and now >= self.next_hello:
            self.say_hello()
            self.hello_backoff = min(self.hello_backoff * 2, 10.0)

    def reconnect(self, url: str) -> None:
        """Connect to the controller at ``url`` instead (it moved: a new address registered over HTTP)."""
        self.log.warning("controller_moved", old=self.url, new=url)
        self.sock.disconnect(self.url)
        self.sock.connect(url)
        self.url = url
        self.silent_since = time.monotonic()

    def _handshake_failed(self, reason: str) -> None:
        """Called in the handshake watch's thread (at most once a minute)."""
        self.log.error("controller_link_handshake_failed", controller=self.config.controller, detail=reason,
                       failures=self.handshakes.failures,
                       hint="the node token (SHOAL_NODE_TOKEN) must be the controller's, or neither has one")

    def close(self) -> None:
        """Close the link; what is still queued for the controller (the last results, calls given back at a
        drain's end) has ``CLOSE_LINGER_MS`` to go out first: closed at once (LINGER 0), it was dropped, and the
        controller placed those calls again once it took this node for lost."""
        self.handshakes.close()
        self.sock.close(linger=CLOSE_LINGER_MS)
