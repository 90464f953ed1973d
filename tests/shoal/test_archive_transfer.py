"""The archive transfer's two halves, wired back to back in memory: the controller's ArchiveServer and the
node's ArchiveFetcher. Credit bounds what is in flight, the bytes arrive exactly, a broken transfer resumes
from its partial file, and the sender's chunks are views of its mapped blob (no copies)."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.cache import NodeCache
from node_agent.fetcher import CREDIT, MAX_STALLS, STALL_SECONDS, ArchiveFetcher, InlineDisk, ThreadDisk
from shoal.archive_server import ArchiveServer
from shoal.blobs import BlobStore
from shoal.protocol import Msg

CHUNK = 64 * 1024


class Wire:
    """Carries FETCH from the fetcher to the server and the server's answers back, counting what is in flight."""

    def __init__(self, tmp: Path, data: bytes) -> None:
        self.blobs = BlobStore(tmp / "blobs")
        src = tmp / "archive.bin"
        src.write_bytes(data)
        self.sha, self.size = self.blobs.put_file(src)
        self.server = ArchiveServer(self.blobs, chunk_size=CHUNK)
        self.cache = NodeCache(tmp / "node")
        self.done: list[tuple[str, str | None]] = []
        self.inbox: list[tuple[bytes, dict[str, Any]]] = []
        self.max_in_flight = 0
        self.payloads: list[Any] = []
        self.fetches: list[dict[str, Any]] = []
        self.fetcher = self.new_fetcher()

    def new_fetcher(self, disk: Any = None) -> ArchiveFetcher:
        return ArchiveFetcher(self.cache, lambda mtype, h: self.inbox.append((mtype, h)),
                              lambda sha, err: self.done.append((sha, err)), disk)

    def answer(self, header: dict[str, Any]) -> None:
        """Hand the fetcher every chunk the server sends for the FETCH ``header`` (none lost)."""
        for _, ah, payload in self.server.on_fetch("node-1", header):
            assert payload is not None
            self.fetcher.receive(ah, [payload])

    def answer_first_request(self) -> None:
        _, header = self.inbox.pop()
        self.answer(header)

    def run(self, fetcher: ArchiveFetcher, max_chunks: int | None = None, lose: set[int] | None = None) -> None:
        """Deliver until nothing is asked; ``lose``: offsets whose chunk is lost on the way, once each."""
        delivered = 0
        lose = set(lose or ())
        while self.inbox:
            mtype, header = self.inbox.pop(0)
            assert mtype == Msg.FETCH
            self.fetches.append(header)
            answers = self.server.on_fetch("node-1", header)
            for t in self.server.transfers.values():
                self.max_in_flight = max(self.max_in_flight, t.sent - t.acked)
            for amtype, ah, payload in answers:
                if amtype == Msg.FETCH_ERROR:
                    fetcher.on_error(ah)
                    continue
                assert payload is not None
                self.payloads.append(payload)
                if max_chunks is not None and delivered >= max_chunks:
                    return  # the link breaks: the rest is lost
                if ah["offset"] in lose:
                    lose.discard(ah["offset"])
                    continue
                fetcher.on_chunk(ah, [payload])
                delivered += 1


def test_an_archive_arrives_exactly_with_credit_bounding_what_is_in_flight(tmp_path: Path) -> None:
    data = os.urandom(40 * CHUNK + 123)
    wire = Wire(tmp_path, data)
    wire.fetcher.want(wire.sha, wire.size)
    wire.run(wire.fetcher)
    assert wire.done == [(wire.sha, None)]
    assert wire.cache.blob_path(wire.sha).read_bytes() == data
    assert wire.max_in_flight <= CREDIT * CHUNK
    assert all(isinstance(p, memoryview) for p in wire.payloads)  # views of the mapped blob, not copies
    # Every chunk was sent once: the acknowledgements that arrived after the last chunk sent nothing again.
    assert wire.server.bytes_sent == len(data) and wire.server.transfers == {}


