"""Serving archives to nodes: the sender's half of the credit-based chunk protocol (see node_agent/fetcher).

Used by the controller's node hub and by :class:`shoal.nodelink.NodeLink`. ``on_fetch`` turns a node's
``FETCH {sha256, offset, credit}`` into the ``CHUNK`` messages it may send now: at most ``credit`` chunks
past what the node acknowledged. Each transfer keeps one open file and reads one chunk at a time, so the
sender's memory does not grow with the archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any

from shoal.blobs import BlobStore
from shoal.errors import NotFound
from shoal.protocol import Msg

CHUNK_SIZE = 1 << 20
MAX_CREDIT = 64

Outgoing = tuple[bytes, dict[str, Any], bytes | None]


@dataclass
class Transfer:
    sha: str
    size: int
    file: IO[bytes]
    sent: int = 0
    acked: int = 0


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
        if t is None or h.get("restart"):
            if t is not None:
                t.file.close()
                del self.transfers[key]
            try:
                size = self.blobs.size(sha)
            except NotFound as exc:
                return [(Msg.FETCH_ERROR, {"sha256": sha[:64], "error": str(exc)}, None)]
            if not 0 <= offset <= size:
                return [(Msg.FETCH_ERROR, {"sha256": sha, "error": f"offset {offset} out of range"}, None)]
            t = self.transfers[key] = Transfer(sha, size, open(self.blobs.path(sha), "rb"), offset, offset)
            if size == 0:
                out.append((Msg.CHUNK, {"sha256": sha, "offset": 0, "last": True}, b""))
        t.acked = max(t.acked, offset)
        while t.sent < t.size and t.sent - t.acked < credit * self.chunk_size:
            t.file.seek(t.sent)
            data = t.file.read(self.chunk_size)
            if not data:
                break
            last = t.sent + len(data) >= t.size
            out.append((Msg.CHUNK, {"sha256": sha, "offset": t.sent, "last": last}, data))
            t.sent += len(data)
            self.bytes_sent += len(data)
        if t.sent >= t.size:  # everything is out; a node that stalls restarts the transfer itself
            t.file.close()
            del self.transfers[key]
        return out

    def forget(self, node_id: str) -> None:
        for key in [k for k in self.transfers if k[0] == node_id]:
            self.transfers.pop(key).file.close()

    def close(self) -> None:
        for t in self.transfers.values():
            t.file.close()
        self.transfers.clear()
