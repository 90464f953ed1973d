"""A Docker engine to talk to: the one already answering, or a private ``dockerd`` we start and stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import requests
from docker.errors import DockerException

from shoal.devenv.paths import state_dir

API_VERSION = "1.41"


class EngineError(RuntimeError):
    """The Docker engine could not be found or started."""


def _answers(url: str) -> bool:
    if url.startswith("unix://") and not Path(url[len("unix://"):]).exists():
        return False
    try:
        client = docker.DockerClient(base_url=url, version=API_VERSION, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (DockerException, requests.RequestException):
        return False


@dataclass
class DockerEngine:
    """A handle on a Docker engine; ``stop()`` only stops a daemon this handle started."""

    url: str
    started: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version=API_VERSION, timeout=120)

    def env(self) -> dict[str, str]:
        """Environment for the ``docker`` CLI (newer than the engine: pin the API version)."""
        return {"DOCKER_HOST": self.url, "DOCKER_API_VERSION": API_VERSION}

    def stop(self) -> None:
        if not self.started or self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None
        self.started = False


def ensure_engine() -> DockerEngine:
    """Use ``$DOCKER_HOST``, the system socket, or our private socket if one answers; else start dockerd."""
    candidates = [os.environ.get("DOCKER_HOST", ""), "unix:///var/run/docker.sock"]
    root = state_dir() / "docker"
    private = f"unix://{root}/docker.sock"
    candidates.append(private)
    for url in candidates:
        if url and _answers(url):
            return DockerEngine(url=url)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineError("dockerd is not installed: run scripts/bootstrap.sh (installs Debian's docker.io)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    # exec-root holds unix sockets: keep its path short.
    exec_root = Path("/run/shoal-docker") if Path("/run").is_dir() else root / "exec"
    exec_root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    sock.unlink(missing_ok=True)
    log = open(root / "dockerd.log", "ab")
    proc = subprocess.Popen(
        [
            dockerd,
            "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--data-root", str(root / "data"), "--exec-root", str(exec_root),
            "--pidfile", str(root / "dockerd.pid"), "-H", private,
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"dockerd exited with {proc.returncode}; see {root / 'dockerd.log'}")
        if _answers(private):
            return DockerEngine(url=private, started=True, _proc=proc)
        time.sleep(0.2)
    proc.kill()
    raise EngineError(f"dockerd did not answer within 60 s; see {root / 'dockerd.log'}")
