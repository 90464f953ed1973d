"""The local infrastructure's command line (no engine or Redis started: ``up`` itself is a stand-in here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
