"""Tools for tests that act as an attacker: raw HTTP on a socket, a recording upstream.

The openai SDK and aiohttp's client both normalise what they send; an attacker
does not. ``raw_request`` writes the request line and headers byte for byte.
``RecordingUpstream`` is an upstream that answers every path and remembers what
reached it (path as sent, headers), so a test can check nothing else got through.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Every socket read in these helpers is bounded by this.
RAW_TIMEOUT_S = 10.0


@dataclass(slots=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse(data: bytes) -> RawAnswer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return RawAnswer(status=status, headers=headers, body=body)


def _unchunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


async def raw_request(port: int, head: bytes | str, body: bytes = b"", *,
                      host: str = "127.0.0.1") -> RawAnswer:
    """Send ``head`` (request line and headers, without the blank line) and ``body``.

    ``Connection: close`` is added, and the answer read until the server closes.
    """
    if isinstance(head, str):
        head = head.encode("latin-1")
    async with asyncio.timeout(RAW_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n" + body)
        async with asyncio.timeout(RAW_TIMEOUT_S):
            data = await reader.read()
    finally:
        writer.close()
    return _parse(data)


@dataclass
class RecordingUpstream:
    """An upstream that answers 200 to any path and records each request."""

    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _record(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, dict(request.headers)))
        return web.json_response({"object": "list", "data": []})

    async def start(self) -> RecordingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
