"""The base python runtime image, built offline (no registry is reachable) and cached.

``mmdebstrap`` builds a Debian bookworm root filesystem with python3 and pip from Debian's archive
(deb.debian.org, mmdebstrap's default: the package registry, not an image registry; through the proxy the
machine's apt is configured with, if any); ``docker import`` turns it into an image. The tarball is cached
under the state directory, so a new Docker data root re-imports it in seconds, and an engine that already has
the image skips both.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from shoal.devenv.paths import state_dir

IMAGE = "shoal/python:bookworm"
# The name the main seed's example registers its runtime with; present on every node.
SEED_ALIAS = "pythonruntime"
PACKAGES = ("python3", "python3-pip")
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
RECIPE = f"bookworm|apt|{','.join(PACKAGES)}|{','.join(EXCLUDES)}|v1"
LABEL = "org.shoal.recipe"


class ImageBuildError(RuntimeError):
    """The runtime image could not be built."""


def recipe_hash() -> str:
    return hashlib.sha256(RECIPE.encode()).hexdigest()[:16]


BUILD_TIMEOUT = 900.0  # seconds mmdebstrap may take
IMPORT_TIMEOUT = 300.0  # seconds `docker import` may take (a wedged engine must not hang a run)
STOP_GRACE = 30.0  # seconds mmdebstrap has to clean up (unmount, remove its directory) after a SIGTERM


def _build_tarball(out: Path) -> None:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ImageBuildError("mmdebstrap is not installed: run scripts/bootstrap.sh")
    # mmdebstrap picks its output format from the file name: keep the .tar suffix. Its own name per build: it
    # truncates its target as it starts.
    tmp = out.with_name(f"{out.stem}.partial-{os.getpid()}.tar")
    cmd = [exe, "--variant=apt", "--quiet", f"--include={','.join(PACKAGES)}"]
    cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDES]
    cmd += [f'--aptopt={name} "{value}"' for name, value in _apt_proxies().items()]
    cmd += ["bookworm", str(tmp)]
    # In a session of its own, so that it and the children holding its mounts are stopped as a group (SIGTERM
    # first: it cleans up on it) when the build is cut short: a timeout, Ctrl-C, a SIGTERM of the run.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        # Bounded: it takes under a minute here, and a package mirror that stops answering must not hang CI.
        _, err = proc.communicate(timeout=BUILD_TIMEOUT)
    except BaseException as exc:
        _stop_group(proc)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ImageBuildError(f"mmdebstrap did not finish within {BUILD_TIMEOUT:g} s") from None
        raise
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(f"mmdebstrap failed ({proc.returncode}): {err[-2000:]}")
    tmp.rename(out)


def _apt_proxies() -> dict[str, str]:
    """The proxies the machine's apt is configured with (mmdebstrap's apt reads a configuration of its own)."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        return {}
    names = {"Acquire::http::Proxy": "HTTP", "Acquire::https::Proxy": "HTTPS"}
    args = [arg for name, var in names.items() for arg in (var, name)]
    try:
        out = subprocess.run([apt_config, "shell", *args], capture_output=True, text=True, timeout=30,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = dict(re.findall(r"^(HTTPS?)='([^']*)'$", out, re.M))
    return {name: found[var] for name, var in names.items() if found.get(var)}


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to whatever is left of it after STOP_GRACE seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the whole group is gone
    try:
        proc.communicate(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        pass  # killed below
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # it, if it is still there, and children it left behind
    except ProcessLookupError:
        pass  # nothing left
    proc.wait()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing), held for the block: one build at a time."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _present(client: docker.DockerClient, want: str) -> bool:
    """Whether the engine has ``IMAGE`` of this recipe (tagged with its seed alias too, if it was not)."""
    try:
        image = client.images.get(IMAGE)
    except ImageNotFound:
        return False
    if image.labels.get(LABEL) != want:
        return False
    if SEED_ALIAS not in {t.split(":")[0] for t in image.tags}:
        image.tag(SEED_ALIAS)
    return True


def ensure_image(client: docker.DockerClient, docker_host: str, log: bool = True) -> str:
    """Make sure ``IMAGE`` (and its seed alias) exist in the engine; return how: present/imported/built.
    Runs at once (``make demo`` and ``make test``, a test's workers) build and import one at a time."""
    want = recipe_hash()
    if _present(client, want):
        return "present"
    cache = state_dir() / "images"
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".python-bookworm-{want}.lock"):
        if _present(client, want):  # another run imported it meanwhile
            return "present"
        tarball = cache / f"python-bookworm-{want}.tar"
        how = "imported"
        if not tarball.is_file():
            how = "built"
            if log:
                # stderr: stdout may be read by a script (``python -m shoal.devenv up`` prints export lines there)
                print(f"shoal: building the python runtime image offline with mmdebstrap ({tarball})",
                      file=sys.stderr, flush=True)
            _build_tarball(tarball)
        _import(tarball, docker_host, want)
    client.images.get(IMAGE).tag(SEED_ALIAS)
    return how


def _import(tarball: Path, docker_host: str, want: str) -> None:
    """``docker import`` of the cached tarball. When the import fails and the tarball does not read as a tar
    either, it is removed, so the next run builds it again instead of failing the same way; a good one is kept
    (the engine may have failed for a reason of its own: a full disk, a restart)."""
    repo, tag = IMAGE.split(":")
    # The SDK's import streams the tarball in a way dockerd 20.10 rejects; the CLI does it right.
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise ImageBuildError("the docker CLI is not installed: run scripts/bootstrap.sh")
    env = dict(os.environ, DOCKER_HOST=docker_host, DOCKER_API_VERSION="1.41")
    try:
        result = subprocess.run(
            [docker_cli, "import", "--change", f"LABEL {LABEL}={want}", str(tarball), f"{repo}:{tag}"],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False, timeout=IMPORT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"docker import did not finish within {IMPORT_TIMEOUT:g} s") from None
    if result.returncode != 0:
        if _readable_tar(tarball):
            raise ImageBuildError(f"docker import failed: {result.stderr.strip()[-2000:]}")
        tarball.unlink(missing_ok=True)
        raise ImageBuildError(f"docker import failed, and the cached tarball does not read as a tar (removed: the "
                              f"next run builds it again): {result.stderr.strip()[-2000:]}")


def _readable_tar(path: Path) -> bool:
    """Whether ``path`` reads to its end as a tar archive (``tar -t``: its members listed, none extracted)."""
    try:
        return subprocess.run(["tar", "-tf", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=300, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
