"""Structured logging: JSON lines, or a console renderer on a terminal.

Each request binds ``request_id`` into structlog's context variables, so every
line logged while serving it carries the id without passing it around. Keys and
request bodies are never logged. Every event has a stable snake_case name with the
values as fields; README.md ("Log events") lists them all.

Libraries log through the standard ``logging`` module; those records are passed on
to structlog, so they come out in the same format and never break a JSON log.
aiohttp's own complaint about a request it could not parse (a bad request line,
a control byte in a header) quotes the client's raw bytes, header values
included: it becomes ``client_request_malformed`` with the peer and a short,
escaped reason, and the bytes are dropped.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog
from aiohttp.http_exceptions import HttpProcessingError

#: Longest reason taken from a parse error: enough for the parser's description.
_REASON_CHARS = 80
#: Longest message taken from a library's log record.
_MESSAGE_CHARS = 2000
#: Where a parser's description ends and the client's bytes begin (quoted or after ':').
_CLIENT_BYTES_START = re.compile(r"[:'\"]")


def configure_logging(*, level: str = "info", json: bool | None = None) -> bool:
    """Set up structlog, and the standard library's logging, for the process.

    Call once, at start-up.

    Args:
        level: minimum level name (debug, info, warning, error).
        json: force JSON (True) or console (False) output; default: console on a TTY.

    Returns:
        Whether the output is JSON.
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(StdlibBridge())
    # Libraries' info lines (aiohttp's access log in the stand-ins) are noise next to
    # skyroute's own events; their warnings and errors are not.
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.captureWarnings(True)
    return json


class StdlibBridge(logging.Handler):
    """Hands the standard library's log records to structlog as named events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, HttpProcessingError):
                args = record.args if isinstance(record.args, tuple) else ()
                method = "debug" if record.levelno <= logging.DEBUG else "info"
                getattr(log, method)(
                    "client_request_malformed", peer=str(args[0]) if args else None,
                    status=exc.code, error=type(exc).__name__, reason=parse_error_reason(exc))
                return
            fields: dict[str, object] = {
                "logger": record.name,
                "message": printable(record.getMessage(), _MESSAGE_CHARS)}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            getattr(log, _method(record.levelno))("library_logged", **fields)
        except Exception:
            self.handleError(record)


def _method(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


def parse_error_reason(exc: HttpProcessingError) -> str:
    """What was wrong with an unparsable request, without the client's bytes.

    aiohttp's messages put the bytes it choked on after a colon or in quotes
    (``Invalid header value char:\\n\\n  b'...'``); only the text before them is kept.
    """
    first = (exc.message or "").split("\n", 1)[0]
    reason = _CLIENT_BYTES_START.split(first, maxsplit=1)[0].strip().rstrip(".")
    return printable(reason or type(exc).__name__, _REASON_CHARS)


def printable(text: str, limit: int) -> str:
    """``text`` with control and other unprintable characters escaped, cut to ``limit``."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                      for c in text[:limit])
    return escaped if len(text) <= limit else escaped[:limit] + "..."
