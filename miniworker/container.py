"""The one container a miniworker owns: created with the docker SDK's low-level API, locked down."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, NotFound

from miniworker.errors import ContainerError
from miniworker.spec import MiniworkerSpec
from shoal.fstree import TreeError, remove_tree

LABEL_NODE = "org.shoal.node"
LABEL_MW = "org.shoal.miniworker"
#: Where the miniworker's directory appears inside the container.
MOUNT = "/shoal"
SOCKET_NAME = "mw.sock"
ENGINE_ERRORS = (DockerException, requests.RequestException)


def container_env(code_path: str) -> dict[str, str]:
    return {
        "PYTHONPATH": f"/opt/shoal:{MOUNT}/deps",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/tmp",
        # The runtime's own dependency command (`pip3 install -r requirements.txt`) installs offline from
        # the wheelhouse the node resolved on the host, into a writable directory on PYTHONPATH.
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": f"{MOUNT}/wheels",
        "PIP_TARGET": f"{MOUNT}/deps",
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PIP_NO_WARN_SCRIPT_LOCATION": "1",
        "SHOAL_FUNCTION_PATH": code_path,
    }


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


class Container:
    def __init__(self, spec: MiniworkerSpec) -> None:
        self.spec = spec
        self.api = docker.APIClient(base_url=spec.docker_url, version=spec.docker_api_version, timeout=60)
        self.id: str | None = None
        self.workdir = Path(spec.workdir)
        uid, _, gid = spec.limits.user.partition(":")
        self.uid = int(uid) if uid.isdigit() else 0
        self.gid = int(gid) if gid.isdigit() else self.uid

    @property
    def socket_path(self) -> Path:
        return self.workdir / SOCKET_NAME

    def prepare_workdir(self) -> None:
        for sub in ("deps", "wheels", "code"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        _chown_tree(self.workdir, self.uid, self.gid)

    def put_function(self, code_dir: str, wheels_dir: str) -> None:
        """Copy a function's code and wheelhouse into the directories the container sees."""
        shutil.copytree(code_dir, self.workdir / "code", symlinks=True, dirs_exist_ok=True)
        shutil.copytree(wheels_dir, self.workdir / "wheels", dirs_exist_ok=True)
        _chown_tree(self.workdir / "code", self.uid, self.gid)
        _chown_tree(self.workdir / "wheels", self.uid, self.gid)

    def create_and_start(self, image: str, path: str) -> str:
        spec, limits = self.spec, self.spec.limits
        binds: dict[str, dict[str, str]] = {
            str(self.workdir): {"bind": MOUNT, "mode": "rw"},
            str(self.workdir / "code"): {"bind": path, "mode": "rw"},
        }
        for name, host_dir in spec.src_dirs.items():
            binds[host_dir] = {"bind": f"/opt/shoal/{name}", "mode": "ro"}
        try:
            host_config = self.api.create_host_config(
                binds=binds,
                network_mode="none",
                mem_limit=limits.memory,
                memswap_limit=limits.memory,
                nano_cpus=int(limits.cpus * 1e9),
                pids_limit=limits.pids,
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                read_only=True,
                tmpfs={"/tmp": f"rw,nosuid,nodev,size={limits.tmpfs_size},mode=1777"},
                init=True,
                # What a function writes to the process's own stdout (not its call's, which the runner keeps)
                # lands in the container's log: bounded, or it grows on the host's disk for as long as it runs.
                log_config={"type": "local", "config": {"max-size": "1m", "max-file": "1", "compress": "false"}},
            )
            created = self.api.create_container(
                image,
                command=["python3", "-m", "miniworker.runner", f"{MOUNT}/{SOCKET_NAME}"],
                user=limits.user,
                working_dir=path,
                environment=container_env(path),
                labels={LABEL_NODE: spec.node_id, LABEL_MW: spec.mw_id},
                name=f"shoal-{spec.node_id}-{spec.mw_id}",
                host_config=host_config,
                network_disabled=True,
            )
            self.id = str(created["Id"])
            self.api.start(self.id)
        except ENGINE_ERRORS as exc:
            raise ContainerError(f"cannot start a container of image {image!r}: {exc}") from None
        return self.id

    def state(self) -> dict[str, Any]:
        if self.id is None:
            return {}
        try:
            return dict(self.api.inspect_container(self.id).get("State", {}))
        except NotFound:
            return {"Status": "removed"}
        except ENGINE_ERRORS as exc:
            return {"Status": "unknown", "Error": str(exc)}

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exit_reason(self) -> str:
        """Why the container is gone, in words (exit code, OOM kill, removal)."""
        state = self.state()
        if not state:
            return "no container"
        if state.get("Running"):
            return "container is running but its runner closed the connection"
        if state.get("Status") == "removed":
            return "container was removed from outside"
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            return f"container was killed for exceeding its memory limit ({self.spec.limits.memory})"
        if code == 137:
            return "container was killed (SIGKILL, exit code 137)"
        return f"container exited with code {code}"

    def kill(self) -> None:
        if self.id is None:
            return
        try:
            self.api.kill(self.id)
        except (NotFound, APIError):
            pass  # already stopped or gone: nothing left to kill
        except ENGINE_ERRORS as exc:
            raise ContainerError(f"cannot kill container {self.id[:12]}: {exc}") from None

    def remove(self) -> None:
        if self.id is not None:
            try:
                self.api.remove_container(self.id, force=True)
            except NotFound:
                pass  # removed from outside already
            except ENGINE_ERRORS as exc:
                raise ContainerError(f"cannot remove container {self.id[:12]}: {exc}") from None
            self.id = None
        try:
            remove_tree(self.workdir)
        except TreeError as exc:
            raise ContainerError(f"cannot remove its directory: {exc}") from None

    def close(self) -> None:
        self.api.close()
