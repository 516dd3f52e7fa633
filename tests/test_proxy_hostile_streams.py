"""The SSE relay survives any upstream bytes and always ends a failed stream with the error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from skyroute.proxy import Server
from skyroute.proxy._sse import StreamTranscript
from skyroute.routing import parse_config

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY

DONE = b"data: [DONE]\n\n"


def _chunk(content: str) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class ScriptedUpstream:
    """Streams exactly the bytes it is given, then ends cleanly or cuts the connection."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.cut = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in self.pieces:
            await resp.write(piece)
        if self.cut:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._stream)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _config(port: int) -> str:
    # tpm makes skyroute read every event (token counting); resume makes it try to go on.
    return (f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - name: t\n      key: {CLIENT_KEY}\n"
            f"      tpm: 100000000\nupstreams:\n  - name: s\n    url: http://127.0.0.1:{port}/v1\n"
            "    models: {chat: m}\nroutes:\n  - model: chat\n    targets: [s]\n"
            "    resume: true\n")


class Rig:
    def __init__(self, upstream: ScriptedUpstream, server: Server) -> None:
        self.upstream, self.server = upstream, server

    async def stream(self, pieces: list[bytes], *, cut: bool = False) -> bytes:
        status, received = await self.answer(pieces, cut=cut)
        assert status == 200, received
        return received

    async def answer(self, pieces: list[bytes], *, cut: bool = False) -> tuple[int, bytes]:
        self.upstream.pieces, self.upstream.cut = pieces, cut
        body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                f"{self.server.url}/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
            return resp.status, await resp.read()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    upstream = ScriptedUpstream()
    await upstream.start()
    server = Server(parse_config(_config(upstream.port), env={}), port=0)
    await server.start()
    yield Rig(upstream, server)
    await server.aclose()
    await upstream.aclose()


def _ends_with_error(received: bytes) -> bool:
    """The stream's last event is the stream_interrupted error, and it never said [DONE]."""
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    return last.startswith(b"data: ") and b'"code": "stream_interrupted"' in last \
        and DONE not in received


ODD_EVENTS = [
    b'data: {"choices":[null]}\n\n',
    b'data: {"choices":null}\n\n',
    b'data: {"choices":"x","usage":{"total_tokens":"many"}}\n\n',
    b'data: {"choices":[{"delta":"text","index":"0"}]}\n\n',
    b"data: not json at all\n\n",
    b"data: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n\n",
    b"data: " + b"[" * 100_000 + b"\n\n",
    b"event: weird\nid: 7\n\n",
    b"data: \xff\xfe\n\n",
]


@pytest.mark.parametrize("odd", ODD_EVENTS, ids=range(len(ODD_EVENTS)))
async def test_odd_events_are_relayed_and_the_stream_completes(rig: Rig, odd: bytes) -> None:
    """Events that are not OpenAI chunks pass through; the stream still ends with [DONE]."""
    pieces = [_chunk("Hello"), odd, _chunk(" world"), DONE]
    received = await rig.stream(pieces)
    assert received == b"".join(pieces)


async def test_a_1mb_line_is_relayed_whole(rig: Rig) -> None:
    """A 1 MB event arrives whole, in order, followed by the rest of the stream."""
    big = _chunk("x" * 1_000_000)
    pieces = [_chunk("a"), big[:300_000], big[300_000:], _chunk("b"), DONE]
    assert await rig.stream(pieces) == b"".join(pieces)


async def test_odd_events_then_a_cut_end_with_the_error_event(rig: Rig) -> None:
    """A stream cut after odd events ends with the stream_interrupted error, never [DONE]."""
    received = await rig.stream([_chunk("Hello"), b'data: {"choices":[null]}\n\n', b"data: par"],
                                cut=True)
    assert received.startswith(_chunk("Hello") + b'data: {"choices":[null]}\n\n')
    assert b"data: par" not in received  # half an event is never relayed
    assert _ends_with_error(received)


async def test_an_event_that_never_ends_is_cut_with_the_error_event(rig: Rig) -> None:
    """An upstream streaming bytes with no event end is cut at the event size cap."""
    endless = [_chunk("Hi")] + [b"data: " + b"y" * (1 << 20)] + [b"y" * (1 << 20)] * 9
    received = await rig.stream(endless)
    assert received.startswith(_chunk("Hi"))
    assert _ends_with_error(received)
    assert len(received) < 1 << 20


# -- properties ---------------------------------------------------------------------------

_LINES = st.one_of(
    st.sampled_from([b"data: [DONE]", b": keep-alive", b"", b"data: {}", b"data: null",
                     b'data: {"choices":[null]}', b'data: {"choices":[{"delta":null}]}',
                     b'data: {"choices":[{"delta":{"content":5}}]}', b"event: x", b"\r"]),
    st.builds(lambda c: _chunk(c).rstrip(b"\n"), st.text(max_size=20)),
    st.binary(max_size=40),
)
_EVENTS = st.lists(st.lists(_LINES, min_size=1, max_size=4).map(lambda ls: b"\n".join(ls)),
                   max_size=12).map(lambda es: b"".join(e + b"\n\n" for e in es))


@given(_EVENTS, st.booleans())
def test_StreamTranscript_reads_any_bytes_without_raising(events: bytes, continuing: bool) -> None:
    """Whatever an upstream sends, feeding or continuing a transcript never raises."""
    transcript = StreamTranscript()
    transcript.feed(_chunk("start"))
    if continuing:
        transcript.continue_with(events)
    else:
        transcript.feed(events)
    assert isinstance(transcript.text, str)


@given(_EVENTS, st.booleans(), st.integers(min_value=1, max_value=50))
# Found by this property: an empty answer (502, nothing reached the client), and a cut
# right after [DONE] (once marked with an error event after [DONE]).
@example(events=b"", cut=False, split=1)
@example(events=b"data: [DONE]\n\n", cut=True, split=50)
@example(events=b'data: {"choices":[null]}\n\ndata: [DONE]\n\n', cut=False, split=7)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_relay_passes_whole_events_and_marks_every_failure(events: bytes, cut: bool,
                                                           split: int) -> None:
    """Any upstream bytes, cut or not: the client gets whole events, then [DONE] or the error."""

    async def run() -> tuple[int, bytes]:
        upstream = ScriptedUpstream()
        await upstream.start()
        server = Server(parse_config(_config(upstream.port), env={}), port=0)
        await server.start()
        try:
            pieces = [events[i:i + split] for i in range(0, len(events), split)]
            return await Rig(upstream, server).answer(pieces, cut=cut)
        finally:
            await server.aclose()
            await upstream.aclose()

    status, received = asyncio.run(run())
    if status != 200:  # nothing had reached the client: an OpenAI-shaped error instead
        assert json.loads(received)["error"]["type"] == "upstream_error"
        return
    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    if last.startswith(b"data: ") and b'"code": "stream_interrupted"' in last:
        return  # a failed stream, marked as such (anything before it may be junk)
    # Otherwise a whole answer: it ends with [DONE] (a break after it loses nothing),
    # and nothing after that [DONE] says it was cut.
    assert b"[DONE]" in received[-64:], received
    assert b'"code": "stream_interrupted"' not in received[received.rfind(b"[DONE]"):]
