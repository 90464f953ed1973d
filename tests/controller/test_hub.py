"""The node hub's liveness check, with a stand-in store and dispatcher (its ZMQ socket is real, unused)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from controller.config import ControllerConfig
from controller.hub import Hub
from controller.metrics import ControllerMetrics
from controller.nodestate import NodeState
from shoal.blobs import BlobStore
from shoal.protocol import Msg


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
