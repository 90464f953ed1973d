"""The playbooks, run for real over SSH against the local inventory (2 node hosts + a controller host on
loopback addresses, reached through the test rig's sshd)."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from shoal.archive import build_tar_gz
from shoal.auth import registration_credential
from shoal.devenv.sshrig import rig
from tests.conftest import node_containers

pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("ansible")]
ROOT = Path(__file__).resolve().parents[2]
API = "http://127.0.0.10:3000"
REDIS = "127.0.0.10:6390"  # the controller host's Redis (inventory/local)
NODES = ["shoal-node-a", "shoal-node-b"]
AUTH: dict[str, str] = {}  # the deployed controller's API token, once the rollout made it
ECHO = {"handler.py": "import time\ndef handler(p):\n    time.sleep(p.get('s', 0))\n    return p\n"}


def playbook(name: str, env: dict[str, str], *args: str,
             ok: bool = True) -> tuple[float, dict[str, dict[str, int]], str]:
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory/local",
                           f"playbooks/{name}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    took = time.monotonic() - t0
    print(f"\n{name} {' '.join(args)[:80]}: {took:.1f} s")
    assert (proc.returncode == 0) == ok, proc.stdout[-8000:] + proc.stderr[-3000:]
    recap = {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
             for m in re.finditer(r"^(\S+)\s+:\s+(ok=.*)$", proc.stdout, re.M)}
    return took, recap, proc.stdout + proc.stderr


def api(method: str, path: str, body: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json" if body is not None else "application/octet-stream",
               **AUTH, **(headers or {})}
    payload = json.dumps(body).encode() if body is not None else data
    req = urllib.request.Request(API + path, data=payload, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def listener(address: str) -> psutil.Process:
    """The process listening on ``address`` (host:port): the deployed controller's API, its Redis."""
    host, port = address.split(":")
    pids = {c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and (c.laddr.ip, c.laddr.port) == (host, int(port))}
    assert len(pids) == 1 and None not in pids, pids
    return psutil.Process(pids.pop())


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def node_states() -> dict[str, str]:
    return {n["node_id"]: n["state"] for n in api("GET", "/v1/nodes")[1]}


def submit_through_restarts(key: str, seconds: float = 0.05) -> str:
    """An async call, retried with its idempotency key while the controller restarts: accepted exactly once."""
    while True:
        try:
            status, body = api("POST", "/v1/functions/echo/invoke-async", {"params": {"s": seconds}},
                               headers={"Idempotency-Key": key})
        except OSError:  # refused or reset: the controller is restarting
            time.sleep(0.1)
            continue
        if status == 503:  # up, but not yet at its store
            time.sleep(0.1)
            continue
        assert status == 202, body
        return str(body["id"])


def under_load(name: str, env: dict[str, str], *args: str, seconds: float = 1.0) -> tuple[list[str], str]:
    """``name`` run while calls of ``seconds`` each are submitted, one every 0.1 s (the nodes are busy when
    their agents restart); the calls' ids, and the run's output."""
    submitted: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            submitted.append(submit_through_restarts(f"{name}-{time.time_ns()}", seconds))
            time.sleep(0.1)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        _, recap, out = playbook(name, env, *args)
    finally:
        stop.set()
        loader.join()
    assert all(r["failed"] == 0 for r in recap.values()), out[-6000:]
    return submitted, out


def finished(ids: list[str]) -> list[dict[str, Any]]:
    """The calls once each has ended, read by pages of the listing (one GET per call took seconds for
    thousands)."""

    def all_ended() -> list[dict[str, Any]] | None:
        seen: dict[str, dict[str, Any]] = {}
        cursor = ""
        while True:
            page = api("GET", f"/v1/calls?function=echo&limit=1000{cursor}")[1]
            seen.update((c["id"], c) for c in page["calls"])
            if not page["next_cursor"]:
                break
            cursor = f"&cursor={page['next_cursor']}"
        calls = [seen.get(i) for i in ids]
        ended = all(c is not None and c["status"] in ("DONE", "FAILED", "TIMEOUT", "CANCELLED") for c in calls)
        return calls if ended else None  # type: ignore[return-value]

    return wait(all_ended, 180, "calls finished")


