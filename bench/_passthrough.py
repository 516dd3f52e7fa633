"""The baseline: a bare aiohttp+uvloop pass-through proxy, no routing, no checks, no logs.

Two variants, each changing one layer, for ``bench/server_floor.py`` (what each layer
costs per request):

* ``--client lean``: aiohttp's server, skyroute's lean upstream client
  (``proxy._upstream_http.UpstreamPool``, called as ``proxy._forward`` calls it) in
  place of aiohttp's ``ClientSession``.
* ``--server protocol``: no aiohttp server either: ``_PassThrough``, a minimal
  asyncio Protocol parsing requests with ``httptools`` (headers collected, as a real
  server needs them) and writing each answer straight to the transport, with the same
  status line, headers and body as aiohttp's server (``Content-Length`` JSON, a chunked
  SSE stream; ``Date`` and ``Server`` as aiohttp sets them; keep-alive). A benchmark
  fixture, not product code: it serves what the benchmarks send (HTTP/1.1
  ``POST /v1/...``) and answers anything else with an error. Implies ``--client lean``.

Usage: python bench/_passthrough.py UPSTREAM_BASE_URL UPSTREAM_KEY [--client aiohttp|lean]
                                    [--server aiohttp|protocol]
Listens on 127.0.0.1 (a free port) and prints {"url": ...} on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import httptools
import uvloop
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

if TYPE_CHECKING:  # imported when used: the baseline stays as lean as it was
    from skyroute.proxy._upstream_http import UpstreamPool, UpstreamResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The lean client's timeouts and pool, as skyroute's defaults for an upstream.
CONNECT_S, IDLE_S, KEEPALIVE_S, POOL_LIMIT = 10.0, 60.0, 30.0, 256
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
#: Requests a ``_PassThrough`` connection queues (pipelined) before it stops reading.
MAX_QUEUED = 16


async def relay(request: web.Request, up: Any) -> web.StreamResponse:
    """The upstream's answer passed on to the client: a JSON body whole, a stream as it comes.
    ``up`` is either client's answer (both have ``status``, ``headers``, ``read`` and
    ``content.iter_any``)."""
    ctype = up.headers.get("Content-Type", "application/json")
    if not ctype.startswith("text/event-stream"):
        return web.Response(status=up.status, body=await up.read(),
                            headers={"Content-Type": ctype})
    resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
    await resp.prepare(request)
    async for chunk in up.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


def aiohttp_client(session: aiohttp.ClientSession, upstream: str, auth: str) -> Handler:
    """The baseline's handler: aiohttp's ``ClientSession`` to the upstream."""
    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        async with session.post(upstream + request.match_info["tail"], data=body,
                                headers=headers) as up:
            return await relay(request, up)
    return forward


async def lean_request(pool: UpstreamPool, upstream: str, auth: str, path: str,
                       body: bytes) -> UpstreamResponse:
    """The upstream call on the lean client, with the baseline's headers: ``path`` (from
    "/") follows the upstream's base path, as ``proxy._forward`` calls it."""
    headers = CIMultiDict({"Authorization": auth, "Content-Type": "application/json"})
    return await pool.request("POST", upstream, path, headers, body, connect_s=CONNECT_S,
                              idle_s=IDLE_S)


def lean_client(pool: UpstreamPool, upstream: str, auth: str) -> Handler:
    """The baseline's handler with the lean client in place of aiohttp's."""
    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up = await lean_request(pool, upstream, auth, "/" + request.match_info["tail"], body)
        try:
            return await relay(request, up)
        finally:
            up.close()
    return forward


def _head(status: int, ctype: str, framing: str, keep_alive: bool) -> bytes:
    """Status line and headers as aiohttp's server writes them for these answers."""
    reason = _REASONS.get(status, "")
    close = "" if keep_alive else "Connection: close\r\n"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{framing}\r\n"
            f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n{close}\r\n"
            ).encode("latin-1")


