"""The `shoal` command line against a real cluster, and `shoal up | status | down`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from shoal.devenv.redis_server import free_port
from shoal.localcluster import LocalCluster
from tests.controller.conftest import ECHO

pytestmark = pytest.mark.docker
DICE = Path(__file__).resolve().parents[2] / "examples" / "runtimes" / "python" / "dice"


def shoal(url: str, *args: str, env: dict[str, str] | None = None, check: bool = True) -> Any:
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", "--url", url, "--json", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **(env or {})))
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else proc


def test_cli_drives_runtimes_functions_calls_and_nodes(make_cluster: Any, tmp_path: Path) -> None:
    cluster: LocalCluster = make_cluster(agents=1)
    url = cluster.url
    rt = shoal(url, "runtime", "create", "--image", "pythonruntime", "--run", "python3 test.py",
               "--dependencies", "pip3 install -r requirements.txt")
    assert rt["name"] == "pythonruntime"
    assert [r["name"] for r in shoal(url, "runtime", "list")] == ["pythonruntime"]
    fn = shoal(url, "function", "upload", "dice", str(DICE), "--runtime", "pythonruntime")
    assert fn["name"] == "dice" and fn["version"] == 1
    call = shoal(url, "invoke", "dice", "--params", '{"roll": "4d6"}')
    assert call["status"] == "DONE" and len(json.loads(call["result"])) == 4
    echo_dir = tmp_path / "echo"
    echo_dir.mkdir()
    (echo_dir / "handler.py").write_text(ECHO["handler.py"])
    shoal(url, "function", "upload", "echo", str(echo_dir), "--runtime", "pythonruntime",
          "--entrypoint", "handler:handler")
    accepted = shoal(url, "invoke", "echo", "--params", "[1, 2]", "--async")
    waited = shoal(url, "calls", "wait", accepted["id"])
    assert waited["result"] == {"echo": [1, 2]}
    listed = shoal(url, "calls", "list", "--function", "echo", "--json")  # --json after the command too
    assert [c["id"] for c in listed["calls"]] == [accepted["id"]]
    assert shoal(url, "nodes", "list")[0]["node_id"] == cluster.node_ids[0]
    lines = tmp_path / "params.jsonl"
    lines.write_text("".join(f'{{"i": {i}}}\n' for i in range(1500)) + "\n")  # two requests (1,000 at most each)
    batch = shoal(url, "invoke", "echo", "--batch", str(lines))
    assert len(batch) == 1500 and len({b["id"] for b in batch}) == 1500
    assert shoal(url, "calls", "wait", batch[-1]["id"])["result"] == {"echo": {"i": 1499}}
    # One batch shares a millisecond: a listing goes on across pages without skipping any.
    listed = shoal(url, "calls", "list", "--function", "echo", "--limit", "700", "--json")
    assert len(listed["calls"]) == 700 and listed["next_cursor"]
    rest = shoal(url, "calls", "list", "--function", "echo", "--limit", "1500", "--json")  # beyond one page
    assert len(rest["calls"]) == 1500 and {c["id"] for c in rest["calls"]} >= {c["id"] for c in listed["calls"]}
    lines.write_text('{"i": 1}\n{oops\n')
    bad = shoal(url, "invoke", "echo", "--batch", str(lines), check=False)
    assert bad.returncode == 2 and f"error: {lines}:2: not JSON" in bad.stderr
    bad = shoal(url, "invoke", "nope", check=False)
    assert bad.returncode == 2 and "HTTP 404" in bad.stderr
    bad = shoal(url, "invoke", "echo", "--params", "{not json", check=False)
    assert bad.returncode == 2 and "--params must be JSON" in bad.stderr
    # A call that fails: `calls wait` exits 1 as `invoke` does, with the call on stdout.
    (echo_dir / "handler.py").write_text("def handler(params):\n    raise ValueError('no')\n")
    shoal(url, "function", "upload", "boom", str(echo_dir), "--runtime", "pythonruntime",
          "--entrypoint", "handler:handler")
    failed = shoal(url, "calls", "wait", shoal(url, "invoke", "boom", "--async")["id"], check=False)
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "FAILED"


@pytest.mark.xdist_group("shoal-up")
def test_shoal_up_status_down(tmp_path: Path, docker_client: Any) -> None:
    # With an API token: every command, `status` too, presents it.
    env = {"SHOAL_STATE_DIR": str(tmp_path / "state"), "SHOAL_API_TOKEN": "a-long-enough-api-token-for-up"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    up = shoal(url, "up", "--agents", "2", "--port", str(port), "--name", f"up{port}", env=env)
    try:
        assert up["url"] == url and len(up["agents"]) == 2
        status = shoal(url, "status", env=env)
        assert len([n for n in status["nodes"] if n["state"] == "ready"]) == 2
        # A call through it (its state directory is deep here: its unix sockets must still bind).
        shoal(url, "runtime", "create", "--image", "pythonruntime", env=env)
        echo_dir = tmp_path / "echo"
        echo_dir.mkdir()
        (echo_dir / "handler.py").write_text(ECHO["handler.py"])
        shoal(url, "function", "upload", "echo", str(echo_dir), "--runtime", "pythonruntime",
              "--entrypoint", "handler:handler", env=env)
        assert shoal(url, "invoke", "echo", "--params", "7", env=env)["result"] == {"echo": 7}
    finally:
        shoal(url, "down", env=env)
    for pid in [up["controller"]["pid"], *(a["pid"] for a in up["agents"].values())]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert shoal(url, "status", env=env, check=False).returncode == 2


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    archive = tmp_path / "f.tar.gz"
    archive.write_bytes(b"x")
    for args, needle in [(("function", "upload", "f", str(archive), "--runtime", "r"), "cannot reach"),
                         (("runtime", "get", "a b/c"), "cannot reach"),
                         (("calls", "get", "../x"), "cannot reach")]:
        done = shoal(closed, *args, check=False)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    lines = tmp_path / "latin1.jsonl"
    lines.write_bytes(b'{"a": "\xe9"}\n')
    done = shoal(closed, "invoke", "f", "--batch", str(lines), check=False)
    assert done.returncode == 2 and "cannot read" in done.stderr and "Traceback" not in done.stderr


def test_shoal_down_signals_only_the_processes_shoal_up_started(tmp_path: Path) -> None:
    """A record outlives its processes (a crash, a reboot) and their numbers are reused: `down` must not kill
    what now holds them, and `up` must not refuse to start because of them."""
    from shoal.devenv import procs

    state = tmp_path / "state"
    state.mkdir()
    redis_dir = state / "redis" / "1"
    redis_dir.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        alive = procs.identity(bystander.pid)
        record = {"url": "http://127.0.0.1:1", "controller": dict(alive, start=alive["start"] - 1),
                  "agents": {"n1": {"pid": bystander.pid, "start": 1}}, "redis_port": free_port(),
                  "redis_dir": str(redis_dir), "base": str(state / "cluster")}
        (state / "cluster.json").write_text(json.dumps(record))
        done = shoal("http://127.0.0.1:1", "down", env={"SHOAL_STATE_DIR": str(state)})
        assert done == {"down": "http://127.0.0.1:1"} and bystander.poll() is None
        assert not (state / "cluster.json").exists() and not redis_dir.exists()
        # A record whose process does run is a cluster that is up: `up` refuses before starting anything.
        (state / "cluster.json").write_text(json.dumps(dict(record, controller=alive)))
        up = shoal("http://127.0.0.1:1", "up", env={"SHOAL_STATE_DIR": str(state)}, check=False)
        assert up.returncode == 2 and "already up" in up.stderr and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.xdist_group("shoal-up")
def test_shoal_up_on_a_port_in_use_says_so_and_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = shoal(f"http://127.0.0.1:{port}", "up", "--port", str(port), env={"SHOAL_STATE_DIR": str(state)},
                     check=False)
    assert done.returncode == 2 and f"port {port} is in use" in done.stderr and "Traceback" not in done.stderr
    assert not (state / "cluster.json").exists()
    assert not list((state / "redis").glob("*/*"))  # its Redis was stopped and its data removed


@pytest.mark.xdist_group("shoal-up")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_shoal_up_stopped_by_a_signal_while_it_starts_leaves_nothing_running(tmp_path: Path, signum: int) -> None:
    """`timeout 30 shoal up`, a CI job cancelled, a terminal closed while the agents joined: the CLI died at once,
    leaving Redis, the controller and the agents running with no record `shoal down` could use."""
    state = tmp_path / "state"
    port = free_port()
    name = f"sig{port}"
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "--url", f"http://127.0.0.1:{port}", "--json", "up",
                             "--agents", "2", "--port", str(port), "--name", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, SHOAL_STATE_DIR=str(state)))
    try:
        # The controller answers: its agents were started after that, and take far longer than this loop's 10 ms
        # to import, register and be ready.
        deadline = time.monotonic() + 240  # (the first `up` on a machine may build the runtime image)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.01)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum and "interrupted" in err and not out, (proc.returncode, out, err)
    assert not (state / "cluster.json").exists()
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or [])]
    assert not left
    assert not list((state / "redis").glob("*/*"))  # its Redis was stopped and its data removed
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_a_damaged_record_of_the_local_cluster_is_one_error_line(tmp_path: Path, command: str) -> None:
    """A record cut short (written in place, by a run that died mid-write) gave a JSONDecodeError traceback."""
    state = tmp_path / "state"
    state.mkdir()
    for damaged in ('{"url": "http://127.0.0.1:1", "contr', '{"url": "http://127.0.0.1:1"}', "[]"):
        (state / "cluster.json").write_text(damaged)
        done = shoal("http://127.0.0.1:1", command, env={"SHOAL_STATE_DIR": str(state)}, check=False)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"the record of the local cluster, {state / 'cluster.json'}, cannot be read" in done.stderr


def test_status_of_a_cluster_whose_processes_are_gone_says_so(tmp_path: Path) -> None:
    """After a crash or a reboot, `status` asked whatever listened on the recorded port now, and reported that."""
    state = tmp_path / "state"
    state.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"url": "http://127.0.0.1:1", "controller": {"pid": gone.pid, "start": 1}, "agents": {},
              "redis_port": free_port(), "redis_dir": str(state / "redis" / "1"), "base": str(state / "cluster")}
    (state / "cluster.json").write_text(json.dumps(record))
    done = shoal("http://127.0.0.1:1", "status", env={"SHOAL_STATE_DIR": str(state)}, check=False)
    assert done.returncode == 2 and "is not running" in done.stderr and "shoal down" in done.stderr, done.stderr
    unusable = shoal("http://127.0.0.1:1", "status", env={"SHOAL_STATE_DIR": "/proc/self/status/x"}, check=False)
    assert unusable.returncode == 2 and "cannot use the state directory" in unusable.stderr, unusable.stderr
