"""``shoal``: the command line for a Shoal cluster.

    shoal runtime create --image pythonruntime --run "python3 test.py" [--name N] [--path /ws] [--dependencies CMD]
    shoal function upload dice ./examples/runtimes/python/dice --runtime pythonruntime [--entrypoint mod:fn]
    shoal invoke dice --params '{"roll": "4d6"}' [--async] [--timeout S] [--idempotency-key K]
    shoal invoke dice --batch params.jsonl     (one JSON params per line; all accepted, none awaited)
    shoal calls list [--function F] [--status S] | calls get ID | calls wait ID | calls cancel ID
    shoal nodes list | nodes get ID
    shoal up [--agents 2] [--port 3000] | shoal status | shoal down
    shoal deploy -i inventory/example [site|upgrade|teardown] [-- ansible-playbook args]

Every command takes ``--url`` (default ``$SHOAL_URL`` or http://127.0.0.1:3000) and ``--json`` (machine
output); without ``--json`` it prints tables and shows progress for uploads and long waits. A controller
with an API token wants it in ``$SHOAL_API_TOKEN`` (or in the file ``$SHOAL_API_TOKEN_FILE`` names).

``invoke`` submits the call (``invoke-async``: the controller answers at once with its id), then waits on it by
replaying the request to the sync route with an explicit ``wait`` below the HTTP timeout, as many times as it
takes: a call longer than any HTTP timeout is still waited for, and Ctrl-C (or SIGTERM, or a wait that ends
without the outcome) always has the call's full id to report, with ``shoal calls wait ID`` to pick it up again
(under ``--json`` as a JSON object on stdout). Every invoke request carries an ``Idempotency-Key``
(``--idempotency-key K``, else one the CLI makes): the CLI sends a request whose fate it does not know again
with the same key, and the same command rerun with the key it reports makes nothing twice.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from shoal import httpclient
from shoal.auth import bearer, token_from_env
from shoal.devenv import procs
from shoal.devenv.paths import state_dir
from shoal.devenv.procs import ignore_termination
from shoal.errors import ConfigError

TERMINAL = ("DONE", "FAILED", "TIMEOUT", "CANCELLED")
console = Console(stderr=False)
errors = Console(stderr=True)


HTTP_TIMEOUT = 300.0  # seconds a request may take (`invoke`'s waits are SYNC_WAIT each: see cmd_invoke)
POLL_TIMEOUT = 30.0  # seconds a GET of a call may take (the controller's Redis commands are bounded at 10 s)
POST_RETRIES = (0.5, 1.5)  # pauses before sending an invoke request again whose outcome is not known
POLL_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)  # pauses before polling again: ~30 s, a controller restarting
POLL_MIN, POLL_MAX = 0.01, 0.25  # seconds between polls: a tenth of the time waited so far, within these
SYNC_WAIT = 50.0  # seconds `invoke` asks the sync route to wait per request: below HTTP_TIMEOUT, and below the
# 60 s a proxy in front of the controller commonly allows a response to take
INVOKE_WAIT = 86400.0  # how long `invoke` waits for a call (its timeout is at most a day; it may queue first)


class CliError(Exception):
    """One line for the user (exit code 2). ``status``: the HTTP status that gave it, if any; ``unsure``: the
    request may or may not have been acted on (the connection broke or timed out once it was made, a 500, or a
    proxy's 502/504);
    ``refused``: the request went nowhere (nothing listened, no such host); ``timed_out``: no answer in time.
    A bad URL is none of these."""

    def __init__(self, message: str, status: int | None = None, unsure: bool = False, refused: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(message)
        self.status, self.unsure, self.refused, self.timed_out = status, unsure, refused, timed_out


class Unfinished(Exception):
    """Calls the command leaves going without their outcome: interrupted, a wait that timed out, the controller
    lost during a wait. ``main`` reports each one's full id (or the idempotency key it was sent with, when the
    answer never came) and how to pick it up again: under --json as JSON on stdout, else on stderr."""

    def __init__(self, calls: list[Tracked], *, interrupted: int = 0, reason: str = "", batch: bool = False,
                 rerun_key: str | None = None, unsure: str = "") -> None:
        super().__init__(reason or "interrupted")
        self.calls = calls
        self.interrupted = interrupted  # the signal that stopped the command (SIGINT, SIGTERM), else 0
        self.reason = reason  # why it ended, if not interrupted
        self.batch = batch  # the calls of `invoke --batch` (a list under --json, even of one)
        self.rerun_key = rerun_key  # the --idempotency-key that makes the same command make nothing twice
        self.unsure = unsure  # a request whose answer never came: what it may have made


class Stopped(KeyboardInterrupt):
    """SIGTERM while calls are waited for (``timeout 60 shoal invoke ...``), or SIGTERM or SIGHUP while a local
    cluster starts: reported as Ctrl-C is (and what was started is stopped)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(signum)


#: The signals each command turns into a Stopped exception (Ctrl-C is a KeyboardInterrupt already).
STOPPED_BY = {"invoke": (signal.SIGTERM,), "calls": (signal.SIGTERM,), "up": (signal.SIGTERM, signal.SIGHUP)}


