"""The local infrastructure's command line (no engine or Redis started: ``up`` itself is a stand-in here)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
        assert devenv.record_path().exists()  # the second `up`'s record, for its own `down`
        shell.kill()  # killed before its `down`: its lease ends with it
        shell.wait()
        devenv.down()  # (the record's lease: already gone) the last one out
        assert proc.wait(timeout=30) == -15 and not devenv.record_path().exists()
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()


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