def service_events(host: str, since: float, program: str = "shoal-agent") -> list[tuple[float, str]]:
    """The program's starts, drains and stops since ``since`` (epoch seconds), from its log."""
    log = Path(f"/var/tmp/shoal-local/{host}/supervisor/logs/{program}.log")
    events = [(datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)) for m in
              re.finditer(r"^(\S+Z) \[\w+\s*\] ((?:agent|controller)_started|draining|(?:agent|controller)_stopped)\b",
                          log.read_text(), re.M)]
    return [e for e in events if e[0] >= since]


def release(tmp: Path, version: str, broken: bool = False) -> Path:
    """A commit of this repo whose package says `version`: what an upgrade deploys (`broken`: whose controller
    exits at once)."""
    repo = tmp / f"release-{version}"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True, timeout=120)
    init = repo / "shoal" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))
    if broken:
        main = repo / "controller" / "__main__.py"
        main.write_text(main.read_text().replace("sys.exit(main())", "sys.exit(3)"))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "commit", "-qam", f"release {version}"], check=True, timeout=60)
    return repo


def test_rollout_rerun_upgrade_node_loss_and_teardown(docker_url: str, docker_client: docker.DockerClient,
                                                     tmp_path: Path) -> None:
    ssh_rig = rig()
    already_up = ssh_rig.running() is not None
    key = ssh_rig.start().key
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "playbooks" / "ansible.cfg"), SHOAL_RIG_KEY=str(key),
               DOCKER_HOST=docker_url, ANSIBLE_NOCOLOR="1", SHOAL_SECRETS_DIR=str(tmp_path / "secrets"))
    torn_down = False
    try:
        # A dry run (--check) on hosts with nothing of Shoal yet passes, and leaves them so. (The controller host
        # and one node: the other nodes run the same tasks; on all four it took 97 s of the suite's critical path.)
        _, recap, out = playbook("site.yml", env, "--check", "--limit", f"shoal-ctl,{NODES[0]}")
        assert set(recap) == {"shoal-ctl", NODES[0]} and all(r["failed"] == 0 for r in recap.values()), out[-6000:]
        assert not Path("/var/tmp/shoal-local/shoal-ctl/venv").exists()
        assert not Path(f"/var/tmp/shoal-local/{NODES[0]}/venv").exists()
        # The rollout takes the nodes in one batch (shoal_agent_serial=2): one node at a time is upgrade.yml's run
        # below, and a batch a node cost this test about 15 s a node.
        rollout_s, recap, out = playbook("site.yml", env, "-vvv", "-e", f"shoal_agent_serial={len(NODES)}")
        assert set(recap) == {"shoal-ctl", *NODES} and all(r["failed"] == 0 for r in recap.values())
        print(f"\nrollout: {rollout_s:.1f} s")
        # Nothing it ran shows a secret, even at -vvv (which prints each remote command and its environment).
        secrets = {name: (tmp_path / "secrets" / name).read_text().strip()
                   for name in ("api_token", "node_token", "redis_password")}
        assert "Wait until the Redis answering is this role's" in out
        assert [name for name, value in secrets.items() if value in out] == []
        # The rollout made both tokens, readable by root only, on the control machine; the API wants one, and
        # the agents joined with the other (over CURVE: /register says so).
        for name in secrets:
            assert (tmp_path / "secrets" / name).stat().st_mode & 0o777 == 0o600
        redis_host, redis_port = REDIS.split(":")
        with socket.create_connection((redis_host, int(redis_port)), timeout=10) as sock:  # Redis wants AUTH
            sock.sendall(b"PING\r\n")
            assert sock.recv(100).startswith(b"-NOAUTH")
        token = (tmp_path / "secrets" / "api_token").read_text().strip()
        status, body = api("GET", "/v1/nodes")
        assert status == 401 and body["error"]["code"] == "unauthorized", body
        assert api("POST", "/register", {"endpoint_id": "x"}, headers={"Authorization": f"Bearer {token}"})[0] == 401
        AUTH["Authorization"] = f"Bearer {token}"
        assert node_states() == {n: "ready" for n in NODES}
        # The controller and Redis run as their own accounts, not root (the agents need root for the engine).
        assert listener(API.removeprefix("http://")).username() == "shoal"
        assert listener(REDIS).username() == "shoal-redis"
        # Accounts the playbooks made say so (teardown.yml removes only those: one that existed before stays).
        assert {pwd.getpwnam(name).pw_gecos for name in ("shoal", "shoal-redis")} == \
            {"Shoal service account made by its playbooks"}
        credential = registration_credential((tmp_path / "secrets" / "node_token").read_text().strip())
        assert api("POST", "/register", {"endpoint_id": "x"},
                   headers={"Authorization": f"Bearer {credential}"})[1]["curve"] is True
        # An agent that exits 2 (its token refused) is not restarted; any other exit is.
        agent_conf = Path(f"/var/tmp/shoal-local/{NODES[0]}/supervisor/programs/shoal-agent.conf").read_text()
        assert "autorestart=unexpected\nexitcodes=2\n" in agent_conf, agent_conf

        # A function, invoked through the controller: calls land on both nodes.
        assert api("POST", "/v1/runtimes", {"image": "pythonruntime", "name": "py"})[0] == 201
        assert api("POST", "/v1/functions/echo?runtime=py&entrypoint=handler:handler&min_warm=1",
                   data=build_tar_gz(ECHO))[0] == 201
        wait(lambda: sum(s == "ready" for s in api("GET", "/v1/functions/echo")[1]["nodes"].values()) == len(NODES),
             120, "echo ready on every node")
        ids = [api("POST", "/v1/functions/echo/invoke-async", {"params": {"s": 0.3}})[1]["id"] for _ in range(15)]
        calls = [wait(lambda i=i: (c := api("GET", f"/v1/calls/{i}")[1])["status"] == "DONE" and c, 120, "calls")
                 for i in ids]
        assert {c["node"] for c in calls} == set(NODES)

        # An upgrade whose new controller does not start: the controller goes back to the venv it ran and is
        # started again, and the upgrade fails there: no node is touched (on the controller host and one node:
        # the others would be left alone the same way).
        venv = Path("/var/tmp/shoal-local/shoal-ctl/venv")
        running, version = os.readlink(venv), api("GET", "/version")[1]["version"]
        since = time.time()
        _, recap, out = playbook("upgrade.yml", env, "--limit", f"shoal-ctl,{NODES[0]}", "-e",
                                 f"shoal_install_source={release(tmp_path, '0.1.0+broken.test', broken=True)}",
                                 ok=False)
        assert recap["shoal-ctl"]["rescued"] == 1 and "controller was started again" in out, out[-6000:]
        assert os.readlink(venv) == running
        assert service_events(NODES[0], since) == [], out[-6000:]  # its agent was neither drained nor restarted
        assert os.readlink(f"/var/tmp/shoal-local/{NODES[0]}/venv") == running.replace("shoal-ctl", NODES[0])

        def version_now() -> str | None:
            try:
                return str(api("GET", "/version")[1]["version"])
            except OSError:
                return None

        assert wait(version_now, 60, "the controller back") == version
        wait(lambda: node_states() == {n: "ready" for n in NODES}, 60, "the nodes back")

        # An upgrade to a new commit (the controller, then the agents one at a time) while calls are submitted:
        # every part runs the new code after it, and no call is lost.
        new_version = "0.1.0+upgrade.test"
        submitted: list[str] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                submitted.append(submit_through_restarts(f"upgrade-{len(submitted)}"))
                time.sleep(0.05)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        upgraded = release(tmp_path, new_version)
        try:
            upgrade_s, recap, _ = playbook("upgrade.yml", env, "-e", f"shoal_install_source={upgraded}")
        finally:
            stop.set()
            loader.join()
        print(f"upgrade: {upgrade_s:.1f} s, {len(submitted)} calls submitted meanwhile")
        assert len(submitted) > 20 and len(set(submitted)) == len(submitted)
        assert api("GET", "/version")[1]["version"] == new_version
        nodes = api("GET", "/v1/nodes")[1]
        assert {n["node_id"]: n["version"] for n in nodes} == {n: new_version for n in NODES}, nodes
        finals = finished(submitted)
        assert [c["status"] for c in finals] == ["DONE"] * len(finals), [c.get("error") for c in finals
                                                                          if c["status"] != "DONE"]
        # The same upgrade again (after one that failed elsewhere, say) on hosts already on its code: nothing is
        # stopped, drained or restarted (it stopped and started every service again).
        since = time.time()
        again_s, recap, out = playbook("upgrade.yml", env, "--limit", f"shoal-ctl,{NODES[0]}", "-e",
                                       f"shoal_install_source={upgraded}")
        print(f"upgrade again: {again_s:.1f} s, recap {recap}")
        assert all(r["failed"] == 0 for r in recap.values()), out[-6000:]
        assert service_events(NODES[0], since) == [] and service_events("shoal-ctl", since, "shoal-controller") == []
        # Its venvs were copied from the ones that ran (same pinned packages): every script in them names its own
        # venv's python, not the one it was copied from (that one is removed two upgrades later).
        for host in ("shoal-ctl", *NODES):
            venv = Path(os.readlink(f"/var/tmp/shoal-local/{host}/venv"))  # (its target as written)
            shebangs = {p.name: line for p in (venv / "bin").iterdir() if p.is_file() and not p.is_symlink()
                        and (line := p.read_bytes().split(b"\n", 1)[0]).startswith(b"#!")}
            assert shebangs and {name: line for name, line in shebangs.items()
                                 if not line.startswith(f"#!{venv}/bin/".encode())} == {}, (host, shebangs)

        # site.yml on another commit (back to this one) while calls run: like upgrade.yml, each agent is stopped
        # (drained) before its venv is switched, and the controller before its own, so none runs on with code
        # changed under it; then each starts on the new venv. Every call completes. (On the controller host and
        # one node: the others would run the same tasks, and on the whole cluster this step took 112 s of the
        # suite's longest test. The other nodes stay on the upgrade's commit: a cluster of mixed commits runs.)
        since = time.time()
        ids, _ = under_load("site.yml", env, "--limit", f"shoal-ctl,{NODES[0]}")
        assert api("GET", "/version")[1]["version"] == version
        assert {n["node_id"]: n["version"] for n in api("GET", "/v1/nodes")[1]} == \
            {n: version if n == NODES[0] else new_version for n in NODES}
        for node in NODES[:1]:
            switched = os.lstat(f"/var/tmp/shoal-local/{node}/venv").st_mtime
            events = service_events(node, since)
            assert [e for t, e in events if t < switched][-2:] == ["draining", "agent_stopped"], (switched, events)
            assert [e for t, e in events if t > switched] == ["agent_started"], (switched, events)
        for node in NODES[1:]:
            assert service_events(node, since) == []  # (not in the run: left alone)
        # The controller too is stopped before its switch, and started after it on the new code.
        switched = os.lstat("/var/tmp/shoal-local/shoal-ctl/venv").st_mtime
        events = service_events("shoal-ctl", since, "shoal-controller")
        assert [e for t, e in events if t < switched] == ["controller_stopped"], (switched, events)
        assert [e for t, e in events if t > switched] == ["controller_started"], (switched, events)
        calls = finished(ids)
        assert [c["status"] for c in calls] == ["DONE"] * len(calls), [c.get("error") for c in calls
                                                                        if c["status"] != "DONE"]

        # Idempotent: a second run changes nothing, here after a change of commit (the venv it switched away from
        # is kept, for a rollback: a re-run took the venv it runs for the one before and removed that one). (Check
        # mode is the first run's: a dry run on hosts with nothing of Shoal. One on the rolled-out cluster was
        # dropped for the suite's time: the real re-run changing nothing says more.)
        kept = {host: sorted(p.name for p in Path(f"/var/tmp/shoal-local/{host}/venvs").iterdir())
                for host in ("shoal-ctl", NODES[0])}
        assert all(len(names) == 2 for names in kept.values()), kept  # this commit's and the upgrade's
        rerun_s, recap, out = playbook("site.yml", env, "--limit", f"shoal-ctl,{NODES[0]}")
        print(f"idempotent re-run: {rerun_s:.1f} s, recap {recap}")
        assert all(r["changed"] == 0 for r in recap.values()), out[-6000:]
        assert {host: sorted(p.name for p in Path(f"/var/tmp/shoal-local/{host}/venvs").iterdir())
                for host in ("shoal-ctl", NODES[0])} == kept

        # A site.yml whose controller host fails (here at its first check: a Python the wheels are not for) rolls no
        # node against it: the node is prepared, then refused at the nodes play, its agent left as it ran.
        broken = tmp_path / "broken-ctl.yml"
        broken.write_text('all:\n  hosts:\n    shoal-ctl:\n      shoal_install_python_version: "2.7"\n')
        since = time.time()
        _, recap, out = playbook("site.yml", env, "-i", str(broken), "--limit", f"shoal-ctl,{NODES[0]}", ok=False)
        assert recap["shoal-ctl"]["failed"] == 1 and recap[NODES[0]]["failed"] == 1, out[-6000:]
        assert "shoal-ctl failed earlier in this run: no node is rolled against it" in out, out[-6000:]
        assert service_events(NODES[0], since) == [] and node_states() == {n: "ready" for n in NODES}

        # One node's agent stopped: calls go on elsewhere; the controller reports the node lost.
        stopped = NODES[-1]
        supervisor = f"/var/tmp/shoal-local/{stopped}/supervisor/supervisord.conf"
        subprocess.run([f"/var/tmp/shoal-local/{stopped}/venv/bin/supervisorctl", "-c", supervisor, "stop",
                        "shoal-agent"], check=True, capture_output=True, timeout=120)
        for _ in range(10):
            status, call = api("POST", "/v1/functions/echo/invoke", {"params": {}})
            assert status == 200 and call["status"] == "DONE" and call["node"] != stopped
        wait(lambda: node_states()[stopped] == "lost", 60, f"{stopped} reported lost")

        playbook("teardown.yml", env)
        torn_down = True
        leftovers = subprocess.run(["pgrep", "-af", "shoal-local"], capture_output=True, text=True).stdout
        assert leftovers.strip() == "", leftovers
        for node in NODES:
            assert node_containers(docker_client, node) == []
        with pytest.raises(OSError):
            urllib.request.urlopen(API + "/ping", timeout=2)
        for host in ("shoal-ctl", *NODES):
            assert not Path(f"/var/tmp/shoal-local/{host}").exists(), host
        with pytest.raises(KeyError):
            pwd.getpwnam("shoal")  # the accounts are gone with the rest
        with pytest.raises(KeyError):
            pwd.getpwnam("shoal-redis")
    finally:
        AUTH.clear()
        if not torn_down:
            subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory/local",
                            "playbooks/teardown.yml"], cwd=ROOT, env=env, capture_output=True, timeout=600)
        if not already_up:
            ssh_rig.stop()
