"""Session fixtures: the real Docker engine and runtime image (and Redis), started once.

Under the test command (`make test`) ``python -m shoal.devenv up`` has started them and exported
``DOCKER_HOST``; pytest workers only connect. Run bare (``pytest tests/...``), the session starts what is
missing itself and stops it at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from miniworker.container import LABEL_NODE
from shoal.devenv.docker_engine import API_VERSION
from shoal.devenv.stack import Infra, start_infra
from shoal.fstree import remove_tree
from shoal.localnode import LocalNode


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ansible rollout test first: it is by far the longest (a whole cluster rolled out, upgraded twice, torn
    down), and xdist hands out work in collection order. Started last, it ran alone at the end of the suite."""
    def rank(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group")
        return 0 if group is not None and group.args[:1] == ("ansible",) else 1

    items.sort(key=rank)


@pytest.fixture(scope="session")
def docker_url() -> Iterator[str]:
    url = os.environ.get("DOCKER_HOST")
    if url and os.environ.get("SHOAL_IMAGE"):
        yield url
        return
    infra: Infra = start_infra(with_redis=False)
    try:
        yield infra.engine.url
    finally:
        infra.close()


@pytest.fixture(scope="session")
def docker_client(docker_url: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_url, version=API_VERSION, timeout=60)
    yield client
    client.close()


def node_containers(client: docker.DockerClient, node_id: str) -> list[str]:
    """Ids of a node's containers. One listing call: the SDK's ``containers.list`` inspects each container
    after listing, and fails if one is removed in between (as miniworkers do)."""
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": f"{LABEL_NODE}={node_id}"})]


@pytest.fixture
def make_node(docker_url: str, docker_client: docker.DockerClient, request: pytest.FixtureRequest):
    """Factory of started LocalNodes; each is stopped, and checked to leave no container, at teardown."""
    nodes: list[LocalNode] = []
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")

    def factory(policy: str = "function", extra_args: list[str] | None = None, runtime: bool = True,
                **kwargs: object) -> LocalNode:
        node_id = f"t-{worker}-{len(nodes)}-{os.getpid() % 10000}-{request.node.name[:20]}"
        node_id = "".join(c if c.isalnum() or c in "-_." else "-" for c in node_id)
        node = LocalNode(docker_url, node_id=node_id, policy=policy, extra_args=extra_args, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        node.start()
        if runtime:
            node.add_runtime()
        return node

    yield factory
    for node in nodes:
        code = node.stop()
        node.close()
        assert code == 0, f"agent {node.node_id} exited with {code}"
        assert node_containers(docker_client, node.node_id) == [], "the agent left containers behind"


def make_deep_tree(root: Path, depth: int, name: str = "a") -> None:
    """``depth`` nested directories under ``root`` and a file at the bottom, made as a function would (one level
    at a time, relative to the last: no path is ever spelled out whole)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
def deep_tree() -> Iterator[Callable[..., None]]:
    """make_deep_tree, and the trees made removed at teardown whatever the test did: pytest's own removal of
    old temporary directories recurses per level, and a tree a failed test left would break later sessions."""
    made: list[Path] = []

    def make(root: Path, depth: int, name: str = "a") -> None:
        made.append(root)
        make_deep_tree(root, depth, name)

    yield make
    for root in made:
        remove_tree(root)
