"""The runner: the few lines that run inside a function's container.

It connects to its miniworker's unix socket (a bind-mounted directory), says hello, then serves:

* ``R_LOAD``: run the runtime's dependency command in the function's path (offline: pip reads the
  wheelhouse the node prepared), then, in handler style, import the function's module once;
* ``R_CALL``: handler style calls ``handler(params)`` in this process (no process is started) and returns
  its value, JSON-encoded; command style runs the runtime's ``run`` command in the function's path with
  the params as JSON on stdin and in ``$SHOAL_PARAMS`` (a plain string is also ``argv[1]``), and its
  stdout is the result. Linux bounds one argument or environment string at 128 KiB: larger params are in
  the file ``$SHOAL_PARAMS_FILE`` instead of ``$SHOAL_PARAMS``, and a larger string is not in ``argv``.
  The command runs in a session of its own: children it leaves behind are killed when it exits.
  Its output is read as it comes, keeping what a result and the logs may hold (the rest is counted and
  dropped), so a command printing gigabytes costs no memory.

In handler style, the process's fd 1 and 2 are pipes the runner drains: what a call writes at any level
(``print``, ``os.write``, a C library, a child process) is its logs, in the order written, bounded.

A call's output the runner cannot turn into an answer (a result JSON cannot carry, such as NaN; an exception
whose text cannot be printed) fails that call, never the runner: every message gets its answer.

Standard library only (plus :mod:`shoal.protocol`, mounted beside it). The miniworker enforces timeouts
by replacing the whole container, so nothing here needs to.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import os
import select
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from shoal.protocol import (
    MAX_JSON_DEPTH,
    MAX_RESULT_MESSAGE,
    MAX_RUNNER_MESSAGE,
    Message,
    MessageTooLarge,
    Msg,
    ProtocolError,
    RunnerStream,
    nested_deeper_than,
    pack_runner,
)

#: Bytes of stdout/stderr kept per call (and per dependency install).
LOG_LIMIT = 64 * 1024
#: The largest params passed in the environment or argv (Linux: 128 KiB per string, MAX_ARG_STRLEN).
ARG_LIMIT = 100 * 1024
#: Seconds a command's output pipes may stay open after it exited (held by a child it left running).
PIPE_GRACE = 0.1
#: Seconds a handler's captured output may take to be read in after the call returns (what comes later, from
#: a thread or a child it left running, goes with the next call's).
SINK_WAIT = 0.1
_SHELL_CHARS = set("|&;<>()$`\\\"'*?[]#~=%{}\n")


class BoundedText(io.TextIOBase):
    """A text sink that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):  # as sys.stdout does: a bytes write must fail there, not when the call ends
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.size
        if room > 0:
            kept = s[:room]
            self.parts.append(kept)
            self.size += len(kept)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        return text + (f"\n[... {self.dropped} more characters dropped]" if self.dropped else "")


def clip(data: bytes) -> str:
    text = data[:LOG_LIMIT].decode("utf-8", "replace")
    return text + (f"\n[... {len(data) - LOG_LIMIT} more bytes dropped]" if len(data) > LOG_LIMIT else "")


def error_info(exc: BaseException) -> dict[str, Any]:
    """An exception as the call's error. Its text comes from user code, which may raise in turn."""
    try:
        message = str(exc)
    except BaseException as inner:  # noqa: BLE001 - a user's __str__ may raise anything
        message = f"<unprintable {type(exc).__name__}: str() raised {type(inner).__name__}>"
    try:
        tb = "".join(traceback.format_exception(exc))[-LOG_LIMIT:]
    except BaseException:  # noqa: BLE001 - as above (it prints the exception too)
        tb = "".join(traceback.format_tb(exc.__traceback__))[-LOG_LIMIT:]
    return {"type": type(exc).__name__, "message": message, "traceback": tb}


