"""The node's cache: archives by sha256 (with resumable partial downloads), their extracted trees,
runtimes, and per-miniworker directories. All under ``<state_dir>/<node_id>/``."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path
from typing import BinaryIO

from node_agent.errors import FetchError
from shoal.archive import ArchiveLimits, extract_archive, sha256_file
from shoal.errors import ValidationError
from shoal.fstree import remove_tree
from shoal.logs import get_logger
from shoal.models import SHA256_RE, Runtime

log = get_logger("cache")


class NodeCache:
    def __init__(self, root: Path, limits: ArchiveLimits | None = None) -> None:
        self.root = root
        self.limits = limits or ArchiveLimits()
        for sub in ("blobs", "code", "wheels", "mw", "runtimes", "trash"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Archives this process verified (fetched, or hashed again): one kept from before it started (a crash,
        # a power loss) may be cut short, and its extracted tree too (nothing is synced to disk on the way).
        self.trusted: set[str] = set()
        self.trust_lock = threading.Lock()  # (code_dir runs in the agent's worker threads)

    def sweep(self) -> int:
        """Remove what an agent killed mid-work left half done: extractions and dependency resolutions (they
        are redone when needed). Only at start: nothing is preparing then. Returns how many were removed."""
        removed = 0
        for leftover in [*(self.root / "code").glob(".extract-*"), *(self.root / "wheels").glob(".resolve-*"),
                         *(self.root / "trash").glob("*")]:
            remove_path(leftover)
            removed += 1
        return removed

    # ---- archives -----------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        if not SHA256_RE.fullmatch(sha):
            raise FetchError(f"not a sha256: {sha!r}")
        return self.root / "blobs" / sha

    def has_blob(self, sha: str) -> bool:
        return self.blob_path(sha).is_file()

    def partial(self, sha: str) -> Path:
        return self.blob_path(sha).with_suffix(".part")

    def open_partial(self, sha: str) -> tuple[int, hashlib._Hash]:
        """Resume point of a partial download: its size and the running hash of what is there."""
        part = self.partial(sha)
        digest = hashlib.sha256()
        if not part.exists():
            part.touch()
            return 0, digest
        size = 0
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        return size, digest

    def open_for_append(self, sha: str, offset: int) -> BinaryIO:
        """The partial download, positioned at ``offset`` (anything after it is dropped)."""
        f = open(self.partial(sha), "r+b")
        f.seek(offset)
        f.truncate()
        return f

    def commit(self, sha: str, digest: hashlib._Hash) -> Path:
        part = self.partial(sha)
        if digest.hexdigest() != sha:
            part.unlink(missing_ok=True)
            raise FetchError(f"archive {sha[:12]} failed verification (got {digest.hexdigest()[:12]})")
        final = self.blob_path(sha)
        os.replace(part, final)
        self.trusted.add(sha)
        return final

    def code_dir(self, sha: str) -> Path:
        """The archive's extracted tree, extracting it (safely) on first use. An archive from before this process
        started is hashed again first, and its tree extracted anew: a damaged one is removed (FetchError, which
        the agent takes as passing: it fetches it again), where its extraction would fail the function for good
        (a bad archive) or, from a tree cut short, run part of its code."""
        dest = self.root / "code" / sha
        if sha not in self.trusted:
            blob = self.blob_path(sha)
            digest = sha256_file(blob)  # (outside the lock: other archives are not held up by this one)
            with self.trust_lock:
                if sha not in self.trusted:
                    remove_path(dest)
                    if digest != sha:
                        blob.unlink(missing_ok=True)
                        raise FetchError(f"the archive {sha[:12]} kept here is damaged (from before a restart); "
                                         "it is fetched again")
                    self.trusted.add(sha)
        if not dest.is_dir():
            extract_archive(self.blob_path(sha), dest, self.limits)
        return dest

    def collect(self, shas: set[str], wheels: set[str]) -> list[Path]:
        """Move aside what no function refers to: archives and extracted code not in ``shas``, dependency
        wheelhouses not in ``wheels`` (names), partial downloads of archives not in ``shas``. A rename each (the
        caller's loop is not held up); the returned paths are removed afterwards, off the loop. What is half
        made (names starting with a dot) is not touched."""
        trash = self.root / "trash"
        moved: list[Path] = []
        for sub, keep in (("blobs", shas), ("code", shas), ("wheels", wheels)):
            for entry in (self.root / sub).iterdir():
                name = entry.name.removesuffix(".part") if sub == "blobs" else entry.name
                if name.startswith(".") or name in keep:
                    continue
                target = trash / f"{sub}-{entry.name}-{uuid.uuid4().hex[:8]}"
                try:
                    entry.rename(target)
                except FileNotFoundError:
                    continue
                moved.append(target)
        return moved

    # ---- runtimes -----------------------------------------------------------------------------
    def save_runtime(self, runtime: Runtime) -> None:
        path = self.root / "runtimes" / f"{runtime.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runtime.to_dict()))
        os.replace(tmp, path)

    def forget_runtime(self, name: str) -> None:
        (self.root / "runtimes" / f"{name}.json").unlink(missing_ok=True)

    def load_runtimes(self) -> dict[str, Runtime]:
        out: dict[str, Runtime] = {}
        for path in sorted((self.root / "runtimes").glob("*.json")):
            try:
                runtime = Runtime.from_dict(json.loads(path.read_text()))
            except (ValueError, ValidationError) as exc:  # written by an older version, or damaged
                log.error("cached_runtime_dropped", file=path.name, error=str(exc))
                path.unlink(missing_ok=True)  # the controller sends every runtime again at HELLO
                continue
            out[runtime.name] = runtime
        return out

    # ---- miniworkers --------------------------------------------------------------------------
    def mw_dir(self, mw_id: str) -> Path:
        return self.root / "mw" / mw_id

    def clear_mw_dirs(self) -> None:
        """Remove every miniworker's directory (at start: none runs yet). Raises TreeError for what is left."""
        (self.root / "mw").mkdir(parents=True, exist_ok=True)
        for path in (self.root / "mw").iterdir():
            remove_path(path)


def remove_path(path: Path) -> None:
    """Remove a file or a whole tree; what is already gone is no error."""
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)
