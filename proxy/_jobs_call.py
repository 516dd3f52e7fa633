"""A job's call, served in-process: the application's own handler chain, without a socket.

A job takes exactly the path a client's request takes (the error middleware, auth, limits,
aliases, cache, failover, busy detection, degradation), so the runner builds an aiohttp
request from the job (method, path, JSON body; a ``JobRequest`` naming the client key
it runs as, which ``proxy._jobs_auth`` reads) and hands it to the application as its
server would. Nothing
is parsed or serialised on the way: a whole answer is read from the ``web.Response`` the
handlers return; a streamed one (SSE) is collected from what the handlers write, without
HTTP framing or compression (which a client would undo anyway).

The request's connection is a stand-in (``_NoConnection``): no transport, so nothing
waits on a socket's buffer, and closing it is a no-op.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._jobs_auth import JobRequest

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

#: The peer a job's call comes from, as the loopback call it replaces did.
LOCAL_PEER: Final = ("127.0.0.1", 0)


@dataclass(frozen=True, slots=True)
class JobAnswer:
    """What the application answered a job's call."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class _NoConnection:
    """What an aiohttp request asks of its connection, for a call with none."""

    ssl_context = None
    peername = LOCAL_PEER
    sockname = LOCAL_PEER
    transport = None
    writing_paused = False
    _reading_paused = False
    max_field_size = 8190
    max_headers = 128

    # Any arguments: aiohttp's body reader passes its own (``resume_parser``), which vary
    # between its releases.
    def pause_reading(self, *args: object, **kwargs: object) -> None:
        """The whole body is in the buffer already: nothing to pause."""

    def resume_reading(self, *args: object, **kwargs: object) -> None:
        """See ``pause_reading``."""

    def force_close(self) -> None:
        """Nothing to close (``send_and_close`` after an error answer)."""


class _CollectedBody(AbstractStreamWriter):
    """A response writer keeping the body's bytes (headers are read from the response)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.chunks.append(bytes(chunk))
        self.output_size += len(chunk)

    async def write_eof(self, chunk: bytes = b"") -> None:
        if chunk:
            await self.write(chunk)

    async def drain(self) -> None:
        """Nothing buffered."""

    def enable_compression(self, encoding: str = "deflate",
                           strategy: int | None = None) -> None:
        """Kept as is: the runner wants the body a client would decode."""

    def enable_chunking(self) -> None:
        """No HTTP framing in-process."""

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        """The headers are the response's own (``StreamResponse.headers``)."""


async def call_in_process(app: web.Application, method: str, path: str, body: bytes | None,
                          headers: dict[str, str], *, owner: str = "") -> JobAnswer:
    """Serve ``method path`` with ``body`` through ``app``'s handlers, as its server would,
    as a job's call run as the client key named ``owner``.

    Raises:
        Exception: whatever the handler chain did not turn into an answer (the error
            middleware turns nearly everything into one); ``CancelledError`` as a client
            that went away (shutdown cancelled the job).
    """
    loop = asyncio.get_running_loop()
    connection = _NoConnection()
    given = CIMultiDict(headers)
    given.setdefault("Host", "127.0.0.1")
    given["Content-Length"] = str(len(body or b""))
    message = RawRequestMessage(method, path, HttpVersion11, CIMultiDictProxy(given), (),
                                False, None, False, False, URL.build(path=path, encoded=True))
    protocol = cast("RequestHandler", connection)
    payload = StreamReader(protocol, 2**16 + len(body or b""), loop=loop)
    if body:
        payload.feed_data(body)
    payload.feed_eof()
    writer = _CollectedBody()
    request = JobRequest(message, payload, protocol, writer, cast("asyncio.Task[None]",
                         asyncio.current_task()), loop, remote=LOCAL_PEER[0])
    request.job_owner = owner
    # What aiohttp's server does with a request: the application's _handle resolves the
    # route and runs the middlewares (there is no public call for it), then the answer is
    # sent (here: kept).
    try:
        resp = await app._handle(request)
    except web.HTTPException as exc:  # aiohttp's own (the error middleware maps them first)
        return JobAnswer(exc.status, CIMultiDictProxy(CIMultiDict(exc.headers)),
                         (exc.text or "").encode())
    if not resp.prepared and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
        return JobAnswer(resp.status, CIMultiDictProxy(resp.headers), resp.body)
    if not resp.prepared:  # a body that is a payload (a file): sent as the server would
        await resp.prepare(request)
    await resp.write_eof()
    return JobAnswer(resp.status, CIMultiDictProxy(resp.headers), b"".join(writer.chunks))
