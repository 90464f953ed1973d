"""Processes started in one command and stopped in another (``shoal up`` / ``down``, ``devenv up`` / ``down``).

A recorded pid outlives its process (a crash, a reboot), and its number may then belong to anything: each pid
is recorded with its start time, and only a process that still has both is signalled.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None if gone (or a
    zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after its end.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None  # exited, not yet reaped by its parent: gone all the same
    return int(fields[19])


def identity(pid: int) -> dict[str, int]:
    """What to record about a process we started, to recognise it later."""
    return {"pid": pid, "start": start_time(pid) or 0}


def alive(record: dict[str, int]) -> bool:
    """Whether the recorded process is still running (the same process, not a later one with its number)."""
    return start_time(int(record["pid"])) == int(record["start"])


def stop(record: dict[str, int], timeout: float = 60) -> None:
    """SIGTERM the recorded process if it is still the one we started; SIGKILL it after ``timeout`` s."""
    pid = int(record["pid"])
    if not alive(record):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(record):
            return
        time.sleep(0.1)
    if alive(record):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it exited meanwhile


def exit_on_termination() -> None:
    """Make SIGTERM and SIGHUP (a CI timeout, a closed terminal) end this process as Ctrl-C would: by an
    exception, so that every ``finally`` that stops what it started (dockerd, Redis, agents, containers) runs."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)


def ignore_termination() -> None:
    """From here on, Ctrl-C, SIGTERM and SIGHUP wait: a cleanup under way (stopping what was started) finishes
    instead of being cut short by a second one."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
