"""The node hub's liveness check, with a stand-in store and dispatcher (its ZMQ socket is real, unused)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from controller.config import ControllerConfig
from controller.hub import Hub
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from shoal import protocol
from shoal.blobs import BlobStore
from shoal.models import Runtime
from shoal.protocol import Msg, ProtocolError, zmq_readable


class UnreachableStore:
    def __init__(self) -> None:
        self.attempts = 0

    async def save_node(self, node_id: str, info: dict[str, Any]) -> None:
        self.attempts += 1
        raise RedisConnectionError("redis is restarting")


class Lost:
    def __init__(self) -> None:
        self.nodes: list[str] = []

    def on_node_lost(self, node: NodeState) -> None:
        self.nodes.append(node.node_id)

    def on_node_hello(self, node: NodeState, running: set[str]) -> None:
        pass


def test_a_store_failure_while_recording_a_lost_node_does_not_stop_the_liveness_check(tmp_path: Path) -> None:
    """The liveness loop is the only thing that marks nodes lost (and places their calls again): a Redis
    error saving a lost node's state used to end it for good."""

    async def scenario() -> None:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0", heartbeat=0.05, liveness=2)
        store, lost = UnreachableStore(), Lost()
        hub = Hub(config, store, BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        hub.start(lost)  # type: ignore[arg-type]
        try:
            silent = time.monotonic() - 10
            hub.nodes["a"] = NodeState("a", {"v": 1}, capacity=1, last_seen=silent)
            await asyncio.sleep(0.3)
            hub.nodes["b"] = NodeState("b", {"v": 1}, capacity=1, last_seen=silent)
            deadline = time.monotonic() + 10
            while lost.nodes != ["a", "b"]:
                assert time.monotonic() < deadline, lost.nodes
                await asyncio.sleep(0.05)
            assert store.attempts == 2 and not hub.tasks[0].done()
        finally:
            await hub.close()

    asyncio.run(scenario())


def test_a_joining_node_is_sent_the_older_versions_that_held_calls_wait_for(tmp_path: Path) -> None:
    def record(version: int) -> dict[str, Any]:
        return {"name": "f", "version": version, "runtime": "rt", "sha256": str(version) * 64, "size": 1}

    class Store:
        async def list_runtimes(self) -> list[Any]:
            return []

        async def runtime_names(self) -> set[str]:
            return set()

        async def list_functions(self) -> list[dict[str, Any]]:
            return [record(3)]

        async def get_version(self, name: str, version: int) -> dict[str, Any] | None:
            return record(version) if name == "f" and version <= 3 else None

        async def save_node(self, node_id: str, info: dict[str, Any]) -> None:
            pass

    class Held:
        calls = {f"c{v}": SimpleNamespace(function="f", version=v) for v in (1, 1, 3)}

    async def scenario() -> list[tuple[bytes, dict[str, Any]]]:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0")
        hub = Hub(config, Store(), BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        hub.dispatcher = Held()  # type: ignore[assignment]
        hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)
        sent: list[tuple[bytes, dict[str, Any]]] = []

        def send(node_id: str, mtype: bytes, header: dict[str, Any], *payload: Any) -> bool:
            sent.append((mtype, header))
            return True

        hub.send = send  # type: ignore[method-assign]
        await hub.sync_node("n1")
        await hub.close()
        return sent

    sent = asyncio.run(scenario())
    assert [(m, h["version"]) for m, h in sent] == [(Msg.FUNCTION, 3), (Msg.FUNCTION, 1)]


class Statuses:
    def __init__(self) -> None:
        self.calls: dict[str, Any] = {}
        self.reports: list[tuple[int, set[str]]] = []
        self.hellos: list[set[str]] = []

    def on_node_status(self, node: NodeState, seen: int, held: set[str]) -> None:
        self.reports.append((seen, held))

    def on_node_hello(self, node: NodeState, running: set[str]) -> None:
        self.hellos.append(running)

    def kick(self) -> None:
        pass


def test_a_nodes_status_and_hello_are_checked_before_they_change_anything(tmp_path: Path) -> None:
    """Malformed call lists and sequence numbers are protocol errors (the drain loop logs them and goes on);
    an agent that reports neither takes no part in the check for dropped calls."""

    async def scenario() -> None:
        hub = Hub(ControllerConfig(zmq_bind="tcp://127.0.0.1:0"), None, BlobStore(tmp_path),  # type: ignore[arg-type]
                  ControllerMetrics())
        hub.dispatcher = dispatcher = Statuses()  # type: ignore[assignment]
        hub.send = lambda *args, **kwargs: True  # type: ignore[method-assign]
        hub.sync_node = lambda node_id, *known: asyncio.sleep(0)  # type: ignore[method-assign]
        try:
            check(hub, dispatcher)
        finally:
            await hub.close()

    def check(hub: Hub, dispatcher: Statuses) -> None:
        node = hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)

        def status(**fields: Any) -> None:
            hub.on_status(node, protocol.Message(Msg.STATUS, {"node_id": "n1", **fields}, []))

        status(warm={})
        status(seq=4, calls=["a", "b"])
        assert dispatcher.reports == [(4, {"a", "b"})]
        bad: dict[str, Any]
        for bad in ({"seq": 4}, {"calls": []}, {"seq": -1, "calls": []}, {"seq": True, "calls": []},
                    {"seq": "4", "calls": []}, {"seq": 4, "calls": "a"}, {"seq": 4, "calls": [1]},
                    {"seq": 4, "calls": [["a"]]}):
            with pytest.raises(ProtocolError):
                status(**bad)
        assert len(dispatcher.reports) == 1

        def hello(**fields: Any) -> None:
            hub.on_hello("n2", protocol.Message(Msg.HELLO, {"v": protocol.PROTOCOL_VERSION, "node_id": "n2",
                                                            "capacity": 1, **fields}, []))

        bad_hello: dict[str, Any]
        for bad_hello in ({"running": [{"a": 1}]}, {"running": "abc"}, {"functions": [["f@1"]]}, {"functions": {}},
                          {"runtimes": [1]}):
            with pytest.raises(ProtocolError):
                hello(**bad_hello)
        assert "n2" not in hub.nodes and not dispatcher.hellos
        # A transfer to n2 under way: its HELLO (a restart) drops it; the node starts it over after WELCOME.
        sha, _ = hub.archives.blobs.put_bytes(b"x" * (3 << 20))
        assert hub.archives.on_fetch("n2", {"sha256": sha, "offset": 0, "credit": 1, "restart": True})
        assert ("n2", sha) in hub.archives.transfers
        hello(running=["c"], functions=["f@1"])
        assert dispatcher.hellos == [{"c"}] and hub.nodes["n2"].ready == {"f@1"} and not hub.archives.transfers

    asyncio.run(scenario())


