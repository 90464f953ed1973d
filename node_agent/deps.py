"""Resolving a function's requirements on the host into a wheelhouse, cached by the requirements' hash.

Containers have no network. The host can reach the package index, so the agent downloads the wheels a
``requirements.txt`` names (binary only: no package's build code runs on the host) into
``wheels/<hash>/``; the container's own dependency command then installs from there offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from node_agent.errors import DependencyError

REQUIREMENTS = "requirements.txt"
# A PEP 508 requirement without URLs, paths or pip options: a name, extras, specifiers, markers.
_REQ_LINE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,\s-]*\])?\s*([<>=!~]=?[^;@]*)?(;[^@]*)?$")


#: Bytes a requirements.txt may hold (read whole, then split: a file of newlines as large as the archive's extraction
#: budget took about ten times its size in the agent's memory).
REQUIREMENTS_MAX = 1 << 20


def parse_requirements(text: str) -> list[str]:
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if "$" in line:  # pip expands ${VAR} in a requirements file from its environment: the host's, here
            raise DependencyError(f"{REQUIREMENTS} line {number}: {line[:200]!r} refers to an environment variable "
                                  "(${...} is refused)")
        if not _REQ_LINE.match(line):
            raise DependencyError(
                f"{REQUIREMENTS} line {number}: {line!r} is not a plain requirement "
                "(pip options, URLs and paths are refused)"
            )
        lines.append(line)
    return lines


class WheelhouseResolver:
    def __init__(self, root: Path, timeout: float = 600.0) -> None:
        self.root = root
        self.timeout = timeout
        root.mkdir(parents=True, exist_ok=True)

    def resolve(self, code_dir: Path) -> Path:
        """Wheelhouse for the function in ``code_dir`` (empty if it has no requirements)."""
        req_file = code_dir / REQUIREMENTS
        requirements: list[str] = []
        if req_file.is_file():
            if (size := req_file.stat().st_size) > REQUIREMENTS_MAX:
                raise DependencyError(f"{REQUIREMENTS} holds {size} bytes (at most {REQUIREMENTS_MAX})")
            requirements = parse_requirements(req_file.read_text(errors="replace"))
        digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:24]
        dest = self.root / digest
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=".resolve-", dir=self.root))
        try:
            if requirements:
                listing = tmp / ".requirements.txt"
                listing.write_text("\n".join(requirements) + "\n")
                cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet",
                       "--disable-pip-version-check", "--dest", str(tmp), "-r", str(listing)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                                          stdin=subprocess.DEVNULL, check=False, env=dict(os.environ))
                except subprocess.TimeoutExpired:
                    raise DependencyError(f"resolving requirements took over {self.timeout:g} s") from None
                if proc.returncode != 0:
                    raise DependencyError(f"cannot resolve requirements: {proc.stderr.strip()[-1500:]}")
                listing.unlink()
            (tmp / ".complete").touch()
            try:
                tmp.rename(dest)
            except OSError:
                if not (dest / ".complete").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return dest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
