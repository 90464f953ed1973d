"""The in-container runner's answers, driven in-process (the container tests run it for real)."""

from __future__ import annotations

from typing import Any

from miniworker.runner import Runner, handle
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
    failed = call(lambda p: "x" * MAX_RESULT_MESSAGE)
    assert failed["ok"] is False and failed["error"]["type"] == "ResultTooLarge" and "result" not in failed


def test_a_result_json_cannot_carry_fails_the_call_with_the_reason() -> None:
    failed = call(lambda p: {1, 2})
    assert failed["ok"] is False and failed["error"]["type"] == "TypeError" and "set" in failed["error"]["message"]


def test_what_the_handler_prints_is_kept_as_its_logs() -> None:
    def handler(params: Any) -> Any:
        print("out", params)
        return params

    ok = call(handler, {"a": [1]})
    assert ok["result"] == {"a": [1]} and ok["stdout"] == "out {'a': [1]}\n" and ok["stderr"] == ""
