"""A private ``redis-server`` on a loopback port, started and stopped by us."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.devenv.paths import state_dir
from shoal.protocol import UNIX_PATH_MAX


class RedisStartError(RuntimeError):
    """redis-server could not be started."""


class RedisPortTaken(RedisStartError):
    """Something else listens on the port chosen (taken between `free_port` and the server's start)."""


# Below Linux's ephemeral range (32768-60999): a port found free here is not then taken by some process's
# outgoing connection before its server binds it (CI saw a controller fail to bind a port bind(0) had given).
FREE_PORTS = range(20000, 32768)


def free_port() -> int:
    for port in random.sample(FREE_PORTS, 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            return port
    raise OSError(f"no free port on 127.0.0.1 in {FREE_PORTS.start}-{FREE_PORTS.stop - 1}")


def _ping(port: int) -> bool:
    """Whether the server on ``port`` serves commands (PONG: not while it loads its data, say)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _server_pid(port: int) -> int | None:
    """The ``process_id`` of the Redis answering on ``port`` (INFO server), or None if none answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\n" not in data or len(data) < _bulk_end(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    match = re.search(rb"\r\nprocess_id:(\d+)\r\n", data)
    return int(match[1]) if match and data.startswith(b"$") else None


def _bulk_end(data: bytes) -> int:
    """The length of a whole RESP bulk string reply whose header ``data`` starts with (0 if not one)."""
    header = data.split(b"\r\n", 1)[0]
    if not header.startswith(b"$") or not header[1:].isdigit():
        return 0
    return len(header) + 2 + int(header[1:]) + 2


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RedisServer:
    port: int
    directory: Path
    appendonly: bool = True
    unix_socket: bool = False  # also listen on redis.sock in its directory (a short enough path)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)  # if started here

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """The same server on its unix socket (started with ``unix_socket``)."""
        if not self.unix_socket:
            raise RedisStartError("this redis-server listens on no unix socket")
        return f"unix://{self.directory / 'redis.sock'}"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers. It must be this server that answers (its ``process_id``):
        on a port another server took meanwhile, ours cannot bind, exits, and `RedisPortTaken` is raised (two
        clusters never share one Redis). If the start fails or is interrupted (Ctrl-C), what it started is
        stopped, and its directory removed if the start made it."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisStartError("redis-server is not installed: run scripts/bootstrap.sh")
        made = not self.directory.exists()
        try:
            self._start(exe)
        except BaseException:
            self.stop(remove=made)
            raise
        return self

    def _start(self, exe: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        socket_args: list[str] = []
        if self.unix_socket:
            path = str(self.directory / "redis.sock")
            if len(path.encode()) > UNIX_PATH_MAX:
                raise RedisStartError(f"the unix socket path {path} is longer than {UNIX_PATH_MAX} bytes")
            socket_args = ["--unixsocket", path, "--unixsocketperm", "700"]
        logfile = self.directory / "redis.log"
        # Not daemonized: our child, so we know its pid at once and see it exit. In a session of its own (Ctrl-C
        # in a terminal is not for it), and holding none of our descriptors: `devenv up`'s stdout is read by a
        # shell until every holder closes it. It outlives this process if asked to (`devenv up`, `shoal up`); the
        # pid file is how another process stops it then.
        with open(logfile, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                    "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                    "--daemonize", "no", "--pidfile", str(self.directory / "redis.pid"),
                    "--logfile", str(logfile), *socket_args,
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while True:
            if self._proc.poll() is not None:
                tail = _tail(logfile)
                if "Address already in use" in tail:
                    raise RedisPortTaken(f"port {self.port} is taken: redis-server could not listen on it")
                raise RedisStartError(f"redis-server exited with {self._proc.returncode}: {tail.strip()[-400:]}")
            if _server_pid(self.port) == self._proc.pid and _ping(self.port):
                return
            # (Another server answering is not ours: ours will not bind the port, and exits.)
            if time.monotonic() > deadline:
                raise RedisStartError(f"redis-server did not answer on port {self.port} (see {logfile})")
            time.sleep(0.05)

    def stop(self, remove: bool = False) -> None:
        """Stop the server; ``remove`` also deletes its directory (its data: only when it will not start again)."""
        proc, self._proc = self._proc, None
        if proc is not None:  # started by this handle: our child (reaped here)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:  # its directory is not removed under a server still running
                    proc.kill()
                    proc.wait(10)
            if remove:
                shutil.rmtree(self.directory, ignore_errors=True)
            return
        # Started by another process (`devenv up`, `shoal up`): by its pid file, if that is still the server.
        pidfile = self.directory / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        for sig in (signal.SIGTERM, signal.SIGKILL):  # its directory is not removed under a server still running
            if not (pid and _is_redis(pid, self.port)):
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break  # it exited meanwhile
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _is_redis(pid, self.port):
                time.sleep(0.05)
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def _is_redis(pid: int, port: int) -> bool:
    """Whether ``pid`` is still the redis-server we started on ``port`` (a pid file outlives its process, and
    after a reboot its number may belong to anything)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and b"redis-server" in cmdline[0] and f":{port}".encode() in b" ".join(cmdline)


def start_redis(name: str = "redis", appendonly: bool = True, unix_socket: bool = False,
                attempts: int = 5) -> RedisServer:
    """A new server on a free port, in a new directory under the state directory (a port taken between its
    choice and the server's start: another one is tried)."""
    for attempt in range(attempts):
        server = RedisServer(port=free_port(), directory=state_dir() / name / str(time.time_ns()),
                             appendonly=appendonly, unix_socket=unix_socket)
        try:
            return server.start()
        except RedisPortTaken:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
