"""`shoal invoke` and `shoal calls wait` against a scripted stand-in for the controller's invoke and call routes
(a real local HTTP server): a wait cut short (Ctrl-C, SIGTERM, a batch between requests, a request whose answer
never came) reports every call's full id, or the Idempotency-Key to rerun with, and never loses one; every invoke
request carries an Idempotency-Key, and a request whose fate is unknown is sent again with the same one; a call
that outlives the CLI's HTTP timeout is still waited for. No cluster needed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.shoal.test_cli_client import serve

GUARD = 60  # seconds to wait for the CLI to get somewhere before the test gives up on it (a hang, not a bound)


class Rig:
    """What the stand-in controller does and what it saw.

    A wait is a GET /v1/calls/ID or a sync invoke that says how long to wait (``wait``): ``statuses`` is what the
    waits see in turn (the last one for ever); a sync invoke answers 200 with the call once it sees it ended, else
    202 at once (the controller would hold it up to ``wait``: time runs faster here). ``hold_from``: the POSTs
    from this one on (1-based) are held unanswered until the test ends; ``drop_first``: the first POST is acted on
    (its calls are made) but the connection closes without an answer; ``fail_waits``: the waits (1-based) that get
    a 503; ``refuse_sync``: the status a sync invoke that says how long to wait gets instead (409: a controller
    that will not replay it); ``sync_holds``: a sync invoke that does not say how long to wait is held (a call
    longer than the client waits), else it answers 202 at once, as when its wait has passed."""

    def __init__(self, statuses: tuple[str, ...] = ("QUEUED",), hold_from: int = 0, drop_first: bool = False,
                 fail_waits: tuple[int, ...] = (), refuse_sync: int = 0, sync_holds: bool = False) -> None:
        self.statuses, self.hold_from, self.drop_first = statuses, hold_from, drop_first
        self.fail_waits, self.refuse_sync, self.sync_holds = fail_waits, refuse_sync, sync_holds
        self.refuse_posts = 0  # the status every POST gets instead, if set
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.made: dict[str | None, list[str]] = {}  # idempotency key -> the ids it made (None: no key)
        self.waits: list[str] = []  # "GET" or "sync", in turn
        self.lock = threading.Lock()
        # polled: a second wait came (an answer to the first arrived); held: a POST is held unanswered
        self.polled, self.held, self.release = threading.Event(), threading.Event(), threading.Event()

    def make(self, key: str | None, count: int) -> list[str]:
        with self.lock:
            if key is not None and key in self.made:
                return self.made[key]  # a replayed key: the same calls
            ids = [secrets.token_hex(16) for _ in range(count)]
            self.made.setdefault(key, []).extend(ids)
            return ids

    def wait(self, kind: str) -> tuple[int, str]:
        """A wait of ``kind`` comes: its number (1-based) and the status it sees."""
        with self.lock:
            self.waits.append(kind)
            number = len(self.waits)
        if number >= 2:
            self.polled.set()
        return number, self.statuses[min(number, len(self.statuses)) - 1]


def controller(rig: Rig) -> type[BaseHTTPRequestHandler]:
    class Controller(BaseHTTPRequestHandler):
        def answer(self, status: int, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def error(self, status: int, message: str) -> None:
            self.answer(status, {"error": {"code": str(status), "message": message}})

        def call(self, call_id: str, status: str) -> dict[str, Any]:
            return {"id": call_id, "function": "f", "status": status,
                    "result": {"ok": True} if status == "DONE" else None}

        def hold(self) -> None:
            rig.held.set()
            rig.release.wait()
            self.close_connection = True

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            with rig.lock:
                rig.posts.append((self.path, dict(self.headers), body))
                number = len(rig.posts)
            if rig.hold_from and number >= rig.hold_from:
                return self.hold()
            if rig.refuse_posts:
                return self.error(rig.refuse_posts, "not accepted")
            key = self.headers.get("Idempotency-Key")
            sync = self.path.endswith("/invoke")
            if sync and "wait" in body and rig.refuse_sync:
                return self.error(rig.refuse_sync, "not replayed here")
            if sync and "wait" not in body and rig.sync_holds:
                return self.hold()
            if self.path.endswith("/invoke-batch"):
                ids = rig.make(key, len(body["calls"]))
                calls = [{"id": i, "status": "QUEUED", "location": f"/v1/calls/{i}"} for i in ids]
                answer: tuple[int, Any] = (202, {"count": len(calls), "calls": calls})
            else:
                call_id = rig.make(key, 1)[0]
                status = "QUEUED"
                if sync and "wait" in body:
                    waited, status = rig.wait("sync")
                    if waited in rig.fail_waits:
                        return self.error(503, "the store is failing")
                    if status in ("DONE", "FAILED"):
                        return self.answer(200, self.call(call_id, status))
                answer = (202, {"id": call_id, "status": status, "location": f"/v1/calls/{call_id}"})
            if rig.drop_first and number == 1:
                self.close_connection = True  # acted on, but the answer is lost
                return None
            return self.answer(*answer)

        def do_GET(self) -> None:
            call_id = self.path.rsplit("/", 1)[-1]
            waited, status = rig.wait("GET")
            if waited in rig.fail_waits:
                return self.error(503, "the store is failing")
            if not any(call_id in ids for ids in rig.made.values()):
                return self.error(404, f"no call {call_id!r}")
            return self.answer(200, self.call(call_id, status))

        def log_message(self, *_: Any) -> None:
            pass

    return Controller


@pytest.fixture
def start() -> Iterator[Any]:
    servers: list[tuple[ThreadingHTTPServer, Rig]] = []

    def started(rig: Rig) -> str:
        server, url = serve(controller(rig))
        servers.append((server, rig))
        return url

    yield started
    for server, rig in servers:
        rig.release.set()
        server.shutdown()
        server.server_close()


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_API_TOKEN")}


#: Runs the CLI with Ctrl-C as a user's terminal delivers it: a test run started in the background (``cmd &``, as a
#: CI runner may start it) has SIGINT ignored, and a child inherits that: the CLI never saw the interrupt. (Not a
#: preexec_fn: it is unsafe with the threads these tests run.)
AT_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "runpy.run_module('shoal.cli', run_name='__main__', alter_sys=True)")


def launch(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", AT_A_TERMINAL, "--url", url, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())


def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "--url", url, *args], capture_output=True, text=True,
                          timeout=GUARD, env=env())


def stop_when(proc: subprocess.Popen[str], reached: threading.Event, signum: int) -> tuple[int, str, str]:
    """Once the CLI has got to ``reached``, send it ``signum``; its exit code and output."""
    if not reached.wait(GUARD):
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI never got there: exit {proc.returncode}, stdout {out!r}, stderr {err!r}")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=GUARD)
    return proc.returncode, out, err


def keys_sent(rig: Rig) -> list[str | None]:
    return [headers.get("Idempotency-Key") for _, headers, _ in rig.posts]


@pytest.mark.parametrize("command", ["invoke", "calls wait"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_wait_gives_the_full_id_as_json(start: Any, command: str, signum: int) -> None:
    rig = Rig(statuses=("QUEUED",))
    url = start(rig)
    if command == "invoke":
        proc = launch(url, "--json", "invoke", "f", "--params", "1")
    else:
        call_id = rig.make(None, 1)[0]
        proc = launch(url, "--json", "calls", "wait", call_id)
    code, out, err = stop_when(proc, rig.polled, signum)
    assert code == 128 + signum, err
    if command == "invoke":
        [call_id] = rig.made[keys_sent(rig)[0]]
    reported = json.loads(out)
    assert reported["id"] == call_id and reported["status"] == "QUEUED" and reported["interrupted"] is True, out
    if command == "invoke":
        assert reported["idempotency_key"] == keys_sent(rig)[0]
    assert f"shoal calls wait {call_id}" in err and "Traceback" not in err


def test_an_interrupted_invoke_gives_the_full_id_to_a_human(start: Any) -> None:
    rig = Rig(statuses=("QUEUED", "RUNNING"))
    url = start(rig)
    code, out, err = stop_when(launch(url, "invoke", "f"), rig.polled, signal.SIGINT)
    [call_id] = rig.made[keys_sent(rig)[0]]
    assert code == 130 and out == ""
    assert f"shoal calls wait {call_id}" in err and f"shoal calls cancel {call_id}" in err, err


@pytest.mark.parametrize("json_out", [True, False])
def test_an_invoke_interrupted_before_its_answer_gives_the_key_to_rerun_with(start: Any, json_out: bool) -> None:
    """The controller holds the request (a slow store, a sync route's wait): no id yet, but the call may exist.
    The key the request carried is the handle: the same command rerun with it makes nothing twice."""
    rig = Rig(hold_from=1)
    url = start(rig)
    proc = launch(url, *(["--json"] if json_out else []), "invoke", "f", "--params", "1")
    code, out, err = stop_when(proc, rig.held, signal.SIGINT)
    [key] = keys_sent(rig)
    assert code == 130 and key, err
    if json_out:
        assert json.loads(out) == {"id": None, "status": None, "interrupted": True, "idempotency_key": key}
    assert f"--idempotency-key {key}" in err, err
    # The rerun with that key answers with the call the first request made (here: the stand-in's replay).
    rig.hold_from = 0
    rig.statuses = ("DONE",)
    done = run(url, "--json", "invoke", "f", "--params", "1", "--idempotency-key", key)
    assert done.returncode == 0, done.stderr
    assert set(keys_sent(rig)) == {key} and rig.made[key] == [json.loads(done.stdout)["id"]]


@pytest.mark.parametrize("json_out", [True, False])
def test_a_batch_interrupted_lists_the_calls_accepted(start: Any, tmp_path: Path, json_out: bool) -> None:
    """1,001 calls: the first request (1,000) is accepted, the second is held when Ctrl-C comes."""
    lines = tmp_path / "params.jsonl"
    lines.write_text("".join(f"{i}\n" for i in range(1001)))
    rig = Rig(hold_from=2)
    url = start(rig)
    proc = launch(url, *(["--json"] if json_out else []), "invoke", "f", "--batch", str(lines))
    code, out, err = stop_when(proc, rig.held, signal.SIGINT)
    assert code == 130, err
    first, second = keys_sent(rig)
    assert first and second and first != second
    accepted = rig.made[first]
    assert len(accepted) == 1000
    if json_out:
        listing = json.loads(out)
        assert [c["id"] for c in listing] == accepted
        assert all(c["interrupted"] is True and c["status"] == "QUEUED" for c in listing)
        key = listing[0]["idempotency_key"]
    else:
        assert out == "" and all(call_id in err for call_id in accepted)
        key = err.split("--idempotency-key ", 1)[1].split(":", 1)[0]
    assert f"--idempotency-key {key}" in err and "request 2 of 2 (1 call) may have been accepted" in err, err
    # Rerun with the key: the first request is replayed (its calls listed again), only the rest are made.
    rig.hold_from = 0
    done = run(url, "--json", "invoke", "f", "--batch", str(lines), "--idempotency-key", key)
    assert done.returncode == 0, done.stderr
    ids = [c["id"] for c in json.loads(done.stdout)]
    assert len(ids) == len(set(ids)) == 1001 and ids[:1000] == accepted
    assert keys_sent(rig)[2:] == [first, second]


def test_every_invoke_request_carries_an_idempotency_key_and_a_wait_below_the_http_timeout(start: Any,
                                                                                         tmp_path: Path) -> None:
    """One key per call (the waits on it replay its request: the same key) and per batch request; a sync invoke
    always says how long to wait, within the CLI's HTTP timeout (else the controller may hold it past that)."""
    lines = tmp_path / "params.jsonl"
    lines.write_text("".join(f"{i}\n" for i in range(1500)))  # two requests
    rig = Rig(statuses=("QUEUED", "RUNNING", "DONE"))
    url = start(rig)
    keys: list[list[str | None]] = []
    for args in (["invoke", "f"], ["invoke", "f", "--async"], ["invoke", "f", "--batch", str(lines)],
                 ["invoke", "f", "--params", "[1]"]):
        before = len(rig.posts)
        done = run(url, "--json", *args)
        assert done.returncode == 0, done.stderr
        keys.append(keys_sent(rig)[before:])
    assert all(key for command in keys for key in command), keys
    invoked, submitted, batch, again = keys
    assert len(set(invoked)) == len(set(again)) == 1 and len(submitted) == 1 and len(set(batch)) == len(batch) == 2
    assert len({*invoked, *submitted, *batch, *again}) == 5
    from shoal import cli

    for path, _, body in rig.posts:
        assert not path.endswith("/invoke") or 0 <= body.get("wait", cli.HTTP_TIMEOUT) < cli.HTTP_TIMEOUT, body
    # The outcome came from the sync route (no poll), and the last call's from the last of its waits.
    assert "GET" not in rig.waits and json.loads(done.stdout)["status"] == "DONE"


def test_a_call_that_outlives_the_http_timeout_is_waited_for(start: Any) -> None:
    """The CLI's HTTP timeout cut to 2 s (as a call longer than 300 s would find it); the stand-in holds a sync
    invoke that does not say how long it waits for as long as the call runs. The user gets the outcome, not
    'cannot reach the controller'."""
    rig = Rig(statuses=("QUEUED", "RUNNING", "RUNNING", "RUNNING", "DONE"), sync_holds=True)
    url = start(rig)
    short = ("import sys\nfrom shoal import cli, httpclient\nopen_ = httpclient.urlopen\n"
             "httpclient.urlopen = lambda request, timeout: open_(request, min(timeout, 2.0))\n"
             "sys.exit(cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", short, "--url", url, "--json", "invoke", "f"], capture_output=True,
                          text=True, timeout=GUARD, env=env())
    assert done.returncode == 0, done.stderr
    call = json.loads(done.stdout)
    assert call["status"] == "DONE" and call["id"] in rig.made[keys_sent(rig)[0]]


