"""A content-addressed blob store on disk: archives by sha256, written atomically, read in chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from shoal.errors import NotFound
from shoal.fstree import remove_tree
from shoal.models import SHA256_RE


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not SHA256_RE.fullmatch(sha):
            raise NotFound(f"not a sha256: {sha[:80]!r}")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        try:
            return self.path(sha).is_file()
        except NotFound:
            return False

    def size(self, sha: str) -> int:
        path = self.path(sha)
        if not path.is_file():
            raise NotFound(f"no archive {sha[:12]}")
        return path.stat().st_size

    def put_stream(self, chunks: Iterable[bytes], max_bytes: int | None = None) -> tuple[str, int]:
        """Store the bytes of ``chunks``; return (sha256, size). Raises ValueError past ``max_bytes``."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ValueError(f"archive exceeds {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            return sha, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def adopt(self, path: Path, sha: str) -> None:
        """Move the file at ``path`` (in this store's root, its sha256 already computed) into place, on disk
        before its record is: synced, renamed, its directory synced (a version Redis keeps whose blob a power
        loss cut short would fail on every node until uploaded again). Blocking: call it off the loop."""
        final = self.path(sha)
        final.parent.mkdir(exist_ok=True)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, final)
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def collect(self, keep: set[str], before: float) -> int:
        """Remove the blobs not in ``keep`` last written before ``before`` (unix time); how many. An upload's blob
        is in place a moment before its version is recorded: a fresh one is kept whatever ``keep`` says."""
        removed = 0
        for sub in self.root.iterdir():
            if len(sub.name) != 2 or sub.name.startswith(".") or not sub.is_dir():
                continue
            for blob in sub.iterdir():
                if blob.name in keep or not SHA256_RE.fullmatch(blob.name):
                    continue
                try:
                    if blob.stat().st_mtime >= before:
                        continue
                    blob.unlink()
                except FileNotFoundError:
                    continue  # removed meanwhile
                removed += 1
        return removed

    def sweep(self) -> int:
        """Remove what a controller killed mid-upload left: partial uploads and verification scratch trees (up to
        the archive limit, and its expansion, each). Only at start: no upload is under way then."""
        removed = 0
        for leftover in [*self.root.glob(".upload-*"), *self.root.glob(".verify-*")]:
            if leftover.is_dir() and not leftover.is_symlink():
                remove_tree(leftover)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        return self.put_stream([data])

    def put_file(self, path: Path) -> tuple[str, int]:
        def chunks() -> Iterable[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return self.put_stream(chunks())
