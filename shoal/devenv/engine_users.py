"""Who uses the private Docker engine, so that the last one out stops it, not the first.

The demo, the test command, the benchmarks and ``shoal up`` each start the private ``dockerd`` if none answers,
or use the one that does. Stopping it when the one that started it ends broke whatever else was using it (a
test run in one terminal, the demo in another). Each user instead holds a lease, a file in ``<root>/users``:

* a process's lease (``pid-<pid>-<start time>``) lives while that process does: one killed without releasing
  it does not keep the engine up;
* a named lease (``devenv-up``, ``shoal-up``) lives until released: ``up`` exits at once, ``down`` releases it.

Leases are taken and released under a lock (``flock`` on ``<root>/users.lock``), which is also held while an
engine is started, so two users never start two daemons on one socket.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.devenv import procs

_PROCESS = re.compile(r"pid-(\d+)-(\d+)-\d+")
_handles = itertools.count()


def process_lease() -> str:
    """A new lease name for this process (one per handle: a process may hold the engine twice)."""
    who = procs.identity(os.getpid())
    return f"pid-{who['pid']}-{who['start']}-{next(_handles)}"


class EngineUsers:
    def __init__(self, root: Path) -> None:
        self.dir = root / "users"
        self.lock_path = root / "users.lock"

    @contextmanager
    def locked(self) -> Iterator[EngineUsers]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, lease: str) -> None:
        (self.dir / lease).touch()

    def remove(self, lease: str) -> None:
        (self.dir / lease).unlink(missing_ok=True)

    def live(self) -> list[str]:
        """The leases still held (a dead process's lease is removed on the way)."""
        held = []
        for path in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            match = _PROCESS.fullmatch(path.name)
            if match and not procs.alive({"pid": int(match[1]), "start": int(match[2])}):
                path.unlink(missing_ok=True)
                continue
            held.append(path.name)
        return held
