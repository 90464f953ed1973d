"""The local infrastructure (no engine started: ``up`` itself and dockerd are stand-ins here; the Redis and sshd
tests start their own, on ports of their own)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def test_up_prints_nothing_but_export_lines_on_stdout() -> None:
    """Scripts evaluate ``python -m shoal.devenv up``'s stdout: the first run on a fresh machine printed the
    image build's progress line there, and the test command failed with a shell syntax error."""
    script = textwrap.dedent("""
        import subprocess, sys
        import shoal.devenv.__main__ as devenv

        def up(with_redis, holder=None):
            print("shoal: building the python runtime image offline (progress)")
            subprocess.run(["echo", "a child's output"], check=True)
            return {"DOCKER_HOST": "unix:///x.sock", "SHOAL_IMAGE": "img:1"}

        devenv.up = up
        sys.exit(devenv.main(["up", "--no-redis"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "export DOCKER_HOST=unix:///x.sock\nexport SHOAL_IMAGE=img:1\n"
    assert "(progress)" in done.stderr and "a child's output" in done.stderr


def stand_in_dockerd(root: Path) -> subprocess.Popen[bytes]:
    """A process that looks like the private engine to ``stop_private`` (a ``dockerd`` argument and the data
    root on its command line, its pid in the pid file), as a real dockerd started by another user would."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "dockerd", str(root / "data")],
                            start_new_session=True)
    # Popen returns while the exec may still be under way (its command line reads empty meanwhile): wait for it,
    # as a real engine has long been running when it is stopped.
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 30
    while b"dockerd" not in cmdline.read_bytes():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    (root / "dockerd.pid").write_text(str(proc.pid))
    return proc


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    root = tmp_path / "docker"
    proc = stand_in_dockerd(root)
    try:
        yield root, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_the_last_user_out_stops_the_private_engine_not_the_first(daemon: Any) -> None:
    """`make demo` in one terminal and `make test` in another: whichever started the engine stopped it when it
    ended, under the other one's feet."""
    from shoal.devenv.docker_engine import DockerEngine, release
    from shoal.devenv.engine_users import EngineUsers, process_lease

    root, proc = daemon
    users = EngineUsers(root)
    with users.locked():
        first, second = process_lease(), process_lease()
        users.add(first)
        users.add(second)
        users.add("devenv-up-0f0f0f")
    assert first != second and set(users.live()) == {first, second, "devenv-up-0f0f0f"}
    DockerEngine(url="unix:///x.sock", lease=first, root=root).stop()  # the one that started it leaves first
    assert proc.poll() is None
    assert not release(root, second) and proc.poll() is None
    assert release(root, "devenv-up-0f0f0f")  # the last one out
    assert proc.wait(timeout=30) == -15 and users.live() == []


def test_a_dead_users_lease_does_not_keep_the_engine(daemon: Any) -> None:
    from shoal.devenv import engine_users, procs
    from shoal.devenv.docker_engine import release
    from shoal.devenv.engine_users import EngineUsers

    root, proc = daemon
    gone = subprocess.Popen(["true"])
    who = procs.identity(gone.pid)
    gone.wait()  # killed before it could release: its lease names a process that is no more
    users = EngineUsers(root)
    with users.locked():
        users.add(f"pid-{who['pid']}-{who['start']}-0")
        users.add("devenv-up-1a2b3c")
    assert users.live() == ["devenv-up-1a2b3c"] and not (users.dir / f"pid-{who['pid']}-{who['start']}-0").exists()
    assert engine_users.process_lease().startswith(f"pid-{os.getpid()}-")
    assert release(root, "devenv-up-1a2b3c") and proc.wait(timeout=30) == -15