class ManualDisk:
    """A disk whose jobs run when the test says (``run``): what the agent's loop sees while its disk thread is busy."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Any]] = []

    def submit(self, job: Any, done: Any) -> None:
        self.jobs.append((job, done))

    def run(self, count: int | None = None, ahead: bool = False) -> None:
        """Run jobs, each one's ``done`` after it; ``ahead``: every job first, then the ``done``s (the disk's
        thread ahead of the agent's loop)."""
        outcomes = []
        for _ in range(len(self.jobs) if count is None else count):
            job, done = self.jobs.pop(0)
            outcome: tuple[Any, Exception | None]
            try:
                outcome = (job(), None)
            except Exception as exc:  # noqa: BLE001 - handed to `done`, as the agent's disk does
                outcome = (None, exc)
            if ahead:
                outcomes.append((done, outcome))
            else:
                done(*outcome)
        for done, outcome in outcomes:
            done(*outcome)

    def close(self) -> None:
        pass


def test_chunks_are_acknowledged_only_once_the_disk_wrote_them(tmp_path: Path) -> None:
    """The agent takes chunks off the link at once and hands them to its disk thread; the acknowledgement waits
    for the write and the hash, so the credit still bounds what is held."""
    data = os.urandom(20 * CHUNK + 5)
    wire = Wire(tmp_path, data)
    disk = ManualDisk()
    wire.fetcher = wire.new_fetcher(disk)
    wire.fetcher.want(wire.sha, wire.size)
    assert wire.inbox == [] and len(disk.jobs) == 1  # the partial file is opened by the disk first
    disk.run()
    most_held = 0
    while wire.inbox:
        for mtype, header in wire.inbox:
            assert mtype == Msg.FETCH
            wire.answer(header)
        wire.inbox.clear()
        most_held = max(most_held, len(disk.jobs))
        if not disk.jobs:
            continue  # acknowledgements that came after the last chunk was sent
        written = wire.cache.partial(wire.sha).stat().st_size
        assert wire.inbox == [] and wire.fetcher.transfers[wire.sha].offset == written  # nothing acknowledged yet
        disk.run(1)
        assert [h["offset"] for _, h in wire.inbox] == [written + CHUNK] or wire.done
        disk.run()
    assert wire.done == [(wire.sha, None)] and not disk.jobs
    assert wire.cache.blob_path(wire.sha).read_bytes() == data
    assert most_held == CREDIT


def test_a_transfer_ended_with_writes_waiting_leaves_its_file_as_the_next_one_finds_it(tmp_path: Path) -> None:
    """The disk works in order: a transfer cancelled (or failed) while chunks wait to be written skips them and
    closes its file before a new transfer of the archive opens it and hashes what it holds."""
    data = os.urandom(20 * CHUNK)
    wire = Wire(tmp_path, data)
    disk = ManualDisk()
    wire.fetcher = wire.new_fetcher(disk)
    wire.fetcher.want(wire.sha, wire.size)
    disk.run()
    wire.answer_first_request()
    disk.run(3)  # three written, five waiting
    wire.fetcher.cancel(wire.sha)
    wire.fetcher.want(wire.sha, wire.size)  # wanted again at once
    wire.inbox.clear()
    disk.run()
    assert wire.cache.partial(wire.sha).stat().st_size == 3 * CHUNK
    assert [h["offset"] for _, h in wire.inbox] == [3 * CHUNK]  # resumed from what was written
    wire.fetcher.disk = InlineDisk()
    wire.run(wire.fetcher)
    assert wire.done == [(wire.sha, None)] and wire.cache.blob_path(wire.sha).read_bytes() == data


def test_a_threaded_disk_writes_in_order_and_reports_on_the_loop(tmp_path: Path) -> None:
    """The agent's disk: a thread of its own, its outcomes run by the agent's loop (here, the test's)."""
    data = os.urandom(50 * CHUNK + 17)
    wire = Wire(tmp_path, data)
    posted: queue.SimpleQueue[Any] = queue.SimpleQueue()
    disk = ThreadDisk(posted.put)
    wire.fetcher = wire.new_fetcher(disk)
    loop_thread = threading.current_thread()
    seen: list[Any] = []
    try:
        wire.fetcher.want(wire.sha, wire.size)
        deadline = time.monotonic() + 60
        while not wire.done:
            assert time.monotonic() < deadline
            try:
                posted.get(timeout=1)()  # the agent's loop running what the disk reports
                seen.append(threading.current_thread())
            except queue.Empty:
                continue
            while wire.inbox:
                _, header = wire.inbox.pop(0)
                wire.answer(header)
    finally:
        wire.fetcher.close()
    assert wire.done == [(wire.sha, None)] and wire.cache.blob_path(wire.sha).read_bytes() == data
    assert set(seen) == {loop_thread} and not disk.thread.is_alive()


