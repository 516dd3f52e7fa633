"""Structured logging: JSON lines, or a console renderer on a terminal.

Each request binds ``request_id`` into structlog's context variables, so every
line logged while serving it carries the id without passing it around. Keys and
request bodies are never logged, and anything that looks like a key is redacted
(``proxy._redact``).
"""

from __future__ import annotations

import logging
import sys

import structlog

from ._redact import redact_processor


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Set up structlog for the process (call once, at start-up).

    Args:
        level: minimum level name (debug, info, warning, error).
        json: force JSON (True) or console (False) output; default: console on a TTY.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,  # last before rendering: tracebacks are redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
