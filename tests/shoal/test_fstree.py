"""Trees a function or an archive made as deep as it liked: measured and removed without recursion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.fstree import ENTRY_BYTES, TooDeep, remove_tree, tree_bytes


def test_a_tree_deeper_than_pythons_stack_is_measured_and_removed(tmp_path: Path,
        deep_tree: Callable[..., None]) -> None:
    """Python 3.11's os.walk and shutil.rmtree recurse per level: RecursionError (ignore_errors covers OSError
    only), out of a miniworker's disk check and container removal, and out of the agent's start."""
    root = tmp_path / "mw"
    deep_tree(root, 1500)
    assert tree_bytes(root) >= 1501 * ENTRY_BYTES
    assert tree_bytes(root, stop_above=10 * ENTRY_BYTES) == 11 * ENTRY_BYTES  # it stops once over
    remove_tree(root)
    assert not root.exists()
    remove_tree(root)  # already gone: no error


def test_a_tree_whose_paths_are_too_long_to_name_is_too_deep_to_measure_and_still_removed(tmp_path: Path,
        deep_tree: Callable[..., None]) -> None:
    root = tmp_path / "mw"
    deep_tree(root, 900, name="d" * 8)  # 8,100 bytes of path: past PATH_MAX (4,096)
    with pytest.raises(TooDeep, match="too long to walk"):
        tree_bytes(root)
    remove_tree(root)
    assert not root.exists()


def test_a_symlink_is_counted_not_followed_and_removing_it_leaves_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "big").write_bytes(b"x" * (1 << 20))
    root = tmp_path / "mw"
    root.mkdir()
    (root / "link").symlink_to(target)
    assert tree_bytes(root) == ENTRY_BYTES
    remove_tree(root / "link")
    assert not (root / "link").exists() and (target / "big").exists()
