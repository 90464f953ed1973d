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
import stat
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
    are longer than the system can name (it was made to be).

    The tree's owner may change it while it is walked (a function's code runs meanwhile): each directory is opened
    without following a link, and only if it is still the one listed (device and inode), so a directory swapped
    for a link (to itself: a loop; to ``/``: the host's tree) is counted as the entry it was, never entered."""
    total = 0
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return 0  # (not made yet, or removed)
    stack = [(os.fspath(root), top.st_dev, top.st_ino)]
    while stack:
        path, dev, ino = stack.pop()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise TooDeep(errno.ENAMETOOLONG, f"paths under {root} are too long to walk ({len(path)} bytes)",
                              str(root)) from None
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            continue  # gone, or replaced meanwhile (by a file, a link): counted as the entry it was
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (dev, ino):
                continue  # a path leading elsewhere now (a directory above it was swapped for a link)
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while the tree was walked
                    total += max(ENTRY_BYTES, st.st_blocks * 512)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((os.path.join(path, entry.name), st.st_dev, st.st_ino))
                    if stop_above is not None and total > stop_above:
                        return total
        finally:
            os.close(fd)
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