def test_a_request_whose_answer_was_lost_is_sent_again_with_the_same_key(start: Any) -> None:
    """The first POST is acted on but its connection closes unanswered, and a wait meets a 503: the CLI sends the
    POST again with the same key (the controller answers with the call already made) and waits on."""
    rig = Rig(statuses=("QUEUED", "RUNNING", "DONE"), drop_first=True, fail_waits=(2,))
    url = start(rig)
    done = run(url, "--json", "invoke", "f")
    assert done.returncode == 0, done.stderr
    first, second, *waits = keys_sent(rig)
    assert first and first == second and set(waits) == {first} and len(rig.made) == 1
    assert json.loads(done.stdout)["id"] == rig.made[first][0]
    assert rig.waits == ["sync", "sync", "sync"]  # the second got the 503


def test_a_controller_that_will_not_replay_the_request_is_polled(start: Any) -> None:
    """A sync invoke replayed with the key refused (409 here; a controller from before keys were bound to their
    request answered a deleted function's or a full queue's replay with a 404 or a 429): the CLI polls the call."""
    rig = Rig(statuses=("RUNNING", "RUNNING", "DONE"), refuse_sync=409)
    url = start(rig)
    done = run(url, "--json", "invoke", "f")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "DONE" and rig.waits == ["GET", "GET", "GET"]
    assert [path.rsplit("/", 1)[1] for path, _, _ in rig.posts] == ["invoke-async", "invoke"]


