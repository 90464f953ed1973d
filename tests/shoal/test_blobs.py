"""The controller's content-addressed blob store on a real directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shoal.blobs import BlobStore


def test_an_adopted_file_is_found_by_its_sha256(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    upload = store.root / ".upload-x"
    upload.write_bytes(b"archive")
    sha = hashlib.sha256(b"archive").hexdigest()
    store.adopt(upload, sha)
    assert store.has(sha) and store.size(sha) == 7 and not upload.exists()


def test_what_a_controller_killed_mid_upload_left_is_removed_at_start(tmp_path: Path) -> None:
    """Partial uploads (up to the archive limit each) and verification trees (up to its expansion) stayed for
    ever; the blobs stay."""
    store = BlobStore(tmp_path / "blobs")
    kept, _ = store.put_bytes(b"kept")
    (store.root / ".upload-abc").write_bytes(b"half an archive")
    (store.root / ".verify-def" / "tree" / "a").mkdir(parents=True)
    assert BlobStore(store.root).sweep() == 2
    assert sorted(p.name for p in store.root.iterdir()) == [kept[:2]] and store.has(kept)
