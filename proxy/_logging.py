"""Structured logging: JSON lines, or a console renderer on a terminal.

Each request binds ``request_id`` into structlog's context variables, so every
line logged while serving it carries the id without passing it around. Keys and
request bodies are never logged, and anything that looks like a key is redacted
(``proxy._redact``). Every event has a stable snake_case name with the values as
fields; README.md ("Log events") lists them all.

Libraries log through the standard ``logging`` module; those records are passed on
to structlog, so they come out in the same format and never break a JSON log.
aiohttp's own complaint about a request it could not parse (a bad request line,
a control byte in a header) quotes the client's raw bytes, header values
included: it becomes ``client_request_malformed`` with the peer and a short,
escaped reason, and the bytes are dropped.
"""

from __future__ import annotations

import asyncio
import atexit
import json as stdlib_json
import json.encoder as json_encoder
import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from ._redact import redact_processor

#: Longest reason taken from a parse error: enough for the parser's description.
_REASON_CHARS = 80
#: Longest message taken from a library's log record.
_MESSAGE_CHARS = 2000
#: Where a parser's description ends and the client's bytes begin (quoted or after ':').
_CLIENT_BYTES_START = re.compile(r"[:'\"]")


def configure_logging(*, level: str = "info", json: bool | None = None,
                      pid: bool = False) -> bool:
    """Set up structlog, and the standard library's logging, for the process.

    Call once, at start-up.

    Args:
        level: minimum level name (debug, info, warning, error).
        json: force JSON (True) or console (False) output; default: console on a TTY.
        pid: add the process id to every line (a ``--workers`` worker: which one served).

    Returns:
        Whether the output is JSON.
    """
    if json is None:
        json = not sys.stderr.isatty()
    global _lines
    if _lines is not None:
        _lines.write_out()  # lines of a previous configuration go out first
    lines = _lines = BatchedLines(sys.stderr)
    renderer: structlog.typing.Processor = (
        render_json if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *([_add_pid(os.getpid())] if pid else []),
            add_level_time_and_exception,
            redact_processor,  # last before rendering: tracebacks are redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: lines,
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


def _fallback(value: Any) -> Any:
    """What a value JSON cannot hold is written as (as structlog's ``JSONRenderer`` does)."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


#: One encoder for every line: ``json.dumps(..., default=...)`` would build a new one
#: per call. The output is ``json.dumps``'s, byte for byte.
_ENCODER = stdlib_json.JSONEncoder(default=_fallback)
#: What ``_ENCODER.encode`` builds anew on every call (``JSONEncoder.iterencode``): the
#: C encoder with the same settings, made once. Without the circular-reference markers,
#: which a shared dict would make wrong across threads: a log event is never circular
#: (one would raise either way: ``RecursionError`` here, ``ValueError`` in ``json.dumps``).
_C_ENCODER = None if json_encoder.c_make_encoder is None else json_encoder.c_make_encoder(
    None, _fallback, json_encoder.encode_basestring_ascii, None, ": ", ", ", False, False,
    True)


def render_json(logger: object, method: str, event: structlog.typing.EventDict) -> str:
    """structlog processor: the event as one JSON object (``json.dumps``'s format)."""
    if _C_ENCODER is None:
        return _ENCODER.encode(event)
    return "".join(_C_ENCODER(event, 0))


#: What ``structlog.processors.add_log_level`` calls a method's level, where it differs.
_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}
_format_exc_info = structlog.processors.format_exc_info


def add_level_time_and_exception(logger: object, method: str,
                                 event: structlog.typing.EventDict
                                 ) -> structlog.typing.EventDict:
    """structlog processor: ``add_log_level``, ``add_timestamp`` and ``format_exc_info``
    in one call (three processor calls per line were a tenth of a line's cost)."""
    event["level"] = _LEVEL_OF_METHOD.get(method, method)
    add_timestamp(logger, method, event)
    if "exc_info" in event:
        return _format_exc_info(logger, method, event)
    return event


#: (second, its ISO 8601 text): the date and time are formatted once a second.
_second: tuple[int, str] = (-1, "")


def add_timestamp(logger: object, method: str,
                  event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """structlog processor: ``timestamp``, UTC, ISO 8601 with microseconds
    (``2026-01-02T03:04:05.678901Z``, as ``TimeStamper(fmt="iso", utc=True)`` writes it,
    which drops ``.000000``), without a ``datetime`` per line."""
    global _second
    now = time.time()
    second = int(now)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    micro = int((now - second) * 1_000_000)
    event["timestamp"] = f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"
    return event


#: Writes up to this size are atomic on a pipe: lines of ``--workers`` processes that
#: share stderr never interleave.
PIPE_BUF = 4096
#: A line waits at most this long in its batch before it is written.
FLUSH_AFTER_S = 0.05


class BatchedLines:
    """Where structlog puts rendered lines: gathered, and written a batch at a time.

    The access log writes a line per request; a system call per line (and a flush of
    a text file) costs more than building the line. Lines written while an event
    loop runs wait in a batch, which is written once it holds ``PIPE_BUF`` bytes or
    ``FLUSH_AFTER_S`` after its first line, whichever comes first (one timer per
    batch, not per line). Each write is whole lines of at most ``PIPE_BUF`` bytes
    (a longer line alone), so workers sharing a pipe never interleave.

    No line is dropped: lines written outside a running loop (start-up, other threads,
    exit) are written at once with whatever is pending, and so is the batch at
    interpreter exit (``atexit``), when the server stops (``flush_logs``), and before
    a worker exits by ``os._exit``. Lines are lost only when the process is killed
    (SIGKILL) in the ``FLUSH_AFTER_S`` before a write.

    It is structlog's logger itself (``msg``, ``info``, ... take the rendered line),
    so a line takes no logger lock, no newline concatenation and no per-line flush.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._pending: list[str] = []
        self._size = 0
        #: The loop a write is scheduled on (None: none is): a test's loop may close
        #: before its timer fires, and the next loop must schedule its own.
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        atexit.register(self.write_out)

    def msg(self, line: str) -> None:
        """Add one rendered line (without its newline)."""
        size = len(line) + 1
        earlier = now = None
        with self._lock:
            if self._size + size > PIPE_BUF and self._pending:
                earlier = self._take()  # whole lines of at most PIPE_BUF per write
            self._pending.append(line)
            self._size += size
            if self._size >= PIPE_BUF or not self._schedule():
                now = self._take()
        # Written outside the lock: a write that blocks (a full pipe) or logs (a warning)
        # must not hold, or deadlock, another thread's line.
        if earlier is not None:
            self._write(earlier)
        if now is not None:
            self._write(now)

    # structlog calls the method named as the level; every level is a line here.
    log = debug = info = warn = warning = err = error = critical = exception = fatal = \
        failure = msg

    def _schedule(self) -> bool:
        """Write the batch ``FLUSH_AFTER_S`` from now; False outside a running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        timer_loop = self._timer_loop
        if timer_loop is loop:
            return True
        if timer_loop is not None and not timer_loop.is_closed():
            return False  # another thread's loop holds the batch: write it now
        loop.call_later(FLUSH_AFTER_S, self.write_out)
        self._timer_loop = loop
        return True

    def flush(self) -> None:
        """Write every pending line now (as a file's ``flush`` would)."""
        self.write_out()

    def write_out(self) -> None:
        """Write every pending line now."""
        with self._lock:
            text = self._take()
        if text is not None:
            self._write(text)

    def _take(self) -> str | None:
        """The batch as one text, emptied (the lock is held); None when empty."""
        self._timer_loop = None
        if not self._pending:
            return None
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        self._size = 0
        return text

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):  # stderr closed (a client that went away, exit)
            pass


#: The process's log output, once ``configure_logging`` ran.
_lines: BatchedLines | None = None


def flush_logs() -> None:
    """Write every log line still waiting in a batch (before an exit that skips ``atexit``)."""
    if _lines is not None:
        _lines.write_out()


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


def _add_pid(pid: int) -> structlog.typing.Processor:
    def add(logger: object, method: str, event: structlog.typing.EventDict
            ) -> structlog.typing.EventDict:
        event["pid"] = pid
        return event

    return add


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