@dataclass
class Tracked:
    """A call the command made or waits for, as far as it knows it (what an interrupted command reports)."""

    id: str | None = None
    status: str | None = None


def q(name: str) -> str:
    """A name or id as one path segment (a space or a slash in it must not change the route)."""
    return urllib.parse.quote(name, safe="")


def parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError(f"{what}: the answer is not JSON: {raw[:200].decode('utf-8', 'replace')!r}") from None


class Client:
    def __init__(self, url: str, token: str = "") -> None:
        self.url = url.rstrip("/")
        self.auth = bearer(token)  # the controller's API token ($SHOAL_API_TOKEN or the file $SHOAL_API_TOKEN_FILE)

    def request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT) -> Any:
        hdrs = {**self.auth, **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        try:
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
            with httpclient.urlopen(req, timeout=timeout) as resp:  # (redirects not followed)
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            if 300 <= err.code < 400:
                raise self._redirected(f"{method} {path}", err.code, err.headers.get("Location")) from None
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:500]
            # (a 503 is the controller's own "not accepted": its store failed, and it says if the call may have run)
            raise CliError(f"{method} {path}: HTTP {err.code}: {message}", status=err.code,
                           unsure=err.code in (500, 502, 504)) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # unreachable, not HTTP, a bad URL
            cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            bad_url = not isinstance(cause, OSError | http.client.HTTPException) or isinstance(
                cause, http.client.InvalidURL)
            refused = isinstance(cause, ConnectionRefusedError | FileNotFoundError | socket.gaierror) or (
                isinstance(cause, OSError) and cause.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH))
            raise CliError(f"cannot reach the controller at {self.url}: {exc}", refused=refused,
                           timed_out=isinstance(cause, TimeoutError), unsure=not bad_url and not refused) from None
        if status == 204 or not raw:
            return None
        return parse_json(raw, f"{method} {path}")

    def _redirected(self, what: str, code: int, location: str | None) -> CliError:
        return CliError(f"{what}: HTTP {code}: the controller's URL {self.url} redirects to {location!r}; give the "
                        "address it ends at (--url or $SHOAL_URL): redirects are not followed, they would carry "
                        "the API token elsewhere")

    def upload(self, path: str, archive: bytes, show: bool) -> Any:
        """Stream an archive with a progress bar."""
        try:
            parsed = urllib.parse.urlsplit(self.url)
            if parsed.scheme not in ("http", "https"):
                raise ValueError(f"the URL must start with http:// or https://, not {self.url!r}")
            kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
            conn = kind(parsed.hostname or "127.0.0.1", parsed.port, timeout=600)
            conn.putrequest("POST", parsed.path.rstrip("/") + path)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(archive)))
            for name, value in self.auth.items():
                conn.putheader(name, value)
            conn.endheaders()
            with Progress(TextColumn("uploading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=errors, disable=not show, transient=True) as progress:
                task = progress.add_task("upload", total=len(archive))
                view = memoryview(archive)
                try:
                    for start in range(0, len(archive), 1 << 20):
                        chunk = view[start:start + (1 << 20)]
                        conn.send(chunk)
                        progress.update(task, advance=len(chunk))
                except OSError:
                    # The controller refused the upload before its body (too large, too many at once, an option
                    # it does not take) and closed: its answer, if it came before the close, says why.
                    refused = _early_answer(conn)
                    if refused is None:
                        raise
                    resp, raw = refused
                else:
                    resp = conn.getresponse()
                    raw = resp.read()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise CliError(f"cannot upload to the controller at {self.url}: {exc}") from None
        if 300 <= resp.status < 400:
            raise self._redirected("upload", resp.status, resp.getheader("Location"))
        if resp.status >= 400:
            try:
                message = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode("utf-8", "replace")[:500]
            raise CliError(f"upload: HTTP {resp.status}: {message}")
        return parse_json(raw, "upload")


def _early_answer(conn: http.client.HTTPConnection) -> tuple[http.client.HTTPResponse, bytes] | None:
    try:
        resp = conn.getresponse()
        return resp, resp.read()
    except (OSError, http.client.HTTPException):
        return None


def archive_of(path: Path) -> bytes:
    """A directory becomes a tar.gz of its files; a file is taken as the archive itself."""
    try:
        if path.is_file():
            return path.read_bytes()
        if not path.is_dir():
            raise CliError(f"{path} is neither a directory nor an archive file")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for file in sorted(path.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    tf.add(file, arcname=str(file.relative_to(path)))
        return buf.getvalue()
    except OSError as exc:  # unreadable, or a file gone while the directory was read
        raise CliError(f"cannot read {exc.filename or path}: {exc.strerror or exc}") from None


#: Columns whose values are ids that other commands take (``calls get ID``, ``nodes get ID``).
WHOLE_COLUMNS = {"id", "node_id", "name"}


def show(args: argparse.Namespace, data: Any, columns: list[str] | None = None, title: str = "") -> None:
    if args.json or columns is None:
        print(json.dumps(data, indent=None if args.json else 2))
        return
    rows = data if isinstance(data, list) else [data]
    table = Table(title=title or None)
    for col in columns:
        if col in WHOLE_COLUMNS:  # names other commands take: never cut, whatever the terminal's width
            table.add_column(col, no_wrap=True, min_width=max((len(str(r.get(col) or "")) for r in rows), default=0))
        else:
            table.add_column(col)
    for row in rows:
        table.add_row(*[_cell(row.get(col)) for col in columns])
    console.print(table)


def _cell(value: Any) -> Text:
    """A table cell shown as it is (a plain string would be read as rich markup: ``[/x]`` in a result failed)."""
    if value is None:
        return Text("")
    if isinstance(value, dict | list):
        text = json.dumps(value)
        return Text(text if len(text) <= 60 else text[:57] + "...")
    return Text(str(value))


# ---- commands ------------------------------------------------------------------------------------
def cmd_runtime(args: argparse.Namespace, c: Client) -> None:
    if args.action == "create":
        body = {k: v for k, v in {"name": args.name, "image": args.image, "path": args.path,
                                  "dependencies": args.dependencies, "run": args.run}.items() if v is not None}
        show(args, c.request("POST", "/v1/runtimes", body), ["name", "image", "path", "dependencies", "run"])
    elif args.action == "list":
        show(args, c.request("GET", "/v1/runtimes"), ["name", "image", "path", "dependencies", "run"], "runtimes")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/runtimes/{q(args.name)}"), ["name", "image", "path", "dependencies", "run"])
    elif args.action == "delete":
        c.request("DELETE", f"/v1/runtimes/{q(args.name)}")
        show(args, {"deleted": args.name})


def cmd_function(args: argparse.Namespace, c: Client) -> None:
    cols = ["name", "version", "runtime", "entrypoint", "size", "sha256"]
    if args.action == "upload":
        query = {"runtime": args.runtime}
        for key in ("entrypoint", "timeout", "preload", "min_warm", "max_warm", "keepalive"):
            value = getattr(args, key, None)
            if value is not None:
                query[key] = str(value)
        data = archive_of(Path(args.path))
        # The runtime before the archive: a name mistyped is a clear 404 now, not an upload cut short (the
        # controller refuses it before reading the archive, and may close before the CLI has sent it all).
        c.request("GET", f"/v1/runtimes/{q(args.runtime)}")
        record = c.upload(f"/v1/functions/{q(args.name)}?{urllib.parse.urlencode(query)}", data, not args.json)
        show(args, record, cols)
    elif args.action == "list":
        show(args, c.request("GET", "/v1/functions"), cols, "functions")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/functions/{q(args.name)}"), [*cols, "versions", "nodes"])
    elif args.action == "delete":
        c.request("DELETE", f"/v1/functions/{q(args.name)}")
        show(args, {"deleted": args.name})


CALL_COLS = ["id", "function", "version", "status", "node", "result", "error"]


def retrying(send: Callable[[], Any], pauses: Sequence[float], again: Callable[[CliError], bool]) -> Any:
    """``send()``, sent again after each pause while it fails in a way ``again`` accepts."""
    for pause in (*pauses, None):
        try:
            return send()
        except CliError as exc:
            if pause is None or not again(exc):
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")


def post_again(exc: CliError) -> bool:
    """An invoke request is sent again (with its Idempotency-Key: the controller makes nothing twice) when the
    connection broke after it went out or a proxy in front failed (502/504); not when nothing listens (the
    controller is down: say so at once), after a whole HTTP timeout, on a 500 (it would fail again), nor on the
    controller's 503 (not accepted, but a call that had reached a node may have run: the user decides)."""
    return exc.unsure and not exc.timed_out and exc.status != 500


def poll_again(exc: CliError) -> bool:
    """A wait on a call is sent again through any outage (a controller restarting refuses connections for a
    while, its store fails: 503), not on an answer that says no (404, 401)."""
    return exc.unsure or exc.refused or exc.status == 503


def get_call(c: Client, call_id: str, again: Callable[[CliError], bool]) -> dict[str, Any]:
    path = f"/v1/calls/{q(call_id)}"
    call = retrying(lambda: c.request("GET", path, timeout=POLL_TIMEOUT), POLL_RETRIES, again)
    if not isinstance(call, dict) or not isinstance(call.get("status"), str):
        raise CliError(f"GET {path}: the answer is not a call: {str(call)[:200]!r}")
    return call


def wait_for(c: Client, tracked: Tracked, human: bool, timeout: float,
             replay: Callable[[float], Any] | None = None) -> Any:
    """Wait for the call until it ends; ``tracked.status`` follows it. Unfinished if ``timeout`` passes first.

    ``replay(wait)``: the request that made the call, sent again with its Idempotency-Key to the sync route, which
    answers with the call as it stands and waits up to ``wait`` s for its outcome (`invoke`: the outcome comes as
    soon as it is stored). Without it, or once the controller refuses it (a 4xx), the call is polled: every
    POLL_MIN to POLL_MAX s, a quick call is seen ended within milliseconds and a long one costs a few requests a
    second. Until the controller has answered once (``tracked.status`` is None: `calls wait` with a wrong URL) a
    refused connection is an error at once; after, it is an outage to wait through."""
    assert tracked.id is not None
    start = time.monotonic()
    deadline = start + timeout
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=errors,
                  disable=not human or not errors.is_terminal, transient=True) as progress:
        task = progress.add_task(f"call {tracked.id}: {tracked.status or 'waiting'}")
        while True:
            began = time.monotonic()
            call = None
            if replay is not None:
                try:
                    call = replay(max(0.0, min(SYNC_WAIT, deadline - began)))
                except CliError as exc:
                    if exc.status is None or exc.status >= 500:
                        raise
                    replay = None  # the route will not wait on it (409, an older controller's 404 or 429): poll
            if call is None:
                call = get_call(c, tracked.id, poll_again if tracked.status is not None else lambda exc: exc.unsure)
            elif not isinstance(call, dict) or call.get("id") != tracked.id or not isinstance(call.get("status"), str):
                raise CliError(f"the sync invoke replayed for call {tracked.id} answered: {str(call)[:200]!r}")
            tracked.status = call["status"]
            progress.update(task, description=f"call {tracked.id}: {call['status']}")
            if call["status"] in TERMINAL:
                # (a 202 naming a call that ended meanwhile has no outcome in it)
                return call if "function" in call else get_call(c, tracked.id, poll_again)
            now = time.monotonic()
            if now >= deadline:
                raise Unfinished([tracked], reason=f"call {tracked.id} still {call['status']} after {timeout:g} s")
            if replay is None or now - began < SYNC_WAIT / 2:  # a poll, or a wait the controller cut short
                time.sleep(min(max(POLL_MIN, (now - start) / 10), POLL_MAX, deadline - now))


def idempotency_key(args: argparse.Namespace) -> str:
    key: str | None = args.idempotency_key
    if key is None:
        return f"shoal-cli-{uuid.uuid4().hex}"
    if not 1 <= len(key) <= 190 or not key.isascii() or not key.isprintable():
        raise CliError("--idempotency-key must be 1-190 printable ASCII characters")
    return key


def submit(c: Client, path: str, body: dict[str, Any], key: str) -> Any:
    """POST an invoke request with its Idempotency-Key, again (same key) if its fate is not known."""
    return retrying(lambda: c.request("POST", path, body, headers={"Idempotency-Key": key}), POST_RETRIES,
                    post_again)


def accepted_call(answer: Any, what: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
        raise CliError(f"{what}: the answer is not an accepted call: {str(answer)[:200]!r}")
    return answer


def signal_of(exc: KeyboardInterrupt) -> int:
    return int(exc.signum) if isinstance(exc, Stopped) else int(signal.SIGINT)


BATCH_MAX = 1000  # calls per invoke-batch request (the controller's bound)
PAGE_MAX = 1000  # calls per page of GET /v1/calls (the controller's bound)


def read_params_lines(path: str) -> list[Any]:
    """One JSON value per line (blank lines skipped); ``-`` is stdin."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8
        raise CliError(f"cannot read {path}: {exc}") from None
    params: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                params.append(json.loads(line))
            except ValueError as exc:
                raise CliError(f"{path}:{number}: not JSON ({exc})") from None
    if not params:
        raise CliError(f"{path}: no params (one JSON value per line)")
    return params


def cmd_invoke_batch(args: argparse.Namespace, c: Client) -> None:
    """BATCH_MAX calls per request, request N with the Idempotency-Key ``KEY-N``: rerun with the same
    --idempotency-key, the requests already accepted answer with their calls again and only the rest are made."""
    if args.params is not None or args.async_:
        raise CliError("--batch reads each call's params from its file and does not wait: no --params/--async")
    params = read_params_lines(args.batch)
    key = idempotency_key(args)
    path = f"/v1/functions/{q(args.name)}/invoke-batch"
    requests = -(-len(params) // BATCH_MAX)
    accepted: list[dict[str, Any]] = []
    in_flight = ""  # the request sent whose answer has not come
    try:
        for number, start in enumerate(range(0, len(params), BATCH_MAX), 1):
            chunk = params[start:start + BATCH_MAX]
            body: dict[str, Any] = {"calls": [{"params": p} for p in chunk]}
            if args.timeout is not None:
                body["timeout"] = args.timeout
            in_flight = (f"request {number} of {requests} ({len(chunk)} call{'s' * (len(chunk) != 1)}) may have "
                         "been accepted")
            answer = submit(c, path, body, f"{key}-{number}")
            made = answer.get("calls") if isinstance(answer, dict) else None
            if not isinstance(made, list) or len(made) != len(chunk):
                raise CliError(f"POST {path}: the answer does not list the {len(chunk)} calls sent: "
                               f"{str(answer)[:200]!r}")
            accepted += [accepted_call(call, f"POST {path}") for call in made]
            in_flight = ""
    except KeyboardInterrupt as exc:
        raise Unfinished(listed(accepted), interrupted=signal_of(exc), batch=True, rerun_key=key, unsure=in_flight,
                         reason=f"{len(accepted)} of {len(params)} calls accepted") from None
    except CliError as exc:
        if not accepted and not exc.unsure:
            raise  # nothing was made
        # The calls accepted are queued and will run: say which, and how to finish without repeating them.
        reason = f"only the first {len(accepted)} of {len(params)} calls were accepted: {exc}" if accepted else str(exc)
        raise Unfinished(listed(accepted), batch=True, rerun_key=key, unsure=in_flight if exc.unsure else "",
                         reason=reason) from None
    show(args, accepted, ["id", "status", "location"], f"{len(accepted)} calls accepted")


def listed(calls: list[dict[str, Any]]) -> list[Tracked]:
    return [Tracked(call["id"], call.get("status")) for call in calls]


def cmd_invoke(args: argparse.Namespace, c: Client) -> None:
    """Submit (invoke-async: the id comes at once), then wait on the call through the sync route, the same
    request replayed with its Idempotency-Key and an explicit ``wait`` (SYNC_WAIT, well within the HTTP timeout),
    as many times as the call takes: the outcome comes as soon as it is stored, however long the call, and from
    the moment the first POST is answered an interrupt has the id to report. (The sync route alone would save a
    quick call one request, about a millisecond; an interrupt during it would have no id to give.)"""
    if args.batch is not None:
        cmd_invoke_batch(args, c)
        return
    try:
        params = json.loads(args.params) if args.params is not None else None
    except ValueError as exc:
        raise CliError(f"--params must be JSON: {exc}") from None
    body: dict[str, Any] = {"params": params}
    if args.timeout is not None:
        body["timeout"] = args.timeout
    key = idempotency_key(args)
    path = f"/v1/functions/{q(args.name)}/invoke-async"
    tracked = Tracked()
    try:
        answer = accepted_call(submit(c, path, body, key), f"POST {path}")
        tracked.id, tracked.status = answer["id"], answer.get("status")
        if args.async_:
            show(args, answer)
            return
        sync = f"/v1/functions/{q(args.name)}/invoke"

        def replay(wait: float) -> Any:
            return retrying(lambda: c.request("POST", sync, {**body, "wait": wait}, headers={"Idempotency-Key": key},
                                              timeout=wait + POLL_TIMEOUT), POLL_RETRIES, poll_again)

        call = wait_for(c, tracked, not args.json, INVOKE_WAIT, replay)
    except KeyboardInterrupt as exc:
        raise Unfinished([tracked], interrupted=signal_of(exc), rerun_key=key,
                         unsure="" if tracked.id else "the call may have been made") from None
    except Unfinished as exc:
        exc.rerun_key = key
        raise
    except CliError as exc:
        if tracked.id is None and not exc.unsure:
            raise  # nothing was made
        raise Unfinished([tracked], reason=str(exc), rerun_key=key,
                         unsure="" if tracked.id else "the call may have been made") from None
    show(args, call, CALL_COLS)
    if call["status"] != "DONE":
        sys.exit(1)


def report(args: argparse.Namespace, exc: Unfinished) -> None:
    """The calls an unfinished command leaves, each with its full id, and how to pick them up again: under
    --json a JSON object on stdout (a list for a batch), always one line on stderr (and the ids above it)."""
    if args.json:
        entries: list[dict[str, Any]] = []
        for call in exc.calls:
            entry: dict[str, Any] = {"id": call.id, "status": call.status, "interrupted": bool(exc.interrupted)}
            if exc.batch and call.id is not None:
                entry["location"] = f"/v1/calls/{call.id}"
            if exc.rerun_key is not None:
                entry["idempotency_key"] = exc.rerun_key
            if not exc.interrupted:
                entry["error"] = exc.reason
            entries.append(entry)
        print(json.dumps(entries if exc.batch else entries[0]), flush=True)
    elif exc.batch:  # plain lines: a table would cut ids to the terminal's width
        for call in exc.calls:
            print(f"{call.id} {call.status}", file=sys.stderr)
    head = f"interrupted ({signal.Signals(exc.interrupted).name})" if exc.interrupted else "error"
    if exc.batch:
        what = f"{exc.reason}{' (listed)' if exc.calls else ''}"
        if exc.unsure:
            what += f"; {exc.unsure}"
        hint = (f"rerun the same command with --idempotency-key {exc.rerun_key}: the requests already accepted "
                "are not made again (their calls are listed again), the rest are sent")
    elif (call_id := exc.calls[0].id) is not None:
        state = f"call {call_id} ({exc.calls[0].status or 'status unknown'}) goes on"
        gone_on = "it goes on" if call_id in exc.reason else state
        what = state if exc.interrupted else f"{exc.reason}; {gone_on}"
        hint = f"`shoal calls wait {call_id}` waits for it again" + (
            f", `shoal calls cancel {call_id}` stops it" if exc.interrupted else "")
    else:
        what = "before the controller answered" if exc.interrupted else exc.reason
        what += f"; {exc.unsure}" if exc.unsure else ""
        hint = (f"rerun the same command with --idempotency-key {exc.rerun_key}: it makes the call only if it was "
                "not made, and gives its id")
    errors.print(Text.assemble((f"{head}: ", "red"), f"{what}: {hint}"), soft_wrap=True)


def cmd_calls(args: argparse.Namespace, c: Client) -> None:
    if args.action == "list":
        query = {k: v for k, v in {"function": args.function, "status": args.status,
                                   "limit": args.limit}.items() if v is not None}
        wanted = 50 if args.limit is None else int(args.limit)
        if wanted < 1:
            raise CliError("--limit must be at least 1")
        calls: list[dict[str, Any]] = []
        while True:  # a status filter that matches few gives short pages: follow them up to the limit
            query["limit"] = min(PAGE_MAX, wanted - len(calls))
            page = c.request("GET", f"/v1/calls?{urllib.parse.urlencode(query)}")
            calls += page["calls"]
            if len(calls) >= wanted or page["next_cursor"] is None:
                break
            query["cursor"] = page["next_cursor"]
        listing = {"calls": calls, "next_cursor": page["next_cursor"]}
        show(args, listing if args.json else calls, CALL_COLS, "calls")
    elif args.action == "get":
        show(args, c.request("GET", f"/v1/calls/{q(args.id)}"))
    elif args.action == "wait":
        tracked = Tracked(args.id)
        try:
            call = wait_for(c, tracked, not args.json, args.timeout)
        except KeyboardInterrupt as exc:
            raise Unfinished([tracked], interrupted=signal_of(exc)) from None
        except CliError as exc:
            if tracked.status is None or not poll_again(exc):
                raise  # never reached, or an answer that says no: no such call, not allowed, not a call
            raise Unfinished([tracked], reason=str(exc)) from None  # the controller lost for a while
        show(args, call, CALL_COLS)
        if call["status"] != "DONE":
            sys.exit(1)  # as `invoke` does: a script can tell a failed call
    elif args.action == "cancel":
        show(args, c.request("POST", f"/v1/calls/{q(args.id)}/cancel"))


def cmd_nodes(args: argparse.Namespace, c: Client) -> None:
    cols = ["node_id", "state", "capacity", "inflight", "done", "functions_ready", "status_url"]
    if args.action == "list":
        show(args, c.request("GET", "/v1/nodes"), cols, "nodes")
    else:
        show(args, c.request("GET", f"/v1/nodes/{q(args.id)}"))


# ---- local cluster -------------------------------------------------------------------------------
def cluster_record() -> Path:
    try:
        return state_dir() / "cluster.json"
    except OSError as exc:
        raise CliError(f"cannot use the state directory {exc.filename or ''} ($SHOAL_STATE_DIR): "
                       f"{exc.strerror or exc}") from None


def read_record() -> dict[str, Any] | None:
    """What `shoal up` recorded of the local cluster, None if nothing is; one error line if it cannot be read."""
    path = cluster_record()
    try:
        record = json.loads(path.read_text())
        recorded_processes(record)
        str(record["url"]), int(record["redis_port"]), str(record["redis_dir"])
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CliError(f"the record of the local cluster, {path}, cannot be read ({type(exc).__name__}: {exc}); "
                       "stop what it started by hand if anything still runs, then remove it") from None


def write_record(record: dict[str, Any]) -> None:
    """Whole or not at all (a crash or a full disk mid-write left a record no command could read)."""
    path = cluster_record()
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(record))
    os.replace(part, path)


def cmd_up(args: argparse.Namespace, c: Client) -> None:
    from shoal.devenv.docker_engine import EngineError
    from shoal.devenv.engine_users import process_lease
    from shoal.devenv.redis_server import RedisStartError
    from shoal.devenv.runtime_image import ImageBuildError
    from shoal.devenv.stack import engine_with_image
    from shoal.localcluster import ClusterError, LocalCluster

    if (record := read_record()) is not None:
        if any(procs.alive(p) for p in recorded_processes(record)):
            raise CliError(f"a local cluster is already up (see {cluster_record()}); run `shoal down` first")
        stop_recorded(record)  # none of its processes runs any more (a crash, a reboot): clear what is left
    try:  # tokens from the environment protect the local cluster as they would a deployed one
        api_token, node_token = token_from_env("SHOAL_API_TOKEN"), token_from_env("SHOAL_NODE_TOKEN")
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    base = cluster_record().parent / "cluster"
    try:
        engine = engine_with_image()
    except (EngineError, ImageBuildError) as exc:
        raise CliError(f"cannot start the Docker engine or its runtime image: {exc}") from None
    cluster = LocalCluster(engine.url, agents=args.agents, policy=args.policy, port=args.port, name=args.name,
                           base=base, log_level="warning", detach=True, api_token=api_token,
                           node_token=node_token)
    try:
        base.mkdir(parents=True, exist_ok=True)
        cluster.start()
        record = cluster.describe()
        if engine.lease is not None and engine.root is not None:
            # The private engine: held while the controller runs (released by `shoal down`, or with the controller).
            engine.keep(process_lease(int(record["controller"]["pid"])))
            record["engine_lease"], record["engine_root"] = engine.lease, str(engine.root)
        write_record(record)
    except BaseException as exc:
        # Ctrl-C, SIGTERM or SIGHUP (`main` makes them exceptions here) included: nothing is left running, and a
        # second signal does not cut the cleanup short.
        ignore_termination()
        cluster.stop()
        engine.stop()
        if isinstance(exc, ClusterError | RedisStartError | OSError):
            raise CliError(f"the local cluster did not start: {exc} (logs in {base})") from None
        raise
    show(args, record)


def recorded_processes(record: dict[str, Any]) -> list[dict[str, int]]:
    return [*record["agents"].values(), record["controller"], *([record["dockerd"]] if "dockerd" in record else [])]


def stop_recorded(record: dict[str, Any]) -> None:
    """Stop what ``shoal up`` recorded, each process only if it is still the one started (pids are reused)."""
    from shoal.devenv.redis_server import RedisServer

    for process in [*record["agents"].values(), record["controller"]]:
        procs.stop(process)
    RedisServer(port=int(record["redis_port"]), directory=Path(record["redis_dir"])).stop(remove=True)
    if "engine_lease" in record:
        from shoal.devenv.docker_engine import release

        release(Path(record["engine_root"]), record["engine_lease"])  # stopped if nothing else uses it
    elif "dockerd" in record:  # a record written before leases
        procs.stop(record["dockerd"])
    cluster_record().unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace, c: Client) -> None:
    record = read_record()
    if record is None:
        show(args, {"down": "nothing was up"})
        return
    stop_recorded(record)
    show(args, {"down": record["url"]})


def cmd_status(args: argparse.Namespace, c: Client) -> None:
    record = read_record()
    if record is None:
        raise CliError("no local cluster is up (`shoal up` starts one)")
    if not any(procs.alive(p) for p in recorded_processes(record)):  # (another cluster may answer on its port now)
        raise CliError(f"the local cluster recorded in {cluster_record()} is not running (a crash, a reboot?); "
                       "`shoal down` clears what is left of it")
    client = Client(record["url"])
    client.auth = c.auth  # the token the cluster was started with ($SHOAL_API_TOKEN), as every other command
    health = client.request("GET", "/v1/health")
    nodes = client.request("GET", "/v1/nodes")
    if args.json:
        show(args, {"cluster": record, "health": health, "nodes": nodes})
        return
    console.print(f"controller {record['url']}  queued {health['queued']}  active {health['active']}", markup=False)
    show(args, nodes, ["node_id", "state", "capacity", "inflight", "done", "functions_ready"], "nodes")


# ---- deployment ----------------------------------------------------------------------------------
PLAYBOOKS = {"site": "site.yml", "upgrade": "upgrade.yml", "teardown": "teardown.yml"}


def playbooks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "playbooks"
    if not (here / "site.yml").is_file():
        raise CliError(f"no playbooks next to this installation ({here}); run from a Shoal checkout")
    return here


def cmd_deploy(args: argparse.Namespace, c: Client) -> None:
    """`ansible-playbook -i INVENTORY playbooks/<action>.yml`, with the project's ansible.cfg."""
    import shutil

    book = playbooks_dir()
    exe = shutil.which("ansible-playbook", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if exe is None:
        raise CliError("ansible-playbook is not installed: pip install ansible-core (or -e '.[deploy]')")
    if not Path(args.inventory).exists():
        raise CliError(f"no inventory at {args.inventory}")
    env = dict(os.environ, ANSIBLE_CONFIG=str(book / "ansible.cfg"))
    rest = list(args.rest)  # [ACTION] [-- ANSIBLE ARGS...]; argparse would take an option after -- for the action
    action = rest.pop(0) if rest[:1] and rest[0] in PLAYBOOKS else "site"
    if rest[:1] == ["--"]:
        rest.pop(0)
    elif rest:
        raise CliError(f"deploy: expected {' | '.join(sorted(PLAYBOOKS))}, then -- and ansible-playbook's "
                       f"arguments; got {rest[0]!r}")
    cmd = [exe, "-i", args.inventory, str(book / PLAYBOOKS[action]), *rest]
    sys.stdout.flush()
    # Under --json, stdout is for the one JSON answer: ansible-playbook's report goes to stderr.
    code = subprocess.call(cmd, env=env, stdout=sys.stderr.fileno() if args.json else None)
    if code != 0:
        raise CliError(f"ansible-playbook exited with {code}")
    if args.json:
        show(args, {"deployed": action, "playbook": str(book / PLAYBOOKS[action]), "inventory": args.inventory})


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: functions as a service.")
    parser.add_argument("--url", default=os.environ.get("SHOAL_URL", "http://127.0.0.1:3000"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    rt = sub.add_parser("runtime", help="runtimes").add_subparsers(dest="action", required=True)
    create = rt.add_parser("create")
    create.add_argument("--image", required=True)
    create.add_argument("--name")
    create.add_argument("--path")
    create.add_argument("--dependencies")
    create.add_argument("--run")
    rt.add_parser("list")
    for action in ("get", "delete"):
        rt.add_parser(action).add_argument("name")

    fn = sub.add_parser("function", help="functions").add_subparsers(dest="action", required=True)
    upload = fn.add_parser("upload")
    upload.add_argument("name")
    upload.add_argument("path", help="a directory (packed as tar.gz) or a zip/tar.gz archive")
    upload.add_argument("--runtime", required=True)
    upload.add_argument("--entrypoint", help="module:function for handler style")
    upload.add_argument("--timeout", type=float)
    upload.add_argument("--preload", choices=["none", "runtime", "function"])
    upload.add_argument("--min-warm", dest="min_warm", type=int)
    upload.add_argument("--max-warm", dest="max_warm", type=int)
    upload.add_argument("--keepalive", type=float)
    fn.add_parser("list")
    for action in ("get", "delete"):
        fn.add_parser(action).add_argument("name")

    inv = sub.add_parser("invoke", help="invoke a function")
    inv.add_argument("name")
    inv.add_argument("--params", help="JSON")
    inv.add_argument("--timeout", type=float)
    inv.add_argument("--async", dest="async_", action="store_true")
    inv.add_argument("--batch", metavar="FILE",
                     help="many calls without waiting: one JSON params per line ('-': stdin)")
    inv.add_argument("--idempotency-key", dest="idempotency_key", metavar="KEY",
                     help="the same command rerun with the same KEY makes nothing twice: it answers with the call "
                     "(or, with --batch, the calls) the first run made; without it the CLI makes a key, and "
                     "reports it when a run is cut short")

    calls = sub.add_parser("calls", help="calls").add_subparsers(dest="action", required=True)
    lst = calls.add_parser("list")
    lst.add_argument("--function")
    lst.add_argument("--status")
    lst.add_argument("--limit", type=int)
    for action in ("get", "cancel"):
        calls.add_parser(action).add_argument("id")
    wait = calls.add_parser("wait")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=3600)

    nodes = sub.add_parser("nodes", help="nodes").add_subparsers(dest="action", required=True)
    nodes.add_parser("list")
    nodes.add_parser("get").add_argument("id")

    up = sub.add_parser("up", help="start a local cluster (Redis, Docker engine, controller, agents)")
    up.add_argument("--agents", type=int, default=2)
    up.add_argument("--port", type=int, default=3000)
    up.add_argument("--policy", choices=["none", "runtime", "function"], default="function")
    up.add_argument("--name", default="node", help="node ids are NAME-1..N (an agent removes its node's containers at "
                    "start: two clusters on one Docker engine need different names)")
    sub.add_parser("down", help="stop the local cluster")
    deploy = sub.add_parser("deploy", help="roll a cluster out with Ansible (wraps ansible-playbook)")
    deploy.add_argument("-i", "--inventory", required=True, help="an Ansible inventory (see inventory/)")
    deploy.add_argument("rest", nargs=argparse.REMAINDER, metavar="[ACTION] [-- ANSIBLE_ARGS]",
                        help="site (default: roll out, idempotent), upgrade (rolling, one node at a time) or "
                        "teardown; anything after -- goes to ansible-playbook")
    sub.add_parser("status", help="the local cluster's state")
    for leaf in _leaves(parser):  # `shoal nodes list --json` as well as `shoal --json nodes list`
        if leaf is not parser:
            leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that end a command line (those with no subcommands of their own)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in dict.fromkeys(a.choices.values()) for leaf in _leaves(child)]


COMMANDS = {"runtime": cmd_runtime, "function": cmd_function, "invoke": cmd_invoke, "calls": cmd_calls,
            "nodes": cmd_nodes, "up": cmd_up, "down": cmd_down, "status": cmd_status, "deploy": cmd_deploy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own_signals = threading.current_thread() is threading.main_thread()
    handlers = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
                if own_signals else {})
    try:
        if own_signals:
            # SIGTERM (`timeout 60 shoal invoke ...`, a CI job cancelled), and SIGHUP (a terminal closed) while a
            # local cluster starts, are reported as Ctrl-C is.
            for sig in STOPPED_BY.get(args.command, ()):
                signal.signal(sig, _stop)
        try:
            token = token_from_env("SHOAL_API_TOKEN")
        except ConfigError as exc:
            raise CliError(str(exc)) from None
        COMMANDS[args.command](args, Client(args.url, token))
    except CliError as exc:
        # One line, whatever the terminal's width, and the message as written (no rich markup in it).
        errors.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        return 2
    except Unfinished as exc:
        ignore_termination()  # a second Ctrl-C must not cut the report short
        report(args, exc)
        return 128 + exc.interrupted if exc.interrupted else 2
    except KeyboardInterrupt as exc:
        errors.print("interrupted")
        return 128 + signal_of(exc)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
