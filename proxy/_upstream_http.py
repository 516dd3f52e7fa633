"""A lean HTTP/1.1 client for the common upstream request: keep-alive pools on asyncio Protocols.

Why: a request through skyroute makes one upstream call; aiohttp's ``ClientSession``
spends more CPU on it (request and response objects, a ``StreamReader``, timers
re-armed per chunk, tracing hooks, cookie jars) than the rest of the upstream leg
together. This module does only what that call needs, with ``httptools`` (llhttp, C)
parsing the answers.

Theory of operation:

* ``UpstreamPool`` is one upstream's pool. At most ``limit`` connections are busy
  at once, all of the upstream's endpoints together; an acquirer beyond that waits
  in a FIFO queue (within the connect timeout, as aiohttp's ``connect`` timeout
  covers its pool wait). Idle connections are kept per origin (scheme, host, port)
  and reused last-in first-out; one idle longer than ``keepalive_s`` is closed (on
  reuse, or by a sweep timer that runs only while some are idle). Busy plus idle
  never exceed ``limit``: opening one more closes an idle one first.
* ``_Connection`` is the protocol of one socket: it writes a request in one
  ``transport.write`` and feeds what arrives to the parser. The answer's headers
  resolve the request's future; body bytes queue in its ``UpstreamResponse``.
  When the parser has seen the whole message, the connection goes back to the
  pool if the answer allows keep-alive and nothing came after it; otherwise it is
  closed. An answer delimited by the end of the connection ends there.
* ``UpstreamResponse`` has the part of aiohttp's ``ClientResponse`` that
  ``proxy._forward`` reads (``status``, ``headers``, ``content_type``,
  ``content.readany``/``iter_any``/``read``, ``read``, ``release``, ``close``), so
  one streaming code path serves both clients. Closing it before its body was
  read whole aborts the connection: a half-read connection is never reused.
* Backpressure: reading from the socket pauses while more than ``HIGH_WATER`` body
  bytes wait unread, and resumes once the reader has taken them.
* Timeouts, as with aiohttp's ``ClientTimeout(connect=..., sock_read=...)``: the
  pool wait plus connect (and TLS handshake) is bounded by ``connect_s``
  (``aiohttp.ConnectionTimeoutError``); from the request's write until the answer
  ends, no byte for ``idle_s`` fails it (``aiohttp.SocketTimeoutError``; not
  counted while reading is paused for a slow reader). One timer per connection,
  re-armed only when it fires, checks the time of the last byte (and stops when
  it finds no request on).
* Failures raise what aiohttp raises in the same place, so ``_forward.error_category``
  names them as before: a connection lost before the headers is
  ``aiohttp.ServerDisconnectedError`` (clean close) or ``aiohttp.ClientOSError``
  (``ECONNRESET``...), one lost mid-body ``aiohttp.ClientPayloadError``; a connect
  that fails is ``ConnectFailed`` (an ``aiohttp.ClientConnectionError`` whose
  ``os_error`` holds the cause).
* TLS: ``https`` endpoints use the default SSL context (system CAs, hostname checked),
  as aiohttp does.

What stays on aiohttp (``proxy._forward`` dispatches): cloud upstreams (their own
URLs, signing and answer translation), streamed uploads, and ``HEAD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, cast

import aiohttp
import httptools  # type: ignore[import-untyped]
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

#: Unread body bytes above which reading from the upstream pauses.
HIGH_WATER: Final = 1 << 18
#: Most bytes of status line and headers read from an answer (aiohttp allows 8 KiB a line).
MAX_HEAD_BYTES: Final = 1 << 18
_DEFAULT_PORT: Final = {"http": 80, "https": 443}
#: Methods that get ``Content-Type: application/octet-stream`` when none is given (aiohttp's rule).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
#: Methods sent without ``Content-Length: 0`` when they have no body (aiohttp's rule).
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class InvalidAnswer(aiohttp.ClientPayloadError):
    """The upstream's bytes are not a valid HTTP/1.1 answer."""