class _PassThrough(asyncio.Protocol):
    """One client connection: requests parsed by httptools, answered one at a time, in order.

    Each complete request joins a queue that one task per connection works through, so
    pipelined requests are answered in order; past ``MAX_QUEUED`` waiting, reading pauses.
    A request that cannot be served on this connection (unparsable, not HTTP/1.1) is
    queued as a refusal: answered in its turn, then the connection closes.
    """

    def __init__(self, pool: UpstreamPool, upstream: str, auth: str) -> None:
        self._pool, self._upstream, self._auth = pool, upstream, auth
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        # (method, URL, body, keep-alive, refusal status or 0), in arrival order
        self._queue: deque[tuple[bytes, bytes, bytes, bool, int]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused
        self._reading = True
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # nothing after a refused request is framed
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._enqueue(b"", b"", b"", False, 400)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._task is not None:
            self._task.cancel()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept though unused: a real server reads them (key, request id), as aiohttp's does.
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        # HTTP/1.0 has no chunked answers: this fixture serves HTTP/1.1 only.
        refusal = 0 if parser.get_http_version() == "1.1" else 505
        self._enqueue(parser.get_method(), self._url, b"".join(self._body),
                      parser.should_keep_alive(), refusal)
        self._url, self._headers, self._body = b"", [], []

    def _enqueue(self, method: bytes, url: bytes, body: bytes, keep_alive: bool,
                 refusal: int) -> None:
        if refusal:
            self._refused = True
        self._queue.append((method, url, body, keep_alive, refusal))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        if (refusal or len(self._queue) > MAX_QUEUED) and self._reading \
                and self._transport is not None:
            self._transport.pause_reading()
            self._reading = False

    async def _serve(self) -> None:
        while self._queue and self._transport is not None:
            method, url, body, keep_alive, refusal = self._queue.popleft()
            if refusal:
                self._error(refusal, False)
                self._transport.close()
                return
            if not self._reading and not self._refused:
                self._transport.resume_reading()
                self._reading = True
            if not await self._answer(method, url, body, keep_alive):
                if self._transport is not None:
                    self._transport.close()
                return
        self._task = None

    async def _answer(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> bool:
        """Forward one request and write the answer; False if the connection is to close."""
        path = url.split(b"?", 1)[0]
        if not path.startswith(b"/v1/"):
            return self._error(404, keep_alive)
        if method != b"POST":
            return self._error(405, keep_alive)
        try:
            up = await lean_request(self._pool, self._upstream, self._auth,
                                    path[3:].decode("latin-1"), body)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return self._error(502, False)
        try:
            ctype = up.headers.get("Content-Type", "application/json")
            if not ctype.startswith("text/event-stream"):
                data = await up.read()
                self._write(_head(up.status, ctype, f"Content-Length: {len(data)}",
                                  keep_alive) + data)
                return keep_alive
            self._write(_head(up.status, ctype, "Transfer-Encoding: chunked", keep_alive))
            async for chunk in up.content.iter_any():
                if chunk:
                    self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    if self._drained is not None:
                        await self._drained
            self._write(b"0\r\n\r\n")
            return keep_alive
        except (aiohttp.ClientError, OSError):
            return False  # cut mid-answer: the client sees the connection end early
        finally:
            up.close()

    def _write(self, data: bytes) -> None:
        if self._transport is None:
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)

    def _error(self, status: int, keep_alive: bool) -> bool:
        text = f"{status}: {_REASONS[status]}".encode()
        with contextlib.suppress(ConnectionResetError):
            self._write(_head(status, "text/plain; charset=utf-8",
                              f"Content-Length: {len(text)}", keep_alive) + text)
        return keep_alive


async def serve_aiohttp(forward: Handler) -> None:
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(json.dumps({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_protocol(pool: UpstreamPool, upstream: str, auth: str) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _PassThrough(pool, upstream, auth), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
    async with server:
        await asyncio.Event().wait()


async def main(upstream: str, key: str, client: str, server: str) -> None:
    auth = f"Bearer {key}"
    if client == "aiohttp" and server == "aiohttp":
        # No total timeout: bench/streams.py holds streams open for minutes.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=None))
        try:
            await serve_aiohttp(aiohttp_client(session, upstream, auth))
        finally:
            await session.close()
        return
    from skyroute.proxy._upstream_http import UpstreamPool

    pool = UpstreamPool(POOL_LIMIT, keepalive_s=KEEPALIVE_S)
    try:
        if server == "protocol":
            await serve_protocol(pool, upstream, auth)
        else:
            await serve_aiohttp(lean_client(pool, upstream, auth))
    finally:
        pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="the upstream's base URL (ending in /v1)")
    parser.add_argument("key", help="the upstream's API key")
    parser.add_argument("--client", choices=("aiohttp", "lean"), default="aiohttp")
    parser.add_argument("--server", choices=("aiohttp", "protocol"), default="aiohttp")
    args = parser.parse_args()
    if args.server == "protocol" and args.client != "lean":
        parser.error("--server protocol runs with --client lean only")
    uvloop.run(main(args.upstream.rstrip("/") + "/", args.key, args.client, args.server))
