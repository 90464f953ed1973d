"""The local infrastructure's command line (no engine or Redis started: ``up`` itself is a stand-in here)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest


def test_up_prints_nothing_but_export_lines_on_stdout() -> None:
    """Scripts evaluate ``python -m shoal.devenv up``'s stdout: the first run on a fresh machine printed the
    image build's progress line there, and the test command failed with a shell syntax error."""
    script = textwrap.dedent("""
        import subprocess, sys
        import shoal.devenv.__main__ as devenv

        def up(with_redis):
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


def test_a_second_up_keeps_the_engine_the_first_one_started_on_the_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`down` stops what the record says `up` started: a second `up` found the engine answering and wrote a
    record without it, and `down` then left that dockerd running for ever."""
    import shoal.devenv.__main__ as devenv
    from shoal.devenv import procs

    monkeypatch.setenv("SHOAL_STATE_DIR", str(tmp_path))
    dockerd = subprocess.Popen(["sleep", "60"])  # stands in for the engine the first `up` started
    try:
        url = "unix:///x/docker.sock"
        first = SimpleNamespace(url=url, started=True, _proc=dockerd)
        again = SimpleNamespace(url=url, started=False, _proc=None)
        for engine in (first, again):
            monkeypatch.setattr(devenv, "engine_with_image", lambda e=engine: e)
            devenv.up(with_redis=False)
        assert json.loads(devenv.record_path().read_text())["dockerd"] == procs.identity(dockerd.pid)
        devenv.down()
        assert dockerd.wait(timeout=30) == -15 and not devenv.record_path().exists()
    finally:
        if dockerd.poll() is None:
            dockerd.kill()
            dockerd.wait()
