"""A container's host-side directory, removed however its function left it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from miniworker.container import Container
from miniworker.spec import MiniworkerSpec


def test_a_containers_directory_a_function_nested_deep_is_removed(tmp_path: Path,
        deep_tree: Callable[..., None]) -> None:
    """It raised RecursionError out of the miniworker's teardown: the process died with a traceback, the
    directory stayed, and its call ran again."""
    spec = MiniworkerSpec(mw_id="mw-t", node_id="n", broker_url="ipc:///nowhere", docker_url="unix:///nowhere.sock",
                          docker_api_version="1.41", mode="oneshot", image="x", runtime_path="/ws",
                          workdir=str(tmp_path / "mw"), src_dirs={})
    container = Container(spec)
    container.prepare_workdir()
    deep_tree(Path(spec.workdir) / "code", 1500)
    container.remove()  # (no container was created: only the directory)
    assert not Path(spec.workdir).exists()
    container.close()
