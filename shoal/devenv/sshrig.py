"""An sshd of our own on several loopback addresses, each a "host" for Ansible (local inventory, tests).

Keys, config and pid file live under the state directory; ``start`` is idempotent, ``stop`` stops only
this sshd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.devenv.paths import state_dir

ADDRESSES = ("127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13")
PORT = 2222


class RigError(RuntimeError):
    pass


@dataclass
class SshRig:
    root: Path
    addresses: tuple[str, ...] = ADDRESSES
    port: int = PORT

    @property
    def key(self) -> Path:
        return self.root / "client_key"

    @property
    def pidfile(self) -> Path:
        return self.root / "sshd.pid"

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.addresses[0], self.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def start(self) -> SshRig:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise RigError("sshd is not installed: apt-get install openssh-server")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        host_key = self.root / "host_ed25519"
        if not host_key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        authorized = self.root / "authorized_keys"
        authorized.write_text(Path(str(self.key) + ".pub").read_text())
        os.chmod(authorized, 0o600)
        if self._answers():
            return self
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            *(f"ListenAddress {a}:{self.port}" for a in self.addresses),
            f"HostKey {host_key}", f"PidFile {self.pidfile}", f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "MaxStartups 100:30:200", "MaxSessions 100",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", "",
        ]))
        subprocess.run([sshd, "-f", str(config)], check=True)
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline:
                raise RigError("the rig's sshd did not answer")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # already gone
        self.pidfile.unlink(missing_ok=True)


def rig() -> SshRig:
    return SshRig(state_dir() / "sshrig")