def test_only_a_dockerd_of_this_data_root_is_stopped(tmp_path: Path) -> None:
    from shoal.devenv.docker_engine import release

    root = tmp_path / "docker"
    root.mkdir()
    other = subprocess.Popen(["sleep", "60"])  # what the pid file names is not a dockerd (a stale file, a reused pid)
    try:
        (root / "dockerd.pid").write_text(str(other.pid))
        assert release(root, "devenv-up-0f0f0f") and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_each_up_holds_its_own_lease_until_its_down(daemon: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `up`s at once (two test runs, or a developer's own `up` beside `make test`): the first `down` must
    not stop the engine under the second. `up` exits at once: its lease goes to its holder process (the shell
    that will run `down`), or is a named one of its own."""
    import shoal.devenv.__main__ as devenv
    from shoal.devenv.docker_engine import DockerEngine
    from shoal.devenv.engine_users import EngineUsers, process_lease

    root, proc = daemon
    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    users = EngineUsers(root)

    def engine() -> DockerEngine:
        lease = process_lease()
        with users.locked():
            users.add(lease)
        return DockerEngine(url="unix:///x/docker.sock", lease=lease, root=root)

    monkeypatch.setattr(devenv, "engine_with_image", engine)
    shell = subprocess.Popen(["sleep", "60"])  # the shell of a run that will call `down`
    try:
        first = devenv.up(with_redis=False)["SHOAL_ENGINE_LEASE"]
        second = devenv.up(with_redis=False, holder=shell.pid)["SHOAL_ENGINE_LEASE"]
        assert first.startswith("devenv-up-") and second.startswith(f"pid-{shell.pid}-")
        assert sorted(users.live()) == sorted([first, second])
        devenv.down(first)
        assert proc.poll() is None and users.live() == [second]
        assert devenv.record_path(second).exists()  # the second `up`'s record, for its own `down`
        shell.kill()  # killed before its `down`: its lease ends with it
        shell.wait()
        devenv.down(second)  # (the record's lease: already gone) the last one out
        assert proc.wait(timeout=30) == -15 and not devenv.record_path(second).exists()
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()


@pytest.fixture
def stand_in_engine(daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``devenv``'s module with its engine a stand-in of ``daemon`` (each ``up`` takes a lease on it)."""
    import shoal.devenv.__main__ as devenv
    from shoal.devenv.docker_engine import DockerEngine
    from shoal.devenv.engine_users import EngineUsers, process_lease

    root, _ = daemon
    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("SHOAL_DEVENV_ID", raising=False)

    def engine() -> DockerEngine:
        lease = process_lease()
        with EngineUsers(root).locked() as users:
            users.add(lease)
        return DockerEngine(url="unix:///x/docker.sock", lease=lease, root=root)

    monkeypatch.setattr(devenv, "engine_with_image", engine)
    return devenv


def redis_answers(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        with Redis.from_url(url, socket_timeout=5) as r:
            return bool(r.ping())
    except RedisConnectionError:
        return False


def test_an_up_beside_another_leaves_the_others_redis_and_record_alone(stand_in_engine: Any) -> None:
    """One record for every `up`: a developer's `up` (Redis, for the local inventory), then `make test`'s `up`
    stopped that Redis and deleted its data, and wrote over its record (the developer's `down` then found
    nothing to stop, and the engine's named lease stayed)."""
    devenv = stand_in_engine
    mine = devenv.up(with_redis=True)
    try:
        tests = devenv.up(with_redis=False)
        assert tests["SHOAL_DEVENV_ID"] != mine["SHOAL_DEVENV_ID"]
        assert redis_answers(mine["SHOAL_REDIS_URL"])
        devenv.down(tests["SHOAL_ENGINE_LEASE"])
        assert redis_answers(mine["SHOAL_REDIS_URL"])
        assert devenv.record_path(mine["SHOAL_DEVENV_ID"]).exists()
    finally:
        devenv.down(mine["SHOAL_ENGINE_LEASE"])
    assert not redis_answers(mine["SHOAL_REDIS_URL"])
    assert not devenv.record_path(mine["SHOAL_DEVENV_ID"]).exists()


def test_two_ups_held_by_one_shell_keep_a_record_and_a_lease_each(stand_in_engine: Any) -> None:
    """Their leases were named by a counter that starts again in every process: the second `up` wrote over the
    first's record (its Redis left with none), and the first `down` released the lease the second relied on."""
    devenv = stand_in_engine
    shell = subprocess.Popen(["sleep", "60"])
    try:
        first = devenv.up(with_redis=True, holder=shell.pid)
        second = devenv.up(with_redis=False, holder=shell.pid)
        assert first["SHOAL_ENGINE_LEASE"] != second["SHOAL_ENGINE_LEASE"]
        devenv.down(second["SHOAL_ENGINE_LEASE"])
        assert redis_answers(first["SHOAL_REDIS_URL"]) and devenv.record_path(first["SHOAL_DEVENV_ID"]).exists()
        devenv.down(first["SHOAL_ENGINE_LEASE"])
        assert not redis_answers(first["SHOAL_REDIS_URL"])
    finally:
        shell.kill()
        shell.wait()


def test_the_down_of_an_up_made_before_records_were_its_own_stops_its_redis(stand_in_engine: Any,
                                                                          tmp_path: Path) -> None:
    """Its record is the one devenv.json, and its `down` names its lease (the test command's trap does)."""
    devenv = stand_in_engine
    old = devenv.up(with_redis=True)
    devenv.record_path(old["SHOAL_DEVENV_ID"]).rename(tmp_path / "devenv.json")
    devenv.down(old["SHOAL_ENGINE_LEASE"])
    assert not redis_answers(old["SHOAL_REDIS_URL"]) and not (tmp_path / "devenv.json").exists()


def test_the_redis_of_an_up_whose_holder_died_is_stopped_by_the_next_up(stand_in_engine: Any) -> None:
    devenv = stand_in_engine
    shell = subprocess.Popen(["sleep", "60"])
    try:
        dead = devenv.up(with_redis=True, holder=shell.pid)
        assert redis_answers(dead["SHOAL_REDIS_URL"])
    finally:
        shell.kill()  # killed before its `down`
        shell.wait()
    later = devenv.up(with_redis=False)
    try:
        assert not redis_answers(dead["SHOAL_REDIS_URL"])
        assert not devenv.record_path(dead["SHOAL_DEVENV_ID"]).exists()
    finally:
        devenv.down(later["SHOAL_ENGINE_LEASE"])


def test_an_up_that_fails_midway_leaves_no_lease_and_no_record(stand_in_engine: Any, daemon: Any,
                                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No export line is printed for it, so no `down` comes: it must undo what it did itself."""
    from shoal.devenv.engine_users import EngineUsers

    devenv = stand_in_engine
    root, proc = daemon

    def no_redis() -> None:
        raise RuntimeError("redis-server would not start")

    monkeypatch.setattr(devenv, "start_redis", no_redis)
    with pytest.raises(RuntimeError, match="would not start"):
        devenv.up(with_redis=True)
    assert EngineUsers(root).live() == [] and proc.wait(timeout=30) == -15  # (the last one out)
    assert list((tmp_path / "devenv").glob("*")) == []


def test_a_damaged_record_is_one_warning_not_a_traceback(stand_in_engine: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed as an older version wrote its one record left it empty: every later `up` and `down` failed
    with a JSONDecodeError until it was removed by hand."""
    devenv = stand_in_engine
    (tmp_path / "devenv.json").write_text('{"engine_le')
    devenv.down()
    assert "ignoring the unreadable record" in capsys.readouterr().err
    (tmp_path / "devenv").mkdir(exist_ok=True)
    (tmp_path / "devenv" / "devenv-0a1b.json").write_text("")
    env = devenv.up(with_redis=False)
    devenv.down(env["SHOAL_ENGINE_LEASE"])


def test_what_is_not_a_lease_holds_nothing_and_breaks_nothing(daemon: Any) -> None:
    from shoal.devenv.docker_engine import release
    from shoal.devenv.engine_users import EngineUsers

    root, proc = daemon
    users = EngineUsers(root)
    users.dir.mkdir(parents=True)
    (users.dir / "devenv-up-0a1b2c").write_text("a-boot-before-this-one")  # taken before a restart
    (users.dir / ".swp").write_text("")
    (users.dir / "pid-1-2").write_text("")
    (users.dir / "pid-999999-1-0").mkdir()  # a directory named like a dead process's lease
    assert users.live() == []
    assert not (users.dir / "devenv-up-0a1b2c").exists() and (users.dir / ".swp").exists()
    assert release(root, "pid-999999-1-0") and proc.wait(timeout=30) == -15


def test_the_last_user_out_stops_a_daemon_started_after_its_own_ended(daemon: Any) -> None:
    """This handle's own dockerd exited, and another user started the one running now: it is stopped too."""
    from shoal.devenv.docker_engine import DockerEngine
    from shoal.devenv.engine_users import EngineUsers, process_lease

    root, proc = daemon
    ours = subprocess.Popen(["true"])
    ours.wait()
    lease = process_lease()
    with EngineUsers(root).locked() as users:
        users.add(lease)
    DockerEngine(url="unix:///x.sock", lease=lease, root=root, _proc=ours).stop()
    assert proc.wait(timeout=30) == -15


def test_up_refuses_a_holder_that_does_not_run_and_down_of_an_unknown_lease_is_harmless(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shoal.devenv.__main__ as devenv

    gone = subprocess.Popen(["true"])
    gone.wait()
    env = dict(os.environ, SHOAL_STATE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "shoal.devenv", "up", "--no-redis", "--holder", str(gone.pid)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and f"--holder {gone.pid}: no such process" in done.stderr and done.stdout == ""
    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    devenv.down("pid-1-2-3")  # nothing recorded, nothing held: nothing to do, nothing raised
    victim = tmp_path / "victim"
    victim.write_text("kept")
    devenv.down("../../victim")  # not a lease name: never a path out of the lease directory
    assert victim.read_text() == "kept"


def test_a_stale_dockerd_pid_file_is_removed_only_when_no_dockerd_of_ours_runs(daemon: Any, tmp_path: Path) -> None:
    """dockerd refuses to start while the pid in its pid file is a running process: one SIGKILLed (its stop
    timed out) or a reboot left the file, its pid went to something else, and the engine never started again."""
    from shoal.devenv.docker_engine import remove_stale_pidfile

    root, proc = daemon
    assert not remove_stale_pidfile(root) and (root / "dockerd.pid").read_text() == str(proc.pid)  # ours runs
    other = subprocess.Popen(["sleep", "60"])
    try:
        (root / "dockerd.pid").write_text(str(other.pid))  # the pid went to another process
        assert remove_stale_pidfile(root) and not (root / "dockerd.pid").exists() and other.poll() is None
        assert not remove_stale_pidfile(root)  # (no file: nothing to do)
        (root / "dockerd.pid").write_text("999999999")  # a process that is no more
        assert remove_stale_pidfile(root) and not (root / "dockerd.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_a_stale_pid_file_does_not_stop_the_private_engine_from_starting(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import shoal.devenv.docker_engine as docker_engine

    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(docker_engine, "_answers", lambda url: False)  # no engine answers, the system's neither
    root = (tmp_path / "docker").resolve()
    root.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    (root / "dockerd.pid").write_text(str(other.pid))
    started: list[bool] = []
    done = subprocess.Popen(["true"])
    done.wait()

    def start(root_: Path, private: str) -> subprocess.Popen[bytes]:
        started.append((root_ / "dockerd.pid").exists())
        return done

    monkeypatch.setattr(docker_engine, "_start_dockerd", start)
    try:
        engine = docker_engine.ensure_engine()
        engine.stop()
        assert started == [False] and other.poll() is None
    finally:
        other.kill()
        other.wait()


redis_installed = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@redis_installed
def test_a_redis_already_on_the_port_is_not_taken_for_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours could not listen, exited, and the start answered with the other server: two clusters on one Redis."""
    from shoal.devenv import redis_server
    from shoal.devenv.redis_server import RedisPortTaken, RedisServer, start_redis

    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    first = start_redis("first")
    try:
        assert first._proc is not None and redis_server._server_pid(first.port) == first._proc.pid
        assert (first.directory / "redis.pid").read_text().strip() == str(first._proc.pid)
        with pytest.raises(RedisPortTaken):
            RedisServer(port=first.port, directory=tmp_path / "second").start()
        assert not (tmp_path / "second").exists()  # made by the start: removed
        kept = tmp_path / "kept"
        kept.mkdir()
        (kept / "appendonly.aof").write_text("data")
        with pytest.raises(RedisPortTaken):
            RedisServer(port=first.port, directory=kept).start()
        assert (kept / "appendonly.aof").read_text() == "data"  # a directory it did not make keeps its data
        # start_redis draws another port when the one drawn is taken meanwhile.
        drawn, free_port = [first.port], redis_server.free_port
        monkeypatch.setattr(redis_server, "free_port", lambda: drawn.pop() if drawn else free_port())
        other = start_redis("third")
        try:
            assert other.port != first.port and other._proc is not None
            assert redis_server._server_pid(other.port) == other._proc.pid
            assert len(list((tmp_path / "third").iterdir())) == 1  # the failed attempt's directory is gone
        finally:
            other.stop(remove=True)
        assert redis_server._server_pid(first.port) == first._proc.pid  # untouched all along
    finally:
        first.stop(remove=True)
    assert not first.directory.exists()


@redis_installed
def test_an_interrupted_redis_start_leaves_no_server_and_no_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.devenv import procs, redis_server
    from shoal.devenv.redis_server import RedisServer, free_port

    real = redis_server._server_pid
    seen: list[int] = []

    def interrupted(port: int) -> int | None:
        pid = real(port)
        if pid is not None:
            seen.append(pid)
            raise KeyboardInterrupt  # Ctrl-C once the server runs
        return pid

    monkeypatch.setattr(redis_server, "_server_pid", interrupted)
    server = RedisServer(port=free_port(), directory=tmp_path / "redis")
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert seen and procs.start_time(seen[0]) is None and not (tmp_path / "redis").exists()
    assert real(server.port) is None


def test_the_rig_stops_only_its_own_sshd(tmp_path: Path) -> None:
    """A pid file that outlived its sshd named a process that was then SIGTERMed, whatever it was."""
    from shoal.devenv import procs
    from shoal.devenv.sshrig import SshRig

    rig = SshRig(tmp_path / "rig")
    rig.root.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        rig.pidfile.write_text(str(other.pid))  # no record: not an sshd of our config
        assert rig.running() is None
        rig.stop()
        assert other.poll() is None and not rig.pidfile.exists()
        rig.pidfile.write_text(str(other.pid))
        rig.record.write_text(json.dumps({"pid": other.pid, "start": procs.identity(other.pid)["start"] - 1}))
        assert rig.running() is None  # the recorded sshd is gone; its pid is another process's now
        rig.stop()
        assert other.poll() is None and not rig.pidfile.exists() and not rig.record.exists()
    finally:
        other.kill()
        other.wait()
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "sshd", "-f", str(rig.config)])
    try:
        deadline = time.monotonic() + 30
        while b"sshd" not in Path(f"/proc/{ours.pid}/cmdline").read_bytes():  # (the exec may be under way)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rig.pidfile.write_text(str(ours.pid))  # started before there were records: known by its config
        assert rig.running() == procs.identity(ours.pid)
        rig.stop()
        assert ours.wait(30) == -15
    finally:
        ours.kill()
        ours.wait()


def _fake_ssh_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-NotOurs\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return server, port


def test_an_sshd_that_is_not_the_rigs_does_not_count_as_the_rig_up(tmp_path: Path) -> None:
    from shoal.devenv.sshrig import RigError, SshRig

    if shutil.which("ssh-keygen") is None or not Path(shutil.which("sshd") or "/usr/sbin/sshd").exists():
        pytest.skip("openssh is not installed")
    server, port = _fake_ssh_server()
    try:
        rig = SshRig(tmp_path / "rig", addresses=("127.0.0.1",), port=port)
        rig.root.mkdir()
        rig.pidfile.write_text(str(os.getpid()))  # stale: names a live process that is no sshd
        with pytest.raises(RigError, match="not the rig's sshd"):
            rig.start()
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/sbin/sshd").exists(), reason="sshd needs root here")
def test_the_rig_starts_once_and_stops_its_sshd(tmp_path: Path) -> None:
    from shoal.devenv import procs
    from shoal.devenv.redis_server import free_port
    from shoal.devenv.sshrig import SshRig

    rig = SshRig(tmp_path / "rig", addresses=("127.0.0.1",), port=free_port())
    try:
        rig.start()
        who = rig.running()
        assert who is not None and json.loads(rig.record.read_text()) == who and procs.alive(who)
        assert rig.start().running() == who  # already up: the same sshd
    finally:
        rig.stop()
    assert who is not None and not procs.alive(who) and not rig.pidfile.exists() and not rig.record.exists()


def test_the_engines_log_is_kept_to_two_runs_past_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dockerd.log was appended to at every start, for ever (13.5 MB on a machine after some days)."""
    from shoal.devenv import docker_engine

    monkeypatch.setattr(docker_engine, "LOG_KEEP", 100)
    with docker_engine.open_log(tmp_path) as log:
        log.write(b"x" * 60)
    with docker_engine.open_log(tmp_path) as log:  # under the bound: appended to
        log.write(b"y" * 60)
    assert (tmp_path / "dockerd.log").read_bytes() == b"x" * 60 + b"y" * 60
    with docker_engine.open_log(tmp_path) as log:  # past it: moved aside first
        log.write(b"z")
    assert (tmp_path / "dockerd.log").read_bytes() == b"z"
    assert (tmp_path / "dockerd.log.1").read_bytes() == b"x" * 60 + b"y" * 60
