"""The base python runtime image, built offline (no registry is reachable) and cached.

``mmdebstrap`` builds a Debian bookworm root filesystem with python3 and pip from the machine's apt
sources; ``docker import`` turns it into an image. The tarball is cached under the state directory, so
a new Docker data root re-imports it in seconds, and an engine that already has the image skips both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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


def _build_tarball(out: Path) -> None:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ImageBuildError("mmdebstrap is not installed: run scripts/bootstrap.sh")
    # mmdebstrap picks its output format from the file name: keep the .tar suffix.
    tmp = out.with_name(out.stem + ".partial.tar")
    cmd = [exe, "--variant=apt", "--quiet", f"--include={','.join(PACKAGES)}"]
    cmd += [f"--dpkgopt=path-exclude={pattern}" for pattern in EXCLUDES]
    cmd += ["bookworm", str(tmp)]
    try:
        # Bounded: it takes under a minute here, and a package mirror that stops answering must not hang CI.
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
                                timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(f"mmdebstrap did not finish within {BUILD_TIMEOUT:g} s") from None
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(f"mmdebstrap failed ({result.returncode}): {result.stderr[-2000:]}")
    tmp.rename(out)


def ensure_image(client: docker.DockerClient, docker_host: str, log: bool = True) -> str:
    """Make sure ``IMAGE`` (and its seed alias) exist in the engine; return how: present/imported/built."""
    want = recipe_hash()
    try:
        image = client.images.get(IMAGE)
        if image.labels.get(LABEL) == want:
            if SEED_ALIAS not in {t.split(":")[0] for t in image.tags}:
                image.tag(SEED_ALIAS)
            return "present"
    except ImageNotFound:
        pass
    cache = state_dir() / "images"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"python-bookworm-{want}.tar"
    how = "imported"
    if not tarball.is_file():
        how = "built"
        if log:
            # stderr: stdout may be read by a script (``python -m shoal.devenv up`` prints export lines there)
            print(f"shoal: building the python runtime image offline with mmdebstrap ({tarball})", file=sys.stderr,
                  flush=True)
        _build_tarball(tarball)
    repo, tag = IMAGE.split(":")
    # The SDK's import streams the tarball in a way dockerd 20.10 rejects; the CLI does it right.
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise ImageBuildError("the docker CLI is not installed: run scripts/bootstrap.sh")
    env = dict(os.environ, DOCKER_HOST=docker_host, DOCKER_API_VERSION="1.41")
    result = subprocess.run(
        [docker_cli, "import", "--change", f"LABEL {LABEL}={want}", str(tarball), f"{repo}:{tag}"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False,
    )
    if result.returncode != 0:
        raise ImageBuildError(f"docker import failed: {result.stderr.strip()[-2000:]}")
    image = client.images.get(IMAGE)
    image.tag(SEED_ALIAS)
    return how
