"""Who uses the private Docker engine, so that the last one out stops it, not the first.

The demo, the test command, the benchmarks and ``shoal up`` each start the private ``dockerd`` if none answers,
or use the one that does. Stopping it when the one that started it ends broke whatever else was using it (a
test run in one terminal, the demo in another). Each user instead holds a lease, a file in ``<root>/users``:

* a process's lease (``pid-<pid>-<start time>-<n>``) lives while that process does: one killed without
  releasing it does not keep the engine up. ``devenv up --holder PID`` (the test command's shell) and
  ``shoal up`` (its controller) hand theirs to the process that outlives them;
* a named lease (``devenv up`` without a holder) lives until released, or until the machine restarts: it holds
  the boot id it was taken in. A file in the directory that is neither is not a lease (ignored).

Leases are taken and released under a lock (``flock`` on ``<root>/users.lock``), which is also held while an
engine is started, so two users never start two daemons on one socket.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.devenv import procs

_PROCESS = re.compile(r"pid-(\d+)-(\d+)-\d+")
_NAMED = re.compile(r"devenv-up-[0-9a-f]+")


def process_lease(pid: int | None = None) -> str:
    """A new lease name for a process, this one by default: one per handle (a process may hold it twice, and two
    `devenv up --holder` of one shell each take one), so its last part is random."""
    who = procs.identity(os.getpid() if pid is None else pid)
    return f"pid-{who['pid']}-{who['start']}-{secrets.randbits(48)}"


def is_lease(name: str) -> bool:
    return bool(_PROCESS.fullmatch(name) or _NAMED.fullmatch(name))


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


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
        if not is_lease(lease):
            raise ValueError(f"not a lease name: {lease!r}")
        (self.dir / lease).write_text(boot_id())

    def remove(self, lease: str) -> None:
        if not is_lease(lease):
            return  # (a name given on a command line: never a path out of the directory)
        try:
            (self.dir / lease).unlink(missing_ok=True)
        except OSError:
            pass  # not a lease file (a directory of that name): it holds nothing either way

    def live(self) -> list[str]:
        """The leases still held. A dead process's lease, or a named one from before a restart, is removed on
        the way; anything else in the directory is ignored."""
        held = []
        try:
            paths = sorted(self.dir.iterdir())
        except FileNotFoundError:
            return []
        this_boot = boot_id()
        for path in paths:
            match = _PROCESS.fullmatch(path.name)
            try:
                if not path.is_file():
                    continue
                if match:
                    if procs.alive({"pid": int(match[1]), "start": int(match[2])}):
                        held.append(path.name)
                        continue
                elif path.read_text().strip() == this_boot:
                    held.append(path.name)
                    continue
                elif not _NAMED.fullmatch(path.name):
                    continue  # not ours
                path.unlink(missing_ok=True)
            except OSError:
                continue  # removed meanwhile, unreadable: not a lease held
        return held