def test_a_broken_transfer_resumes_from_its_partial_file(tmp_path: Path) -> None:
    data = os.urandom(30 * CHUNK)
    wire = Wire(tmp_path, data)
    wire.fetcher.want(wire.sha, wire.size)
    wire.run(wire.fetcher, max_chunks=11)  # the agent dies after 11 chunks
    assert wire.done == [] and wire.cache.partial(wire.sha).stat().st_size == 11 * CHUNK
    wire.inbox.clear()
    before = wire.server.bytes_sent
    fresh = wire.new_fetcher()  # a restarted agent: it finds the partial file
    fresh.want(wire.sha, wire.size)
    assert wire.inbox[0][1]["offset"] == 11 * CHUNK and wire.inbox[0][1]["restart"] is True
    wire.run(fresh)
    assert wire.done == [(wire.sha, None)]
    assert wire.cache.blob_path(wire.sha).read_bytes() == data
    assert wire.server.bytes_sent - before == 19 * CHUNK  # only the rest was sent again


def test_a_chunk_lost_on_the_way_is_asked_again_at_once_not_after_a_stall(tmp_path: Path) -> None:
    data = os.urandom(30 * CHUNK + 7)
    wire = Wire(tmp_path, data)
    wire.fetcher.want(wire.sha, wire.size)
    wire.run(wire.fetcher, lose={5 * CHUNK, 17 * CHUNK})  # no tick: a stall would never be noticed here
    assert wire.done == [(wire.sha, None)]
    assert wire.cache.blob_path(wire.sha).read_bytes() == data
    restarts = [h["offset"] for h in wire.fetches if h.get("restart")]
    assert restarts == [0, 5 * CHUNK, 17 * CHUNK]  # the first request, then once per gap
    assert wire.server.bytes_sent <= len(data) + 2 * CREDIT * CHUNK  # what was in flight behind each gap


def test_acknowledged_bytes_are_dropped_from_the_senders_mapping(tmp_path: Path) -> None:
    wire = Wire(tmp_path, os.urandom(20 * CHUNK))
    first = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 0, "credit": 4, "restart": True})
    assert len(first) == 4
    transfer = wire.server.transfers[("n", wire.sha)]
    wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 3 * CHUNK, "credit": 4})
    assert transfer.released == 3 * CHUNK and transfer.sent - transfer.acked == 4 * CHUNK
    wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 5 * CHUNK + 10, "credit": 4})  # never page-aligned
    assert transfer.released == (5 * CHUNK + 10) // mmap.PAGESIZE * mmap.PAGESIZE


def test_a_node_cannot_take_more_than_its_credit_nor_a_mapping_per_restart(tmp_path: Path) -> None:
    """A node holding the node token: an acknowledgement past what was sent let the whole archive go at once; each
    restart mapped the blob anew (a descriptor each, kept while ZMQ held its chunks)."""
    wire = Wire(tmp_path, os.urandom(20 * CHUNK))
    first = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 0, "credit": 2, "restart": True})
    transfer = wire.server.transfers[("n", wire.sha)]
    more = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 20 * CHUNK, "credit": 2})  # "all arrived"
    assert len(first) == len(more) == 2 and transfer.sent == 4 * CHUNK  # taken as what was sent: 2 more
    mapping = transfer.map
    for _ in range(5):
        again = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": CHUNK, "credit": 1, "restart": True})
        assert [h["offset"] for _, h, _ in again] == [CHUNK]
        assert wire.server.transfers[("n", wire.sha)] is transfer and transfer.map is mapping
    [(mtype, answer, _)] = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 21 * CHUNK, "credit": 1,
                                                      "restart": True})
    assert mtype == Msg.FETCH_ERROR and "out of range" in answer["error"]


