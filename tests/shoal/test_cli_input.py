"""The CLI on bad URLs, odd ids, unreadable archives and server text that looks like markup: one error line (exit
code 2) or the text shown as it is, never a traceback. Real local servers, no cluster needed."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.cli import CliError, archive_of, show
from tests.shoal.test_cli_client import Recorder, serve


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "--url", url, *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def not_http() -> Iterator[str]:
    """A TCP server that answers anything with a line that is not HTTP, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("url", ["localhost:3000", "http://localhost:30o0", "not_http"])
def test_a_url_that_is_not_a_controller_is_one_error_line(url: str, not_http: str) -> None:
    done = cli(not_http if url == "not_http" else url, "runtime", "list")
    assert done.returncode == 2 and "cannot reach the controller" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("call_id", ["abc def", "é", "../../v1/runtimes", "a?b#c"])
def test_a_call_id_goes_into_the_path_quoted(call_id: str) -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    server, url = serve(type("Seen", (Recorder,), {"seen": seen}))
    try:
        done = cli(url, "calls", "wait", call_id, "--timeout", "0")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2 and "the answer is not a call" in done.stderr, done.stderr  # (it answers {})
    # One segment under /v1/calls/, whatever the id holds.
    assert [path for path, _ in seen] == [f"/v1/calls/{urllib.parse.quote(call_id, safe='')}"]


def test_an_archive_that_cannot_be_read_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="cannot read /proc/self/mem"):
        archive_of(Path("/proc/self/mem"))  # a file that is there but whose read fails (EIO)
    with pytest.raises(CliError, match="neither a directory nor an archive"):
        archive_of(tmp_path / "missing")


def test_a_limit_below_one_is_refused() -> None:
    done = cli("http://127.0.0.1:9", "calls", "list", "--limit", "0")
    assert done.returncode == 2 and "--limit must be at least 1" in done.stderr


def test_text_from_the_controller_is_shown_as_it_is_not_read_as_markup(capsys: Any) -> None:
    args = argparse.Namespace(json=False)
    rows = [{"id": "c1", "result": "[/x] closes nothing", "error": "[bold]kept[/bold]"}]
    show(args, rows, ["id", "result", "error"])
    out = capsys.readouterr().out
    assert "[/x] closes nothing" in out and "[bold]kept[/bold]" in out
