"""The miniworker against a ROUTER standing in for its broker, its engine stood in for (a real engine cannot be
made to refuse, or be slow, on cue) and a socketpair as its runner's connection where a call runs: its exit code
(whether its container may be left behind), what it sends the broker whatever the runner sends or does."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from miniworker.errors import ContainerError, LoadError
from miniworker.spec import LoadSpec, MiniworkerSpec
from miniworker.worker import EXIT_CONTAINER_LEFT, STRAY_RESULTS_MAX, ActiveCall, Miniworker
from shoal import protocol
from shoal.protocol import MAX_HEADER_BYTES, MAX_RESULT_MESSAGE, Message, Msg, pack_runner


def broker_and_spec(tmp_path: Path, mw_id: str, **fields: Any) -> tuple[zmq.Context[Any], zmq.Socket[Any],
                                                                          MiniworkerSpec]:
    """A broker's ROUTER on ipc, and a oneshot miniworker's spec pointing at it (its engine is nowhere)."""
    ctx: zmq.Context[Any] = zmq.Context()
    broker = ctx.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    url = f"ipc://{tmp_path}/broker.ipc"
    broker.bind(url)
    fields = {"mode": "oneshot", **fields}
    spec = MiniworkerSpec(mw_id=mw_id, node_id="n", broker_url=url, docker_url=f"unix://{tmp_path}/none.sock",
                          docker_api_version="1.41", image="x", runtime_path="/ws", workdir=str(tmp_path / "mw"),
                          src_dirs={}, **fields)
    return ctx, broker, spec


@contextmanager
def loaded_miniworker(tmp_path: Path, **fields: Any) -> Iterator[tuple[Miniworker, zmq.Socket[Any], socket.socket]]:
    """A bound miniworker whose function is loaded, its runner's connection one end of a socketpair (non-blocking,
    as after a load), and the other end (the runner's); no container (a kill or a removal is a no-op)."""
    ctx, broker, spec = broker_and_spec(tmp_path, "mw-s", mode="bound", **fields)
    mw = Miniworker(spec)
    mw.conn, runner = socket.socketpair()
    mw.conn.setblocking(False)
    mw.loaded = "f@1"
    try:
        yield mw, broker, runner
    finally:
        runner.close()
        mw.conn.close()
        mw.sock.close(linger=0)
        mw.container.close()
        broker.close()
        ctx.term()


def received(broker: zmq.Socket[Any], skip: bytes | None = Msg.MW_HEARTBEAT) -> Message:
    """The next message the broker's ROUTER gets (but ``skip``'s type), decoded as the broker does."""
    while True:
        assert broker.poll(10_000), "nothing came to the broker"
        _, *frames = broker.recv_multipart()
        msg = protocol.decode(frames)
        if msg.type != skip:
            return msg


def refuse() -> None:
    raise ContainerError("cannot remove container 0123456789ab: engine refused")


@pytest.mark.parametrize(("remove", "code"), [(lambda: None, 0), (refuse, EXIT_CONTAINER_LEFT)])
def test_a_container_the_miniworker_could_not_remove_is_its_exit_code(tmp_path: Path, remove: Any, code: int) -> None:
    ctx, broker, spec = broker_and_spec(tmp_path, "mw-t")
    mw = Miniworker(spec)
    try:
        mw.container.remove = remove  # type: ignore[method-assign]
        mw.stopping = True  # told to stop as soon as it is ready
        assert mw.run() == code
        assert broker.poll(5000)
        _, *frames = broker.recv_multipart()
        assert protocol.decode(frames).type == Msg.MW_READY
    finally:
        mw.container.close()
        broker.close()
        ctx.term()


@pytest.mark.parametrize("engine", ["restarting", "container gone"])
def test_the_wait_for_a_gone_runners_container_neither_hammers_the_engine_nor_goes_silent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """The engine refusing at once used to be asked again at once, for 10 s; the wait says MW_HEARTBEAT every
    heartbeat, so the broker does not take the miniworker for lost (and run its call again)."""
    import requests
    from docker.errors import NotFound

    from miniworker import worker as worker_module

    monkeypatch.setattr(worker_module, "RUNNER_EXIT_WAIT", 0.5)
    ctx, broker, spec = broker_and_spec(tmp_path, "mw-w", heartbeat=0.1)
    mw = Miniworker(spec)
    asked: list[float] = []

    def wait(container_id: str, timeout: float) -> None:
        asked.append(timeout)
        if engine == "container gone":
            raise NotFound("no such container")
        raise requests.ConnectionError("connection refused")

    try:
        mw.container.id = "c" * 64
        mw.container.api.wait = wait
        mw._wait_for_exit()
        if engine == "container gone":
            assert len(asked) == 1
        else:
            # At most one ask per heartbeat over the 0.5 s (it was as often as the engine answered), a heartbeat
            # between each two.
            assert 2 <= len(asked) <= 6
            heartbeats = 0
            while broker.poll(1000):
                _, *frames = broker.recv_multipart()
                heartbeats += protocol.decode(frames).type == Msg.MW_HEARTBEAT
                if heartbeats == len(asked) - 1:
                    break
            assert heartbeats == len(asked) - 1
    finally:
        mw.container.id = None
        mw.container.close()
        broker.close()
        ctx.term()


def test_a_result_that_grows_when_encoded_again_fails_its_call_instead_of_being_dropped_by_the_broker(
        tmp_path: Path) -> None:
    """The function's code shares the runner's process and can write its own R_RESULT: raw UTF-8 emoji and one
    escaped lone surrogate, within MAX_RESULT_MESSAGE. orjson refuses the surrogate, the standard library escapes
    every emoji (12 bytes for 4): the MW_RESULT took 46.8 MB, the broker dropped it (over MAX_HEADER_BYTES), and the
    call waited for its timeout and ran again. Now it fails, ResultTooLarge, in a message the broker takes."""
    with loaded_miniworker(tmp_path) as (mw, broker, runner):
        mw.call = ActiveCall("c1", time.monotonic() + 60, 60.0, time.monotonic(), cold=False)
        text = '{"call_id":"c1","ok":true,"stdout":"","stderr":"","result":"' + "\U0001f600" * 3_900_000 + '\\ud800"}'
        body = b"RRESULT\0" + text.encode()
        assert len(body) <= MAX_RESULT_MESSAGE  # within what the miniworker's stream takes
        writer = threading.Thread(target=runner.sendall, args=(struct.pack("!I", len(body)) + body,))
        writer.start()
        conn = mw.conn
        assert conn is not None
        while mw.call is not None:
            assert select.select([conn], [], [], 10)[0]
            mw.on_runner_readable()
        writer.join()
        msg = received(broker)
        assert msg.type == Msg.MW_RESULT
        assert (msg.header["call_id"], msg.header["status"]) == ("c1", "FAILED")
        assert msg.header["error"]["type"] == "ResultTooLarge"
        assert "result" not in msg.header
        size = int(msg.header["error"]["message"].split(" takes ")[1].split()[0])
        assert size > MAX_HEADER_BYTES  # what it would have taken, said


def test_a_load_failure_whose_report_is_too_large_still_reaches_the_broker(tmp_path: Path) -> None:
    """An import error's text comes whole from the runner (up to a result's bound), and MW_FAILED carried it twice
    (reason, error): 18 MB, dropped by the broker, and the function's failure to load was not reported as such."""
    with loaded_miniworker(tmp_path) as (mw, broker, _):
        text = "x" * 9_000_000
        mw.send(Msg.MW_FAILED, {"reason": text, "error": {"type": "ImportError", "message": text}, "logs": ""})
        msg = received(broker)
        assert msg.type == Msg.MW_FAILED
        assert msg.header["error"]["type"] == "LoadReportTooLarge"
        assert "18000" in msg.header["reason"] and len(msg.header["reason"]) < 1000  # its size, not its text


@pytest.mark.parametrize("error", ["not an object", ["a", "list"], {"type": 3}, None])
def test_a_forged_load_report_is_a_load_failure_with_the_reason(tmp_path: Path, error: Any) -> None:
    """The function's module code runs in the runner's process during the load and can write the report itself: an
    error that was not an object crashed the miniworker (AttributeError), seen by the broker as a failed start."""
    with loaded_miniworker(tmp_path) as (mw, _, runner):
        mw.conn.setblocking(True)  # type: ignore[union-attr]  # (as while loading)
        mw.loaded = None
        runner.sendall(pack_runner(Msg.R_LOADED, {"ok": False, "error": error, "logs": 7}))
        load = LoadSpec(key="f@1", image="x", path="/ws", code_dir="", wheels_dir="", style="handler",
                        entrypoint="handler:handler", dependencies="", run="")
        with pytest.raises(LoadError) as raised:
            mw.load(load, put=False, deadline=time.monotonic() + 10)
        assert raised.value.error["type"] == "LoadError" and "malformed" in str(raised.value.error["message"])
        assert raised.value.logs == "" and mw.loaded is None


def test_a_flood_of_stray_results_fails_the_call_once_and_is_logged_once(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A well-formed result for another call is ignored (the call's own result follows), but each one was a log line
    on the host: a function writing them in a loop flooded the node's logs."""
    with loaded_miniworker(tmp_path) as (mw, broker, runner):
        mw.on_call({"call_id": "c1", "params": None, "timeout": 30})
        assert runner.recv(1 << 16)  # (its R_CALL)
        stray = {"call_id": "someone-else", "ok": True, "result": "forged"}
        for _ in range(STRAY_RESULTS_MAX):
            mw.on_result(stray)
        assert mw.call is not None and not mw.stopping  # tolerated so far
        mw.on_result(stray)
        msg = received(broker)
        assert (msg.type, msg.header["call_id"], msg.header["status"]) == (Msg.MW_RESULT, "c1", "FAILED")
        assert msg.header["error"]["type"] == "RunnerProtocolError"
        assert "messages that answer nothing it runs" in msg.header["error"]["message"]
        captured = capsys.readouterr()
        assert mw.stopping and (captured.out + captured.err).count("stray_runner_message") == 1


def test_a_call_the_runner_does_not_take_heartbeats_the_broker_and_times_out(tmp_path: Path) -> None:
    """Params larger than the socket's buffer, to a runner that does not read (a function that wrote an early
    result of its own runs on): the send blocked up to 30 s, silent (the broker took the miniworker for lost and ran
    the call again), and ended RunnerProtocolError past the call's timeout. Now the broker hears heartbeats while it
    waits, and the call ends TIMEOUT at its deadline, its container killed."""
    with loaded_miniworker(tmp_path, heartbeat=0.1) as (mw, broker, _):
        mw.on_call({"call_id": "c1", "params": "p" * (8 << 20), "timeout": 0.5})
        heartbeats = 0
        while (msg := received(broker, skip=None)).type == Msg.MW_HEARTBEAT:
            heartbeats += 1
        assert msg.type == Msg.MW_RESULT
        assert (msg.header["call_id"], msg.header["status"], msg.header["retire"]) == ("c1", "TIMEOUT", True)
        assert heartbeats >= 2  # one each 0.1 s of the 0.5 s wait
        assert mw.stopping and mw.call is None


def test_a_stop_ends_the_wait_for_a_runner_that_does_not_take_the_call(tmp_path: Path) -> None:
    """The broker is heard while the send waits: a call to hold is held (and given back at the stop, as it never
    started), and a stop (a cancel) ends the wait at once instead of after 30 s."""
    with loaded_miniworker(tmp_path, heartbeat=0.1) as (mw, broker, _):
        sending = threading.Thread(target=mw.on_call, args=({"call_id": "c1", "params": "p" * (8 << 20),
                                                              "timeout": 60.0},))
        sending.start()
        assert received(broker, skip=None).type == Msg.MW_HEARTBEAT  # it waits for the runner
        broker.send_multipart([b"mw-s", *protocol.encode(Msg.MW_CALL, {"call_id": "c2", "params": 1, "timeout": 5})])
        broker.send_multipart([b"mw-s", *protocol.encode(Msg.MW_STOP, {})])
        msg = received(broker)
        assert (msg.type, msg.header["call_id"], msg.header["status"]) == (Msg.MW_RESULT, "c2", "REJECTED")
        sending.join(10)
        assert not sending.is_alive()
        assert mw.stopping and mw.held is None


def test_a_slow_kill_of_a_timed_out_call_heartbeats_the_broker_and_reports_timeout(tmp_path: Path) -> None:
    """The engine's kill blocks (up to its client's 60 s on a loaded engine): the miniworker was silent meanwhile,
    the broker took it for lost and ran again a call that had timed out. The kill stands in for a slow engine here:
    it returns once the broker has heard three heartbeats (at most 10 s), and the call ends TIMEOUT after."""
    with loaded_miniworker(tmp_path, heartbeat=0.1) as (mw, broker, _):
        heard: list[bytes] = []

        def kill() -> None:  # (the ROUTER is this thread's until the kill returns)
            while len(heard) < 3 and broker.poll(10_000):
                _, *frames = broker.recv_multipart()
                heard.append(protocol.decode(frames).type)

        mw.container.kill = kill  # type: ignore[method-assign]
        mw.next_heartbeat = time.monotonic() + 0.1  # (one was just sent)
        mw.call = ActiveCall("c1", time.monotonic(), 0.5, time.monotonic() - 0.5, cold=False)
        mw.on_timeout()
        assert heard == [Msg.MW_HEARTBEAT] * 3
        msg = received(broker)
        assert (msg.type, msg.header["call_id"], msg.header["status"]) == (Msg.MW_RESULT, "c1", "TIMEOUT")
        assert msg.header["retire"] and mw.stopping



def test_a_flood_read_at_once_ends_the_call_once_and_says_nothing_more(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """110 forged results in one read: the 101st ended the call, then each one after it sent another MW_FAILED
    (counted, at the broker, as failed starts: three of them failed the function on the node); other messages
    (R_HELLO in a loop) were a log line each, without bound."""
    with loaded_miniworker(tmp_path) as (mw, broker, runner):
        mw.on_call({"call_id": "c1", "params": None, "timeout": 30})
        assert runner.recv(1 << 16)
        hellos = pack_runner(Msg.R_HELLO, {"pid": 0}) * 50
        forged = pack_runner(Msg.R_RESULT, {"call_id": "x", "ok": True}) * 60
        runner.sendall(hellos + forged)
        while not mw.stopping:
            mw.on_runner_readable()
        msg = received(broker)
        assert (msg.type, msg.header["call_id"], msg.header["status"]) == (Msg.MW_RESULT, "c1", "FAILED")
        assert not broker.poll(200)  # nothing else: no MW_FAILED after it
        mw.on_runner_gone("and the runner went")  # (whatever comes after: said once)
        assert not broker.poll(200)
        captured = capsys.readouterr()
        assert (captured.out + captured.err).count("stray_runner_message") == 1


def test_a_malformed_result_for_the_running_call_fails_it_at_once(tmp_path: Path) -> None:
    """A result forged by the function's code with its output nested 199 deep was passed on one level deeper (under
    `logs`), past what the broker decodes: dropped there, the call waited for its timeout and 10 s more."""
    nested: Any = "x"
    for _ in range(199):
        nested = [nested]
    for forged in ({"call_id": "c1", "ok": True, "result": 1, "stdout": nested},
                   {"call_id": "c1", "ok": "yes", "result": 1},
                   {"call_id": "c1", "ok": False, "error": {"type": nested}}):
        with loaded_miniworker(tmp_path) as (mw, broker, runner):
            mw.on_call({"call_id": "c1", "params": None, "timeout": 30})
            assert runner.recv(1 << 16)
            mw.on_result(forged)
            msg = received(broker)
            assert (msg.header["call_id"], msg.header["status"]) == ("c1", "FAILED")
            assert msg.header["error"]["type"] == "RunnerProtocolError"


def test_the_disk_is_measured_off_the_loop_and_its_outcome_taken_once_done(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree of 250,000 directories took 4 s to walk, inline: no heartbeat went out meanwhile, and the broker took
    the miniworker for lost (its call ran again). A walk that cannot finish (a loop of links swapped in) ended the
    miniworker with the OSError."""
    from miniworker import worker as worker_module

    walking = threading.Event()
    finish = threading.Event()
    outcome: list[Any] = [2 << 40]  # what the walk finds: far over any limit

    def slow_walk(root: Path, stop_above: int | None = None) -> int:
        walking.set()
        assert finish.wait(10)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return int(outcome[0])

    monkeypatch.setattr(worker_module, "tree_bytes", slow_walk)
    for found, error_text in ((2 << 40, "hold at least"), (OSError(40, "Too many levels of symbolic links"),
                                                           "cannot be measured")):
        outcome[0] = found
        finish.clear()
        walking.clear()
        with loaded_miniworker(tmp_path) as (mw, broker, runner):
            mw.on_call({"call_id": "c1", "params": None, "timeout": 30})
            assert runner.recv(1 << 16)
            mw.check_disk()  # starts the walk, and returns while it goes on
            assert walking.wait(10) and mw.disk_walk is not None and not mw.disk_walk.done()
            mw.check_disk()  # not done yet: nothing decided
            assert mw.call is not None and not mw.stopping
            finish.set()
            while not mw.disk_walk.done():
                time.sleep(0.01)
            mw.check_disk()
            msg = received(broker)
            assert (msg.header["call_id"], msg.header["status"], msg.header["error"]["type"]) == (
                "c1", "FAILED", "DiskLimit")
            assert error_text in msg.header["error"]["message"]
