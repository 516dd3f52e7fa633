"""An open-loop HTTP/1.1 load generator cheap enough to leave the CPU to the server measured.

aiohttp's client spends 200-300 us of CPU per request, so at a few thousand requests per
second the load generator, not the server, sets the pace. Here each request is the same
prebuilt bytes written to an idle keep-alive connection, and an answer is read by its
``Content-Length`` (or the end of a chunked body): a few tens of us per request.

Requests are due at a steady rate (open loop) and each latency is measured from when it
was due, so a server stall counts for every request it delays (no coordinated omission).
A request due while every connection is busy waits for one, and that wait counts too.

Benchmarks run as scripts (``python bench/NAME.py``), so this directory is on
``sys.path`` and they import it as ``_paced_load``.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding: *chunked", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:head_end + 2])
        if (length := _LENGTH.search(head)) is not None:
            end = head_end + 4 + int(length.group(1))
        elif _CHUNKED.search(head):
            last = self._buffer.find(b"\r\n0\r\n\r\n", head_end)
            if last < 0:
                return
            end = last + 7
        else:
            raise RuntimeError(f"an answer without a length: {head[:200]!r}")
        if len(self._buffer) < end:
            return
        del self._buffer[:end]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("the server closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.lost)

    async def send(self, raw: bytes) -> int:
        assert self.transport is not None and self._waiter is None
        if self.lost is not None:
            raise self.lost
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One POST as it goes on the wire."""
    parts = urlsplit(url)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class PacedResult:
    """Latencies (s, from when each request was due), when each was due (s from the
    phase's start, in the same order), and the phase's wall time."""

    latencies: list[float] = field(default_factory=list)
    due: list[float] = field(default_factory=list)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


async def paced_posts(url: str, body: bytes, headers: dict[str, str], *, rate: float,
                      duration: float, connections: int = 64,
                      timeout: float = 30.0) -> PacedResult:
    """POST ``body`` to ``url`` ``rate`` times a second for ``duration`` seconds.

    Raises:
        RuntimeError: a request was not answered within ``timeout`` s.
    """
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    raw = request_bytes(url, body, headers)
    opened: list[_Connection] = []
    for _ in range(connections):
        _, conn = await loop.create_connection(_Connection, parts.hostname, parts.port)
        opened.append(conn)
    result = PacedResult()
    total = int(rate * duration)
    taken = 0
    began = time.perf_counter()

    # One worker per connection takes the next request due (no task per request: at a
    # few thousand a second, creating them would be most of this process's CPU).
    async def worker(conn: _Connection) -> None:
        nonlocal taken
        while taken < total:
            due = began + taken / rate
            taken += 1
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            status = await conn.send(raw)
            result.latencies.append(time.perf_counter() - due)
            result.due.append(due - began)
            result.statuses[status] += 1

    try:
        async with asyncio.timeout(duration + timeout):
            await asyncio.gather(*(worker(conn) for conn in opened))
    except TimeoutError:
        raise RuntimeError(f"{url}: requests unanswered {timeout:.0f} s after the phase") \
            from None
    finally:
        for conn in opened:
            if conn.transport is not None:
                conn.transport.close()
    result.seconds = time.perf_counter() - began
    return result
