"""A canned upstream: replays one recorded JSON answer and one recorded SSE stream, cheaply.

``bench/overhead.py``'s scaling part runs the load generator, the upstream and skyroute on
the same cores; the stand-in upstream (aiohttp) spends a quarter of what a skyroute worker
does per request, which caps what a second worker can add. This one is a bare asyncio
protocol (uvloop) that reads a request's head and ``Content-Length`` body and writes back
the answer the stand-in gave to the same request, recorded by the bench (``"stream": true``
in the body: the SSE stream, one chunk per event, else the JSON answer), as nginx with a
static answer would.

Usage: python bench/_canned_upstream.py ANSWERS_JSON
(ANSWERS_JSON: {"json": "<body>", "events": ["data: ...\\n\\n", ...]}, latin-1 text).
Prints {"url": "<base_url ending in /v1>"} on stdout, then serves until terminated.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import cast

import uvloop


def answers(path: Path) -> tuple[bytes, bytes]:
    """The whole HTTP/1.1 responses: the JSON answer, the SSE stream."""
    recorded = json.loads(path.read_text())
    body = recorded["json"].encode("latin-1")
    plain = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body) + body)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e)
                      for e in (event.encode("latin-1") for event in recorded["events"]))
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    return plain, stream


class Canned(asyncio.Protocol):
    """One connection: keep-alive requests answered in order."""

    def __init__(self, plain: bytes, stream: bytes) -> None:
        self._plain, self._stream = plain, stream
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self._buf[:end]).lower()
            if b"transfer-encoding: chunked" in head:
                raise RuntimeError("the canned upstream reads Content-Length bodies only")
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4:end + 4 + length])
            del self._buf[:end + 4 + length]
            streamed = b'"stream": true' in body or b'"stream":true' in body
            self._transport.write(self._stream if streamed else self._plain)


async def main(path: Path) -> None:
    plain, stream = answers(path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Canned(plain, stream), "127.0.0.1", 0,
                                      backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}/v1"}), flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1])))
