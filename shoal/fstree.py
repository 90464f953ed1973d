"""Directory trees that functions (or uploaded archives) made: measured and removed without recursion.

A function's code writes its directories, and can make them as deep as it likes (``mkdir a; cd a`` a thousand
times). Python 3.11's ``os.walk`` and ``shutil.rmtree`` recurse once per level: such a tree raised
RecursionError out of a miniworker's disk check, out of a container's removal (``ignore_errors`` covers OSError
only), and out of the agent's start, which clears what miniworkers left (the agent then exited, was restarted,
and failed again). Here the walk keeps its own stack, and a removal that Python cannot finish is handed to
``rm -rf``, which removes trees of any depth.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

#: What an entry (a file, a directory, a link) counts for at least: an inode and a block are disk too (a million
#: empty directories or files hold gigabytes of a filesystem's blocks, or all of its inodes).
ENTRY_BYTES = 4096

#: Seconds ``rm -rf`` may take on a tree Python could not remove.
RM_TIMEOUT = 300


class TreeError(OSError):
    """A tree could not be removed."""


class TooDeep(OSError):
    """A tree holds paths longer than the system can name: it cannot be measured whole."""


def tree_bytes(root: Path, stop_above: int | None = None) -> int:
    """Disk space the entries under ``root`` take: allocated blocks (a sparse file counts for what it holds), at
    least ENTRY_BYTES each. The walk stops once the total is over ``stop_above``: a tree of millions of entries
    is known to be over the limit long before it is walked whole. Raises :class:`TooDeep` for a tree whose paths
    are longer than the system can name (it was made to be)."""
    total = 0
    stack = [os.fspath(root)]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        total += max(ENTRY_BYTES, entry.stat(follow_symlinks=False).st_blocks * 512)
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except FileNotFoundError:
                        continue  # removed while the tree was walked
                    if stop_above is not None and total > stop_above:
                        return total
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            continue  # replaced by a file meanwhile: counted as the entry it was
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise TooDeep(errno.ENAMETOOLONG, f"paths under {root} are too long to walk ({len(path)} bytes)",
                              str(root)) from None
            raise
    return total


def remove_tree(path: Path) -> None:
    """Remove a directory tree, however deep; one already gone is no error. Raises :class:`TreeError` if it
    is still there afterwards."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        pass  # deeper than Python's stack: rm below
    if not os.path.lexists(path):
        return
    try:
        done = subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], capture_output=True,
                              timeout=RM_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TreeError(errno.EIO, f"cannot remove {path}: {exc}") from None
    if os.path.lexists(path):
        raise TreeError(errno.EIO, f"cannot remove {path}: {done.stderr.decode(errors='replace').strip()[:200]}")
