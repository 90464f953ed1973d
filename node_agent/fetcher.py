"""Pulling archives from the controller over the ZMQ link: chunked, credit-based, resumable, verified.

The agent sends ``FETCH {sha256, offset, credit}``: "I hold the first ``offset`` bytes; you may have up to
``credit`` chunks in flight past them". The controller answers with ``CHUNK`` messages (the bytes as their
own frame) and the agent acknowledges each with a new ``FETCH``, so neither side ever holds more than
``credit`` chunks and memory stays flat whatever the archive's size. Bytes go straight to a ``.part`` file
whose size is the resume point; the sha256 is computed as they arrive and checked before the archive is
usable.

The disk is not the agent loop's: chunks are checked and taken off the link at once (``receive``) and handed to
a ``Disk``, which writes and hashes them in order on a thread of its own (the hash on a second thread, at the
same time as the write) and reports each one back to the loop, which only then acknowledges it. A write that
blocks (the kernel holding back a writer with too much unwritten data) or a partial file hashed again on resume
no longer holds up the calls the loop serves, and the hash no longer waits for the write. Every file operation
of the fetcher (open, write, close, commit, removal) is a job of that one thread, in order: a transfer started
again for an archive finds its partial file as the previous one left it.

A transfer that skips ahead (a chunk lost with a reset connection) or stalls is asked again from where it
stands; stalls are not counted while the link to the controller is down (a restarting controller is not a
failing transfer).

A transfer that fails keeps its ``.part`` file (its bytes were checked against nothing yet but are what the
controller sent, and the next request resumes from them) unless the bytes themselves are wrong: longer than
announced, or a failed verification. The disk failing (full, read-only) fails the transfer with its reason;
it never ends the agent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from node_agent.cache import NodeCache
from node_agent.errors import FetchError
from shoal.logs import get_logger
from shoal.protocol import Buffer, Msg

log = get_logger("fetcher")

CREDIT = 8  # chunks (MiB) in flight per transfer: the sender holds at most this much per node
STALL_SECONDS = 10.0
MAX_STALLS = 5
DISK_STALL_SECONDS = 120.0  # chunks waiting for the disk this long with none written: the transfer fails

Send = Callable[[bytes, dict[str, Any]], None]
Job = Callable[[], Any]
Done = Callable[[Any, BaseException | None], None]


class Disk(Protocol):
    """Runs the fetcher's file work in order, and reports each job's outcome (its value, or the exception it
    raised) with ``done`` on the agent's loop."""

    def submit(self, job: Job, done: Done) -> None: ...

    def close(self) -> None: ...


class InlineDisk:
    """Each job at once, on the caller's thread (tests: the order of events is the test's)."""

    def submit(self, job: Job, done: Done) -> None:
        try:
            value = job()
        except Exception as exc:  # noqa: BLE001 - handed to `done`, as the threaded disk does
            done(None, exc)
            return
        done(value, None)

    def close(self) -> None:
        pass


class ThreadDisk:
    """Jobs on a thread of their own, in order; ``post`` runs each ``done`` on the agent's loop."""

    def __init__(self, post: Callable[[Callable[[], None]], None]) -> None:
        self.post = post
        self.jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="archive-disk", daemon=True)
        self.thread.start()

    def submit(self, job: Job, done: Done) -> None:
        self.jobs.put((job, done))

    def _run(self) -> None:
        while (item := self.jobs.get()) is not None:
            job, done = item
            try:
                value, error = job(), None
            except Exception as exc:  # noqa: BLE001 - handed to `done` on the loop, which fails the transfer
                value, error = None, exc
            self.post(lambda done=done, value=value, error=error: done(value, error))  # type: ignore[misc]

    def close(self) -> None:
        """Stop after the jobs already submitted (at most a few seconds: the agent is stopping)."""
        self.jobs.put(None)
        self.thread.join(5)


@dataclass
class Transfer:
    sha: str
    size: int
    received: int = -1  # bytes taken off the link, in order (handed to the disk); -1 until the file is open
    offset: int = 0  # bytes written and hashed (acknowledged)
    digest: Any = None  # hashlib sha256 object (the disk thread's)
    file: BinaryIO | None = None  # the .part file, open for the transfer's lifetime (the disk thread's)
    last_progress: float = field(default_factory=time.monotonic)
    stalls: int = 0
    started: float = field(default_factory=time.monotonic)
    first_offset: int = 0
    resynced_at: int = -1  # the offset a gap last made this transfer ask again from
    ended: bool = False  # failed or cancelled: what the disk still has of it is skipped
    broken: bool = False  # (disk thread) a write failed: the chunks queued behind it must not be written
    last_written: float = field(default_factory=time.monotonic)


