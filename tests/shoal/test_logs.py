"""One log format per process: Shoal's own lines and libraries' (stdlib logging) alike."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage

from shoal.logs import configure, get_logger


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def malformed_request_record() -> logging.LogRecord:
    try:
        raise BadHttpMessage("Invalid character in chunk size:\n\n  b'zz'\n    ^")
    except BadHttpMessage as exc:
        return logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("127.0.0.1",),
            (type(exc), exc, exc.__traceback__))


def lines(capsys: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_library_records_are_rendered_like_shoals_own(capsys: Any) -> None:
    configure("info", json_lines=True)
    get_logger("hub", node_id="n1").info("node_hello", capacity=2)
    logging.getLogger("docker.api").warning("engine said %s", "no")
    logging.getLogger("asyncio").info("below WARNING: a library's chatter, not ours")
    ours, theirs = lines(capsys)
    assert ours["event"] == "node_hello" and ours["node_id"] == "n1" and ours["level"] == "info"
    assert theirs == {"event": "engine said no", "level": "warning", "logger": "docker.api",
                      "timestamp": theirs["timestamp"]}


def test_a_malformed_http_request_is_one_warning_line_without_a_traceback(capsys: Any) -> None:
    configure("info", json_lines=True)
    logging.getLogger("aiohttp.server").handle(malformed_request_record())
    [line] = lines(capsys)
    assert line["level"] == "warning" and line["event"] == "malformed_http_request: Invalid character in chunk size:"
    assert "exception" not in line
    configure("error", json_lines=True)  # a warning is below what was asked for
    logging.getLogger("aiohttp.server").handle(malformed_request_record())
    assert capsys.readouterr().err == ""


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level must be one of"):
        configure("loud")
