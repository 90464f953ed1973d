"""An sshd of our own on several loopback addresses, each a "host" for Ansible (local inventory, tests).

Keys, config and pid file live under the state directory; ``start`` is idempotent, ``stop`` stops only
this sshd: the pid its pid file names is recorded with its start time (``sshd.json``, `shoal.devenv.procs`), and
a pid file that outlived its sshd (a crash, a reboot) names nothing we signal.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.devenv import procs
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

    @property
    def record(self) -> Path:
        """Our sshd's identity (`procs.identity`): its pid and start time."""
        return self.root / "sshd.json"

    @property
    def config(self) -> Path:
        return self.root / "sshd_config"

    def running(self) -> dict[str, int] | None:
        """Our sshd's identity if it runs: the process its pid file names, if it is the one recorded when it
        started (or, with no record, from before there were any, an sshd of our config). None else."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            record = json.loads(self.record.read_text())
            who = {"pid": int(record["pid"]), "start": int(record["start"])}
        except (OSError, ValueError, KeyError, TypeError):
            return procs.identity(pid) if self._is_our_sshd(pid) else None
        return who if who["pid"] == pid and procs.alive(who) else None

    def _is_our_sshd(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"sshd" in cmdline and str(self.config).encode() in cmdline

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
        if self.running() is not None:
            return self  # (ours: it answers as it did, with the keys above)
        if self._answers():
            raise RigError(f"something else listens on {self.addresses[0]}:{self.port}, not the rig's sshd "
                           f"(its pid file: {self.pidfile}); stop it first")
        self.pidfile.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        config = self.config
        config.write_text("\n".join([
            *(f"ListenAddress {a}:{self.port}" for a in self.addresses),
            f"HostKey {host_key}", f"PidFile {self.pidfile}", f"AuthorizedKeysFile {authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "MaxStartups 100:30:200", "MaxSessions 100",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", "",
        ]))
        subprocess.run([sshd, "-f", str(config)], check=True)  # (returns once it has daemonized)
        deadline = time.monotonic() + 10
        while True:
            try:  # its pid file is written before it accepts connections
                pid = int(self.pidfile.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid and self._is_our_sshd(pid) and self._answers():
                self.record.write_text(json.dumps(procs.identity(pid)))
                return self
            if time.monotonic() > deadline:
                raise RigError(f"the rig's sshd did not answer (pid file: {self.pidfile})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop our sshd if it runs (nothing else: its pid file may name another process by now)."""
        who = self.running()
        if who is not None:
            procs.stop(who, timeout=10)
        self.pidfile.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def rig() -> SshRig:
    return SshRig(state_dir() / "sshrig")