class ArchiveFetcher:
    def __init__(self, cache: NodeCache, send: Send, on_done: Callable[[str, str | None], None],
                 disk: Disk | None = None) -> None:
        self.cache = cache
        self.send = send
        self.on_done = on_done  # (sha, error or None)
        self.disk: Disk = disk if disk is not None else InlineDisk()
        self.transfers: dict[str, Transfer] = {}
        self.completed: deque[dict[str, Any]] = deque(maxlen=20)  # recent transfers, for /status
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="archive-hash")

    def close(self) -> None:
        self.disk.close()
        self.hasher.shutdown(wait=False, cancel_futures=True)

    # ---- starting ------------------------------------------------------------------------------
    def want(self, sha: str, size: int) -> None:
        """Make sure the archive ``sha`` is (or becomes) in the cache; ``on_done`` tells when."""
        if self.cache.has_blob(sha):
            self.on_done(sha, None)
            return
        if sha in self.transfers:
            return
        t = self.transfers[sha] = Transfer(sha, size)
        self.disk.submit(lambda: self._open(t), lambda whole, error: self._opened(t, whole, error))

    def _open(self, t: Transfer) -> bool:
        """(disk thread) Open the partial file and hash what it holds; True if it holds the whole archive (the
        agent stopped between the last write and the commit: the controller has nothing left to send, so the
        transfer would only stall), which is then committed."""
        offset, digest = self.cache.open_partial(t.sha)
        if offset == t.size and digest.hexdigest() == t.sha:
            self.cache.commit(t.sha, digest)
            return True
        if offset >= t.size and t.size:
            self.cache.partial(t.sha).unlink(missing_ok=True)
            offset, digest = self.cache.open_partial(t.sha)
        t.file = self.cache.open_for_append(t.sha, offset)
        t.digest, t.offset, t.first_offset = digest, offset, offset
        return False

    def _opened(self, t: Transfer, whole: bool, error: BaseException | None) -> None:
        if t.ended:
            self._close_file(t, bad_bytes=False)
            return
        if error is not None:
            self.transfers.pop(t.sha, None)
            self.on_done(t.sha, f"cannot store archive {t.sha[:12]}: {error}")
            return
        if whole:
            self.transfers.pop(t.sha, None)
            self.on_done(t.sha, None)
            return
        t.received = t.offset
        t.last_progress = t.last_written = time.monotonic()
        self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.offset, "credit": CREDIT, "restart": True})

    # ---- chunks --------------------------------------------------------------------------------
    def receive(self, header: dict[str, Any], payload: list[Buffer]) -> None:
        """A chunk off the link: handed to the disk if it is the next one; acknowledged once it is written."""
        sha = header["sha256"]
        t = self.transfers.get(sha)
        if t is None or t.received < 0 or header["offset"] < t.received:
            return  # a duplicate, a chunk of a request that was asked again, or of a transfer not open yet
        if header["offset"] > t.received:
            # A gap: a chunk was lost on the way (a connection reset drops what was in flight, and ZMQ
            # reconnects underneath). Ask again from here at once, rather than when the transfer stalls; once
            # per gap, as the rest of the lost stream (up to ``credit`` chunks) comes in behind it.
            if t.resynced_at != t.received:
                t.resynced_at = t.received
                self.send(Msg.FETCH, {"sha256": sha, "offset": t.received, "credit": CREDIT, "restart": True})
            return
        data = payload[0] if payload else b""
        if t.received + len(data) > t.size:
            self._fail(t, f"archive {sha[:12]} is longer than announced ({t.size} bytes)", bad_bytes=True)
            return
        t.received += len(data)
        t.last_progress = time.monotonic()
        last = bool(header["last"]) or t.received == t.size
        self.disk.submit(lambda: self._write(t, data, last), lambda written, error: self._written(t, written, error))

    on_chunk = receive  # (the name the agent's handlers and the tests use)

    def _write(self, t: Transfer, data: Buffer, last: bool) -> int | None:
        """(disk thread) Write and hash a chunk, the hash on the hasher thread meanwhile (both let go of the
        GIL); the last one closes the file and commits the archive (verified). None if the transfer ended."""
        if t.ended or t.file is None:
            return None
        if t.broken:  # a chunk before this one was not written (the loop has not heard yet): nor is this one
            raise OSError(f"an earlier write of archive {t.sha[:12]} failed")
        hashed = self.hasher.submit(t.digest.update, data)
        try:
            t.file.write(data)
            if last:
                t.file.close()
        except BaseException:
            # Written in part, or not at all. The chunks after it must not be: the disk may have room again
            # by then, and the last one would commit a file with a hole in it (the hash is of the chunks
            # received, not of the file).
            t.broken = True
            raise
        finally:
            hashed.result()
        if last:
            self.cache.commit(t.sha, t.digest)
        return len(data)

    def _written(self, t: Transfer, written: int | None, error: BaseException | None) -> None:
        if t.ended:
            return
        if error is not None:
            if isinstance(error, FetchError):  # a failed verification (its .part file is removed)
                self._end(t)
                self._close_file(t, bad_bytes=True)
                self.on_done(t.sha, str(error))
            elif isinstance(error, OSError):
                self._fail(t, f"cannot store archive {t.sha[:12]}: {error}", bad_bytes=True)  # maybe cut short
            else:
                log.error("archive_write_failed", sha256=t.sha[:12], error=repr(error), exc_info=error)
                self._fail(t, f"cannot store archive {t.sha[:12]}: {error!r}", bad_bytes=True)
            return
        assert written is not None  # (None: the transfer had ended, and the disk skipped the chunk)
        t.offset += written
        t.last_progress = t.last_written = time.monotonic()
        t.stalls = 0
        if t.offset < t.size:
            self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.offset, "credit": CREDIT})
            return
        self._end(t)
        seconds = time.monotonic() - t.started
        moved = t.offset - t.first_offset
        self.completed.append({"sha256": t.sha, "bytes": moved, "seconds": round(seconds, 4),
                               "mb_per_s": round(moved / 2**20 / max(seconds, 1e-9), 1)})
        self.on_done(t.sha, None)

    # ---- ending --------------------------------------------------------------------------------
    def _end(self, t: Transfer) -> None:
        t.ended = True
        if self.transfers.get(t.sha) is t:
            del self.transfers[t.sha]

    def _close_file(self, t: Transfer, bad_bytes: bool) -> None:
        """Close the transfer's file on the disk thread, after what it still has to write (skipped); remove the
        partial file too if its bytes are wrong."""

        def close() -> None:
            if t.file is not None and not t.file.closed:
                try:
                    t.file.close()
                except OSError as exc:
                    self.log_close_failure(t.sha, exc)
                    self.cache.partial(t.sha).unlink(missing_ok=True)  # what was buffered did not reach it
            if bad_bytes:
                self.cache.partial(t.sha).unlink(missing_ok=True)

        def closed(_value: Any, error: BaseException | None) -> None:
            if error is not None:
                self.log_close_failure(t.sha, error)

        self.disk.submit(close, closed)

    def cancel(self, sha: str) -> None:
        """Stop a transfer nothing wants any more (its ``.part`` is left for the cache to collect)."""
        t = self.transfers.get(sha)
        if t is not None:
            self._end(t)
            self._close_file(t, bad_bytes=False)

    @staticmethod
    def log_close_failure(sha: str, exc: BaseException) -> None:
        log.warning("partial_archive_close_failed", sha256=sha[:12], error=str(exc))

    def on_error(self, header: dict[str, Any]) -> None:
        t = self.transfers.get(header["sha256"])
        if t is not None:
            self._fail(t, f"controller cannot serve archive: {header['error']}")

    def _fail(self, t: Transfer, reason: str, bad_bytes: bool = False) -> None:
        """End a transfer; its ``.part`` file is kept for the next request unless its bytes are wrong."""
        self._end(t)
        self._close_file(t, bad_bytes)
        self.on_done(t.sha, reason)

    # ---- time ----------------------------------------------------------------------------------
    def tick(self, now: float, connected: bool = True) -> None:
        for t in list(self.transfers.values()):
            if t.received < 0:
                continue  # its file is being opened
            if t.received > t.offset:
                # Chunks wait for our own disk (slow, or busy hashing another transfer's partial file): not a
                # stall of the link, and a request sent again would only bring more chunks to wait with them.
                if now - t.last_written > DISK_STALL_SECONDS:
                    self._fail(t, f"the disk wrote nothing of archive {t.sha[:12]} for {DISK_STALL_SECONDS:g} s")
                continue
            if not connected:
                t.last_progress = now  # the controller is away: waiting for it is not a stall
                continue
            if now - t.last_progress < STALL_SECONDS:
                continue
            t.stalls += 1
            if t.stalls > MAX_STALLS:
                self._fail(t, f"archive transfer stalled {MAX_STALLS} times at byte {t.received}")
                continue
            t.last_progress = now
            self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.received, "credit": CREDIT, "restart": True})

    def resume_all(self) -> None:
        """After a reconnect: ask again for every transfer in progress."""
        for t in self.transfers.values():
            if t.received < 0:
                continue  # asked for once its file is open
            t.last_progress = time.monotonic()
            self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.received, "credit": CREDIT, "restart": True})
