"""The node hub: the controller's ZMQ ROUTER that node agents keep their links to.

It knows the nodes (HELLO, heartbeats both ways, lost after ``liveness`` silent heartbeats), keeps each
node's runtimes and functions in sync with the store, serves archive chunks (credit-based), and hands call
states and results to the dispatcher. A bad frame is logged and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import zmq
from redis.exceptions import RedisError
from zmq.auth.thread import ThreadAuthenticator

from controller.config import ControllerConfig
from controller.errors import CorruptRecord
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from controller.store import Store
from shoal import protocol
from shoal.archive_server import ArchiveServer
from shoal.auth import CurveKeys, HandshakeWatch, start_authenticator
from shoal.blobs import BlobStore
from shoal.logs import get_logger
from shoal.nodelink import bind_router
from shoal.protocol import Buffer, Message, Msg, ProtocolError, zmq_readable

DRAIN_BATCH = 256
CATCH_UP_SECONDS = 0.25  # read from the socket at most this long before judging the nodes' liveness
SYNC_RETRY_FIRST = 0.5  # seconds before a node's sync the store failed is tried again, doubling
SYNC_RETRY_MAX = 10.0

if TYPE_CHECKING:
    from controller.dispatcher import Dispatcher


class Hub:
    def __init__(self, config: ControllerConfig, store: Store, blobs: BlobStore, metrics: ControllerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.log = get_logger("hub")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.authenticator: ThreadAuthenticator | None = None
        self.handshakes: HandshakeWatch | None = None
        curve = None
        if config.node_token:
            curve = CurveKeys.from_token(config.node_token)
            self.authenticator = start_authenticator(self.ctx, curve)
        self.sock = bind_router(self.ctx, config.zmq_bind, curve)
        if curve is not None:
            self.handshakes = HandshakeWatch(self.sock, self._refused)
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.fd = int(self.sock.getsockopt(zmq.FD))
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self.archives = ArchiveServer(blobs)
        self.nodes: dict[str, NodeState] = {}
        self.dispatcher: Dispatcher | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.syncs: set[asyncio.Task[None]] = set()  # nodes being sent their runtimes and functions
        self.on_function_state: list[Callable[[str, str, dict[str, Any]], None]] = []

    def start(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        loop = self.loop = asyncio.get_running_loop()
        # ZMQ's FD is edge-triggered: it signals "something changed", and any call that reads the socket's
        # events (a send included) consumes that signal. So: drain on the signal, and check again after
        # every send (see _recheck); never block on a receive.
        loop.add_reader(self.fd, self._drain)
        self.tasks = [loop.create_task(self._liveness_loop())]
        loop.call_soon(self._drain)

    async def close(self) -> None:
        for task in [*self.tasks, *self.syncs]:
            task.cancel()
        for task in [*self.tasks, *self.syncs]:
            try:
                await task
            except asyncio.CancelledError:
                pass  # stopping
        if self.loop is not None:
            self.loop.remove_reader(self.fd)
        self.archives.close()
        if self.handshakes is not None:
            self.handshakes.close()
        self.sock.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()

    @property
    def refused_links(self) -> int:
        """Handshakes of peers that do not know the node token."""
        return 0 if self.handshakes is None else self.handshakes.failures

    def _refused(self, reason: str) -> None:
        """A peer failed its handshake (the watch's thread; at most once a minute)."""
        self.log.warning("node_link_refused", reason=reason, refused_so_far=self.refused_links)

    # ---- sending -------------------------------------------------------------------------------
    def send(self, node_id: str, mtype: bytes, header: dict[str, Any], *payload: Buffer) -> bool:
        try:
            # Payload frames (archive chunks, views of a mapped blob) go zero-copy; ZMQ copies small frames.
            self.sock.send_multipart([node_id.encode(), *protocol.encode(mtype, header, *payload)], flags=zmq.NOBLOCK,
                                     copy=not payload)
            return True
        except zmq.ZMQError as exc:
            # A heartbeat to a node that went away says nothing the liveness check will not (it marks the node
            # lost); anything else not delivered is worth a warning.
            log = self.log.debug if mtype == Msg.HEARTBEAT else self.log.warning
            log("node_unreachable", node_id=node_id, error=exc.strerror, message=mtype.decode())
            return False
        finally:
            self._recheck()

    def _recheck(self) -> None:
        if not self._drain_scheduled and self.loop is not None and zmq_readable(self.sock):
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def send_sequenced(self, node_id: str, mtype: bytes, header: dict[str, Any]) -> bool:
        """Send a message the node must not miss (a runtime, a function): it carries the node's next sequence
        number, as calls do. A node that finds a number skipped (a reset connection lost what was in flight)
        says HELLO, and is sent everything again. A send the socket refuses uses its number all the same, so
        the next heartbeat shows the node the gap."""
        node = self.nodes.get(node_id)
        if node is None:
            return self.send(node_id, mtype, header)
        node.call_seq += 1
        return self.send(node_id, mtype, dict(header, seq=node.call_seq))

    def broadcast(self, mtype: bytes, header: dict[str, Any]) -> None:
        for node in list(self.nodes.values()):
            if not node.lost:
                self.send_sequenced(node.node_id, mtype, header)

    # ---- receiving -----------------------------------------------------------------------------
    def _drain(self) -> None:
        """Handle what the socket holds, in bounded batches so that HTTP requests are served between."""
        self._drain_scheduled = False
        for _ in range(DRAIN_BATCH):
            if not zmq_readable(self.sock):
                return
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            try:
                self.on_frames(frames)
            except ProtocolError as exc:
                self.metrics.protocol_errors.inc(socket="nodes")
                self.log.error("protocol_error", node_id=bytes(frames[0][:64]).decode("utf-8", "backslashreplace"),
                               error=str(exc))
            except Exception as exc:  # a defect in a handler: logged with its traceback; the other messages go on
                self.metrics.protocol_errors.inc(socket="nodes")
                self.log.error("node_message_failed", node_id=bytes(frames[0][:64]).decode("utf-8", "backslashreplace"),
                               error=repr(exc), exc_info=True)
        self._recheck()

    def on_frames(self, frames: list[bytes]) -> None:
        try:
            node_id = frames[0].decode()  # agents connect with their node id as ZMQ identity
        except UnicodeDecodeError:
            raise ProtocolError("the peer's identity is not a node id (an anonymous ZMQ peer?)") from None
        msg = protocol.decode(frames[1:])
        node = self.nodes.get(node_id)
        if msg.type == Msg.HELLO:
            self.on_hello(node_id, msg)
            return
        if node is None:
            # A node we do not know (we restarted): ask it to introduce itself. A result it held for us while we
            # were away may end a call recovered as on that node.
            if msg.type == Msg.RESULT and self.dispatcher is not None:
                self.dispatcher.on_result_before_hello(node_id, msg.header)
            self.send(node_id, Msg.WELCOME, {"v": protocol.PROTOCOL_VERSION, "hello": True, "seq": 0})
            return
        node.last_seen = now = time.monotonic()
        if node.lost:
            # Back from being taken for lost: it may have missed what was sent to the others meanwhile (functions,
            # deletions), and its calls were placed again. Its HELLO brings it up to date and says which calls it
            # still holds (those not placed elsewhere yet stay with it).
            self.log.info("node_back", node_id=node_id)
            node.lost = False
            node.awaiting_hello = True  # no calls until then: a CALL behind the WELCOME is not in its HELLO
            self._ask_hello(node, now)
        elif node.awaiting_hello and now - node.hello_asked >= self.config.heartbeat * self.config.liveness:
            # Asked a liveness window ago, and no HELLO yet: the WELCOME or the HELLO was lost on the way (a connection
            # reset), and the node, welcomed already, would never say it; until it does it is given no calls. (Not
            # sooner: a HELLO asked twice, the second written before CALLs placed after the first, places them again.)
            self._ask_hello(node, now)
        handler = self._handlers.get(msg.type)
        if handler is None:
            raise ProtocolError(f"{msg.name} is not a node-to-controller message")
        handler(self, node, msg)

    def _ask_hello(self, node: NodeState, now: float) -> None:
        node.hello_asked = now
        self.send(node.node_id, Msg.WELCOME, {"v": protocol.PROTOCOL_VERSION, "hello": True, "seq": node.call_seq})

    def on_hello(self, node_id: str, msg: Message) -> None:
        h = msg.header
        if h["v"] != protocol.PROTOCOL_VERSION:
            self.log.error("protocol_version_mismatch", node_id=node_id, theirs=h["v"])
            return
        running = string_set(h.get("running"), "HELLO running")
        functions = string_set(h.get("functions"), "HELLO functions")
        runtimes = string_set(h.get("runtimes"), "HELLO runtimes")
        # A node saying HELLO (restarted, or catching up after a gap) starts its transfers over after our WELCOME:
        # what we were sending it is dropped (it held its blob mapped until the node was lost).
        self.archives.forget(node_id)
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeState(node_id, h, capacity=max(1, int(h["capacity"])))
        else:
            node.hello, node.capacity, node.lost, node.draining = h, max(1, int(h["capacity"])), False, False
            node.awaiting_hello = False
        node.last_seen = time.monotonic()
        node.ready = functions
        # Failures reported before are stale: the functions are sent again below, and the node reports each
        # anew (a restarted agent prepares them again; a failed one is prepared again on being sent again).
        node.failed = {}
        self.log.info("node_hello", node_id=node_id, capacity=node.capacity, ready=len(node.ready))
        node.peer_silence = protocol.silence_of(h) or 0.0
        self.send(node_id, Msg.WELCOME, {"v": protocol.PROTOCOL_VERSION, "seq": node.call_seq,
                                         "heartbeat": self.config.heartbeat, "liveness": self.config.liveness,
                                         "max_archive_bytes": self.config.max_archive_bytes})
        self.background(self.sync_node(node_id, frozenset(runtimes), frozenset(functions)))
        if self.dispatcher is not None:
            self.dispatcher.on_node_hello(node, running)

    def resend_function(self, node_id: str, name: str, version: int) -> None:
        """Send a node a function version again (it dropped it, and calls of it wait)."""

        async def resend() -> None:
            try:
                record = await self.store.get_version(name, version)
            except (RedisError, CorruptRecord) as exc:
                self.log.error("function_not_resent", node_id=node_id, function=f"{name}@{version}", error=str(exc))
                return
            if record is not None:
                self.send_sequenced(node_id, Msg.FUNCTION, function_message(record))

        self.background(resend())

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the hub holds (one only the loop refers to may be collected before it ends)
        and cancels when it closes."""
        task = asyncio.get_running_loop().create_task(work)
        self.syncs.add(task)
        task.add_done_callback(self.syncs.discard)

    async def sync_node(self, node_id: str, runtimes: frozenset[str] = frozenset(),
                        functions: frozenset[str] = frozenset()) -> None:
        """Send a node every runtime, the latest version of every function, and any older version that calls
        held here still wait for (a node that restarted knows none of them; without it they would wait for
        ever). What the node said it has (``runtimes``, ``functions``) that was deleted meanwhile, it is told to
        forget. The store failing meanwhile does not leave the node without them: it is tried again, for as
        long as the node is there."""
        delay = SYNC_RETRY_FIRST
        while True:
            try:
                await self._sync_node(node_id, runtimes, functions)
                return
            except RedisError as exc:
                node = self.nodes.get(node_id)
                if node is None or node.lost:
                    return  # a node back from being lost says HELLO, and is synced then
                self.log.error("node_sync_failed", node_id=node_id, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, SYNC_RETRY_MAX)

    async def _sync_node(self, node_id: str, runtimes: frozenset[str], functions: frozenset[str]) -> None:
        stored = await self.store.list_runtimes()
        for runtime in stored:
            self.send_sequenced(node_id, Msg.RUNTIME, runtime.to_dict())
        for name in sorted(runtimes - await self.store.runtime_names()):  # (one stored but invalid is not gone)
            self.send_sequenced(node_id, Msg.RUNTIME_GONE, {"name": name})
        latest: dict[str, int] = {}
        for fn in await self.store.list_functions():
            latest[fn["name"]] = int(fn["version"])
            self.send_sequenced(node_id, Msg.FUNCTION, function_message(fn))
        deleted: dict[str, int] = {}
        for key in functions:
            name, _, number = key.rpartition("@")
            if name and name not in latest and number.isdigit():
                deleted[name] = max(deleted.get(name, 0), int(number))
        for name, up_to in sorted(deleted.items()):
            if self.dispatcher is None or not self.dispatcher.has_calls(name, up_to):
                self.send_sequenced(node_id, Msg.FUNCTION_GONE, {"name": name, "up_to": up_to})
            else:
                self.dispatcher.forget_when_idle(name, up_to)  # its calls still held here end first
        held = {(p.function, p.version) for p in self.dispatcher.calls.values()} if self.dispatcher else set()
        for name, version in sorted(held):
            if latest.get(name) == version:
                continue
            try:
                record = await self.store.get_version(name, version)
            except CorruptRecord as exc:  # (damaged in Redis: this node cannot be given it; the sync goes on)
                self.log.error("function_not_sent", node_id=node_id, function=f"{name}@{version}", error=str(exc))
                continue
            if record is not None:
                self.send_sequenced(node_id, Msg.FUNCTION, function_message(record))
        await self.store.save_node(node_id, self.nodes[node_id].to_dict())

    def on_heartbeat(self, node: NodeState, msg: Message) -> None:
        pass  # last_seen was updated

    def on_fetch(self, node: NodeState, msg: Message) -> None:
        for mtype, header, data in self.archives.on_fetch(node.node_id, msg.header):
            self.send(node.node_id, mtype, header, *([] if data is None else [data]))

    def on_function_state_msg(self, node: NodeState, msg: Message) -> None:
        h = msg.header
        key = f"{h['name']}@{h['version']}"
        if h["state"] == "ready":
            node.ready.add(key)
            node.failed.pop(key, None)
        elif h["state"] == "failed":
            node.ready.discard(key)
            node.failed[key] = str(h.get("error", ""))
        elif h["state"] == "retired":  # an old version the node dropped, unused: it is sent back if wanted
            node.ready.discard(key)
            node.failed.pop(key, None)
        for callback in self.on_function_state:
            callback(node.node_id, key, h)
        if self.dispatcher is not None:
            self.dispatcher.on_function_state(node, key, h["state"])

    def on_call_state(self, node: NodeState, msg: Message) -> None:
        if self.dispatcher is not None:
            self.dispatcher.on_call_state(node, msg.header)

    def on_result(self, node: NodeState, msg: Message) -> None:
        if self.dispatcher is not None:
            self.dispatcher.on_result(node, msg.header)

    def on_status(self, node: NodeState, msg: Message) -> None:
        h = msg.header
        seen, held = h.get("seq"), h.get("calls")
        if seen is not None or held is not None:  # an agent that reports neither does not take part
            if not isinstance(seen, int) or isinstance(seen, bool) or seen < 0:
                raise ProtocolError(f"STATUS seq must be a non-negative integer, not {seen!r:.40}")
            if self.dispatcher is not None:
                self.dispatcher.on_node_status(node, seen, string_set(held, "STATUS calls", required=True))
        node.draining = bool(h.get("draining", False))
        warm = h.get("warm")
        if isinstance(warm, dict):
            node.warm_pool = {str(k): int(v) for k, v in warm.items() if isinstance(v, int)}
        if node.draining and self.dispatcher is not None:
            self.dispatcher.kick()

    _handlers: dict[bytes, Callable[[Hub, NodeState, Message], None]] = {
        Msg.HEARTBEAT: on_heartbeat,
        Msg.FETCH: on_fetch,
        Msg.FUNCTION_STATE: on_function_state_msg,
        Msg.CALL_STATE: on_call_state,
        Msg.RESULT: on_result,
        Msg.STATUS: on_status,
    }

    # ---- liveness ------------------------------------------------------------------------------
    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat)
            # What the nodes sent is read before they are judged: a controller behind on its socket (a burst of
            # results, a stalled loop) took their heartbeats, unread, for silence, and ran their calls again.
            caught_up = self.catch_up(CATCH_UP_SECONDS)
            for node in self.check_liveness(time.monotonic(), behind=not caught_up):
                try:
                    await self.store.save_node(node.node_id, node.to_dict())
                except RedisError as exc:  # only the record of it: the loop must go on (it is the only one)
                    self.log.error("node_state_not_saved", node_id=node.node_id, error=str(exc))

    def catch_up(self, budget: float) -> bool:
        """Handle what the socket holds, for at most ``budget`` seconds; whether it was all read."""
        deadline = time.monotonic() + budget
        while zmq_readable(self.sock):
            if time.monotonic() >= deadline:
                return False
            self._drain()
        return True

    def check_liveness(self, now: float, behind: bool = False) -> list[NodeState]:
        """Heartbeat the nodes that are alive; mark lost those silent for ``liveness`` heartbeats (their calls
        go back to the dispatcher) and return them. ``behind``: what they sent is not all read yet (their
        heartbeats may be among it), so they get twice the time (a node that died is still found, later)."""
        silence = self.config.heartbeat * self.config.liveness * (2 if behind else 1)
        lost: list[NodeState] = []
        for node in list(self.nodes.values()):
            if node.lost:
                continue
            # A node that heartbeats less often than we do is judged by its own interval (the two are set apart:
            # a node at 5 s judged by our 1 s x 3 was lost between any two of its heartbeats).
            if now - node.last_seen > max(silence, node.peer_silence * (2 if behind else 1)):
                node.lost = True
                self.archives.forget(node.node_id)
                self.log.warning("node_lost", node_id=node.node_id, silent_s=round(now - node.last_seen, 1),
                                 inflight=len(node.inflight))
                if self.dispatcher is not None:
                    self.dispatcher.on_node_lost(node)
                lost.append(node)
            else:
                self.send(node.node_id, Msg.HEARTBEAT, {"seq": node.call_seq})
        return lost


def string_set(value: Any, what: str, required: bool = False) -> set[str]:
    """A node's list of names (HELLO running and functions, STATUS calls), or a ProtocolError."""
    if value is None and not required:
        return set()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what} must be a list of strings")
    return set(value)


def function_message(record: dict[str, Any]) -> dict[str, Any]:
    """The FUNC message for a stored function version."""
    fields = ("name", "version", "runtime", "sha256", "size", "entrypoint", "timeout", "preload", "min_warm",
              "max_warm", "keepalive")
    return {k: record[k] for k in fields if record.get(k) is not None}
