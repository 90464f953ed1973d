from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from shoal.archive import ArchiveLimits, build_tar_gz, extract_archive
from shoal.errors import ArchiveError


def tar_with(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in members:
            content = (data or {}).get(info.name)
            tf.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = link
    return info


def zip_with(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def extract(workdir: Path, data: bytes, limits: ArchiveLimits | None = None) -> Path:
    archive = workdir / "archive.bin"
    archive.write_bytes(data)
    return extract_archive(archive, workdir / "cache" / "out", limits)


def assert_nothing_written(workdir: Path) -> None:
    cache = workdir / "cache"
    leftovers = [p for p in cache.rglob("*")] if cache.exists() else []
    assert leftovers == [], leftovers
    assert not (workdir.parent / "evil").exists()


def test_tar_gz_and_zip_extract(workdir: Path) -> None:
    out = extract(workdir, build_tar_gz({"test.py": "print(1)", "pkg/mod.py": "x = 1"}))
    assert (out / "test.py").read_text() == "print(1)"
    assert (out / "pkg" / "mod.py").exists()
    out2 = extract_archive_zip(workdir)
    assert (out2 / "a" / "b.txt").read_bytes() == b"hi"


def extract_archive_zip(workdir: Path) -> Path:
    archive = workdir / "a.zip"
    archive.write_bytes(zip_with({"a/b.txt": b"hi"}, {"a/link": "b.txt"}))
    out = extract_archive(archive, workdir / "zipout")
    assert (out / "a" / "link").is_symlink()
    return out


def zip_loop() -> bytes:
    """Two links pointing at each other, then a directory reached through them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, target in (("a", "b"), ("b", "a")):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        zf.writestr("a/d/", b"")
    return buf.getvalue()


def zip_link_member(flags: int = 0, method: int | None = None) -> bytes:
    """A zip whose one member, a symlink, is marked encrypted (``flags`` 1) or stored in a method zipfile does
    not know (``method`` 99: AES): reading its target raised out of the extraction (a 500 on upload)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("l")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "target")
    data = bytearray(buf.getvalue())
    for header, at in ((0, 6), (data.rfind(b"PK\x01\x02"), 8)):  # the local header's fields, the directory's
        data[header + at] |= flags
        if method is not None:
            data[header + at + 2:header + at + 4] = method.to_bytes(2, "little")
    return bytes(data)


def zip_lzma_corrupt() -> bytes:
    """An LZMA member whose stream is broken: lzma.LZMAError, which nothing took (a 500 on upload)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_LZMA) as zf:
        zf.writestr("f.bin", os.urandom(100_000))
    data = bytearray(buf.getvalue())
    for i in range(200, 400):
        data[i] ^= 0x55
    return bytes(data)


HOSTILE = [
        (tar_with([member("../evil", size=1)], {"../evil": b"x"}), "traversal"),
        (tar_with([member("a/../../evil", size=1)], {"a/../../evil": b"x"}), "traversal"),
        (tar_with([member("/etc/evil", size=1)], {"/etc/evil": b"x"}), "absolute"),
        (tar_with([member("link", tarfile.SYMTYPE, link="/etc/passwd")]), "outside"),
        (tar_with([member("link", tarfile.SYMTYPE, link="../../x")]), "outside"),
        (tar_with([member("hard", tarfile.LNKTYPE, link="/etc/passwd")]), "hard link"),
        (tar_with([member("dev", tarfile.CHRTYPE)]), "device"),
        (tar_with([member("fifo", tarfile.FIFOTYPE)]), "device"),
        (zip_with({"../evil": b"x"}), "traversal"),
        (zip_with({"/abs": b"x"}), "absolute"),
        (zip_with({}, {"l": "/etc/passwd"}), "outside"),
        (zip_with({"C:\\windows\\evil": b"x"}), "absolute"),
        # A loop of links: Python 3.11's resolve() raised RuntimeError (a 500 on upload, a dead agent on a node).
        (tar_with([member("a", tarfile.SYMTYPE, link="b"), member("b", tarfile.SYMTYPE, link="a"),
                   member("a/x", size=1)], {"a/x": b"x"}), "loop"),
        (zip_loop(), "loop"),
        (b"this is not an archive at all", "not a zip or tar"),
        (b"PK\x03\x04garbage-after-zip-magic", "unreadable zip"),
        (b"\x1f\x8bgarbage-after-gzip-magic", "tar"),
        (zip_link_member(flags=1), "encrypted"),
        (zip_link_member(method=99), "compression method"),
        (zip_lzma_corrupt(), "Corrupt input"),
        # Thousands of directories deep: pathlib's mkdir recursed per level (RecursionError: a 500 on upload).
        (tar_with([member("d/" * 1500 + "f", size=1)], {"d/" * 1500 + "f": b"x"}), "nested 1501 levels"),
        (zip_with({"d/" * 200 + "f": b"x"}), "nested 201 levels"),
]


# Explicit ids: gzip headers carry a timestamp, and xdist workers must collect identical test ids.
@pytest.mark.parametrize(("data", "needle"), HOSTILE, ids=[f"{i}-{needle}" for i, (_, needle) in enumerate(HOSTILE)])
def test_hostile_archives_are_refused_and_write_nothing(workdir: Path, data: bytes, needle: str) -> None:
    with pytest.raises(ArchiveError, match=needle):
        extract(workdir, data)
    assert_nothing_written(workdir)


def test_symlink_then_file_through_it_is_refused(workdir: Path) -> None:
    data = tar_with([member("d", tarfile.SYMTYPE, link="."), member("d/../../evil", size=1)], {"d/../../evil": b"x"})
    with pytest.raises(ArchiveError):
        extract(workdir, data)
    assert_nothing_written(workdir)


def test_zip_bomb_is_refused_by_ratio_on_bytes_actually_read(workdir: Path) -> None:
    bomb = zip_with({"zeros.bin": b"\0" * (64 << 20)})  # 64 MiB of zeros compress to ~64 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(ArchiveError, match="bomb"):
        extract(workdir, bomb, ArchiveLimits(max_ratio=100, ratio_floor_bytes=1 << 20))
    assert_nothing_written(workdir)


def test_too_many_files_and_too_large(workdir: Path) -> None:
    many = build_tar_gz({f"f{i}.txt": "x" for i in range(50)})
    with pytest.raises(ArchiveError, match="more than 10 members"):
        extract(workdir, many, ArchiveLimits(max_files=10))
    with pytest.raises(ArchiveError, match="exceeds the limit"):
        extract(workdir, many, ArchiveLimits(max_archive_bytes=100))
    big = build_tar_gz({"big.bin": b"\x01" * 4096})
    with pytest.raises(ArchiveError, match="expands beyond"):
        extract(workdir, big, ArchiveLimits(max_bytes=1024, ratio_floor_bytes=0, max_ratio=1e9))
    assert_nothing_written(workdir)


def climbing_links(kind: str) -> bytes:
    """``d/x -> ..`` is the tree itself; ``p -> d/x/..`` reads ``d`` as text but is the tree's parent on disk; a
    file then points through it at what is outside."""
    links = {"d/x": "..", "p": "d/x/..", "requirements.txt": "p/outside.txt"}
    if kind == "zip":
        return zip_with({"d/keep.txt": b"x"}, links)
    return tar_with([member("d", tarfile.DIRTYPE), *(member(n, tarfile.SYMTYPE, link=t) for n, t in links.items())])


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_links_that_climb_out_through_other_links_are_refused(workdir: Path, kind: str) -> None:
    (workdir / "cache").mkdir()
    (workdir / "cache" / "outside.txt").write_text("a host file\n")  # what p/outside.txt reaches
    with pytest.raises(ArchiveError, match="resolves outside the tree"):
        extract(workdir, climbing_links(kind))
    assert [p.name for p in (workdir / "cache").iterdir()] == ["outside.txt"]  # nothing extracted is left


def test_links_that_stay_inside_through_other_links_are_kept(workdir: Path) -> None:
    data = tar_with([member("lib", tarfile.DIRTYPE), member("lib/a.txt", size=2),
                     member("lib/up", tarfile.SYMTYPE, link=".."),
                     member("b", tarfile.SYMTYPE, link="lib/up/lib/a.txt")], {"lib/a.txt": b"hi"})
    out = extract(workdir, data)
    assert (out / "b").read_text() == "hi"


def test_a_full_disk_is_the_hosts_error_not_the_archives(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be an ArchiveError: a node failed the function for good (no retry), the controller answered 400."""
    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shoal.archive._Extractor.file", full)
    with pytest.raises(OSError) as raised:
        extract(workdir, build_tar_gz({"a.py": "x"}))
    assert not isinstance(raised.value, ArchiveError) and raised.value.errno == errno.ENOSPC
    assert_nothing_written(workdir)


def tar_formatted(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int,
                  pax_headers: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt, pax_headers=pax_headers) as tf:
        for info, content in members:
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_tar_extended_headers_are_bounded_before_they_are_read(workdir: Path) -> None:
    """The standard library reads a GNU long name or a pax header whole before anything looks at it (a 200 MiB long
    name, 204 KB gzip'd, took 215 MB, and was accepted); a long run of digits in a pax header made its regex
    quadratic on Pythons before 3.11.10 (CVE-2024-6232: a 150-byte upload held a core for hours); sparse members'
    maps are read block after block."""
    from shoal.archive import MAX_TAR_HEADER

    long_name = tar_formatted([(tarfile.TarInfo("d/" + "n" * (MAX_TAR_HEADER + 1)), b"x")], tarfile.GNU_FORMAT)
    with pytest.raises(ArchiveError, match="extended header of"):
        extract(workdir, long_name)
    digits = tar_formatted([(tarfile.TarInfo("f.py"), b"x")], tarfile.PAX_FORMAT, {"comment": "1" * 100})
    with pytest.raises(ArchiveError, match="run of more than 64 digits"):
        extract(workdir, digits)
    sparse = tarfile.TarInfo("s.bin")
    sparse.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(ArchiveError, match="sparse"):
        extract(workdir, tar_formatted([(sparse, b"")], tarfile.GNU_FORMAT))
    gnu_sparse_pax = tarfile.TarInfo("p.bin")
    gnu_sparse_pax.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    with pytest.raises(ArchiveError, match="sparse"):
        extract(workdir, tar_formatted([(gnu_sparse_pax, b"")], tarfile.PAX_FORMAT))
    assert_nothing_written(workdir)
    # What real tools write still goes through: `git archive`'s global pax header (the commit), long names within
    # the bound in either format, a pax header per member.
    named = tarfile.TarInfo("pkg/" + "/".join(["m" * 60] * 4) + ".py")  # over 100 bytes: an extended header
    named.pax_headers = {"mtime": "1700000000.123456789"}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        tree = extract(workdir, tar_formatted([(named, b"ok")], fmt, {"comment": "0" * 40}))
        assert (tree / named.name).read_bytes() == b"ok"
        shutil.rmtree(tree)


def test_a_zip_central_directory_larger_than_its_members_may_take_is_refused_before_it_is_read(workdir: Path) -> None:
    """zipfile reads the whole central directory into objects before the members are counted: one of repeated
    47-byte entries, 14 MB, took 131 MB to be refused."""
    from shoal.archive import ZIP_DIRECTORY_BYTES_PER_MEMBER

    limits = ArchiveLimits(max_files=2)
    long_name = zip_with({"x" * (2 * ZIP_DIRECTORY_BYTES_PER_MEMBER + 1): b"1"})  # one member, a long entry
    with pytest.raises(ArchiveError, match="central directory of"):
        extract(workdir, long_name, limits)
    many = zip_with({f"f{n}.py": b"" for n in range(3)})
    with pytest.raises(ArchiveError, match=r"more than 2 members \(3 listed\)"):
        extract(workdir, many, limits)
    assert_nothing_written(workdir)
    assert (extract(workdir, zip_with({"a.py": b"1", "b.py": b"2"}), limits) / "b.py").read_bytes() == b"2"


def zip_of_version(version: int) -> bytes:
    """A zip whose central directory says it needs ``version`` (tenths: 64 is 6.4) to be extracted."""
    data = bytearray(zip_with({"handler.py": b"def handler(p):\n    return p\n"}))
    entry = data.rfind(b"PK\x01\x02")
    data[entry + 6] = version  # "version needed to extract"
    return bytes(data)


def test_a_zip_of_a_version_zipfile_cannot_read_is_refused(workdir: Path) -> None:
    """zipfile raises NotImplementedError for a version above 6.3: it escaped as a 500 at upload."""
    with pytest.raises(ArchiveError, match=r"zip file version 6\.4"):
        extract(workdir, zip_of_version(64))
    assert_nothing_written(workdir)


def tar_with_pax_body(body: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A tar.gz whose first member is an extended header holding ``body`` as it is, then a file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tf:
        header = tarfile.TarInfo("././@PaxHeader")
        header.type = kind
        header.size = len(body)
        tf.addfile(header, io.BytesIO(body))
        info = tarfile.TarInfo("f.py")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def test_pax_records_must_tile_their_header_and_headers_are_bounded_in_all(workdir: Path) -> None:
    """Python before 3.11.10 parsed pax records with regexes a header of overlapping or unterminated records made
    quadratic ("2 2 2..." copied a keyword of up to 64 KiB per 2 bytes); the global header's keys are copied into every
    member after it, and every member was kept with its copy."""
    for body in (b"2 " * 1000 + b"=", b"50 comment=" + b"y" * 100, b"12 comment=x", b"x" * 100):
        with pytest.raises(ArchiveError, match="pax header is malformed"):
            extract(workdir, tar_with_pax_body(body))
    with pytest.raises(ArchiveError, match="global header of"):
        extract(workdir, tar_formatted([(tarfile.TarInfo("f.py"), b"x")], tarfile.PAX_FORMAT, {"comment": "c" * 5000}))
    assert_nothing_written(workdir)
    good = b"20 comment=abcdefgh\n"
    assert (extract(workdir, tar_with_pax_body(good)) / "f.py").read_bytes() == b"x"
