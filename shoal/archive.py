"""Function archives (zip or tar, optionally gzip'd): hashing and safe extraction.

Every check happens while extracting, on the bytes actually read, not on what headers claim:

* member names: no absolute paths, no ``..``, no NUL, no drive letters; nothing lands outside ``dest``;
* links: hard links and device/fifo members are refused; symlinks only when they resolve inside the tree;
* counts and sizes: at most ``max_files`` members, at most ``max_bytes`` written in total;
* bombs: the bytes written may not exceed ``max_ratio`` times the archive's size (above a small floor).

Extraction goes to a temporary sibling directory that is renamed into place only when complete, so a
refused archive leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import lzma
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from shoal.errors import ArchiveError
from shoal.fstree import TreeError, remove_tree

_COPY_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    max_archive_bytes: int = 1 << 30
    max_files: int = 10_000
    max_bytes: int = 2 << 30
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 32 << 20

    def budget(self, archive_size: int) -> int:
        """Bytes an archive of ``archive_size`` may expand to."""
        return min(self.max_bytes, max(self.ratio_floor_bytes, int(archive_size * self.max_ratio)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def detect_format(head: bytes) -> str:
    """``zip`` or ``tar`` (gzip'd or plain), from the first bytes; anything else is refused."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise ArchiveError("not a zip or tar(.gz) archive")


#: Directories a member's path may go down. Deeper trees are refused: a function's code has no use for them, and
#: a path thousands of directories deep broke Python's recursive tree functions (RecursionError).
MAX_MEMBER_DEPTH = 128


def safe_member_path(name: str) -> str:
    """Normalised relative path of a member, or ArchiveError if it could escape the tree or is nested deeper
    than MAX_MEMBER_DEPTH."""
    if "\0" in name:
        raise ArchiveError(f"member name contains NUL: {name!r}")
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":"):
        raise ArchiveError(f"absolute path in archive: {name!r}")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"path traversal ('..') in archive: {name!r}")
    if len(parts) > MAX_MEMBER_DEPTH:
        raise ArchiveError(f"member path nested {len(parts)} levels deep (at most {MAX_MEMBER_DEPTH}): "
                           f"{name[:80]!r}...")
    return "/".join(parts)


