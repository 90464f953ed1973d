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


def test_ids_in_a_table_are_never_cut_whatever_the_terminal_width() -> None:
    """`calls list` on 80 columns showed ids as `06a750443bbb…`, which `calls get` cannot take."""
    import io

    from rich.console import Console

    import shoal.cli as cli_module

    call_id = "06a750443bbb4e5f8c0d1e2f3a4b5c6d"
    rows = [{"id": call_id, "function": "a-function-with-a-long-name", "version": 12, "status": "DONE",
             "node": "node-1", "result": {"echo": list(range(30))}, "error": None}]
    out = io.StringIO()
    saved, cli_module.console = cli_module.console, Console(file=out, width=60)
    try:
        show(argparse.Namespace(json=False), rows, cli_module.CALL_COLS)
    finally:
        cli_module.console = saved
    assert call_id in out.getvalue()


class RefusesEarly(Recorder):
    """A controller that knows the runtime `python` only, and refuses every upload at once (413) without reading
    its body, then closes: what aiohttp does for a body declared too large, or too many uploads at once."""

    def do_GET(self) -> None:
        self.seen.append((self.path, dict(self.headers)))
        known = self.path == "/v1/runtimes/python"
        body = b'{"name": "python"}' if known else b'{"error": {"type": "NotFound", "message": "no runtime named x"}}'
        self.send_response(200 if known else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.seen.append((self.path, dict(self.headers)))
        body = b'{"error": {"type": "TooLarge", "message": "archive exceeds the limit"}}'
        self.send_response(413)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True


def test_an_upload_refused_before_its_body_says_why(tmp_path: Path) -> None:
    """A large upload the controller refused at once showed `Connection reset by peer`, not the reason."""
    seen: list[tuple[str, dict[str, str]]] = []
    server, url = serve(type("Refuses", (RefusesEarly,), {"seen": seen}))
    archive = tmp_path / "big.tar.gz"
    archive.write_bytes(b"\0" * (64 << 20))  # far more than the socket buffers hold: the send fails midway
    try:
        mistyped = cli(url, "function", "upload", "f", str(archive), "--runtime", "x")
        refused = cli(url, "function", "upload", "f", str(archive), "--runtime", "python")
    finally:
        server.shutdown()
        server.server_close()
    assert mistyped.returncode == 2 and "HTTP 404: no runtime named x" in mistyped.stderr, mistyped.stderr
    assert len([path for path, _ in seen if path.startswith("/v1/functions")]) == 1  # the mistyped one posted nothing
    assert refused.returncode == 2 and "HTTP 413: archive exceeds the limit" in refused.stderr, refused.stderr
    assert "Traceback" not in mistyped.stderr + refused.stderr
