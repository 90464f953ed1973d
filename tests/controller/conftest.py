from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from shoal.archive import build_tar_gz
from shoal.localcluster import LocalCluster

ECHO = {"handler.py": "def handler(params):\n    return {'echo': params}\n"}
SLOW = {"handler.py": "import time\ndef handler(p):\n    time.sleep(p.get('s', 1))\n    return p.get('s', 1)\n"}


def all_containers_gone(client: docker.DockerClient, node_ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # One listing call (the SDK's containers.list inspects each one and races with their removal).
        left = [c for n in node_ids for c in
                client.api.containers(all=True, filters={"label": f"org.shoal.node={n}"})]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"containers left behind: {[c['Names'] for c in left]}")
        time.sleep(0.2)


@pytest.fixture
def make_cluster(docker_url: str, docker_client: docker.DockerClient) -> Iterator[Callable[..., LocalCluster]]:
    clusters: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        kwargs.setdefault("name", f"c{uuid.uuid4().hex[:6]}")
        # A node is lost after 5 s of silence (not 1.5 s): a node the loaded test machine stalls for a second
        # stays in place. Tests of node loss ask for the short window.
        kwargs.setdefault("liveness", 10)
        cluster = LocalCluster(docker_url, **kwargs)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield factory
    for cluster in clusters:
        node_ids = list(cluster.nodes)
        cluster.stop()
        all_containers_gone(docker_client, node_ids)


def upload(cluster: LocalCluster, name: str, files: dict[str, str], runtime: str = "pythonruntime",
           **options: Any) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in dict(options, runtime=runtime).items())
    status, body, _ = cluster.request("POST", f"/v1/functions/{name}?{query}", data=build_tar_gz(files),
                                      headers={"Content-Type": "application/octet-stream"})
    assert status == 201, body
    return dict(body)


def seed_runtime(cluster: LocalCluster, **fields: Any) -> None:
    body = dict({"image": "pythonruntime", "path": "/ws", "dependencies": "pip3 install -r requirements.txt",
                 "run": "python3 test.py"}, **fields)
    status, answer, _ = cluster.request("POST", "/v1/runtimes", body)
    assert status == 201, answer


def wait_ready(cluster: LocalCluster, name: str, nodes: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        fn = cluster.get(f"/v1/functions/{name}")
        if sum(1 for s in fn["nodes"].values() if s == "ready") >= nodes:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} not ready on {nodes} nodes: {fn['nodes']}")
        time.sleep(0.1)


def wait_call(cluster: LocalCluster, call_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        call = cluster.get(f"/v1/calls/{call_id}")
        if call["status"] in ("DONE", "FAILED", "TIMEOUT", "CANCELLED"):
            return dict(call)
        if time.monotonic() > deadline:
            raise AssertionError(f"call {call_id} still {call['status']}")
        time.sleep(0.05)


def metrics(cluster: LocalCluster) -> dict[str, float]:
    """The controller's /metrics page: series (name and labels, as printed) -> value."""
    status, text, headers = cluster.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), (status, text)
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


__all__ = ["ECHO", "SLOW", "build_tar_gz", "metrics", "seed_runtime", "upload", "wait_call", "wait_ready"]
