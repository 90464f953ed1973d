"""The in-container runner's answers, driven in-process (the container tests run it for real)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from miniworker.runner import LOG_LIMIT, Runner, handle
from shoal.protocol import MAX_JSON_DEPTH, MAX_RESULT_MESSAGE, Message, Msg, RunnerStream


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def call(handler: Any, params: Any = None) -> dict[str, Any]:
    runner = Runner()
    runner.style, runner.handler = "handler", handler
    [answer] = RunnerStream().feed(handle(runner, Message(Msg.R_CALL, {"call_id": "c1", "params": params})))
    assert answer.type == Msg.R_RESULT and answer.header["call_id"] == "c1"
    return answer.header


def test_a_result_is_carried_up_to_the_depth_every_process_can_decode() -> None:
    ok = call(lambda p: nested(MAX_JSON_DEPTH - 1))
    assert ok["ok"] is True and ok["result"] == nested(MAX_JSON_DEPTH - 1)
    for levels in (MAX_JSON_DEPTH, 100_000):  # the latter is past what json can encode at all
        failed = call(lambda p, n=levels: nested(n))
        assert failed["ok"] is False and failed["error"]["type"] == "ResultTooDeep" and "result" not in failed


def test_a_result_too_large_for_the_way_back_fails_the_call() -> None:
    assert call(lambda p: "x" * (MAX_RESULT_MESSAGE - 1000))["ok"] is True
    for result in ("x" * MAX_RESULT_MESSAGE, "x" * (MAX_RESULT_MESSAGE + 1),  # (the latter seen without encoding)
                   ["x" * (40 << 20), "y" * (40 << 20)]):  # past what one runner message holds at all
        failed = call(lambda p, r=result: r)
        assert failed["ok"] is False and failed["error"]["type"] == "ResultTooLarge" and "result" not in failed
        assert f"at most {MAX_RESULT_MESSAGE}" in failed["error"]["message"], failed["error"]


def test_a_result_json_cannot_carry_fails_the_call_with_the_reason() -> None:
    failed = call(lambda p: {1, 2})
    assert failed["ok"] is False and failed["error"]["type"] == "TypeError" and "set" in failed["error"]["message"]


def test_what_the_handler_prints_is_kept_as_its_logs() -> None:
    def handler(params: Any) -> Any:
        print("out", params)
        return params

    ok = call(handler, {"a": [1]})
    assert ok["result"] == {"a": [1]} and ok["stdout"] == "out {'a': [1]}\n" and ok["stderr"] == ""


def command(run: str, params: Any, tmp_path: Path) -> dict[str, Any]:
    runner = Runner()
    loaded = runner.load({"path": str(tmp_path), "style": "command", "run": run})
    assert loaded["ok"], loaded
    [answer] = RunnerStream().feed(handle(runner, Message(Msg.R_CALL, {"call_id": "c1", "params": params})))
    assert answer.type == Msg.R_RESULT and answer.header["call_id"] == "c1"
    return answer.header


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class Exploding(dict):
    def items(self) -> Any:
        raise RuntimeError("cannot be listed")


class ExitingItems(dict):
    def items(self) -> Any:
        raise SystemExit(3)


def test_what_user_code_does_to_its_answer_fails_the_call_not_the_runner() -> None:
    """Each of these used to escape the runner: its container exited, and the call's real error and logs were
    lost (FAILED ContainerExited), the warm container with them."""
    failed = call(lambda p: (_ for _ in ()).throw(Unprintable()))
    assert failed["ok"] is False and failed["error"]["type"] == "Unprintable"
    assert "unprintable" in failed["error"]["message"]

    def writes_bytes(p: Any) -> Any:
        sys.stdout.write(b"abc")  # type: ignore[arg-type]
        return 1

    failed = call(writes_bytes)
    assert failed["ok"] is False and failed["error"]["type"] == "TypeError" and "str" in failed["error"]["message"]
    assert call(lambda p: Exploding(a=1))["ok"] is False
    # A BaseException from the result's own code, raised while it is encoded, used to end the runner.
    failed = call(lambda p: ExitingItems(a=1))
    assert failed["ok"] is False and failed["error"]["type"] == "SystemExit" and "result" not in failed
    for value in (math.nan, math.inf, [1.0, -math.inf]):  # not JSON: they used to go on as null or as NaN
        failed = call(lambda p, v=value: v)
        assert failed["ok"] is False and "result" not in failed and "JSON" in failed["error"]["message"], failed


def test_command_style_params_argv_and_output_bounds(tmp_path: Path) -> None:
    (tmp_path / "show.py").write_text(
        "import os, sys\n"
        "env = os.environ.get('SHOAL_PARAMS')\n"
        "path = os.environ.get('SHOAL_PARAMS_FILE')\n"
        "stdin = sys.stdin.read()\n"
        "from_file = open(path).read() if path else None\n"
        "print(len(stdin), env == stdin if env else None, from_file == stdin if path else None, len(sys.argv))\n")
    run = f"{sys.executable} show.py"
    assert command(run, "small", tmp_path)["result"] == "7 True None 2"  # "small" is argv[1] as well
    big = "x" * 200_000  # past Linux's 128 KiB for one argument: E2BIG used to fail every such call
    assert command(run, big, tmp_path)["result"] == f"{len(big) + 2} None True 1"
    assert not list(Path("/tmp").glob("shoal-params-*"))  # the params file is removed after the call
    failed = command(run, "a\u0000b", tmp_path)  # argv cannot carry a NUL: the call fails, the runner lives
    assert failed["ok"] is False and failed["error"]["type"] == "ValueError"

    # Output is read as it comes and kept within bounds: a command printing 200 MB costs no memory here.
    loud = command(f"{sys.executable} -c \"import os; [os.write(2, b'e' * 2**20) for _ in range(200)]\"", None,
                   tmp_path)
    assert loud["ok"] is True and len(loud["stderr"]) < LOG_LIMIT + 100 and "bytes dropped" in loud["stderr"]
    huge = command(f"{sys.executable} -c \"import os; [os.write(1, b'o' * 2**20) for _ in range(20)]\"", None,
                   tmp_path)
    assert huge["ok"] is False and huge["error"]["type"] == "ResultTooLarge" and "result" not in huge

    # A command that closes its stdout and stderr and works on is waited for (it used to be killed at once, and
    # its call failed "exited with status -9"); one killed by a signal says which.
    closing = (f"{sys.executable} -c \"import os, time; print(42, flush=True); os.close(1); os.close(2); "
               f"time.sleep(0.3); open('finished', 'w').close()\"")
    done = command(closing, None, tmp_path)
    assert done["ok"] is True and done["result"] == "42" and (tmp_path / "finished").exists(), done
    (tmp_path / "die.py").write_text("import os\nos.kill(os.getpid(), 9)\n")
    killed = command(f"{sys.executable} die.py", None, tmp_path)
    assert killed["ok"] is False and killed["error"]["message"].endswith("die.py' was killed by SIGKILL"), killed
    killed = command(f"{sys.executable} die.py && true", None, tmp_path)  # through a shell: 128 + 9
    assert "status 137 (the shell's way of saying its command was killed by SIGKILL)" in killed["error"]["message"]

    # A child left running does not hold the call (it used to wait for the child to close the pipes), and does
    # not outlive it.
    done = command("sh -c 'sleep 600 & echo $! > child.pid; echo hi'", None, tmp_path)
    assert done["ok"] is True and done["result"] == "hi"
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text().lower():
        assert time.monotonic() < deadline, "the call's leftover child is still running"
        time.sleep(0.05)


CAPTURED = '''
import json, os, sys
from miniworker.runner import FdCapture, Runner
runner = Runner(FdCapture())
loaded = runner.load({"path": sys.argv[1], "style": "handler", "entrypoint": "fn:handler"})
answers = [runner.call("c%d" % n, n) for n in range(5)]
print(json.dumps({"loaded": loaded, "answers": answers}))  # the runner's own stdout: the original fd
'''
FN = '''
import ctypes, os, sys
print("imported")
def handler(n):
    if n == 0:
        print("py-out", flush=False)
        os.write(1, b"fd-out\\n")
        print("py-err", file=sys.stderr)
        os.system("echo child-out; echo child-err >&2")
        ctypes.CDLL(None).puts(b"libc-out")
        return "zero"
    if n == 1:
        os.write(1, b"x" * 300_000)  # more than the pipe holds, and than a call keeps
        raise ValueError("one")
    if n == 3:
        os.close(1)  # the function takes the fd away: the next call has it back
        return "closed"
    if n == 4:
        os.write(1, b"back")
    return "quiet"
'''


def test_a_handlers_output_at_every_level_is_its_calls_logs_in_order(tmp_path: Path) -> None:
    """Output a handler writes past sys.stdout (os.write, a child process, a C library) went to the container's
    log, lost to the call. The capture replaces the process's fd 1 and 2, so it runs in a process of its own."""
    (tmp_path / "fn.py").write_text(FN)
    proc = subprocess.run([sys.executable, "-c", CAPTURED, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loaded"]["ok"] and "[import stdout]\nimported" in out["loaded"]["logs"]
    zero, one, two, three, four = out["answers"]
    assert zero["result"] == "zero"
    assert zero["stdout"].split() == ["py-out", "fd-out", "child-out", "libc-out"]
    assert zero["stderr"].split() == ["py-err", "child-err"]
    assert one["ok"] is False and one["error"]["message"] == "one"
    assert len(one["stdout"].split("\n")[0]) == LOG_LIMIT and "more bytes dropped" in one["stdout"]
    assert two == {"call_id": "c2", "ok": True, "result": "quiet", "stdout": "", "stderr": ""}
    assert three["result"] == "closed" and four["result"] == "quiet" and four["stdout"] == "back"


REWIRED = '''
import io, sys
def handler(n):
    if n == 3:
        print("before the detach")
        sys.stdout = io.TextIOWrapper(sys.stdout.detach(), encoding="utf-8")  # the usual way to rewrap it
        return "detached"
    if n == 0:
        print("first")
        sys.stdout.close()  # the writer the runner gave it, closed
        return "closed"
    if n == 1:
        print("after the close")
        sys.stdout.reconfigure(encoding="ascii", errors="strict")
        return "reconfigured"
    print("caf\\u00e9")
    return "printed"
'''


def test_a_handler_that_closes_or_reconfigures_its_stdout_leaves_the_next_calls_theirs(tmp_path: Path) -> None:
    """`sys.stdout.close()` in one call made every later call's `print` fail in that warm container (ValueError:
    I/O operation on closed file); `reconfigure(encoding="ascii")` made them fail on any non-ASCII text."""
    (tmp_path / "fn.py").write_text(REWIRED)
    proc = subprocess.run([sys.executable, "-c", CAPTURED.replace("range(5)", "[0, 1, 2, 3, 2]"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    closed, reconfigured, printed, detached, after_detach = json.loads(proc.stdout)["answers"]
    assert detached["ok"] and detached["result"] == "detached", detached  # (its detached writer raised ValueError)
    assert after_detach["ok"] and after_detach["stdout"] == "caf\u00e9\n", after_detach
    assert closed["result"] == "closed" and closed["stdout"] == "first\n"
    assert reconfigured["ok"] and reconfigured["stdout"] == "after the close\n", reconfigured
    assert printed["ok"] and printed["stdout"] == "caf\u00e9\n", printed
