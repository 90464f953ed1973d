"""The miniworker process: one DEALER to the agent's broker, one container, one runner connection.

Life of a miniworker (see ARCHITECTURE.md):

* ``bound``: start the container, load the function, say MW_READY, serve calls until told to stop;
* ``runtime``: start the container of the runtime image, say MW_READY; the first call carries the function
  to load (code and dependencies are put in then), after which it serves that function only;
* ``oneshot``: say MW_READY with no container; the one call it gets creates the container, runs, and the
  container is removed.

A warm miniworker may hold one more call while it runs one (the broker pipelines short functions): the held
call goes to the runner the moment the running one's result is sent, so the broker's round trip overlaps the
run. A held call never started: if the miniworker ends first, it is answered REJECTED (the broker queues it
again), and ``MW_DROP`` (its call was cancelled) removes it, answered CANCELLED.

Anything that leaves the container in doubt (a timeout, the runner's connection closing, a load failure)
ends the miniworker: it reports the call's outcome with ``retire: true``, removes its container and exits,
and the agent's pool starts a replacement. A silent broker (agent gone) also ends it, so no container
outlives its agent.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from docker.errors import NotFound

from miniworker.container import ENGINE_ERRORS, Container
from miniworker.errors import ContainerError, LoadError, MiniworkerError, RunnerError
from miniworker.spec import LoadSpec, MiniworkerSpec
from shoal import protocol
from shoal.fstree import tree_bytes
from shoal.logs import configure, get_logger
from shoal.protocol import (
    MAX_HEADER_BYTES,
    MAX_RESULT_MESSAGE,
    MAX_RUNNER_MESSAGE,
    UNIX_PATH_MAX,
    Message,
    MessageTooLarge,
    Msg,
    ProtocolError,
    RunnerStream,
    pack_runner,
    zmq_readable,
)

#: Results for no call it runs a runner may send (while a call runs, or between calls) before it is taken as broken.
STRAY_RESULTS_MAX = 100  # messages the runner may send that answer no call it runs (see Miniworker.stray)
DISK_POLL = 0.05  # seconds between looks at a measurement under way
DISK_CHECK_EVERY = 5.0  # seconds between measurements of the container's host-backed writable directories
RUNNER_EXIT_WAIT = 10.0  # seconds the engine gets to record the exit of a container whose runner hung up
EXIT_CONTAINER_LEFT = 4  # the container could not be removed: the agent removes it by its label
#: The largest header this process sends: what the broker takes (MAX_HEADER_BYTES), less room for the fields the
#: agent adds when it passes an outcome on to the controller, which takes no more. Half the room a runner's result
#: leaves (MAX_RESULT_MESSAGE): a runner's honest message and this process's own fields fit well under it.
MAX_SENT_HEADER = MAX_HEADER_BYTES - 32 * 1024


def bind_unix(sock: socket.socket, path: str) -> None:
    """Bind a unix socket at ``path``, however deep: a path longer than a unix socket takes (107 bytes; a node's
    state directory can be deep) is reached through the directory's descriptor (``/proc/self/fd/N/name``)."""
    if len(path.encode()) <= UNIX_PATH_MAX:
        sock.bind(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


@dataclass(slots=True)
class ActiveCall:
    call_id: str
    deadline: float
    timeout: float
    started: float
    cold: bool
    load_seconds: float = 0.0


class Miniworker:
    def __init__(self, spec: MiniworkerSpec) -> None:
        self.spec = spec
        self.log = get_logger("miniworker", node_id=spec.node_id, mw_id=spec.mw_id)
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, spec.mw_id.encode())
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(spec.broker_url)
        self.container = Container(spec)
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.stream = RunnerStream(MAX_RESULT_MESSAGE)  # no more than a result may take (the runner checks, but
        # the function's code runs in its process and can undo that check, or write to the socket itself)
        self.loaded: str | None = None
        self.call: ActiveCall | None = None
        self.held: dict[str, Any] | None = None  # the MW_CALL header of the call to run next
        self.path = spec.runtime_path
        self.last_heard = time.monotonic()
        self.next_heartbeat = 0.0
        self.next_disk_check = time.monotonic() + DISK_CHECK_EVERY
        self.disk_walk: Future[int] | None = None  # a measurement under way (on a thread: see check_disk)
        self.stopping = False
        self.strays = 0  # results the runner sent for no call it runs, since the last call started

    # ---- wire helpers --------------------------------------------------------------------------
    def send(self, mtype: bytes, header: dict[str, Any]) -> None:
        """Send to the broker a message it takes: one whose header, encoded, is over MAX_SENT_HEADER would be
        dropped there (the call would wait for its timeout, and run again), so it goes as :meth:`oversized`."""
        frames = protocol.encode(mtype, header)
        # (only these two carry what the runner sent; the others hold a few fields of this process's own)
        if len(frames[1]) > MAX_SENT_HEADER and mtype in (Msg.MW_RESULT, Msg.MW_FAILED):
            frames = protocol.encode(mtype, self.oversized(mtype, header, len(frames[1])))
        self.sock.send_multipart(frames)

    def oversized(self, mtype: bytes, header: dict[str, Any], size: int) -> dict[str, Any]:
        """An MW_RESULT or MW_FAILED ``header`` without what the runner sent (a result, logs, an error's text), which
        made it ``size`` bytes encoded.

        A runner's message is bounded by its length (MAX_RESULT_MESSAGE), but its text is re-encoded here: the
        function's code shares the runner's process and can write its own messages to the socket, in raw UTF-8,
        and a document orjson refuses (a lone surrogate, an integer beyond 64 bits) is written by the standard
        library, every other character escaped: three times as long for emoji. Only the encoded size says."""
        self.log.error("message_too_large", type=mtype.decode(), size=size, call_id=header.get("call_id"))
        if mtype == Msg.MW_RESULT:
            kept = {name: value for name, value in header.items() if name not in ("result", "error", "logs")}
            return dict(kept, status="FAILED", error={
                "type": "ResultTooLarge",
                "message": f"the call's outcome (result, error, logs) takes {size} bytes as JSON, more than the "
                           f"{MAX_SENT_HEADER} its node passes on",
            })
        reason = f"its failure's report (the runner's) takes {size} bytes as JSON, more than the {MAX_SENT_HEADER} " \
                 "a miniworker sends"
        if "error" in header:  # the function's load failed: it still is its function's failure
            return {"reason": reason, "error": {"type": "LoadReportTooLarge", "message": reason}}
        return {"reason": reason}

    def runner_send(self, mtype: bytes, header: dict[str, Any], deadline: float) -> None:
        """Send one message whole by ``deadline`` (TimeoutError past it). Until the function is loaded the socket
        blocks: a load's message is small, and the broker does not judge a loading miniworker's silence. Then it
        is non-blocking, and a message larger than its buffer (a call's params of a few MB) stops half-way when
        the runner does not read: a function that wrote an early result of its own runs on, or a thread of it
        holds the GIL. The rest goes as the runner takes it (:meth:`wait_writable`: heartbeats meanwhile), and a
        stop ends the wait with the message unsent (its container goes with this miniworker)."""
        assert self.conn is not None
        data = pack_runner(mtype, header)
        previous = self.conn.gettimeout()
        if previous != 0.0:
            self.conn.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                self.conn.sendall(data)
            finally:
                self.conn.settimeout(previous)
            return
        try:  # most messages go whole at once, with no mode switch
            sent = self.conn.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        rest = memoryview(data)[sent:]  # (the rest, not a copy of it)
        while rest and self.wait_writable(deadline):
            try:
                rest = rest[self.conn.send(rest):]
            except BlockingIOError:
                continue

    def wait_writable(self, deadline: float) -> bool:
        """Wait until the runner's socket takes more: True then, False once this miniworker is told to stop,
        TimeoutError at ``deadline``. The broker is heard meanwhile (a cancel is a stop; a call to hold may come)
        and told MW_HEARTBEAT every heartbeat: silent past its liveness, this miniworker would be taken for lost
        and the call, which never started, run again."""
        assert self.conn is not None
        fd = self.conn.fileno()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(fd, zmq.POLLOUT)
        while not self.stopping:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError("the runner did not take the message in time")
            self.heartbeat_if_due(now)
            events = dict(poller.poll(int(max(0.0, min(self.next_heartbeat, deadline) - now) * 1000)))
            if self.sock in events:
                self.read_broker()
            if fd in events and not self.stopping:
                return True
        return False

    def heartbeat_if_due(self, now: float) -> None:
        if now >= self.next_heartbeat:
            self.send(Msg.MW_HEARTBEAT, {})
            self.next_heartbeat = now + self.spec.heartbeat

    def read_broker(self) -> None:
        """Take what the broker sent, until told to stop."""
        self.last_heard = time.monotonic()
        while zmq_readable(self.sock):
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            try:
                self.on_broker(protocol.decode(frames))
            except ProtocolError as exc:
                self.log.error("protocol_error", source="broker", error=str(exc))
            if self.stopping:
                return

    def runner_recv(self, deadline: float) -> Message:
        """Blocking read of one runner message (used while booting and loading only)."""
        assert self.conn is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunnerError("the runner did not answer in time")
            self.conn.settimeout(min(remaining, 0.5))
            try:
                data = self.stream.read(self.conn)
            except TimeoutError:
                if not self.container.running():
                    raise RunnerError(self.container.exit_reason()) from None
                continue
            if not data:
                raise RunnerError(self.container.exit_reason())
            messages = self.stream.feed(data)
            if messages:
                if len(messages) > 1:
                    raise RunnerError("the runner sent more than one answer")
                return messages[0]

    # ---- container lifecycle -------------------------------------------------------------------
    def boot(self, load: LoadSpec | None) -> float:
        """Start the container and wait for its runner; load ``load`` if given. Returns seconds spent."""
        started = time.monotonic()
        self.container.prepare_workdir()
        if load is not None:
            self.container.put_function(load.code_dir, load.wheels_dir)
        path = str(self.container.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bind_unix(listener, path)
        os.chmod(path, 0o777)  # the runner runs as an unprivileged user
        listener.listen(1)
        self.listener = listener
        if load is not None:
            image, self.path = load.image, load.path
        else:
            image, self.path = self.spec.image, self.spec.runtime_path
        self.container.create_and_start(image, self.path)
        # One deadline for the whole start (container, runner, dependencies, import), a little inside the
        # broker's (it kills a miniworker still starting after start_timeout): the runner's own report of a
        # slow install or import then reaches the broker, instead of a bare "did not start".
        deadline = started + self.spec.start_timeout - min(5.0, self.spec.start_timeout / 10)
        while self.conn is None:
            if time.monotonic() > deadline:
                raise RunnerError(f"the runner did not connect within {deadline - started:g} s")
            listener.settimeout(0.25)
            try:
                self.conn, _ = listener.accept()
            except TimeoutError:
                if not self.container.running():
                    raise ContainerError(f"{self.container.exit_reason()} before its runner started") from None
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        hello = self.runner_recv(deadline)
        if hello.type != Msg.R_HELLO:
            raise RunnerError(f"expected the runner's hello, got {hello.name}")
        if load is not None:
            self.load(load, put=False, deadline=deadline)
        return time.monotonic() - started

    def load(self, load: LoadSpec, put: bool = True, deadline: float | None = None) -> str:
        if put:
            self.container.put_function(load.code_dir, load.wheels_dir)
        if deadline is None:
            deadline = time.monotonic() + self.spec.start_timeout
        self.runner_send(Msg.R_LOAD, {
            "path": load.path, "style": load.style, "entrypoint": load.entrypoint,
            "dependencies": load.dependencies, "run": load.run,
        }, deadline)
        answer = self.runner_recv(deadline)
        if answer.type != Msg.R_LOADED:
            raise RunnerError(f"expected the load's outcome, got {answer.name}")
        if not answer.header["ok"]:
            error, logs = answer.header.get("error"), answer.header.get("logs", "")
            # (the function's module code runs in the runner's process during the load, and can write this
            # message itself: an error that is not an object crashed this process on reading it)
            if not isinstance(error, dict) or not all(isinstance(error.get(k), str) for k in ("type", "message")):
                error = {"type": "LoadError", "message": f"the runner's load report is malformed: {error!r:.200}"}
            raise LoadError(error, logs if isinstance(logs, str) else "")
        self.loaded = load.key
        self.conn.setblocking(False)  # type: ignore[union-attr]
        return str(answer.header.get("logs", ""))

    def teardown(self) -> bool:
        """Close the runner's socket and remove the container; False if the container may be left behind."""
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        self.conn = self.listener = None
        try:
            self.container.remove()
        except ContainerError as exc:
            self.log.error("container_remove_failed", error=str(exc))
            return False
        return True

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        try:
            if self.spec.mode != "oneshot":
                self.boot(self.spec.load if self.spec.mode == "bound" else None)
        except (MiniworkerError, OSError, ProtocolError) as exc:
            reason = exc.error.get("message", str(exc)) if isinstance(exc, LoadError) else str(exc)
            self.log.warning("miniworker_start_failed", reason=reason)
            header: dict[str, Any] = {"reason": reason}
            if isinstance(exc, LoadError):
                header["error"], header["logs"] = exc.error, exc.logs
            self.send(Msg.MW_FAILED, header)
            self.teardown()
            return 1
        # Booting blocked this loop (container start, dependency install): the broker's silence meanwhile
        # says nothing about the broker, so the liveness clock starts now.
        self.last_heard = time.monotonic()
        self.send(Msg.MW_READY, {
            "v": protocol.PROTOCOL_VERSION, "mw_id": self.spec.mw_id, "container_id": self.container.id or "",
            "function": self.loaded, "mode": self.spec.mode, "pid": os.getpid(),
        })
        self.log.debug("miniworker_ready", container=(self.container.id or "")[:12], function=self.loaded)
        code = EXIT_CONTAINER_LEFT  # (if serve raises, the exception is what the process ends with)
        try:
            code = self.serve()
        finally:
            # An exit code says to the agent that the container may be left: it removes it by label.
            if not self.teardown():
                code = EXIT_CONTAINER_LEFT
            self.sock.close()
        return code

    def serve(self) -> int:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        registered_fd: int | None = None
        silence = self.spec.heartbeat * self.spec.liveness
        while not self.stopping:
            fd = self.conn.fileno() if self.conn is not None else None
            if fd != registered_fd:
                if registered_fd is not None:
                    poller.unregister(registered_fd)
                if fd is not None:
                    poller.register(fd, zmq.POLLIN)
                registered_fd = fd
            now = time.monotonic()
            wake = min(self.next_heartbeat, self.next_disk_check if self.disk_walk is None else now + DISK_POLL)
            if self.call is not None:
                wake = min(wake, self.call.deadline)
            events = dict(poller.poll(int(max(0.0, wake - now) * 1000)))
            if self.sock in events:
                self.read_broker()
                if self.stopping:
                    return 0
            if fd is not None and fd in events:
                self.on_runner_readable()
                if self.stopping:
                    return 0  # (a stop may come while a held call is sent to the runner: not timed out then)
            now = time.monotonic()
            if self.call is not None and now >= self.call.deadline:
                self.on_timeout()
            self.heartbeat_if_due(now)
            if (now >= self.next_disk_check or self.disk_walk is not None) and not self.stopping:
                self.check_disk()
            if now - self.last_heard > silence and self.call is None:
                self.log.warning("broker_silent_exiting", seconds=round(now - self.last_heard, 1))
                return 3
        return 0

    # ---- events --------------------------------------------------------------------------------
    def on_broker(self, msg: Message) -> None:
        if msg.type == Msg.MW_CALL:
            self.on_call(msg.header)
        elif msg.type == Msg.MW_DROP:
            # Dropped if still held (the broker waits for this answer); if it already started, the broker
            # learns it from the previous call's result, sent before it started.
            if self.held is not None and self.held["call_id"] == msg.header["call_id"]:
                self.send(Msg.MW_RESULT, {"call_id": self.held["call_id"], "status": "CANCELLED", "retire": False,
                                          "error": {"type": "Cancelled", "message": "cancelled before it started"}})
                self.held = None
        elif msg.type == Msg.MW_STOP:
            self._reject_held()  # it never started: the broker queues it again
            self.stopping = True
        elif msg.type != Msg.MW_HEARTBEAT:
            self.log.error("unexpected_message", type=msg.name)

    def on_call(self, h: dict[str, Any]) -> None:
        call_id = h["call_id"]
        if self.call is not None and self.held is None and self.loaded is not None and h.get("load") is None:
            self.held = h  # pipelined: it runs when the current call ends
            return
        if self.call is not None:
            self.log.error("call_while_busy", call_id=call_id, busy_with=self.call.call_id)
            self.send(Msg.MW_RESULT, {"call_id": call_id, "status": "REJECTED", "retire": False,
                                      "error": {"type": "Busy", "message": "miniworker is busy"}})
            return
        started = time.monotonic()
        timeout = float(h["timeout"])
        cold = False
        load_seconds = 0.0
        load_logs = ""
        raw_load = h.get("load")
        try:
            if self.spec.mode == "oneshot":
                if raw_load is None:
                    raise RunnerError("a oneshot call must carry the function to load")
                load = LoadSpec.from_dict(raw_load)
                load_seconds = self.boot(load)
                cold = True
            elif self.loaded is None:
                if raw_load is None:
                    raise RunnerError("no function loaded and the call carries none")
                load = LoadSpec.from_dict(raw_load)
                t0 = time.monotonic()
                load_logs = self.load(load)
                load_seconds = time.monotonic() - t0
                cold = True
            elif raw_load is not None and raw_load.get("key") != self.loaded:
                raise RunnerError(f"this miniworker serves {self.loaded}, not {raw_load.get('key')}")
        except (MiniworkerError, OSError, ProtocolError) as exc:
            error = exc.error if isinstance(exc, LoadError) else {"type": type(exc).__name__, "message": str(exc)}
            logs = exc.logs if isinstance(exc, LoadError) else load_logs
            self.send(Msg.MW_RESULT, {
                "call_id": call_id, "status": "FAILED", "retire": True, "cold": True,
                "error": error, "logs": {"load": logs},
                "container_id": self.container.id or "",
            })
            self._reject_held()
            self.stopping = True
            return
        self.last_heard = time.monotonic()  # a cold load blocked the loop: see run()
        self.call = ActiveCall(call_id, time.monotonic() + timeout, timeout, started, cold, load_seconds)
        self.strays = 0
        try:
            self.runner_send(Msg.R_CALL, {"call_id": call_id, "params": h["params"]}, self.call.deadline)
        except TimeoutError:
            self.log.warning("runner_did_not_take_call", call_id=call_id)  # (busy: see runner_send)
            self.on_timeout()
        except OSError as exc:
            # The container died while this miniworker was idle: the call never reached it (a runner does not
            # act on part of a message), so the broker queues it again, not as an attempt.
            self.call = None
            self.log.warning("runner_gone_before_call", call_id=call_id, error=str(exc))
            self.send(Msg.MW_RESULT, {"call_id": call_id, "status": "REJECTED", "retire": True,
                                      "error": {"type": "ContainerExited", "message": "before the call reached it"}})
            self._reject_held()
            self.stopping = True

    def on_runner_readable(self) -> None:
        assert self.conn is not None
        try:
            data = self.stream.read(self.conn)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.on_runner_gone()
            return
        try:
            messages = self.stream.feed(data)
        except MessageTooLarge as exc:  # refused before it is read whole: this process's memory stays bounded
            self.log.error("protocol_error", source="runner", error=str(exc))
            if exc.size > MAX_RUNNER_MESSAGE:  # more than a runner can send: bytes that are not a message
                self.on_runner_gone(f"runner broke the protocol: {exc}")
                return
            self._kill_and_end("FAILED", {"type": "ResultTooLarge", "message": f"the runner sent a message of "
                                          f"{exc.size} bytes; a result takes at most {MAX_RESULT_MESSAGE} (the "
                                          "function undid the runner's bound?); its container was replaced"})
            return
        except ProtocolError as exc:
            self.log.error("protocol_error", source="runner", error=str(exc))
            self.on_runner_gone(f"runner broke the protocol: {exc}")
            return
        for msg in messages:
            if self.stopping:
                return  # the call ended (or the container goes): what else came with it is not read
            if msg.type == Msg.R_RESULT:
                self.on_result(msg.header)
            else:
                self.stray(f"a {msg.name} message", msg.name)

    def stray(self, what: str, name: str) -> None:
        """A message from the runner that answers nothing it runs. Only the function's code makes these (it shares
        the runner's process): ignored, but a flood of them (each one a log line on the host) breaks the protocol,
        and the container goes."""
        self.strays += 1
        if self.strays == 1:
            self.log.error("stray_runner_message", message=name[:64])
        if self.strays > STRAY_RESULTS_MAX:
            self.on_runner_gone(f"the runner sent more than {STRAY_RESULTS_MAX} messages that answer nothing it "
                                f"runs ({what} last): it broke the protocol")

    def on_result(self, h: dict[str, Any]) -> None:
        call = self.call
        if call is None or h["call_id"] != call.call_id:
            self.stray("a result for a call it was not running", str(h["call_id"]))
            return
        if not _well_formed(h):
            # The runner's own results are; a forged one (the function's code) that the broker would drop (nested
            # past what it decodes) left the call waiting for its timeout.
            self._kill_and_end("FAILED", {"type": "RunnerProtocolError", "message": "the runner's result for the call "
                                          "was malformed (not the runner's: the function's code wrote it); its "
                                          "container was replaced"})
            return
        self.call = None
        retire = self.spec.mode == "oneshot"
        reply: dict[str, Any] = {
            "call_id": call.call_id,
            "status": "DONE" if h["ok"] else "FAILED",
            "logs": {"stdout": h.get("stdout", ""), "stderr": h.get("stderr", "")},
            "cold": call.cold,
            "retire": retire,
            "container_id": self.container.id or "",
            "function": self.loaded,
            "timings": {"run_s": time.monotonic() - call.started - call.load_seconds,
                        "load_s": call.load_seconds},
        }
        if h["ok"]:
            reply["result"] = h.get("result")
        else:
            reply["error"] = h.get("error") or {"type": "Error", "message": "function failed"}
        if not retire and self.held is not None:
            reply["held_started_at"] = time.time()  # the held call starts now: the broker learns when, here
        self.send(Msg.MW_RESULT, reply)
        if retire:
            self.stopping = True
            self._reject_held()
        elif self.held is not None:
            held, self.held = self.held, None
            self.on_call(held)

    def _reject_held(self) -> None:
        """The held call never started: the broker queues it again."""
        if self.held is not None:
            self.send(Msg.MW_RESULT, {"call_id": self.held["call_id"], "status": "REJECTED", "retire": True,
                                      "error": {"type": "Busy", "message": "its miniworker ended first"}})
            self.held = None

    def _end_call(self, status: str, error: dict[str, Any]) -> None:
        if self.stopping and self.call is None:
            return  # ended already: said once (a second MW_FAILED counted, at the broker, as another failed start)
        call = self.call
        self.call = None
        if call is not None:
            self.send(Msg.MW_RESULT, {
                "call_id": call.call_id, "status": status, "error": error, "retire": True,
                "cold": call.cold, "container_id": self.container.id or "", "function": self.loaded,
            })
        else:
            self.send(Msg.MW_FAILED, {"reason": error["message"]})
        self._reject_held()
        self.stopping = True

    def _kill_and_end(self, status: str, error: dict[str, Any]) -> None:
        """The container is killed (the miniworker retires with it) and the call, if any, ends ``status``. The kill
        is the engine's, a blocking call a loaded engine can hold for up to its client's 60 s: it runs on a thread
        while this one says MW_HEARTBEAT every heartbeat (the ZMQ socket is this thread's only), or the broker would
        take this miniworker for lost and run again a call that has ended here."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="container-kill") as pool:
            killing = pool.submit(self.container.kill)
            while not wait([killing], timeout=max(0.0, self.next_heartbeat - time.monotonic())).done:
                self.heartbeat_if_due(time.monotonic())
        try:
            killing.result()
        except ContainerError as exc:
            self.log.error("container_kill_failed", error=str(exc))
        self._end_call(status, error)

    def on_timeout(self) -> None:
        assert self.call is not None
        self._kill_and_end("TIMEOUT", {
            "type": "Timeout",
            "message": f"call exceeded its timeout of {self.call.timeout:g} s; its container was replaced",
        })

    def check_disk(self) -> None:
        """The container's code and work directories are on the host's disk, with no quota (overlay2 has none):
        a function that writes more than the node allows there loses its container, and its call fails.

        The walk runs on a thread of its own, the loop going on meanwhile (a tree of 250,000 directories took 4 s
        to walk: inline, no heartbeat went out, and the broker took this miniworker for lost): started here when
        one is due, and its outcome taken here once it is done."""
        limit = self.spec.limits.disk_mb << 20
        if self.disk_walk is None:
            self.disk_walk = _disk_walker().submit(tree_bytes, Path(self.spec.workdir), stop_above=limit)
            return
        if not self.disk_walk.done():
            return
        walk, self.disk_walk = self.disk_walk, None
        self.next_disk_check = time.monotonic() + DISK_CHECK_EVERY
        try:
            used = walk.result()
        except OSError as exc:  # made so that it cannot be measured (too deep; changed under the walk): over it
            self.log.warning("disk_tree_unmeasurable", error=str(exc), call_id=self.call.call_id if self.call else None)
            self._kill_and_end("FAILED", {
                "type": "DiskLimit",
                "message": "its directories cannot be measured against this node's disk limit "
                           f"({exc.strerror or exc}); its container was replaced",
            })
            return
        if used <= limit:
            return
        self.log.warning("disk_limit_exceeded", used_mb=used >> 20, limit_mb=self.spec.limits.disk_mb,
                         call_id=self.call.call_id if self.call else None)
        self._kill_and_end("FAILED", {
            "type": "DiskLimit",
            "message": f"its directories (code, dependencies, what it wrote) hold at least {used >> 20} MB, more "
                       f"than this node's limit of {self.spec.limits.disk_mb} MB (SHOAL_AGENT_CONTAINER_DISK_MB); its "
                       "container was replaced",
        })

    def _wait_for_exit(self) -> None:
        """Give the engine up to RUNNER_EXIT_WAIT to record the container's exit, saying MW_HEARTBEAT to the broker
        every heartbeat meanwhile (it takes a miniworker silent past its liveness for lost, and would run the call
        again). A container whose runner closed its socket but runs on (the function's code did it) never exits:
        the wait ends at its bound, and the container goes with this miniworker."""
        assert self.container.id is not None
        deadline = time.monotonic() + RUNNER_EXIT_WAIT
        while True:
            slice_end = min(time.monotonic() + self.spec.heartbeat, deadline)
            try:
                self.container.api.wait(self.container.id, timeout=max(0.1, slice_end - time.monotonic()))
                return
            except NotFound:
                return  # removed from outside: exit_reason says so
            except ENGINE_ERRORS as exc:
                if time.monotonic() >= deadline:
                    self.log.debug("container_wait_failed", error=str(exc))
                    return
                # The engine refused at once (restarting): not asked again before the slice is over.
                time.sleep(max(0.0, slice_end - time.monotonic()))
            self.send(Msg.MW_HEARTBEAT, {})

    def on_runner_gone(self, reason: str | None = None) -> None:
        """The runner's connection closed (``reason`` None: the engine says why), or what came on it broke the
        protocol (the function's code shares the runner's process and can write to its socket)."""
        error_type = "ContainerExited" if reason is None else "RunnerProtocolError"
        if reason is None:
            # The runner's process is gone (or closed its socket and will not be heard again): let the engine
            # record the container's exit before asking why. A loaded engine can take seconds to.
            if self.container.id is not None:
                self._wait_for_exit()
            reason = self.container.exit_reason()
        self.log.warning("runner_gone", reason=reason, call_id=self.call.call_id if self.call else None)
        self._end_call("FAILED", {"type": error_type, "message": reason})


@functools.cache
def _disk_walker() -> ThreadPoolExecutor:
    """The thread that measures the directories (one for the process: a walk at a time)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-check")


def _well_formed(h: dict[str, Any]) -> bool:
    """A result as the runner makes them: output as text, an error as an object of text."""
    if not isinstance(h.get("ok"), bool) or not all(isinstance(h.get(k, ""), str) for k in ("stdout", "stderr")):
        return False
    error = h.get("error")
    return error is None or (isinstance(error, dict) and all(isinstance(v, str | int | float | bool | None)
                                                            for v in error.values()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m miniworker SPEC_JSON (started by the node agent)", file=sys.stderr)
        return 2
    spec = MiniworkerSpec.from_json(args[0])
    configure(spec.log_level)
    return Miniworker(spec).run()
