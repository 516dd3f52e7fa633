"""Client connections: time limits, a cap on how many, and aiohttp's own error answers.

Rules / theory of operation
---------------------------
aiohttp gives a server no limit on how long a client may take to send its request
head, and none on how many connections it keeps; a few hundred clients sending
one byte a minute would hold every file descriptor. ``ConnectionGuard`` adds
what nginx has (``limits`` in the routing file; reloads apply at once):

* Each connection is in one phase: ``NEW`` (accepted, nothing sent yet), ``HEAD``
  (a request head is arriving), ``BUSY`` (a request is being served, body reads
  included: those are bounded by ``limits.body_timeout`` in the handler), or
  ``IDLE`` (kept alive between requests).
* ``NEW`` and ``HEAD`` must become ``BUSY`` within ``head_timeout`` of the accept
  (or of the first byte of a later request): else the connection is closed, with
  an OpenAI-shaped 408 if it had sent anything. ``IDLE`` lasts ``keepalive_timeout``.
  A sweep a few times a second enforces both (``SWEEP_S``).
* At ``max_client_connections``, a new connection makes room by closing the
  connection that has waited longest for a request head (``NEW``/``HEAD``), else
  the longest idle one; when every connection is serving a request, the new one
  gets a 503 with ``Retry-After`` and is closed. Clients that send whole requests
  promptly are therefore never starved by clients that do not.
* A streamed answer the client stops reading for ``send_timeout`` is cut and the
  client's connection aborted (``send_within``), so an unread stream cannot hold an
  upstream connection forever.
* Requests aiohttp cannot parse (bad framing, a header over 8 KiB) get an
  OpenAI-shaped error instead of aiohttp's plain text, and one log line without
  the client's bytes in it (``handle_error``).

``raise_open_file_limit`` lifts the soft open-file limit to the hard one at start:
every connection is a descriptor, and the default soft limit is often 1024.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import resource
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from skyroute.routing import Limits

from ._errors import http_error
from ._logging import parse_error_reason
from ._metrics import Metrics
from ._state import METRICS, SERVING

log = structlog.get_logger("skyroute.connections")

#: Longest time between two sweeps; tests with sub-second limits sweep faster.
SWEEP_S = 0.5
#: Connections kept for what is not a client (upstream pools, sync peers, files),
#: per open-file limit: the cap warns when it would leave less than half.
FD_SHARE_FOR_CLIENTS = 0.5

CLOSE_REASONS = ("head_timeout", "keepalive_timeout", "evicted", "refused", "send_timeout")


class Phase(enum.Enum):
    NEW = "new"
    HEAD = "head"
    BUSY = "busy"
    IDLE = "idle"


_WAITING_FOR_HEAD = (Phase.NEW, Phase.HEAD)


def _canned(status: int, reason: str, message: str, *, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response, for answering outside aiohttp's request cycle."""
    error = http_error(status, message)
    body = json.dumps({"error": {"message": error.message, "type": error.type, "param": None,
                                 "code": error.code}}).encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


_REFUSED = _canned(503, "Service Unavailable",
                   "skyroute has as many client connections open as it may "
                   "(limits.max_client_connections), all serving requests; retry shortly",
                   retry_after=1)


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, reporting its phase to a ``ConnectionGuard``."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.phase = Phase.NEW
        self.since = 0.0
        self.admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.since = asyncio.get_running_loop().time()
        if not self.guard.admit(self):
            with contextlib.suppress(Exception):
                transport.write(_REFUSED)  # type: ignore[attr-defined]
            transport.close()
            return
        self.admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.admitted:
            return
        self.guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return  # refused: closing, and never parsed
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self.phase = Phase.BUSY
        elif self.phase is Phase.IDLE or self.phase is Phase.BUSY:
            # The first bytes of the next request on a kept-alive connection.
            self.phase, self.since = Phase.HEAD, asyncio.get_running_loop().time()
        elif data:
            self.phase = Phase.HEAD  # NEW: the head's time counts from the accept

    def is_serving(self) -> bool:
        """Whether a request is being handled or waits to be (the sweep's view)."""
        return bool(self._request_in_progress or self._messages)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp could not parse the request (or a handler failed outside the app)."""
        if isinstance(exc, LineTooLong):
            status = 431  # in practice always a header: the request line is checked later
        if status < 500:
            what = type(exc).__name__ if exc is not None else "malformed request"
            text = (f"skyroute could not parse this HTTP request ({what}); send a well-formed "
                    "HTTP/1.1 request with headers under 8 KiB each")
            reason = parse_error_reason(exc) if isinstance(exc, HttpProcessingError) else what
            # Debug for a bad method opening a connection: TLS or junk sent to the port.
            method = "debug" if isinstance(exc, BadHttpMethod) else "info"
            getattr(log, method)("client_request_malformed", peer=request.remote,
                                 status=status, error=what, reason=reason)
        else:
            text = "skyroute failed to answer this request"
            log.error("request_crashed", status=status,
                      exception=type(exc).__name__ if exc is not None else None)
        resp = http_error(status, text).to_response()
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's low-level server, making ``GuardedRequestHandler`` connections."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard

    def __call__(self) -> web.RequestHandler:
        return GuardedRequestHandler(self, guard=self.guard, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are watched by ``guard``."""

    def __init__(self, app: web.Application, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation,
                             loop=plain._loop, guard=self._guard, **plain._kwargs)