def test_a_runtime_or_function_a_node_missed_leaves_a_gap_its_next_heartbeat_shows(tmp_path: Path) -> None:
    """A broadcast the node's socket refused (not connected just then) still uses its number: the heartbeat
    that follows carries it, the node sees the gap and says HELLO, and is sent everything again."""

    async def scenario() -> None:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0")
        hub = Hub(config, UnreachableStore(), BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        sent: list[tuple[bytes, dict[str, Any]]] = []
        real = hub.send

        def send(node_id: str, mtype: bytes, header: dict[str, Any], *payload: Any) -> bool:
            sent.append((mtype, header))
            return real(node_id, mtype, header, *payload)  # refused: no node is connected

        hub.send = send  # type: ignore[method-assign]
        node = hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)
        node.call_seq = 4
        fn = {"name": "f", "version": 1, "runtime": "rt", "sha256": "0" * 64, "size": 1}
        hub.broadcast(Msg.FUNCTION, fn)
        hub.check_liveness(time.monotonic())
        await hub.close()
        assert sent == [(Msg.FUNCTION, dict(fn, seq=5)), (Msg.HEARTBEAT, {"seq": 5})]

    asyncio.run(scenario())


def test_a_node_whose_sync_the_store_failed_is_synced_once_it_answers(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync of a joining node used to end at the first Redis error: the node never got its functions, and
    their calls waited for ever."""
    monkeypatch.setattr("controller.hub.SYNC_RETRY_FIRST", 0.01)

    class Flaky:
        def __init__(self) -> None:
            self.failures = 2

        async def list_runtimes(self) -> list[Any]:
            if self.failures:
                self.failures -= 1
                raise RedisConnectionError("redis is restarting")
            return []

        async def runtime_names(self) -> set[str]:
            return set()

        async def list_functions(self) -> list[dict[str, Any]]:
            return [{"name": "f", "version": 1, "runtime": "rt", "sha256": "0" * 64, "size": 1}]

        async def save_node(self, node_id: str, info: dict[str, Any]) -> None:
            pass

    async def scenario() -> list[bytes]:
        hub = Hub(ControllerConfig(zmq_bind="tcp://127.0.0.1:0"), Flaky(), BlobStore(tmp_path),  # type: ignore[arg-type]
                  ControllerMetrics())
        hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)
        sent: list[bytes] = []

        def send(node_id: str, mtype: bytes, header: dict[str, Any], *payload: Any) -> bool:
            sent.append(mtype)
            return True

        hub.send = send  # type: ignore[method-assign]
        await asyncio.wait_for(hub.sync_node("n1"), 5)
        await hub.close()
        return sent

    assert asyncio.run(scenario()) == [Msg.FUNCTION]


def test_a_joining_node_is_told_to_forget_what_was_deleted_while_it_was_away(tmp_path: Path) -> None:
    class Store:
        async def list_runtimes(self) -> list[Any]:
            return [Runtime(name="rt", image="img", path="/ws", dependencies="", run="")]

        async def runtime_names(self) -> set[str]:
            return {"rt"}

        async def list_functions(self) -> list[dict[str, Any]]:
            return [{"name": "f", "version": 3, "runtime": "rt", "sha256": "3" * 64, "size": 1}]

        async def save_node(self, node_id: str, info: dict[str, Any]) -> None:
            pass

    class Calls:
        calls: dict[str, Any] = {}
        later: list[tuple[str, int]] = []

        def has_calls(self, name: str, up_to: int) -> bool:
            return name == "h"

        def forget_when_idle(self, name: str, up_to: int) -> None:
            self.later.append((name, up_to))

    async def scenario() -> list[tuple[bytes, dict[str, Any]]]:
        hub = Hub(ControllerConfig(zmq_bind="tcp://127.0.0.1:0"), Store(), BlobStore(tmp_path),  # type: ignore[arg-type]
                  ControllerMetrics())
        hub.dispatcher = calls  # type: ignore[assignment]
        hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)
        sent: list[tuple[bytes, dict[str, Any]]] = []

        def send(node_id: str, mtype: bytes, header: dict[str, Any], *payload: Any) -> bool:
            sent.append((mtype, {k: v for k, v in header.items() if k in ("name", "up_to")}))
            return True

        hub.send = send  # type: ignore[method-assign]
        await hub.sync_node("n1", frozenset({"rt", "old-rt"}), frozenset({"f@3", "g@1", "g@2", "h@1"}))
        await hub.close()
        return sent

    calls = Calls()
    assert asyncio.run(scenario()) == [
        (Msg.RUNTIME, {"name": "rt"}), (Msg.RUNTIME_GONE, {"name": "old-rt"}),
        (Msg.FUNCTION, {"name": "f"}), (Msg.FUNCTION_GONE, {"name": "g", "up_to": 2})]
    assert calls.later == [("h", 1)]  # its calls end first


def test_nodes_are_judged_only_after_what_they_sent_is_read(tmp_path: Path) -> None:
    """A controller behind on its socket (a burst of results, a stalled loop) took the heartbeats it had not
    read yet for silence: the node was marked lost and its calls ran again. A node taken for lost that is heard
    from again is asked to say HELLO (it may have missed broadcasts meanwhile)."""
    import zmq

    async def scenario() -> None:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0", heartbeat=0.05, liveness=2)
        hub = Hub(config, UnreachableStore(), BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        lost = Lost()
        hub.dispatcher = lost  # type: ignore[assignment]
        ctx = zmq.Context()
        node = ctx.socket(zmq.DEALER)
        node.setsockopt(zmq.IDENTITY, b"n1")
        node.connect(hub.url)
        try:
            hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1, last_seen=time.monotonic() - 10)
            node.send_multipart(protocol.encode(Msg.HEARTBEAT, {}))  # unread: the hub does not read on its own here
            deadline = time.monotonic() + 10
            while not zmq_readable(hub.sock):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert hub.catch_up(1.0)
            assert hub.check_liveness(time.monotonic()) == [] and lost.nodes == []

            node.send_multipart(protocol.encode(Msg.HEARTBEAT, {}))
            while not zmq_readable(hub.sock):
                await asyncio.sleep(0.01)
            now = time.monotonic()
            hub.nodes["n1"].last_seen = now - 0.15  # silent past 0.1 s (2 x 0.05), within twice that
            assert hub.check_liveness(now, behind=True) == []  # not all read: it gets twice the time
            assert [n.node_id for n in hub.check_liveness(now)] == ["n1"] and hub.nodes["n1"].lost
            hub.catch_up(1.0)  # the heartbeat of a node taken for lost
            assert not hub.nodes["n1"].lost and not hub.nodes["n1"].alive()  # no calls until its HELLO
            answers = []
            while node.poll(2000):
                answers.append(protocol.decode(node.recv_multipart()))
                if answers[-1].type == Msg.WELCOME:
                    break
            assert answers[-1].type == Msg.WELCOME and answers[-1].header["hello"] is True
            hub.background = lambda work: work.close()  # (no sync here)
            lost.on_node_hello = lambda n, running: None
            hub.on_hello("n1", protocol.Message(Msg.HELLO, {"v": protocol.PROTOCOL_VERSION, "node_id": "n1",
                                                            "capacity": 1}, []))
            assert hub.nodes["n1"].alive()
        finally:
            node.close(0)
            ctx.term()
            await hub.close()

    asyncio.run(scenario())


def test_a_node_that_heartbeats_less_often_is_judged_by_its_own_interval(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0", heartbeat=1.0, liveness=3)
        hub = Hub(config, UnreachableStore(), BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        lost = Lost()
        hub.dispatcher = lost  # type: ignore[assignment]
        hub.background = lambda work: work.close()  # type: ignore[method-assign]  # (no sync here)
        try:
            hub.on_hello("slow", protocol.Message(Msg.HELLO, {"v": protocol.PROTOCOL_VERSION, "node_id": "slow",
                                                              "capacity": 1, "heartbeat": 5.0, "liveness": 3}, []))
            hub.on_hello("fast", protocol.Message(Msg.HELLO, {"v": protocol.PROTOCOL_VERSION, "node_id": "fast",
                                                              "capacity": 1}, []))
            seen = time.monotonic()
            for node in hub.nodes.values():
                node.last_seen = seen
            assert hub.check_liveness(seen + 10) == [hub.nodes["fast"]]  # the slow one has 15 s
            assert hub.check_liveness(seen + 16) == [hub.nodes["slow"]]
        finally:
            await hub.close()

    asyncio.run(scenario())


def test_a_node_back_from_lost_is_asked_for_its_hello_until_it_says_it(tmp_path: Path) -> None:
    """It was asked once: a WELCOME{hello} or HELLO lost on the way (a reset) left it welcomed, heartbeating,
    and never given a call again (in a one-node cluster, every call waited for ever)."""

    async def scenario() -> None:
        config = ControllerConfig(zmq_bind="tcp://127.0.0.1:0")
        hub = Hub(config, None, BlobStore(tmp_path), ControllerMetrics())  # type: ignore[arg-type]
        asked: list[str] = []

        def send(node_id: str, mtype: bytes, header: dict[str, Any], *payload: Any) -> bool:
            if mtype == Msg.WELCOME and header.get("hello"):
                asked.append(node_id)
            return True

        hub.send = send  # type: ignore[method-assign]
        try:
            node = hub.nodes["n1"] = NodeState("n1", {"v": 1}, capacity=1)
            node.lost = True
            heartbeat = [b"n1", *(bytes(f) for f in protocol.encode(Msg.HEARTBEAT, {}))]
            hub.on_frames(heartbeat)  # back: asked
            hub.on_frames(heartbeat)  # asked a moment ago: not again yet
            assert asked == ["n1"] and node.awaiting_hello and not node.alive()
            node.hello_asked -= config.heartbeat * config.liveness  # a liveness window later, no HELLO: asked again
            hub.on_frames(heartbeat)
            assert asked == ["n1", "n1"]
            node.awaiting_hello = False  # its HELLO came: no more asking
            node.hello_asked -= config.heartbeat * config.liveness
            hub.on_frames(heartbeat)
            assert asked == ["n1", "n1"]
        finally:
            await hub.close()

    asyncio.run(scenario())
