"""A private ``redis-server`` on a loopback port, started and stopped by us."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.devenv.paths import state_dir
from shoal.protocol import UNIX_PATH_MAX


class RedisStartError(RuntimeError):
    """redis-server could not be started."""


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
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    directory: Path
    appendonly: bool = True
    unix_socket: bool = False  # also listen on redis.sock in its directory (a short enough path)

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
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisStartError("redis-server is not installed: run scripts/bootstrap.sh")
        self.directory.mkdir(parents=True, exist_ok=True)
        socket_args: list[str] = []
        if self.unix_socket:
            path = str(self.directory / "redis.sock")
            if len(path.encode()) > UNIX_PATH_MAX:
                raise RedisStartError(f"the unix socket path {path} is longer than {UNIX_PATH_MAX} bytes")
            socket_args = ["--unixsocket", path, "--unixsocketperm", "700"]
        subprocess.run(
            [
                exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--daemonize", "yes", "--pidfile", str(self.directory / "redis.pid"),
                "--logfile", str(self.directory / "redis.log"), *socket_args,
            ],
            check=True, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _ping(self.port):
                return self
            time.sleep(0.05)
        raise RedisStartError(f"redis-server did not answer on port {self.port}")

    def stop(self, remove: bool = False) -> None:
        """Stop the server; ``remove`` also deletes its directory (its data: only when it will not start again)."""
        pidfile = self.directory / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _is_redis(pid, self.port):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _is_redis(pid, self.port):
                time.sleep(0.05)
            if _is_redis(pid, self.port):  # its directory is not removed under a server still running
                os.kill(pid, signal.SIGKILL)
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


def start_redis(name: str = "redis", appendonly: bool = True, unix_socket: bool = False) -> RedisServer:
    return RedisServer(port=free_port(), directory=state_dir() / name / str(time.time_ns()),
                       appendonly=appendonly, unix_socket=unix_socket).start()