class _Extractor:
    def __init__(self, root: Path, limits: ArchiveLimits, archive_size: int) -> None:
        self.root = root
        self.limits = limits
        self.budget = limits.budget(archive_size)
        self.archive_size = archive_size
        self.files = 0
        self.written = 0
        self.links = 0

    def _count(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise ArchiveError(f"archive has more than {self.limits.max_files} members")

    def target(self, rel: str) -> Path:
        path = self.root / rel
        # Parent directories may be symlinks created earlier: resolve and re-check.
        try:
            resolved_parent = path.parent.resolve()
        except RuntimeError:  # Python 3.11 raises it for a loop of links (later versions raise OSError)
            raise ArchiveError(f"member {rel!r} is reached through a loop of links") from None
        if not resolved_parent.is_relative_to(self.root.resolve()):
            raise ArchiveError(f"member {rel!r} would be written outside the tree (through a link)")
        return path

    def directory(self, rel: str) -> None:
        self._count()
        if rel:
            self.target(rel).mkdir(parents=True, exist_ok=True)

    def file(self, rel: str, src: IO[bytes], executable: bool) -> None:
        self._count()
        if not rel:
            raise ArchiveError("a file member has an empty name")
        path = self.target(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_dir():
            raise ArchiveError(f"member {rel!r} collides with an existing link or directory")
        with open(path, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                self.written += len(chunk)
                if self.written > self.budget:
                    raise ArchiveError(
                        f"archive expands beyond {self.budget} bytes "
                        f"({self.archive_size} bytes compressed): refused as a decompression bomb "
                        "or oversized archive"
                    )
                out.write(chunk)
        path.chmod(0o755 if executable else 0o644)

    def symlink(self, rel: str, link_target: str) -> None:
        self._count()
        if link_target.startswith("/") or "\0" in link_target:
            raise ArchiveError(f"symlink {rel!r} points outside the tree ({link_target!r})")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link_target))
        if resolved == ".." or resolved.startswith("../"):
            raise ArchiveError(f"symlink {rel!r} points outside the tree ({link_target!r})")
        path = self.target(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link_target, path)
        self.links += 1

    def check_links(self) -> None:
        """Every link, now that the tree is whole, resolves inside it on disk. Each was checked as text when it
        was made, but a link can climb through another: ``d/x -> ..`` is the tree itself, so ``p -> d/x/..``
        (``d`` as text) is the tree's parent, and a chain of such links reaches ``/`` (a ``requirements.txt``
        pointing there was read, as root, by the node preparing the function)."""
        if not self.links:
            return
        root = os.path.realpath(self.root)
        for dirpath, dirnames, filenames in os.walk(self.root):  # (links to directories are listed, not followed)
            for name in (*dirnames, *filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    real = os.path.realpath(path)
                    if real != root and not real.startswith(root + os.sep):
                        rel = os.path.relpath(path, self.root)
                        raise ArchiveError(f"symlink {rel!r} resolves outside the tree (through other links)")


#: Bytes of a zip's central directory per member it may list (names, extra fields and comments included): the
#: standard library reads the whole directory into objects before anyone counts them (a 14 MB zip of repeated
#: 47-byte entries took 131 MB to be refused; one of 1 GiB would have taken about 10 GB).
ZIP_DIRECTORY_BYTES_PER_MEMBER = 512


def _check_zip_directory(stream: BinaryIO, limits: ArchiveLimits) -> None:
    """Refuse a zip whose end record announces more members, or a larger central directory, than ``limits`` allow,
    before the standard library reads the directory."""
    end_record = getattr(zipfile, "_EndRecData", None)  # (what ZipFile reads first; private, so checked for)
    if end_record is None:
        return
    try:
        found = end_record(stream)
    except OSError:
        found = None
    finally:
        stream.seek(0)
    if not found:
        return  # not a zip ZipFile can read: it says why
    members, size = found[zipfile._ECD_ENTRIES_TOTAL], found[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if members > limits.max_files:
        raise ArchiveError(f"archive has more than {limits.max_files} members ({members} listed)")
    if size > limits.max_files * ZIP_DIRECTORY_BYTES_PER_MEMBER:
        raise ArchiveError(f"zip central directory of {size} bytes: more than {limits.max_files} members may take")


def _extract_zip(stream: BinaryIO, ex: _Extractor) -> None:
    _check_zip_directory(stream, ex.limits)
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # (NotImplementedError: a "version needed to extract" above what zipfile knows, 6.3)
        raise ArchiveError(f"unreadable zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > ex.limits.max_files:
            raise ArchiveError(f"archive has more than {ex.limits.max_files} members")
        for info in infos:
            rel = safe_member_path(info.filename)
            mode = (info.external_attr >> 16) & 0xFFFF
            if info.is_dir():
                ex.directory(rel)
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFLNK):  # many zips carry no file type at all
                raise ArchiveError(f"member {rel!r} is not a regular file, directory or symlink")
            # A member's bytes may be encrypted (RuntimeError), in a method zipfile lacks (NotImplementedError),
            # or corrupt in its method's own way (zlib, lzma; bzip2's OSError is taken below, with the disk's).
            try:
                if stat.S_ISLNK(mode):
                    if info.file_size > 4096:
                        raise ArchiveError(f"symlink {rel!r} has an oversized target")
                    ex.symlink(rel, zf.read(info).decode("utf-8", "replace"))
                else:
                    with zf.open(info) as src:
                        ex.file(rel, src, bool(mode & 0o111))
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error, lzma.LZMAError) as exc:
                raise ArchiveError(f"cannot read member {rel!r}: {exc}") from None


#: Bytes one tar extended header (pax, GNU long name or link) may hold. The standard library reads each whole into
#: memory before anything looks at it: a 200 MiB long name (204 KB gzip'd) took 215 MB, and was accepted.
MAX_TAR_HEADER = 64 << 10
#: A longer run of digits in a pax header is refused: on Pythons before 3.11.10 (CVE-2024-6232) the standard library
#: searched pax headers with a regex quadratic in such runs (a 150-byte upload held a core for hours).
_DIGIT_RUN = re.compile(rb"[0-9]{65}")
#: Bytes all the extended headers of one archive may hold: each member's pax header is copied into the member, and a
#: chain of them is held at once while the standard library reads it.
MAX_TAR_HEADERS_TOTAL = 16 << 20
#: Bytes a global pax header may hold (its keys are copied into every member after it; `git archive` writes one of
#: about 50 bytes).
MAX_TAR_GLOBAL_HEADER = 4 << 10


def _check_pax_records(buf: bytes, size: int) -> None:
    """The pax records ("LEN key=value\n") tile the header exactly. Pythons before 3.11.10 parsed them with regexes
    that a header of overlapping or unterminated records made quadratic (64 KiB of "2 2 2..." copied a keyword of up to
    64 KiB per 2 bytes); records that tile it are read in linear time."""
    pos = 0
    while pos < size:
        space = buf.find(b" ", pos, pos + 21)
        if space <= pos or not buf[pos:space].isdigit():
            raise ArchiveError("a tar pax header is malformed (a record without its length)")
        length = int(buf[pos:space])
        end = pos + length
        if length < 5 or end > size or buf[end - 1:end] != b"\n" or buf.find(b"=", space, end) < 0:
            raise ArchiveError("a tar pax header is malformed (a record that does not end where it says)")
        pos = end


class _BoundedTarInfo(tarfile.TarInfo):
    """Tar headers read by the standard library, bounded first: extended headers by size (and pax ones by what they
    hold), sparse members refused (their maps are read whole, block after block, and a function has no use for
    them)."""

    def _check_extended(self, tf: tarfile.TarFile) -> None:
        if self.size > MAX_TAR_HEADER:
            raise ArchiveError(f"a tar extended header of {self.size} bytes (at most {MAX_TAR_HEADER})")
        total = getattr(tf, "_shoal_extended_bytes", 0) + self.size
        if total > MAX_TAR_HEADERS_TOTAL:
            raise ArchiveError(f"the tar's extended headers hold more than {MAX_TAR_HEADERS_TOTAL} bytes")
        tf._shoal_extended_bytes = total  # type: ignore[attr-defined]

    def _proc_gnulong(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extended(tf)
        return super()._proc_gnulong(tf)  # type: ignore[misc]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        raise ArchiveError(f"member {self.name[:80]!r} is a sparse file")

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_extended(tf)
        if self.type == tarfile.XGLTYPE and self.size > MAX_TAR_GLOBAL_HEADER:
            raise ArchiveError(f"a tar global header of {self.size} bytes (at most {MAX_TAR_GLOBAL_HEADER})")
        real = tf.fileobj
        buf = real.read(self._block(self.size))  # type: ignore[attr-defined]
        _check_pax_records(buf, self.size)
        if _DIGIT_RUN.search(buf):
            raise ArchiveError("a tar pax header holds a run of more than 64 digits")
        if b"GNU.sparse" in buf:
            raise ArchiveError("a tar pax header describes a sparse file")
        tf.fileobj = _Replay(buf, real)  # the standard library reads the header from here, as it was
        try:
            return super()._proc_pax(tf)  # type: ignore[misc]
        finally:
            tf.fileobj = real


class _Replay:
    """A file object that answers its first read with ``buf`` (already read from ``real``), then is ``real``."""

    def __init__(self, buf: bytes, real: Any) -> None:
        self._buf: bytes | None = buf
        self._real = real

    def read(self, size: int = -1) -> bytes:
        if self._buf is not None:
            buf, self._buf = self._buf, None
            if size == len(buf):
                return buf
            raise ArchiveError("a tar pax header was read in an unexpected way")  # (a standard library changed)
        return self._real.read(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _extract_tar(stream: BinaryIO, ex: _Extractor) -> None:
    try:
        tf = tarfile.open(fileobj=stream, mode="r:*", tarinfo=_BoundedTarInfo)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"unreadable tar archive: {exc}") from None
    with tf:
        try:
            # One member at a time: iterating the TarFile keeps every member read (each with its pax headers, a
            # copy of the global ones), for the whole extraction.
            while (member := tf.next()) is not None:
                tf.members.clear()  # type: ignore[attr-defined]
                rel = safe_member_path(member.name)
                if member.isdir():
                    ex.directory(rel)
                elif member.issym():
                    ex.symlink(rel, member.linkname)
                elif member.islnk():
                    raise ArchiveError(f"hard link {rel!r} refused")
                elif member.isreg():
                    src = tf.extractfile(member)
                    if src is None:
                        raise ArchiveError(f"cannot read member {rel!r}")
                    with src:
                        ex.file(rel, src, bool(member.mode & 0o111))
                else:
                    raise ArchiveError(f"member {rel!r} is a device, fifo or other special file")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"corrupt tar archive: {exc}") from None


#: Errors of the host, not of the archive: extraction raises them as they are (OSError), so that a node prepares the
#: function again later and the controller answers 507, where an ArchiveError fails the function for good (400).
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                             errno.EROFS})


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (which must not exist yet) safely; return ``dest``. An archive that cannot
    be used raises ArchiveError; a host that cannot extract it now (RESOURCE_ERRNOS) raises its OSError."""
    limits = limits or ArchiveLimits()
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise ArchiveError(f"archive of {size} bytes exceeds the limit of {limits.max_archive_bytes}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        ex = _Extractor(tmp, limits, size)
        try:
            with open(archive, "rb") as stream:
                kind = detect_format(stream.read(512))
                stream.seek(0)
                if kind == "zip":
                    _extract_zip(stream, ex)
                else:
                    _extract_tar(stream, ex)
            ex.check_links()
        except ArchiveError:
            raise
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise  # this host's trouble (a full disk), not the archive's: it may pass
            raise ArchiveError(f"archive cannot be extracted: {exc}") from None
        except RecursionError:  # (links can nest what each member's depth bound keeps shallow)
            raise ArchiveError("archive cannot be extracted: its tree is nested too deep") from None
        except (EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, ValueError, NotImplementedError,
                RuntimeError) as exc:
            # A corrupt stream in a member, a file where the archive also has a directory, a name too long for
            # the filesystem, a full disk, a zip of a version zipfile cannot read: the archive cannot be used here,
            # and the reason says why.
            raise ArchiveError(f"archive cannot be extracted: {exc}") from None
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():  # a concurrent extraction of the same archive won: keep theirs
                raise
            with contextlib.suppress(TreeError):  # (left to the sweep of .extract-* trees at the next start)
                remove_tree(tmp)
        return dest
    except BaseException:
        with contextlib.suppress(TreeError):  # (the same)
            remove_tree(tmp)
        raise


def build_tar_gz(files: Mapping[str, bytes | str]) -> bytes:
    """A tar.gz of the given ``{name: content}``: used by examples, tests and the CLI."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