class ConnectFailed(aiohttp.ClientConnectionError):
    """The connection to an upstream could not be made; ``os_error`` says why."""

    def __init__(self, origin: Origin, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {origin.host}:{origin.port}")
        self.os_error = os_error


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an endpoint's requests go, and how its request target starts."""

    scheme: str
    host: str  # as connected to (no IPv6 brackets)
    port: int
    host_header: str  # as sent in ``Host``
    base_path: str  # the endpoint's path, no trailing "/": "" or "/v1"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@lru_cache(maxsize=1024)
def origin_of(endpoint: str) -> Origin:
    """The ``Origin`` of a configured base URL (cached: endpoints are few)."""
    url = URL(endpoint)
    scheme = url.scheme
    host = url.raw_host or ""
    port = url.port or _DEFAULT_PORT[scheme]
    host_header = url.host_port_subcomponent or host
    return Origin(scheme=scheme, host=host, port=port, host_header=host_header,
                  base_path=url.raw_path.rstrip("/"))


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def request_head(method: str, origin: Origin, path_qs: str, headers: CIMultiDict[str],
                 body: bytes | None) -> bytes:
    """The request line and headers, with the headers aiohttp would add.

    Raises:
        ValueError: a header name or value holds CR or LF (it would split the request).
    """
    lines = [f"{method} {origin.base_path}{path_qs} HTTP/1.1", f"Host: {origin.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    block = "\r\n".join(lines)
    # Each separator adds one CR and one LF: any more came from a name or a value.
    if block.count("\n") != len(lines) - 1 or block.count("\r") != len(lines) - 1:
        raise ValueError("a header name or value contains CR or LF")
    extra = []
    if "Accept" not in headers:
        extra.append("\r\nAccept: */*")
    if body is not None:
        extra.append(f"\r\nContent-Length: {len(body)}")
    elif method not in _NO_BODY_METHODS:
        extra.append("\r\nContent-Length: 0")
    if (body is not None or method in _BODY_METHODS) and "Content-Type" not in headers:
        extra.append("\r\nContent-Type: application/octet-stream")
    extra.append("\r\n\r\n")
    return (block + "".join(extra)).encode("utf-8", "surrogateescape")


class UpstreamResponse:
    """One answer: status and headers, and its body as it arrives."""

    __slots__ = ("_chunks", "_conn", "_error", "_size", "_waiter", "content_type", "eof",
                 "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str,
                 headers: CIMultiDictProxy[str]) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        ctype = headers.get("Content-Type", "")
        self.content_type = ctype.partition(";")[0].strip().lower() or "application/octet-stream"
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.eof = False  # the whole body has arrived (it may not all be read yet)

    @property
    def content(self) -> UpstreamResponse:
        """The body reader (this object, as aiohttp's ``response.content``)."""
        return self

    # --- fed by the connection ---

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self.eof = True
        self._conn = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.eof:
            self._error = exc
            self._conn = None
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- read by the consumer ---

    async def readany(self) -> bytes:
        """All body bytes that have arrived (waiting for some); ``b""`` at the end."""
        while not self._chunks:
            if self.eof:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        while chunk := await self.readany():
            yield chunk

    async def read(self, n: int = -1) -> bytes:
        """The rest of the body (at most ``n`` bytes when ``n`` >= 0)."""
        parts = []
        size = 0
        while n < 0 or size < n:
            chunk = await self.readany()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        data = b"".join(parts)
        if 0 <= n < len(data):
            self._chunks.insert(0, data[n:])  # kept for a later read, as aiohttp does
            self._size += len(data) - n
            data = data[:n]
        return data

    def release(self) -> None:
        """Done with the answer: as ``close`` (a whole answer's connection is already pooled)."""
        self.close()

    def close(self) -> None:
        """Drop the answer; a connection still carrying its body is closed, not reused."""
        conn = self._conn
        self._chunks = []
        self._size = 0
        if conn is not None and not self.eof:
            self._conn = None
            self._error = aiohttp.ClientConnectionError("the response was closed")
            conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive socket to an origin: writes requests, parses answers."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._head: asyncio.Future[UpstreamResponse] | None = None  # waiting for headers
        self._response: UpstreamResponse | None = None  # receiving its body
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._reason = b""
        self._informational = False  # parsing a 1xx answer, which is skipped
        self._until_eof = False  # the body ends when the connection does
        self._complete = False  # the parser has seen the whole answer
        self._keep_alive = False  # and it allows the connection's reuse
        self._extra = False  # bytes came after the answer
        self.busy = False  # counted in the pool's busy connections
        self._paused = False
        self._idle_s = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._response is None:
            self.abort()  # bytes nobody asked for: the server is out of step
            return
        self._last_data = self._loop.time()
        if self._head is not None:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(InvalidAnswer(f"the upstream's answer is not valid HTTP/1.1: {exc}"))
            self.abort()
            return
        if self._complete:
            self._done()
        elif self._head is not None and self._head_bytes > MAX_HEAD_BYTES:
            self._lost(InvalidAnswer(f"no end of the answer's headers in {MAX_HEAD_BYTES} bytes"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._response is not None and self._until_eof and exc is None:
            self._complete = True
            self._done()
        elif self._head is not None:
            self._lost(aiohttp.ServerDisconnectedError() if exc is None
                       else aiohttp.ClientOSError(*exc.args) if isinstance(exc, OSError)
                       else exc)
        elif self._response is not None:
            detail = "" if exc is None else f" ({exc!r})"
            self._lost(aiohttp.ClientPayloadError(
                f"Response payload is not completed: the connection was lost{detail}"))
        self._stop_timer()
        self.pool._closed(self)

    def pause_writing(self) -> None:  # the whole request is written at once: nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer in the bytes of the first: do not reuse
            self._extra = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        status = self._parser.get_status_code()
        raw, self._raw_headers = self._raw_headers, []
        reason, self._reason = self._reason, b""
        if 100 <= status < 200:  # an interim answer (100 Continue...): the real one follows
            self._informational = True
            return
        headers = CIMultiDictProxy(CIMultiDict([
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in raw]))
        self._until_eof = (status not in (204, 304) and "Content-Length" not in headers
                           and "chunked" not in headers.get("Transfer-Encoding", "").lower())
        response = UpstreamResponse(self, status, reason.decode("latin-1"), headers)
        self._response = response
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._complete:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._complete:
            return
        if self._informational:
            self._informational = False
            return
        # Asked here: once the parser moves past this message its flags are reset.
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True

    # --- used by the pool and the response ---

    def send(self, head: bytes, body: bytes | None, idle_s: float
             ) -> asyncio.Future[UpstreamResponse]:
        """Write one request; the future resolves with its answer's headers.

        Raises:
            aiohttp.ServerDisconnectedError: the connection closed before the write
                (between its ``connection_made`` and the request's turn to run).
        """
        if self.transport is None or self.closed:
            raise aiohttp.ServerDisconnectedError()
        self._head = self._loop.create_future()
        self._head_bytes = 0
        self._complete = False
        self._idle_s = idle_s
        self._last_data = self._loop.time()
        if body:
            if len(body) < 65536:
                self.transport.write(head + body)
            else:  # no copy of a large body
                self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_data + idle_s, self._on_timer)
        return self._head

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_data = self._loop.time()  # the wait was the reader's, not the upstream's
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows (soon, from the loop)
        self.closed = True

    def forget(self) -> None:
        """The request was given up before its answer (cancelled): the socket is closed."""
        self._head = None
        self.abort()

    def _done(self) -> None:
        """The answer has arrived whole: hand the connection back, or close it."""
        response, self._response = self._response, None
        keep = (self._keep_alive and not self._until_eof and not self._extra and not self.closed)
        self._complete = self._keep_alive = False
        if response is not None:
            response._finish()
        # The idle timer stays armed: when it fires with no request on, it just stops, and
        # the next request's ``send`` finds it set (one timer per idle_s, not per request).
        if self._paused and self.transport is not None:  # the reader was slow; the body is in
            self._paused = False
            self.transport.resume_reading()
        if keep:
            self.pool._put_back(self)
        elif self.transport is not None:
            self.closed = True
            self.transport.close()  # the answer is whole: a clean close, not a reset

    def _lost(self, exc: BaseException) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        response, self._response = self._response, None
        if response is not None:
            response._fail(exc)

    def _on_timer(self) -> None:
        self._timer = None
        if self._head is None and self._response is None:
            return
        now = self._loop.time()
        due = self._last_data + self._idle_s
        if self._paused:  # the reader is the slow one: no clock on the upstream meanwhile
            self._timer = self._loop.call_at(now + self._idle_s, self._on_timer)
            return
        if now < due:  # data came since the timer was set
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        self._lost(aiohttp.SocketTimeoutError(
            f"no data from the upstream for {self._idle_s:g}s (idle_timeout)"))
        self.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamPool:
    """One upstream's keep-alive connections, at most ``limit`` busy at once."""

    def __init__(self, limit: int, *, keepalive_s: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._limit = limit
        self._ssl = ssl_context  # None: the default one, made at the first https connection
        self._keepalive_s = keepalive_s
        self._busy = 0
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def __repr__(self) -> str:
        return (f"<UpstreamPool busy={self._busy} idle={self._idle_count} "
                f"limit={self._limit}>")

    @property
    def busy(self) -> int:
        """Connections carrying a request now."""
        return self._busy

    @property
    def idle(self) -> int:
        """Open connections waiting to be reused."""
        return self._idle_count

    async def request(self, method: str, endpoint: str, path_qs: str,
                      headers: CIMultiDict[str], body: bytes | None, *,
                      connect_s: float, idle_s: float) -> UpstreamResponse:
        """Send one request to ``endpoint`` + ``path_qs``; the answer once its headers are in.

        Raises:
            aiohttp.ConnectionTimeoutError: no connection within ``connect_s``.
            ConnectFailed: the connection could not be made.
            aiohttp.ClientError, OSError: the connection failed before the answer.
        """
        origin = origin_of(endpoint)
        head = request_head(method, origin, path_qs, headers, body)
        conn = await self._acquire(origin, connect_s)
        try:
            waiter = conn.send(head, body, idle_s)
            return await waiter
        except BaseException:
            conn.forget()
            if conn.transport is None:  # already lost: no connection_lost to come
                self._closed(conn)
            raise

    async def _acquire(self, origin: Origin, connect_s: float) -> _Connection:
        conn = self._reuse(origin) if self._busy < self._limit else None
        if conn is None:
            try:
                async with asyncio.timeout(connect_s):
                    await self._wait_turn()
                    try:
                        conn = self._reuse(origin) or await self._connect(origin)
                    except BaseException:
                        self._busy -= 1
                        self._wake()
                        raise
            except TimeoutError:
                raise aiohttp.ConnectionTimeoutError(
                    f"no connection within {connect_s:g}s (connect_timeout)") from None
        else:
            self._busy += 1
        conn.busy = True
        return conn

    async def _wait_turn(self) -> None:
        """Count one more busy connection, waiting in line while ``limit`` are busy."""
        while self._busy >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the turn passes to the next
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise
        self._busy += 1

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _reuse(self, origin: Origin) -> _Connection | None:
        """An idle connection to ``origin`` still open and fresh, or None."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - self._keepalive_s
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        if self._busy + self._idle_count > self._limit:
            self._close_one_idle()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self, origin), origin.host, origin.port,
                ssl=(self._ssl or _ssl_context()) if origin.tls else None,
                server_hostname=origin.host if origin.tls else None)
        except OSError as exc:
            raise ConnectFailed(origin, exc) from exc
        if self.closed:
            conn.abort()
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        if conn.closed:  # lost before this task resumed (its connection_lost has run)
            raise aiohttp.ServerDisconnectedError()
        self._all.add(conn)
        return conn

    def _close_one_idle(self) -> None:
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is not None:
            self._idle[oldest.origin].remove(oldest)
            self._idle_count -= 1
            oldest.abort()

    def _put_back(self, conn: _Connection) -> None:
        """``conn``'s answer is whole and it may be reused."""
        self._busy -= 1
        conn.busy = False
        if self.closed:
            conn.abort()
        else:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._idle_count += 1
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(
                    self._keepalive_s, self._sweep)
        self._wake()

    def _closed(self, conn: _Connection) -> None:
        """``conn``'s socket is gone (from ``connection_lost``; a second call does nothing)."""
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
            self._idle_count -= 1
        elif conn.busy:
            conn.busy = False
            self._busy -= 1
            self._wake()

    def _sweep(self) -> None:
        """Close connections idle longer than ``keepalive_s``; again while some stay idle."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        oldest = now
        for conns in self._idle.values():
            while conns and conns[0].idle_since <= now - self._keepalive_s:
                self._idle_count -= 1
                conns.pop(0).abort()
            if conns:
                oldest = min(oldest, conns[0].idle_since)
        if self._idle_count:
            self._sweeper = asyncio.get_running_loop().call_at(
                oldest + self._keepalive_s, self._sweep)

    def close(self) -> None:
        """Close every connection (at shutdown, or when a reload replaced this pool)."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        self._idle_count = 0