@pytest.mark.parametrize("header, needle", [
    ({"sha256": "0" * 64, "offset": 0, "credit": 4, "restart": True}, "no archive"),
    ({"sha256": "nothex", "offset": 0, "credit": 4, "restart": True}, ""),
])
def test_unknown_or_malformed_archives_get_a_fetch_error(tmp_path: Path, header: dict[str, Any], needle: str) -> None:
    server = ArchiveServer(BlobStore(tmp_path / "blobs"))
    [(mtype, answer, payload)] = server.on_fetch("n", header)
    assert mtype == Msg.FETCH_ERROR and payload is None and needle in answer["error"]


def test_an_offset_past_the_end_is_refused_and_an_empty_archive_is_one_last_chunk(tmp_path: Path) -> None:
    wire = Wire(tmp_path, b"abc")
    [(mtype, answer, _)] = wire.server.on_fetch("n", {"sha256": wire.sha, "offset": 4, "credit": 1, "restart": True})
    assert mtype == Msg.FETCH_ERROR and "out of range" in answer["error"]
    empty = Wire(tmp_path / "empty", b"")
    first = {"sha256": empty.sha, "offset": 0, "credit": 1, "restart": True}
    [(mtype, answer, payload)] = empty.server.on_fetch("n", first)
    assert mtype == Msg.CHUNK and answer["last"] is True and payload == b""
    empty.fetcher.want(empty.sha, 0)
    empty.run(empty.fetcher)
    assert empty.done == [(hashlib.sha256(b"").hexdigest(), None)]


