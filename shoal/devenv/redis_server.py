"""A private ``redis-server`` on a loopback port, started and stopped by us."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.devenv.paths import state_dir


class RedisStartError(RuntimeError):
    """redis-server could not be started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisStartError("redis-server is not installed: run scripts/bootstrap.sh")
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--daemonize", "yes", "--pidfile", str(self.directory / "redis.pid"),
                "--logfile", str(self.directory / "redis.log"),
            ],
            check=True, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _ping(self.port):
                return self
            time.sleep(0.05)
        raise RedisStartError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        pidfile = self.directory / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        subprocess.run(["kill", str(pid)], check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)


def start_redis(name: str = "redis", appendonly: bool = True) -> RedisServer:
    return RedisServer(port=free_port(), directory=state_dir() / name / str(time.time_ns()),
                       appendonly=appendonly).start()
