"""structlog set-up shared by every Shoal process: key=value lines (or JSON) on stderr.

Libraries' own log records (aiohttp, asyncio, the docker SDK: the standard library's ``logging``) go through
the same renderer, so a process writes one format whatever logged the line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class QuietMalformedHttp(logging.Filter):
    """aiohttp logs every request it cannot parse (a bad request line, an oversized header, broken chunking)
    with a traceback at ERROR, before any Shoal code runs; the client already got its 400. One warning line
    without the traceback says the same and cannot be used to flood the log."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from aiohttp.http_exceptions import HttpProcessingError  # only aiohttp's own records get here

            if isinstance(exc, HttpProcessingError):
                record.msg, record.args = "malformed_http_request: %s", (exc.message.splitlines()[0][:200],)
                record.exc_info = record.exc_text = None
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return record.levelno >= self.level


def configure(level: str = "info", json_lines: bool = False) -> None:
    if level not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)} (got {level!r})")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper,
                           structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    # Libraries are chatty below WARNING (asyncio, urllib3 connection pools): their debug is not ours.
    threshold = max(_LEVELS[level], logging.WARNING)
    handler.addFilter(QuietMalformedHttp(threshold))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(threshold)


def get_logger(component: str, **bound: Any) -> Any:
    # Initial values, not .bind(): a module-level logger must stay lazy until configure() has run.
    return structlog.get_logger(component, component=component, **bound)