class Output:
    """A pipe read as it comes: the first ``limit`` bytes kept, the rest counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.size
        if room > 0:
            self.parts.append(data[:room])
            self.size += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def data(self) -> bytes:
        return b"".join(self.parts)

    def text(self) -> str:
        text = self.data().decode("utf-8", "replace")
        return text + (f"\n[... {self.dropped} more bytes dropped]" if self.dropped else "")


def run_command(args: Any, cwd: str, env: dict[str, str], stdin: bytes,
                limits: tuple[int, int]) -> tuple[int, Output, Output]:
    """Run a call's command: ``stdin`` written and both output pipes read as they come (bounded by
    ``limits``), in a session of its own whose leftover processes are killed once it exits."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = Output(limits[0]), Output(limits[1])
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pending = memoryview(stdin)
    sel = selectors.DefaultSelector()
    for fd in sinks:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    writer = proc.stdin.fileno()
    os.set_blocking(writer, False)
    if pending:
        sel.register(writer, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    exited_at: float | None = None
    try:
        # Until both pipes end and it exits: one that closed its stdout and stderr may still be working (the
        # call's timeout bounds it); one that exited but left a child holding the pipes ends the call.
        while sinks or proc.poll() is None:
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() - exited_at > PIPE_GRACE:
                break  # a child it left holds the pipes: it is killed below
            for key, _ in sel.select(timeout=0.05):
                if key.fd == writer:
                    try:
                        pending = pending[os.write(writer, pending[:1 << 16]):]
                    except (BrokenPipeError, BlockingIOError) as exc:
                        if isinstance(exc, BlockingIOError):
                            continue
                        pending = pending[:0]  # it does not read its stdin: fine
                    if not pending:
                        sel.unregister(writer)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if data:
                    sinks[key.fd].add(data)
                else:
                    sel.unregister(key.fd)
                    del sinks[key.fd]
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what it left running (the session has its pid as group id)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    return code, out, err


class PipeSink:
    """One of the runner's standard fds made a pipe that a thread drains: what a call writes there, at any
    level (``print``, ``os.write``, a C library, a child process), is kept up to ``LOG_LIMIT`` bytes and the
    rest counted, however much it writes. The fd's previous target (the container's log) stays the runner's
    own ``sys.stdout``/``sys.stderr`` between calls."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.original = os.dup(fd)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        self.write_fd = write_fd  # kept: fd is put back on it if the function closes or replaces it
        self.pipe = os.fstat(write_fd).st_ino
        self.read_fd = read_fd
        self.lock = threading.Lock()
        self.output = Output(LOG_LIMIT)
        self.reading = False  # a chunk is out of the pipe and not yet in ``output``
        self.writer = self._writer()
        threading.Thread(target=self._drain, name=f"fd{fd}-sink", daemon=True).start()

    def _writer(self) -> io.TextIOWrapper:
        return open(self.fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        while True:
            poller.poll()
            with self.lock:
                self.reading = True
            data = os.read(self.read_fd, 1 << 16)
            with self.lock:
                self.output.add(data)
                self.reading = False
            if not data:
                return

    def take(self) -> str:
        """What was written since the last take (all of it once the pipe is empty and no chunk is on its way:
        waited for a moment at most). A function that closed or replaced the fd gets it back for the next call."""
        try:
            self.writer.flush()
        except (OSError, ValueError):
            pass  # what Python held for it is lost with the fd the function took away (put back below)
        try:
            ours = os.fstat(self.fd).st_ino == self.pipe
        except OSError:
            ours = False
        if not ours:
            os.dup2(self.write_fd, self.fd)
        writer = self.writer
        try:
            stale = writer.closed or writer.encoding != "utf-8" or writer.errors != "backslashreplace" \
                or not writer.line_buffering
        except ValueError:  # detached (``sys.stdout.detach()``, to wrap it anew): its attributes raise
            stale = True
        if stale:
            # Closed (``sys.stdout.close()``) or reconfigured by the function: every later call's ``print`` failed
            # (or wrote otherwise) in this warm container. A new one, as the runner made it.
            self.writer = self._writer()
        deadline = time.monotonic() + SINK_WAIT
        while True:
            with self.lock:
                if (not self.reading and _unread(self.read_fd) == 0) or time.monotonic() > deadline:
                    out, self.output = self.output, Output(LOG_LIMIT)
                    return out.text() if out.size or out.dropped else ""
            time.sleep(0.0002)


def _libc_fflush() -> Callable[[Any], int] | None:
    try:
        import ctypes  # optional: a Python built without it still captures what is flushed

        return ctypes.CDLL(None).fflush
    except (ImportError, OSError, AttributeError):
        return None


_fflush = _libc_fflush()


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


class FdCapture:
    """fd 1 and 2 of the runner's process captured for the calls (see PipeSink); the runner's own messages
    still go to the container's log."""

    def __init__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.out, self.err = PipeSink(1), PipeSink(2)
        sys.stdout = open(self.out.original, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        sys.stderr = open(self.err.original, "w", buffering=1, encoding="utf-8", errors="backslashreplace")

    @contextlib.contextmanager
    def capturing(self) -> Any:
        """Python's ``sys.stdout``/``sys.stderr`` write to the captured fds meanwhile: every level of output
        lands in one stream, in the order it was written."""
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.out.writer, self.err.writer
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved

    def take(self) -> tuple[str, str]:
        if _fflush is not None:
            _fflush(None)  # what C code left in the C library's buffers goes with this call
        return self.out.take(), self.err.take()


class Runner:
    def __init__(self, capture: FdCapture | None = None, sweep: bool = False) -> None:
        self.capture = capture  # the process's fds captured (the real runner); None: sys.stdout only (tests)
        # After each command: kill every other process of the container (see sweep_strays). The real runner
        # only, in its container: anywhere else that would signal every process its user may.
        self.sweep = sweep
        self.path = "/"
        self.style = "command"
        self.handler: Callable[[Any], Any] | None = None
        self.argv: list[str] | None = None
        self.shell_cmd: str | None = None

    # ---- load -------------------------------------------------------------------------------
    def load(self, h: dict[str, Any]) -> dict[str, Any]:
        self.path = h["path"]
        self.style = h["style"]
        os.chdir(self.path)
        logs = ""
        deps = h.get("dependencies") or ""
        if deps:
            started = time.monotonic()
            proc = subprocess.run(
                deps, shell=True, cwd=self.path, capture_output=True, stdin=subprocess.DEVNULL, check=False
            )
            logs = clip(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                return {
                    "ok": False,
                    "error": {
                        "type": "DependencyError",
                        "message": f"dependency command {deps!r} exited with status {proc.returncode}",
                        "traceback": "",
                    },
                    "logs": logs,
                }
            logs += f"\n[dependencies installed in {time.monotonic() - started:.2f} s]"
            importlib.invalidate_caches()
        if self.style == "handler":
            module_name, _, func_name = str(h.get("entrypoint", "")).partition(":")
            if self.path not in sys.path:
                sys.path.insert(0, self.path)
            try:
                with self.capture.capturing() if self.capture is not None else contextlib.nullcontext():
                    module = importlib.import_module(module_name)
                    func = getattr(module, func_name)
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything; it is reported
                return {"ok": False, "error": error_info(exc), "logs": logs + self._import_output()}
            logs += self._import_output()
            if not callable(func):
                return {
                    "ok": False,
                    "error": {"type": "TypeError", "message": f"{h['entrypoint']} is not callable"},
                    "logs": logs,
                }
            self.handler = func
        else:
            run = str(h.get("run") or "")
            if not run.strip():
                return {
                    "ok": False,
                    "error": {"type": "ConfigError", "message": "the runtime has no 'run' command"},
                    "logs": logs,
                }
            if _SHELL_CHARS.intersection(run):
                self.shell_cmd = run
            else:
                self.argv = shlex.split(run)
        return {"ok": True, "logs": logs}

    def _import_output(self) -> str:
        """What importing the function's module printed (kept with the load's logs)."""
        if self.capture is None:
            return ""
        stdout, stderr = self.capture.take()
        return "".join(f"\n[import {name}]\n{text}" for name, text in (("stdout", stdout), ("stderr", stderr)) if text)

    # ---- call -------------------------------------------------------------------------------
    def call(self, call_id: str, params: Any) -> dict[str, Any]:
        if self.style == "handler":
            return self._call_handler(call_id, params)
        return self._call_command(call_id, params)

    def _call_handler(self, call_id: str, params: Any) -> dict[str, Any]:
        if self.capture is not None:
            return self._call_handler_captured(call_id, params, self.capture)
        out, err = BoundedText(), BoundedText()
        assert self.handler is not None
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            value = self.handler(params)
        except BaseException as exc:  # noqa: BLE001 - the function's failure is the call's result
            return {"call_id": call_id, "ok": False, "error": error_info(exc),
                    "stdout": out.getvalue(), "stderr": err.getvalue()}
        finally:
            sys.stdout, sys.stderr = saved
        return {"call_id": call_id, "ok": True, "result": value,
                "stdout": out.getvalue(), "stderr": err.getvalue()}

    def _call_handler_captured(self, call_id: str, params: Any, capture: FdCapture) -> dict[str, Any]:
        assert self.handler is not None
        saved = sys.stdout, sys.stderr  # (as capture.capturing() does: a generator less on the warm path)
        sys.stdout, sys.stderr = capture.out.writer, capture.err.writer
        try:
            value = self.handler(params)
        except BaseException as exc:  # noqa: BLE001 - the function's failure is the call's result
            sys.stdout, sys.stderr = saved
            stdout, stderr = capture.take()
            return {"call_id": call_id, "ok": False, "error": error_info(exc), "stdout": stdout, "stderr": stderr}
        sys.stdout, sys.stderr = saved
        stdout, stderr = capture.take()
        return {"call_id": call_id, "ok": True, "result": value, "stdout": stdout, "stderr": stderr}

    def _call_command(self, call_id: str, params: Any) -> dict[str, Any]:
        payload = json.dumps(params)
        env = dict(os.environ, SHOAL_CALL_ID=call_id)
        params_file = None
        if len(payload) <= ARG_LIMIT:
            env["SHOAL_PARAMS"] = payload
        else:
            params_file = f"/tmp/shoal-params-{os.getpid()}-{call_id[:32]}.json"
            env["SHOAL_PARAMS_FILE"] = params_file
        extra = [params] if isinstance(params, str) and len(params.encode()) <= ARG_LIMIT else []
        if self.shell_cmd is not None:
            args: Any = ["/bin/sh", "-c", self.shell_cmd + ' "$@"', "sh", *extra]
        else:
            assert self.argv is not None
            args = [*self.argv, *extra]
        try:
            if params_file is not None:
                with open(params_file, "w") as f:
                    f.write(payload)
            code, out, err = run_command(args, self.path, env, payload.encode(), (MAX_RESULT_MESSAGE, LOG_LIMIT))
        except (OSError, ValueError) as exc:  # not runnable; a NUL in a string param (argv cannot carry it)
            return {"call_id": call_id, "ok": False, "error": error_info(exc), "stdout": "", "stderr": ""}
        finally:
            if params_file is not None:
                with contextlib.suppress(OSError):
                    os.unlink(params_file)
            if self.sweep:
                sweep_strays()
        reply: dict[str, Any] = {"call_id": call_id, "ok": code == 0, "stdout": _clipped(out), "stderr": err.text()}
        what = f"{self.shell_cmd or ' '.join(self.argv or [])!r}"
        if code != 0:
            ended = f"was killed by {_signal_name(-code)}" if code < 0 else \
                f"exited with status {code}"
            if self.shell_cmd is not None and 128 < code < 128 + 65:
                ended += f" (the shell's way of saying its command was killed by {_signal_name(code - 128)})"
            reply["error"] = {"type": "NonZeroExit", "message": f"{what} {ended}", "traceback": err.text()}
        elif out.dropped:
            reply["ok"] = False
            reply["error"] = {"type": "ResultTooLarge", "traceback": "",
                              "message": f"{what} wrote {out.size + out.dropped} bytes; a result holds at most "
                                         f"{MAX_RESULT_MESSAGE}"}
        else:
            stdout = out.data().decode("utf-8", "replace")
            reply["result"] = stdout[:-1] if stdout.endswith("\n") else stdout
        return reply


def sweep_strays() -> None:
    """Kill every process of this container but its init and this runner: what a command left running outside
    its session (``setsid``, a double fork), which the group kill of run_command does not reach. A command runs
    anew each call; nothing of it is meant to outlive it (a leftover that forks fills the container's process
    limit, and every later call would fail). ``kill(-1)`` spares the namespace's init and the caller."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing else runs


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _clipped(out: Output) -> str:
    """A command's stdout as its call's log (its result is the whole of it)."""
    data = out.data()
    return clip(data) if not out.dropped else clip(data) + f" [{out.dropped} more bytes dropped]"


def serve(sock_path: str) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall(pack_runner(Msg.R_HELLO, {"pid": os.getpid()}))
    # The container's command, under its init (docker's --init, PID 1 of its own namespace): there only, a sweep.
    runner = Runner(FdCapture(), sweep=os.getppid() == 1)
    stream = RunnerStream()
    while True:
        data = stream.read(conn)
        if not data:
            return 0
        try:
            messages = stream.feed(data)
        except ProtocolError as exc:
            print(f"runner: protocol error, closing: {exc}", file=sys.stderr)
            return 2
        for msg in messages:
            conn.sendall(handle(runner, msg))


def handle(runner: Runner, msg: Message) -> bytes:
    """The answer to one message. Whatever goes wrong while making it, the message is answered: a runner
    that died here would take the call's real error and logs with it, and the warm container."""
    try:
        if msg.type == Msg.R_CALL:
            return pack_result(runner.call(msg.header["call_id"], msg.header["params"]))
        if msg.type == Msg.R_LOAD:
            return pack_runner(Msg.R_LOADED, runner.load(msg.header))
    except Exception as exc:  # noqa: BLE001 - answered with the error (see above)
        print(f"runner: {msg.name} failed: {exc!r}", file=sys.stderr)
        error = {"ok": False, "error": error_info(exc)}
        if msg.type == Msg.R_CALL:
            return pack_runner(Msg.R_RESULT, {"call_id": msg.header["call_id"], "stdout": "", "stderr": "", **error})
        return pack_runner(Msg.R_LOADED, {**error, "logs": ""})
    print(f"runner: ignoring unexpected message {msg.name}", file=sys.stderr)
    return b""


def pack_result(reply: dict[str, Any]) -> bytes:
    """The R_RESULT for ``reply``. A result JSON cannot carry, too large for the messages that take it back to
    the controller, or nested too deeply for every process on its way back to decode (the limit is the
    protocol's, checked only when the message has that many brackets), fails the call instead."""
    too_deep = {"type": "ResultTooDeep", "message": f"the result is nested deeper than {MAX_JSON_DEPTH - 1} levels",
                "traceback": ""}
    value = reply.get("result")
    error: dict[str, Any] = too_deep
    size = ""  # set: too large, and how large
    try:
        if isinstance(value, str | bytes) and len(value) > MAX_RESULT_MESSAGE:
            size = f"{len(value)} characters"  # (seen without encoding it, and copying it, first)
        else:
            packed = pack_runner(Msg.R_RESULT, reply, strict=True)
            if len(packed) > MAX_RESULT_MESSAGE:
                size = f"{len(packed)} bytes as JSON"
            elif (packed.count(b"[") + packed.count(b"{") <= MAX_JSON_DEPTH
                  or not nested_deeper_than(reply, MAX_JSON_DEPTH)):
                return packed
    except RecursionError:
        pass  # too deep
    except MessageTooLarge:
        size = f"more than {MAX_RUNNER_MESSAGE} bytes as JSON"
    except BaseException as exc:  # noqa: BLE001 - JSON cannot carry it (NaN, an object; a user type raising, even
        error = error_info(exc)   # SystemExit from its items(): the runner must live on to answer)
    if size:
        error = {"type": "ResultTooLarge", "traceback": "",
                 "message": f"the result takes {size}; at most {MAX_RESULT_MESSAGE}"}
    reply.pop("result", None)
    reply.update(ok=False, error=error)
    return pack_runner(Msg.R_RESULT, reply)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if len(sys.argv) != 2:
        raise SystemExit("usage: python3 -m miniworker.runner SOCKET")
    sys.exit(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
