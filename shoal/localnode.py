"""A node agent on this machine, driven over the real wire: for the demo, the tests and the benchmarks.

``LocalNode`` binds the controller side of the node link (:class:`shoal.nodelink.NodeLink`), starts
``python -m node_agent`` as a child process pointed at it, and stops it (SIGTERM, drain, then kill) on
exit. It also offers the small conveniences a caller wants: deploy a function from a dict of files,
call it, read the status endpoints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal.archive import build_tar_gz
from shoal.blobs import BlobStore
from shoal.localcluster import child_env
from shoal.models import FunctionSpec, Runtime
from shoal.nodelink import NodeLink

SEED_RUNTIME = {"image": "pythonruntime", "path": "/ws", "dependencies": "pip3 install -r requirements.txt",
                "run": "python3 test.py"}


class LocalNode:
    def __init__(self, docker_url: str, node_id: str = "node-1", policy: str = "function",
                 state_dir: Path | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_level: str = "warning") -> None:
        self.docker_url = docker_url
        self.node_id = node_id
        self.policy = policy
        self._tmp = tempfile.TemporaryDirectory(prefix="shoal-node-")
        base = Path(self._tmp.name)
        self.state_dir = state_dir or base / "state"
        self.blobs = BlobStore(base / "blobs")
        self.link = NodeLink(self.blobs)
        self.extra_args = extra_args or []
        self.env = env or {}
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.versions: dict[str, int] = {}

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, wait: float = 60.0) -> LocalNode:
        # (the caller's SHOAL_* settings are left out, as for a LocalCluster's agents: a SHOAL_NODE_TOKEN exported
        # for `shoal up` turned on CURVE, which this link does not speak, and the agent never said hello)
        env = child_env({"DOCKER_HOST": self.docker_url}, self.env)
        self.link.nodes.pop(self.node_id, None)  # a restart: wait for the new agent's hello
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node_agent", "--controller", self.link.url, "--node-id", self.node_id,
             "--state-dir", str(self.state_dir), "--status", "127.0.0.1:0", "--policy", self.policy,
             "--log-level", self.log_level, *self.extra_args],
            env=env, stdin=subprocess.DEVNULL,
        )
        self.link.wait_node(self.node_id, wait)
        return self

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.link.pump(0.05)  # keep the link alive so that the agent can finish its calls
            if self.proc.poll() is None:
                self.proc.kill()
        code = self.proc.wait(timeout=10)
        self.proc = None
        return code

    def close(self) -> None:
        self.stop()
        self.link.close()
        self._tmp.cleanup()

    def __enter__(self) -> LocalNode:
        try:
            return self.start()
        except BaseException:  # an agent that never said hello: stopped, and the link and directory removed
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- conveniences --------------------------------------------------------------------------
    @property
    def status_url(self) -> str:
        return str(self.link.nodes[self.node_id].hello["status_url"])

    def add_runtime(self, name: str | None = None, **fields: Any) -> Runtime:
        data = dict(SEED_RUNTIME, **fields)
        if name:
            data["name"] = name
        runtime = Runtime.from_dict(data)
        self.link.put_runtime(self.node_id, runtime)
        return runtime

    def deploy(self, name: str, files: Mapping[str, str | bytes] | None = None, *, archive: bytes | None = None,
               runtime: str = "pythonruntime", wait: float = 300.0, **spec: Any) -> dict[str, Any]:
        """Upload a function version (files or a ready archive); return the node's FSTATE report."""
        data = archive if archive is not None else build_tar_gz(files or {})
        sha, size = self.blobs.put_bytes(data)
        version = self.versions.get(name, 0) + 1
        self.versions[name] = version
        fn = FunctionSpec.from_dict(dict(spec, name=name, runtime=runtime, sha256=sha, size=size, version=version))
        return self.link.put_function(self.node_id, fn, wait=wait)

    def call(self, name: str, params: Any = None, timeout: float | None = None, wait: float = 300.0) -> dict[str, Any]:
        return self.link.call(self.node_id, name, params, timeout=timeout, wait=wait)

    def submit(self, name: str, params: Any = None, timeout: float | None = None) -> str:
        return self.link.submit(self.node_id, name, params, timeout=timeout)

    def http(self, path: str) -> tuple[int, Any]:
        """GET a status endpoint; JSON bodies are decoded. Keeps the link pumped meanwhile."""
        self.link.pump(0)
        try:
            with urllib.request.urlopen(self.status_url + path, timeout=10) as resp:
                body = resp.read()
                status = resp.status
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            body, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
        return status, json.loads(body) if "json" in ctype else body.decode()

    def status(self) -> dict[str, Any]:
        code, body = self.http("/status")
        if code != 200:
            raise RuntimeError(f"/status answered {code}: {body}")
        return dict(body)
