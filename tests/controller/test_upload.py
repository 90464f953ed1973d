"""Function uploads in the service, with stand-ins for Redis and the node hub: what is kept and what is refused."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller import service as service_module
from controller.api import common
from controller.config import ControllerConfig
from controller.errors import Busy, InsufficientStorage, RequestTimeout, TooLarge
from controller.metrics import ControllerMetrics
from controller.service import Service
from shoal.archive import build_tar_gz
from shoal.blobs import BlobStore
from shoal.errors import ValidationError
from shoal.models import Runtime
from tests.shoal.test_archive import climbing_links, zip_link_member, zip_lzma_corrupt


class FakeStore:
    async def get_runtime(self, name: str) -> Runtime | None:
        return Runtime.from_dict({"image": "img", "name": name}) if name == "rt" else None

    async def add_version(self, record: dict[str, Any]) -> dict[str, Any]:
        return dict(record, version=1, created=0.0)


class FakeHub:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def broadcast(self, mtype: bytes, header: dict[str, Any]) -> None:
        self.sent.append(header)


def make_service(tmp_path: Path) -> Service:
    config = ControllerConfig(blob_dir=tmp_path / "blobs", max_archive_bytes=1 << 20)
    return Service(config, FakeStore(), BlobStore(config.blob_dir), FakeHub(), None,  # type: ignore[arg-type]
                   ControllerMetrics())


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def upload(svc: Service, data: bytes, read: list[int] | None = None, **options: Any) -> dict[str, Any]:
    """Upload ``data`` in 4 KiB chunks; the offset of each chunk the service asks for goes to ``read``."""

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 4096):
            if read is not None:
                read.append(at)
            yield data[at:at + 4096]

    return asyncio.run(svc.upload_function("f", "rt", chunks(), options, "f.tgz"))


def corrupt_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", "def handler(p):\n    return p\n" * 200)
    data = bytearray(buf.getvalue())
    data[60:80] = b"\xff" * 20  # inside the member's compressed stream
    return bytes(data)


def tar_of(*members: tuple[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(content)
            tf.addfile(info, io.BytesIO(content or b""))
    return buf.getvalue()


def test_an_upload_is_verified_before_it_is_kept(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    data = build_tar_gz({"handler.py": "def handler(p):\n    return p\n"})
    record = upload(svc, data, entrypoint="handler:handler")
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size"] == len(data)
    assert files_under(svc.blobs.root) == [svc.blobs.path(record["sha256"])]  # no temporary file left


@pytest.mark.parametrize(("data", "needle"), [
    (corrupt_zip(), "cannot"),  # the member's stream is broken (zlib.error: it was a 500)
    (tar_of(("a", b"file"), ("a/b", b"under a file")), "cannot be extracted"),  # FileExistsError: a 500
    (tar_of(("a" * 300, b"x")), "cannot be extracted"),  # a name the filesystem refuses: a 500
    (tar_of(("../escape.py", b"x")), "traversal"),
    (b"not an archive at all", "not a zip"),
    (zip_link_member(flags=1), "encrypted"),  # RuntimeError: a 500
    (zip_lzma_corrupt(), "cannot read member"),  # lzma.LZMAError: a 500
    (climbing_links("tar"), "resolves outside the tree"),
    (tar_of(("d/" * 1500 + "f.py", b"x")), "nested"),  # RecursionError: a 500
])
def test_a_refused_archive_is_a_clear_error_and_leaves_nothing(tmp_path: Path, data: bytes, needle: str) -> None:
    svc = make_service(tmp_path)
    with pytest.raises(ValidationError, match=needle):
        upload(svc, data)
    assert files_under(svc.blobs.root) == []


def test_bad_options_are_refused_before_any_byte_is_read(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    read: list[int] = []
    with pytest.raises(ValidationError, match="timeout"):
        upload(svc, build_tar_gz({"a.py": "x"}), read, timeout=0)
    assert read == [] and files_under(svc.blobs.root) == []


def test_an_archive_past_the_limit_is_refused_and_its_bytes_dropped(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    with pytest.raises(TooLarge, match="exceeds the limit"):
        upload(svc, b"\0" * ((1 << 20) + 1))
    assert files_under(svc.blobs.root) == []


def test_a_full_disk_on_the_controller_is_a_507_and_keeps_nothing(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(tmp_path)

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shoal.archive._Extractor.file", full)
    with pytest.raises(InsufficientStorage, match="No space left on device") as raised:
        upload(svc, build_tar_gz({"a.py": "x"}))
    assert raised.value.status == 507 and files_under(svc.blobs.root) == []


def test_uploads_past_the_bound_are_told_to_come_back_and_nothing_is_read(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    svc.uploading = service_module.UPLOADS_AT_ONCE  # that many being received
    read: list[int] = []
    with pytest.raises(Busy, match="uploads are being received") as raised:
        upload(svc, build_tar_gz({"a.py": "x"}), read)
    assert raised.value.status == 429 and read == [] and files_under(svc.blobs.root) == []


def test_a_body_that_stalls_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that stopped sending held its connection, its partial upload and a descriptor for ever."""
    monkeypatch.setattr(common, "BODY_IDLE_S", 0.05)
    with pytest.raises(RequestTimeout, match="stalled"):
        asyncio.run(common.body_read(asyncio.sleep(3600), "request body"))


def test_an_upload_file_name_is_kept_readable_whatever_it_holds() -> None:
    """A name spelling out a lone surrogate (`filename*=unicode_escape''%5Cud800`) was a 500: only the surrogates
    aiohttp makes of bytes that are not UTF-8 were handled."""
    from types import SimpleNamespace

    for sent, kept in (("a\udcffb.tgz", "a\ufffdb.tgz"), ("\ud800x.tgz", "\ufffd\ufffd\ufffdx.tgz"),
                       ("f.tar.gz", "f.tar.gz"), (None, "")):
        assert common.upload_name(SimpleNamespace(filename=sent)) == kept  # type: ignore[arg-type]
