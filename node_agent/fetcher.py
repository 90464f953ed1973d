"""Pulling archives from the controller over the ZMQ link: chunked, credit-based, resumable, verified.

The agent sends ``FETCH {sha256, offset, credit}``: "I hold the first ``offset`` bytes; you may have up to
``credit`` chunks in flight past them". The controller answers with ``CHUNK`` messages (the bytes as their
own frame) and the agent acknowledges each with a new ``FETCH``, so neither side ever holds more than
``credit`` chunks and memory stays flat whatever the archive's size. Bytes go straight to a ``.part`` file
whose size is the resume point; the sha256 is computed as they arrive and checked before the archive is
usable.

Chunks are taken off the link at once and kept (``receive``) until the agent's loop has time to write and hash
them (``work``, a few milliseconds per turn), and only then acknowledged: a message behind a chunk on the link
(a call) does not wait for the disk and the hash, and what is kept stays within the credit.

A transfer that skips ahead (a chunk lost with a reset connection) or stalls is asked again from where it
stands; stalls are not counted while the link to the controller is down (a restarting controller is not a
failing transfer).

A transfer that fails keeps its ``.part`` file (its bytes were checked against nothing yet but are what the
controller sent, and the next request resumes from them) unless the bytes themselves are wrong: longer than
announced, or a failed verification. The disk failing (full, read-only) fails the transfer with its reason;
it never ends the agent.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from node_agent.cache import NodeCache
from node_agent.errors import FetchError
from shoal.logs import get_logger
from shoal.protocol import Buffer, Msg

log = get_logger("fetcher")

CREDIT = 8  # chunks (MiB) in flight per transfer: the sender holds at most this much per node
STALL_SECONDS = 10.0
MAX_STALLS = 5

Send = Callable[[bytes, dict[str, Any]], None]


@dataclass
class Transfer:
    sha: str
    size: int
    offset: int
    digest: Any  # hashlib sha256 object
    last_progress: float
    stalls: int = 0
    started: float = field(default_factory=time.monotonic)
    first_offset: int = 0
    file: BinaryIO | None = None  # the .part file, open for the transfer's lifetime
    resynced_at: int = -1  # the offset a gap last made this transfer ask again from


class ArchiveFetcher:
    def __init__(self, cache: NodeCache, send: Send, on_done: Callable[[str, str | None], None]) -> None:
        self.cache = cache
        self.send = send
        self.on_done = on_done  # (sha, error or None)
        self.transfers: dict[str, Transfer] = {}
        self.completed: deque[dict[str, Any]] = deque(maxlen=20)  # recent transfers, for /status
        self.backlog: deque[tuple[dict[str, Any], list[Buffer]]] = deque()  # received, not yet taken

    def want(self, sha: str, size: int) -> None:
        """Make sure the archive ``sha`` is (or becomes) in the cache; ``on_done`` tells when."""
        if self.cache.has_blob(sha):
            self.on_done(sha, None)
            return
        if sha in self.transfers:
            return
        try:
            offset, digest = self.cache.open_partial(sha)
            if offset == size and digest.hexdigest() == sha:
                # Whole already (the agent stopped between the last write and the commit): the controller has
                # nothing left to send, so the transfer would only stall.
                self.cache.commit(sha, digest)
                self.on_done(sha, None)
                return
            if offset >= size and size:
                self.cache.partial(sha).unlink(missing_ok=True)
                offset, digest = self.cache.open_partial(sha)
            file = self.cache.open_for_append(sha, offset)
        except OSError as exc:
            self.on_done(sha, f"cannot store archive {sha[:12]}: {exc}")
            return
        self.transfers[sha] = Transfer(sha, size, offset, digest, time.monotonic(), first_offset=offset, file=file)
        self.send(Msg.FETCH, {"sha256": sha, "offset": offset, "credit": CREDIT, "restart": True})

    def receive(self, header: dict[str, Any], payload: list[Buffer]) -> None:
        """A chunk off the link, kept until ``work`` takes it (the controller sends no more than the credit past
        what was acknowledged, so the backlog stays within it)."""
        self.backlog.append((header, payload))

    def work(self, budget: float) -> None:
        """Take received chunks in order (write, hash, acknowledge) until none is left or ``budget`` seconds
        have passed."""
        deadline = time.monotonic() + budget
        while self.backlog:
            self.on_chunk(*self.backlog.popleft())
            if time.monotonic() >= deadline:
                return

    def on_chunk(self, header: dict[str, Any], payload: list[Buffer]) -> None:
        sha = header["sha256"]
        t = self.transfers.get(sha)
        if t is None or header["offset"] < t.offset:
            return  # a duplicate, or a chunk of a request that was asked again
        if header["offset"] > t.offset:
            # A gap: a chunk was lost on the way (a connection reset drops what was in flight, and ZMQ
            # reconnects underneath). Ask again from here at once, rather than when the transfer stalls; once
            # per gap, as the rest of the lost stream (up to ``credit`` chunks) comes in behind it.
            if t.resynced_at != t.offset:
                t.resynced_at = t.offset
                self.send(Msg.FETCH, {"sha256": sha, "offset": t.offset, "credit": CREDIT, "restart": True})
            return
        data = payload[0] if payload else b""
        if t.offset + len(data) > t.size:
            self._fail(t, f"archive {sha[:12]} is longer than announced ({t.size} bytes)", bad_bytes=True)
            return
        assert t.file is not None
        try:
            t.file.write(data)
            if header["last"] or t.offset + len(data) == t.size:
                t.file.close()
        except OSError as exc:
            self._fail(t, f"cannot store archive {sha[:12]}: {exc}", bad_bytes=True)  # the file may be cut short
            return
        t.digest.update(data)
        t.offset += len(data)
        t.last_progress = time.monotonic()
        t.stalls = 0
        if header["last"] or t.offset == t.size:
            del self.transfers[sha]
            seconds = time.monotonic() - t.started
            moved = t.offset - t.first_offset
            self.completed.append({"sha256": sha, "bytes": moved, "seconds": round(seconds, 4),
                                   "mb_per_s": round(moved / 2**20 / max(seconds, 1e-9), 1)})
            try:
                self.cache.commit(sha, t.digest)
            except FetchError as exc:
                self.on_done(sha, str(exc))
                return
            except OSError as exc:
                self.cache.partial(sha).unlink(missing_ok=True)
                self.on_done(sha, f"cannot store archive {sha[:12]}: {exc}")
                return
            self.on_done(sha, None)
        else:
            self.send(Msg.FETCH, {"sha256": sha, "offset": t.offset, "credit": CREDIT})

    def cancel(self, sha: str) -> None:
        """Stop a transfer nothing wants any more (its ``.part`` is left for the cache to collect)."""
        t = self.transfers.pop(sha, None)
        if t is not None and t.file is not None and not t.file.closed:
            try:
                t.file.close()
            except OSError as exc:
                self.log_close_failure(sha, exc)

    @staticmethod
    def log_close_failure(sha: str, exc: OSError) -> None:
        log.warning("partial_archive_close_failed", sha256=sha[:12], error=str(exc))

    def on_error(self, header: dict[str, Any]) -> None:
        t = self.transfers.get(header["sha256"])
        if t is not None:
            self._fail(t, f"controller cannot serve archive: {header['error']}")

    def _fail(self, t: Transfer, reason: str, bad_bytes: bool = False) -> None:
        """End a transfer; its ``.part`` file is kept for the next request unless its bytes are wrong."""
        self.transfers.pop(t.sha, None)
        if t.file is not None and not t.file.closed:
            try:
                t.file.close()
            except OSError:
                bad_bytes = True  # what was buffered did not reach the file
        if bad_bytes:
            self.cache.partial(t.sha).unlink(missing_ok=True)
        self.on_done(t.sha, reason)

    def tick(self, now: float, connected: bool = True) -> None:
        for t in list(self.transfers.values()):
            if not connected:
                t.last_progress = now  # the controller is away: waiting for it is not a stall
                continue
            if now - t.last_progress < STALL_SECONDS:
                continue
            t.stalls += 1
            if t.stalls > MAX_STALLS:
                self._fail(t, f"archive transfer stalled {MAX_STALLS} times at byte {t.offset}")
                continue
            t.last_progress = now
            self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.offset, "credit": CREDIT, "restart": True})

    def resume_all(self) -> None:
        """After a reconnect: ask again for every transfer in progress."""
        for t in self.transfers.values():
            t.last_progress = time.monotonic()
            self.send(Msg.FETCH, {"sha256": t.sha, "offset": t.offset, "credit": CREDIT, "restart": True})


