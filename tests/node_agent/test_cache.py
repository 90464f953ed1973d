"""The node's cache: what miniworkers left is cleared at start, however a function nested it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node_agent.cache import NodeCache


def test_miniworker_directories_nested_deep_are_cleared_at_start(tmp_path: Path,
        deep_tree: Callable[..., None]) -> None:
    """The agent clears them before it runs: a RecursionError there ended it (exit 1), its service manager
    restarted it, and it failed again until someone removed the tree by hand."""
    cache = NodeCache(tmp_path / "cache")
    deep_tree(cache.mw_dir("mw-old") / "code", 1500)
    (cache.root / "mw" / "stray-file").write_text("x")
    cache.clear_mw_dirs()
    assert list((cache.root / "mw").iterdir()) == []
