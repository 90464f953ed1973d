"""The runner: the few lines that run inside a function's container.

It connects to its miniworker's unix socket (a bind-mounted directory), says hello, then serves:

* ``R_LOAD``: run the runtime's dependency command in the function's path (offline: pip reads the
  wheelhouse the node prepared), then, in handler style, import the function's module once;
* ``R_CALL``: handler style calls ``handler(params)`` in this process (no process is started) and returns
  its value, JSON-encoded; command style runs the runtime's ``run`` command in the function's path with
  the params as JSON on stdin and in ``$SHOAL_PARAMS`` (a plain string is also ``argv[1]``), and its
  stdout is the result.

Standard library only (plus :mod:`shoal.protocol`, mounted beside it). The miniworker enforces timeouts
by replacing the whole container, so nothing here needs to.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from shoal.protocol import (
    MAX_JSON_DEPTH,
    MAX_RESULT_MESSAGE,
    Message,
    Msg,
    ProtocolError,
    RunnerStream,
    nested_deeper_than,
    pack_runner,
)

#: Bytes of stdout/stderr kept per call (and per dependency install).
LOG_LIMIT = 64 * 1024
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
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-LOG_LIMIT:],
    }


class Runner:
    def __init__(self) -> None:
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
                module = importlib.import_module(module_name)
                func = getattr(module, func_name)
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything; it is reported
                return {"ok": False, "error": error_info(exc), "logs": logs}
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

    # ---- call -------------------------------------------------------------------------------
    def call(self, call_id: str, params: Any) -> dict[str, Any]:
        if self.style == "handler":
            return self._call_handler(call_id, params)
        return self._call_command(call_id, params)

    def _call_handler(self, call_id: str, params: Any) -> dict[str, Any]:
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

    def _call_command(self, call_id: str, params: Any) -> dict[str, Any]:
        payload = json.dumps(params)
        env = dict(os.environ, SHOAL_PARAMS=payload, SHOAL_CALL_ID=call_id)
        extra = [params] if isinstance(params, str) else []
        if self.shell_cmd is not None:
            args: Any = ["/bin/sh", "-c", self.shell_cmd + ' "$@"', "sh", *extra]
        else:
            assert self.argv is not None
            args = [*self.argv, *extra]
        try:
            proc = subprocess.run(
                args, cwd=self.path, input=payload.encode(), capture_output=True, env=env, check=False
            )
        except OSError as exc:
            return {"call_id": call_id, "ok": False, "error": error_info(exc), "stdout": "", "stderr": ""}
        stdout = proc.stdout.decode("utf-8", "replace")
        reply: dict[str, Any] = {
            "call_id": call_id,
            "ok": proc.returncode == 0,
            "stdout": clip(proc.stdout),
            "stderr": clip(proc.stderr),
        }
        if proc.returncode == 0:
            reply["result"] = stdout[:-1] if stdout.endswith("\n") else stdout
        else:
            reply["error"] = {
                "type": "NonZeroExit",
                "message": f"{self.shell_cmd or ' '.join(self.argv or [])!r} exited with status "
                f"{proc.returncode}",
                "traceback": clip(proc.stderr),
            }
        return reply


def serve(sock_path: str) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    conn.sendall(pack_runner(Msg.R_HELLO, {"pid": os.getpid()}))
    runner = Runner()
    stream = RunnerStream()
    while True:
        data = conn.recv(1 << 20)
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
    if msg.type == Msg.R_CALL:
        return pack_result(runner.call(msg.header["call_id"], msg.header["params"]))
    if msg.type == Msg.R_LOAD:
        return pack_runner(Msg.R_LOADED, runner.load(msg.header))
    print(f"runner: ignoring unexpected message {msg.name}", file=sys.stderr)
    return b""


def pack_result(reply: dict[str, Any]) -> bytes:
    """The R_RESULT for ``reply``. A result JSON cannot carry, too large for the messages that take it back to
    the controller, or nested too deeply for every process on its way back to decode (the limit is the
    protocol's, checked only when the message has that many brackets), fails the call instead."""
    too_deep = {"type": "ResultTooDeep", "message": f"the result is nested deeper than {MAX_JSON_DEPTH - 1} levels",
                "traceback": ""}
    try:
        packed = pack_runner(Msg.R_RESULT, reply)
        if len(packed) > MAX_RESULT_MESSAGE:
            error = {"type": "ResultTooLarge", "traceback": "",
                     "message": f"the result takes {len(packed)} bytes as JSON; at most {MAX_RESULT_MESSAGE}"}
        elif packed.count(b"[") + packed.count(b"{") <= MAX_JSON_DEPTH or not nested_deeper_than(reply, MAX_JSON_DEPTH):
            return packed
        else:
            error = too_deep
    except RecursionError:
        error = too_deep
    except (TypeError, ValueError) as exc:  # the function returned something JSON cannot carry
        error = error_info(exc)
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
