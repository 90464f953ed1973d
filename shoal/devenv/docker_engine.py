"""A Docker engine to talk to: the one already answering, or a private ``dockerd`` we start; the last of its users
to leave stops it (see :mod:`shoal.devenv.engine_users`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import docker
import requests
from docker.errors import DockerException

from shoal.devenv import procs
from shoal.devenv.engine_users import EngineUsers, process_lease
from shoal.devenv.paths import state_dir

API_VERSION = "1.41"
LOG_KEEP = 16 << 20  # bytes of dockerd.log past which a start moves it to dockerd.log.1


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
    """A handle on a Docker engine. On the private engine it holds a lease, and ``stop()`` releases it: the
    engine stops when its last user has. Any other engine is not ours: ``stop()`` leaves it alone."""

    url: str
    lease: str | None = None
    root: Path | None = None  # the private engine's state directory (with a lease)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # the daemon, if this handle started it

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version=API_VERSION, timeout=120)

    def env(self) -> dict[str, str]:
        """Environment for the ``docker`` CLI (newer than the engine: pin the API version)."""
        return {"DOCKER_HOST": self.url, "DOCKER_API_VERSION": API_VERSION}

    def keep(self, name: str) -> None:
        """Hold the engine under ``name`` instead of this process's lease, past this process's end (``up``
        commands exit at once; their ``down`` releases ``name``)."""
        if self.lease is None or self.root is None:
            return
        with EngineUsers(self.root).locked() as users:
            users.add(name)
            users.remove(self.lease)
        self.lease = name
        self._proc = None  # (the daemon outlives this process: found by its pid file when it is stopped)

    def stop(self) -> None:
        if self.lease is None or self.root is None:
            return
        release(self.root, self.lease, self._proc)
        self.lease = None
        self._proc = None


def release(root: Path, lease: str, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Drop ``lease`` on the private engine under ``root``; the last user out stops it (True then)."""
    with EngineUsers(root).locked() as users:
        users.remove(lease)
        if users.live():
            return False
        stop_private(root, proc)
        return True


def stop_private(root: Path, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Stop the private dockerd: through ``proc`` if this process started it (and so reaps it), else by its pid
    file, if that pid is still a dockerd of this data root."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        return
    # (Ours exited already, or was never ours: another user may have started the one running now.)
    pid = running_dockerd(root)
    if pid is not None:
        procs.stop(procs.identity(pid), timeout=30)


def running_dockerd(root: Path) -> int | None:
    """The pid of the private dockerd of ``root`` if one runs (its pid file names a dockerd of this data root)."""
    try:
        pid = int((root / "dockerd.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None  # not running (dockerd removes its pid file when it exits)
    if any(arg.endswith(b"dockerd") for arg in cmdline) and str(root / "data").encode() in cmdline:
        return pid
    return None


def remove_stale_pidfile(root: Path) -> bool:
    """Remove the private engine's pid file if no dockerd of ``root`` runs (True then). Call with the users'
    lock held, before starting one: a dockerd killed (SIGKILL after its stop timed out, a reboot) leaves its pid
    file behind, and a new dockerd refuses to start while the pid it names is a running process, whatever that
    process is by then."""
    if running_dockerd(root) is not None:
        return False
    try:
        (root / "dockerd.pid").unlink()
    except FileNotFoundError:
        return False
    return True


#: How long an engine named by $DOCKER_HOST may take to answer (a busy engine is slow, not absent).
def open_log(root: Path) -> BinaryIO:
    """``root``'s dockerd.log, to append to; appended at every start, it is first moved to dockerd.log.1 once past
    LOG_KEEP bytes (it grew without end)."""
    path = root / "dockerd.log"
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > LOG_KEEP:
            path.replace(root / "dockerd.log.1")
    return open(path, "ab")


EXPLICIT_ENGINE_WAIT = 60.0


def ensure_engine() -> DockerEngine:
    """Use ``$DOCKER_HOST``, the system socket, or our private socket if one answers; else start dockerd.

    An engine named by ``$DOCKER_HOST`` is waited for, never replaced: starting a second daemon because a
    busy one answered slowly would leave two engines (and their mounts) fighting over the same host.
    """
    root = state_dir() / "docker"
    private = f"unix://{root}/docker.sock"
    explicit = os.environ.get("DOCKER_HOST", "")
    if explicit and explicit != private:  # (the private engine named explicitly is held as below)
        deadline = time.monotonic() + EXPLICIT_ENGINE_WAIT
        while not _answers(explicit):
            if time.monotonic() > deadline:
                raise EngineError(f"DOCKER_HOST={explicit} does not answer (waited {EXPLICIT_ENGINE_WAIT:g} s)")
            time.sleep(1.0)
        return DockerEngine(url=explicit)
    if not explicit and _answers("unix:///var/run/docker.sock"):
        return DockerEngine(url="unix:///var/run/docker.sock")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    with EngineUsers(root).locked() as users:  # (held while starting: one daemon per socket)
        lease = process_lease()
        if _answers(private) or _answers_in_time(root, private):
            users.add(lease)
            return DockerEngine(url=private, lease=lease, root=root)
        users.add(lease)  # before the start: a daemon is never left without a lease on it
        try:
            remove_stale_pidfile(root)
            proc = _start_dockerd(root, private)
        except BaseException:
            users.remove(lease)
            raise
        return DockerEngine(url=private, lease=lease, root=root, _proc=proc)


def _answers_in_time(root: Path, private: str) -> bool:
    """A private dockerd that runs but did not answer at once is busy, not absent: it is waited for (a second
    daemon started on its socket would fight it over the same data root). False if none runs."""
    pid = running_dockerd(root)
    if pid is None:
        return False
    deadline = time.monotonic() + EXPLICIT_ENGINE_WAIT
    while not _answers(private):
        if running_dockerd(root) is None:
            return False  # it ended meanwhile: start one
        if time.monotonic() > deadline:
            raise EngineError(f"the private dockerd (pid {pid}) runs but does not answer on {private} "
                              f"(waited {EXPLICIT_ENGINE_WAIT:g} s); see {root / 'dockerd.log'}")
        time.sleep(1.0)
    return True


def _start_dockerd(root: Path, private: str) -> subprocess.Popen[bytes]:
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineError("dockerd is not installed: run scripts/bootstrap.sh (installs Debian's docker.io)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    # exec-root holds unix sockets: keep its path short, and one per data root (two engines must not share it).
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    exec_root = Path(f"/run/shoal-docker-{tag}") if Path("/run").is_dir() else root / "exec"
    exec_root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    sock.unlink(missing_ok=True)
    log = open_log(root)
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
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineError(f"dockerd exited with {proc.returncode}; see {root / 'dockerd.log'}")
            if _answers(private):
                return proc
            time.sleep(0.2)
        raise EngineError(f"dockerd did not answer within 60 s; see {root / 'dockerd.log'}")
    except BaseException:
        # Ctrl-C included: a dockerd left running here would be found answering next time and taken for one
        # somebody else started, so nothing would ever stop it.
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