class ConnectionGuard:
    """Every open client connection, its phase, and the limits that close it."""

    def __init__(self, limits: Callable[[], Limits], metrics: Metrics) -> None:
        """Args:
            limits: the ``Limits`` in force now (read at each decision: reloads apply).
            metrics: where connection counts and closes are reported.
        """
        self._limits = limits
        self._metrics = metrics
        self._open: dict[GuardedRequestHandler, None] = {}  # insertion-ordered set
        self._closed = dict.fromkeys(CLOSE_REASONS, 0)  # since the last log line
        for reason in CLOSE_REASONS:
            metrics.client_connections_closed.labels(reason)

    def __repr__(self) -> str:
        return f"<ConnectionGuard open={len(self._open)}>"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Take a new connection, making room at the cap; False: refuse it."""
        if len(self._open) >= self._limits().max_client_connections:
            victim = self._eviction_candidate()
            if victim is None:
                self._count("refused")
                return False
            self._close(victim, "evicted")
        self._open[conn] = None
        self._metrics.client_connections.set(len(self._open))
        return True

    def release(self, conn: GuardedRequestHandler) -> None:
        self._open.pop(conn, None)
        self._metrics.client_connections.set(len(self._open))

    def _eviction_candidate(self) -> GuardedRequestHandler | None:
        oldest_head = oldest_idle = None
        for conn in self._open:
            if conn.phase in _WAITING_FOR_HEAD and not conn.is_serving():
                if oldest_head is None or conn.since < oldest_head.since:
                    oldest_head = conn
            elif conn.phase is Phase.IDLE and not conn.is_serving() and (
                    oldest_idle is None or conn.since < oldest_idle.since):
                oldest_idle = conn
        return oldest_head or oldest_idle

    def sweep(self, now: float) -> None:
        """Close connections past their phase's deadline; notice finished requests."""
        limits = self._limits()
        for conn in list(self._open):
            if conn.is_serving():
                conn.phase = Phase.BUSY
            elif conn.phase is Phase.BUSY:
                conn.phase, conn.since = Phase.IDLE, now
            elif conn.phase in _WAITING_FOR_HEAD and now - conn.since > limits.head_timeout_s:
                self._close(conn, "head_timeout", limits.head_timeout_s)
            elif conn.phase is Phase.IDLE and now - conn.since > limits.keepalive_timeout_s:
                self._close(conn, "keepalive_timeout")
        self._log_closes()

    def _close(self, conn: GuardedRequestHandler, reason: str,
               head_timeout_s: float | None = None) -> None:
        transport = conn.transport
        if conn.phase is Phase.HEAD and head_timeout_s is not None and transport is not None:
            with contextlib.suppress(Exception):
                transport.write(_canned(
                    408, "Request Timeout",
                    f"the request head was not complete within {head_timeout_s:g}s "
                    "(limits.head_timeout)"))
        self.release(conn)
        conn.force_close()
        self._count(reason)

    def _count(self, reason: str) -> None:
        self._metrics.client_connections_closed.labels(reason).inc()
        self._closed[reason] += 1

    def _log_closes(self) -> None:
        """One line per sweep that closed anything: floods must not flood the log."""
        if any(self._closed.values()):
            log.warning("client_connections_closed",
                        **{k: v for k, v in self._closed.items() if v},
                        open=len(self._open))
            self._closed = dict.fromkeys(CLOSE_REASONS, 0)

    async def run(self) -> None:
        """Sweep until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            limits = self._limits()
            await asyncio.sleep(min(SWEEP_S, limits.head_timeout_s / 4,
                                    limits.keepalive_timeout_s / 4))
            self.sweep(loop.time())


#: More than what aiohttp adds around a write (chunk framing, the headers of the first).
_FRAMING_BYTES = 16 * 1024


async def send_within(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    """Write ``data`` to a streamed response; drop a client that stops reading.

    A client that reads nothing for ``limits.send_timeout`` (nginx's ``send_timeout``)
    would otherwise hold its upstream connection, and one of the upstream's
    ``max_connections``, for as long as it likes. Its connection is aborted and the
    write raises ``ConnectionResetError``, as for a client that went away.
    """
    transport = request.transport
    if transport is not None and not request.protocol.writing_paused and \
            transport.get_write_buffer_size() + len(data) + _FRAMING_BYTES \
            <= transport.get_write_buffer_limits()[1]:
        # The transport cannot pause for this write, so it cannot wait (aiohttp waits
        # only on a paused transport): no timer to arm for it, as for nearly every event
        # of a stream a client reads.
        await resp.write(data)
        return
    timeout_s = request.app[SERVING].runtime.config.limits.send_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            await resp.write(data)
    except TimeoutError:
        request.app[METRICS].client_connections_closed.labels("send_timeout").inc()
        if request.transport is not None:
            request.transport.abort()  # its send buffer is full: close() would wait on it
        raise ConnectionResetError(f"the client read nothing for {timeout_s:g}s "
                                   "(limits.send_timeout)") from None


async def send_and_close(request: web.Request, resp: web.StreamResponse) -> None:
    """Send ``resp`` now and close the connection, without reading the rest of the body.

    aiohttp would otherwise linger, reading what the client still sends, for up to
    ten seconds: the wrong courtesy for a client that has stopped sending.
    """
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("open_file_limit_kept", soft=soft, hard=hard, error=str(exc))
            return soft
        log.info("open_file_limit_raised", old=soft, new=hard)
        return hard
    return soft


def check_connection_cap(limits: Limits, open_files: int) -> None:
    """Warn when ``max_client_connections`` would leave too few descriptors for the rest."""
    if open_files != resource.RLIM_INFINITY and \
            limits.max_client_connections > open_files * FD_SHARE_FOR_CLIENTS:
        log.warning("connection_cap_questioned",
                    max_client_connections=limits.max_client_connections,
                    open_file_limit=open_files,
                    hint="max_client_connections is over half the open-file limit: upstream "
                         "connections may run out of descriptors under load")