class RefusingDisk(NodeCache):
    """A cache whose disk refuses a download's writes when ``refuse(data)`` names an error (it counts ``writes``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes = 0

    def refuse(self, data: Any) -> OSError | None:
        return None

    def open_for_append(self, sha: str, offset: int) -> Any:
        real = super().open_for_append(sha, offset)
        cache = self

        class File:
            closed = False

            def write(self, data: Any) -> int:
                cache.writes += 1
                if (error := cache.refuse(data)) is not None:
                    raise error
                return real.write(data)

            def close(self) -> None:
                self.closed = True
                real.close()

        return File()


class FullDisk(RefusingDisk):
    """A disk that fills up after ``room`` bytes of a download."""

    def __init__(self, root: Path, room: int) -> None:
        super().__init__(root)
        self.room = room

    def refuse(self, data: Any) -> OSError | None:
        if len(data) > self.room:
            return OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return None


def test_a_full_disk_fails_the_transfer_with_its_reason_and_a_complete_part_file_is_committed(tmp_path: Path) -> None:
    """A disk error while writing used to escape the fetcher and end the agent (and again after each restart,
    as the controller sends the function again); an agent stopped between the last write and the commit
    found its whole ``.part`` file and waited for chunks that never came, then failed the function."""
    data = os.urandom(12 * CHUNK)
    wire = Wire(tmp_path, data)
    wire.cache = FullDisk(tmp_path / "node", room=5 * CHUNK)
    wire.fetcher = wire.new_fetcher()
    wire.fetcher.want(wire.sha, wire.size)
    wire.run(wire.fetcher)
    [(sha, error)] = wire.done
    assert sha == wire.sha and error is not None and "No space left" in error
    assert not wire.cache.partial(wire.sha).exists() and not wire.fetcher.transfers

    # The whole archive in the .part file: committed at once, nothing asked of the controller.
    wire.done.clear()
    wire.inbox.clear()
    wire.cache.partial(wire.sha).write_bytes(data)
    wire.fetcher.want(wire.sha, wire.size)
    assert wire.done == [(wire.sha, None)] and wire.inbox == []
    assert wire.cache.blob_path(wire.sha).read_bytes() == data

    # A cache that cannot open its file at all: the function fails with the reason, nothing raises.
    class ReadOnly(NodeCache):
        def open_partial(self, sha: str) -> Any:
            raise OSError(errno.EROFS, "Read-only file system")

    other = Wire(tmp_path / "other", os.urandom(CHUNK))
    other.cache = ReadOnly(tmp_path / "other" / "node")
    other.fetcher = other.new_fetcher()
    other.fetcher.want(other.sha, other.size)
    [(_, error)] = other.done
    assert error is not None and "cannot store" in error and "Read-only" in error and not other.fetcher.transfers


def test_stalls_are_not_counted_while_the_controller_is_away_and_a_stalled_transfer_keeps_its_bytes(
        tmp_path: Path) -> None:
    data = os.urandom(20 * CHUNK)
    wire = Wire(tmp_path, data)
    wire.fetcher.want(wire.sha, wire.size)
    wire.run(wire.fetcher, max_chunks=7)  # the link breaks
    wire.inbox.clear()
    now = time.monotonic()
    for minute in range(1, 30):  # half an hour without a controller
        wire.fetcher.tick(now + 60 * minute, connected=False)
    assert wire.done == [] and wire.inbox == []
    now += 60 * 30
    for n in range(1, MAX_STALLS + 2):  # back, but it never answers
        wire.fetcher.tick(now + STALL_SECONDS * n)
    [(_, error)] = wire.done
    assert error is not None and "stalled" in error
    assert wire.cache.partial(wire.sha).stat().st_size == 7 * CHUNK  # kept: the next request resumes from it
    wire.done.clear()
    wire.inbox.clear()
    wire.fetcher.want(wire.sha, wire.size)
    assert wire.inbox[0][1]["offset"] == 7 * CHUNK
    wire.run(wire.fetcher)
    assert wire.done == [(wire.sha, None)] and wire.cache.blob_path(wire.sha).read_bytes() == data


class FlakyDisk(RefusingDisk):
    """A disk that refuses one write (the ``fail_at``-th), then takes the rest again."""

    def __init__(self, root: Path, fail_at: int) -> None:
        super().__init__(root)
        self.fail_at = fail_at

    def refuse(self, data: Any) -> OSError | None:
        return OSError(errno.EIO, "Input/output error") if self.writes == self.fail_at else None


def test_chunks_queued_behind_a_failed_write_are_not_written_nor_committed(tmp_path: Path) -> None:
    """The write of chunk 3 failed, the disk took the chunks queued behind it, and the last one committed an
    archive with a hole in it (the hash is of the chunks received, not of the file): trusted, and never
    fetched again."""
    data = os.urandom(6 * CHUNK)
    wire = Wire(tmp_path, data)
    wire.cache = FlakyDisk(tmp_path / "node", fail_at=3)
    disk = ManualDisk()
    wire.fetcher = wire.new_fetcher(disk)
    wire.fetcher.want(wire.sha, wire.size)
    disk.run()
    wire.answer_first_request()  # all six chunks (credit 8)
    assert len(disk.jobs) == 6
    disk.run(ahead=True)  # the disk thread runs every queued write before the loop hears of the failure
    disk.run()  # the file's closing and removal, queued behind them
    [(_, error)] = wire.done
    assert "Input/output error" in str(error)
    assert not wire.cache.has_blob(wire.sha) and not wire.cache.partial(wire.sha).exists()
    assert wire.cache.writes == 3  # nothing written after the failure


def test_chunks_waiting_for_a_slow_disk_are_not_a_stall_of_the_link(tmp_path: Path) -> None:
    """A disk that fell behind looked like a stalled controller: each request sent again brought another credit
    of chunks to wait in memory, and the transfer failed as 'stalled'."""
    from node_agent.fetcher import DISK_STALL_SECONDS

    wire = Wire(tmp_path, os.urandom(20 * CHUNK))
    disk = ManualDisk()
    wire.fetcher = wire.new_fetcher(disk)
    wire.fetcher.want(wire.sha, wire.size)
    disk.run()
    wire.answer_first_request()
    now = time.monotonic()
    for n in range(1, MAX_STALLS + 3):  # the disk writes nothing for a while
        wire.fetcher.tick(now + STALL_SECONDS * n)
    assert wire.inbox == [] and wire.done == []  # nothing asked again, nothing failed
    disk.run(1)
    assert [h["offset"] for _, h in wire.inbox] == [CHUNK]  # it goes on
    wire.fetcher.tick(time.monotonic() + DISK_STALL_SECONDS + 1)
    [(_, error)] = wire.done
    assert error is not None and "the disk wrote nothing" in error
