"""Trees a function or an archive made as deep as it liked: measured and removed without recursion."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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



def test_a_directory_swapped_for_a_link_while_it_is_walked_is_not_entered(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A function swapping a directory of its own for a link while the miniworker measured it: `a -> a` raised
    ELOOP out of the disk check (the miniworker exited), and a link above a directory listed already led the walk
    elsewhere (`/`: the host's tree, walked as root)."""
    root = tmp_path / "work"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    (root / "elsewhere" / "b").mkdir(parents=True)
    for n in range(10):
        (root / "elsewhere" / "b" / f"g{n}").write_bytes(b"y")
    baseline = tree_bytes(root)  # 15 entries
    assert baseline == 15 * ENTRY_BYTES
    real_open, real_scandir = os.open, os.scandir
    swap: dict[str, Callable[[], None]] = {}

    def opening(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and path in swap:
            swap.pop(path)()
        return real_open(path, *args, **kwargs)

    def scanning(path: Any = ".") -> Any:  # (what a walk by path would be caught by)
        if isinstance(path, str) and path in swap:
            swap.pop(path)()
        return real_scandir(path)

    def to_link(target: str | Path) -> Callable[[], None]:
        def swap_now() -> None:
            (root / "a").rename(root / "a-was")
            (root / "a").symlink_to(target)
        return swap_now

    def restore() -> None:
        (root / "a").unlink()
        (root / "a-was").rename(root / "a")

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "scandir", scanning)
    swap[str(root / "a")] = to_link("a")  # listed as a directory, a loop of links when it is opened
    assert tree_bytes(root) == baseline - 2 * ENTRY_BYTES  # a counted as listed; a/b and a/b/f never reached
    restore()
    swap[str(root / "a" / "b")] = to_link(root / "elsewhere")  # a/b listed; then a leads to elsewhere
    assert tree_bytes(root) == baseline - ENTRY_BYTES  # elsewhere/b's 10 files counted once, not again as a/b's
    restore()


def test_a_tree_not_there_measures_nothing(tmp_path: Path) -> None:
    assert tree_bytes(tmp_path / "not-made-yet") == 0
