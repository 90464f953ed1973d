"""Serving archives to nodes: the sender's half of the credit-based chunk protocol (see node_agent/fetcher).

Used by the controller's node hub and by :class:`shoal.nodelink.NodeLink`. ``on_fetch`` turns a node's
``FETCH {sha256, offset, credit}`` into the ``CHUNK`` messages it may send now: at most ``credit`` chunks
past what the node acknowledged.

Chunks are zero-copy: each transfer maps its blob (read-only) and a chunk is a view of the mapping, which
ZMQ sends from directly (``copy=False``) instead of a read into a new buffer and ZMQ's own copy of it. What
the node acknowledged is dropped from this process's mapping (``MADV_DONTNEED``; the page cache keeps it),
so the sender's memory stays at about ``credit`` chunks whatever the archive's size.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

from shoal.blobs import BlobStore
from shoal.errors import NotFound
from shoal.protocol import Buffer, Msg

CHUNK_SIZE = 1 << 20
MAX_CREDIT = 64

Outgoing = tuple[bytes, dict[str, Any], Buffer | None]


@dataclass
class Transfer:
    sha: str
    size: int
    map: mmap.mmap | None  # None for an empty archive
    sent: int = 0
    acked: int = 0
    released: int = 0  # bytes [0, released) were dropped from this process's mapping

    def release_acked(self) -> None:
        end = self.acked - self.acked % mmap.PAGESIZE
        if self.map is not None and end > self.released:
            self.map.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


def _map(path: str, size: int) -> mmap.mmap | None:
    if size == 0:
        return None
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)


class ArchiveServer:
    def __init__(self, blobs: BlobStore, chunk_size: int = CHUNK_SIZE) -> None:
        self.blobs = blobs
        self.chunk_size = chunk_size
        self.transfers: dict[tuple[str, str], Transfer] = {}
        self.bytes_sent = 0

    def on_fetch(self, node_id: str, h: dict[str, Any]) -> list[Outgoing]:
        sha, offset = h["sha256"], h["offset"]
        credit = max(1, min(int(h["credit"]), MAX_CREDIT))
        key = (node_id, sha)
        out: list[Outgoing] = []
        t = self.transfers.get(key)
        if t is None and not h.get("restart"):
            # An acknowledgement that arrives after the last chunk went out (the node acknowledges every
            # chunk, so up to ``credit`` of them do). Starting over here would send the tail again.
            return out
        if t is None or h.get("restart"):
            if t is not None:
                # Started over: the same blob (a sha names its bytes), so the same mapping. A new one per restart
                # kept each old one (and the descriptor it holds) alive while ZMQ held chunks of it: a node that
                # restarted without reading could take every descriptor the controller has.
                if not 0 <= offset <= t.size:
                    return [(Msg.FETCH_ERROR, {"sha256": sha, "error": f"offset {offset} out of range"}, None)]
                t.sent = t.acked = offset
                t.released = min(t.released, offset - offset % mmap.PAGESIZE)
            else:
                try:
                    size = self.blobs.size(sha)
                except NotFound as exc:
                    return [(Msg.FETCH_ERROR, {"sha256": sha[:64], "error": str(exc)}, None)]
                if not 0 <= offset <= size:
                    return [(Msg.FETCH_ERROR, {"sha256": sha, "error": f"offset {offset} out of range"}, None)]
                try:
                    mapping = _map(str(self.blobs.path(sha)), size)
                except (OSError, ValueError) as exc:
                    return [(Msg.FETCH_ERROR, {"sha256": sha, "error": f"cannot read archive: {exc}"}, None)]
                t = self.transfers[key] = Transfer(sha, size, mapping, offset, offset,
                                                   offset - offset % mmap.PAGESIZE)
            if t.size == 0:
                out.append((Msg.CHUNK, {"sha256": sha, "offset": 0, "last": True}, b""))
        # An acknowledgement names what arrived: never past what was sent (one past it let everything go at once,
        # whatever the credit).
        t.acked = max(t.acked, min(offset, t.sent))
        t.release_acked()
        view = memoryview(t.map) if t.map is not None else None
        while view is not None and t.sent < t.size and t.sent - t.acked < credit * self.chunk_size:
            end = min(t.sent + self.chunk_size, t.size)
            out.append((Msg.CHUNK, {"sha256": sha, "offset": t.sent, "last": end >= t.size}, view[t.sent:end]))
            self.bytes_sent += end - t.sent
            t.sent = end
        if t.sent >= t.size:  # everything is out; a node that stalls restarts the transfer itself
            del self.transfers[key]
        return out

    def forget(self, node_id: str) -> None:
        for key in [k for k in self.transfers if k[0] == node_id]:
            del self.transfers[key]

    def close(self) -> None:
        self.transfers.clear()
