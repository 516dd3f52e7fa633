"""A stand-in upstream that holds every SSE stream open until told to end them.

Each POST is answered at once with SSE headers and a first content chunk, and then the
stream stays open. Lines on stdin drive every open stream together:

* ``tick``: write one chat-completion chunk to each open stream, then print
  ``ticked N`` (N streams written to);
* ``end``: finish each stream (``data: [DONE]`` and the chunked body's end), print ``ended N``.

Raw asyncio protocols, not aiohttp: this process holds as many sockets as skyroute
does on its upstream side, and should cost little beside it.

Usage: python bench/_held_upstream.py
Prints {"url": "<base_url ending in /v1>"} on stdout, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys

import uvloop

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
_EVENT = (b'data: {"id":"chatcmpl-held","object":"chat.completion.chunk","created":1,'
          b'"model":"deepseek-chat","choices":[{"index":0,"delta":{"content":"tok"},'
          b'"finish_reason":null}]}\n\n')
CHUNK = f"{len(_EVENT):x}\r\n".encode() + _EVENT + b"\r\n"
_DONE = b"data: [DONE]\n\n"
END = f"{len(_DONE):x}\r\n".encode() + _DONE + b"\r\n0\r\n\r\n"

OPEN: set[asyncio.Transport] = set()


class HeldStream(asyncio.Protocol):
    """One connection: read one request, answer with an SSE head and a first chunk."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        assert self.transport is not None
        self.answered = True
        self.transport.write(HEAD + CHUNK)
        OPEN.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            OPEN.discard(self.transport)


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HeldStream, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}/v1"}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).strip():
        payload = CHUNK if line == b"tick" else END
        streams = list(OPEN)
        for transport in streams:
            transport.write(payload)
            if line != b"tick":
                transport.close()  # one request per connection: "Connection: close"
        if line != b"tick":
            OPEN.clear()
        print(f"{'ticked' if line == b'tick' else 'ended'} {len(streams)}", flush=True)
    server.close()


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main())