def test_a_wait_that_times_out_gives_the_id_as_json(start: Any) -> None:
    rig = Rig(statuses=("RUNNING",))
    url = start(rig)
    call_id = rig.make(None, 1)[0]
    done = run(url, "--json", "calls", "wait", call_id, "--timeout", "0")
    assert done.returncode == 2, done.stderr
    reported = json.loads(done.stdout)
    assert reported["id"] == call_id and reported["status"] == "RUNNING" and reported["interrupted"] is False
    assert f"shoal calls wait {call_id}" in done.stderr


def test_an_unknown_call_or_function_is_one_error_line_not_a_report(start: Any) -> None:
    rig = Rig()
    url = start(rig)
    done = run(url, "--json", "calls", "wait", "nope")
    assert done.returncode == 2 and "HTTP 404" in done.stderr and done.stdout == ""
    done = run("http://127.0.0.1:9", "--json", "invoke", "f")  # nothing listens: nothing was made
    assert done.returncode == 2 and "cannot reach" in done.stderr and done.stdout == ""
    done = run(url, "invoke", "f", "--idempotency-key", "é")
    assert done.returncode == 2 and "--idempotency-key must be" in done.stderr and rig.posts == []
    # The controller's 503 on an invoke is its "not accepted" (and it says when a call may have run anyway): said
    # as it is, not sent again.
    rig.refuse_posts = 503
    done = run(url, "--json", "invoke", "f")
    assert done.returncode == 2 and "HTTP 503: not accepted" in done.stderr and done.stdout == ""
    assert len(rig.posts) == 1
