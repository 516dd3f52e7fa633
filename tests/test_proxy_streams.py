"""Stream protocols (``proxy._streams``) and answer encodings (``proxy._encoding``), as tables."""

from __future__ import annotations

import json
import zlib

import pytest
from skyroute.proxy._encoding import Decoder, accepts
from skyroute.proxy._streams import StreamEnd, StreamKind, content_start, stream_kind


def responses_event(kind: str, sequence: int) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": sequence})
    return f"event: {kind}\ndata: {data}\n\n".encode()


CREATED = responses_event("response.created", 0) + responses_event("response.in_progress", 1)
DELTA = responses_event("response.output_text.delta", 2)


@pytest.mark.parametrize(("path", "kind"), [
    ("/chat/completions", StreamKind.DONE), ("/completions?x=1", StreamKind.DONE),
    ("/responses", StreamKind.RESPONSES), ("/responses/", StreamKind.RESPONSES),
    ("/audio/transcriptions", StreamKind.PLAIN), ("/threads/runs", StreamKind.PLAIN)])
def test_stream_kind_by_path(path: str, kind: StreamKind) -> None:
    """The request path decides which protocol a stream follows."""
    assert stream_kind(path) is kind


@pytest.mark.parametrize(("buf", "kind", "expected"), [
    (b": keep-alive\n\n", StreamKind.DONE, None),
    (b"\n\n: keep-alive\n\ndata: {}\n\n", StreamKind.DONE, b"data: {}\n\n"),
    (CREATED, StreamKind.RESPONSES, None),  # opening events are not content
    (CREATED + b": keep-alive\n\n", StreamKind.RESPONSES, None),
    (CREATED + b": keep-alive\n\n" + DELTA, StreamKind.RESPONSES, CREATED + DELTA),
    (CREATED + DELTA[:10], StreamKind.RESPONSES, None),  # half an event is not content yet
    (b"data: {\"type\": \"transcript.text.delta\"}\n\n", StreamKind.PLAIN,
     b"data: {\"type\": \"transcript.text.delta\"}\n\n"),
])
def test_content_start_skips_keepalives_and_holds_responses_openings(
        buf: bytes, kind: StreamKind, expected: bytes | None) -> None:
    """Content starts past keep-alives; a Responses stream's opening is kept, not counted."""
    assert content_start(buf, sse=True, kind=kind) == expected


@pytest.mark.parametrize(("kind", "events", "eof", "complete"), [
    (StreamKind.DONE, [b"data: {}\n\n", b"data: [DONE]\n\n"], True, True),
    (StreamKind.DONE, [b"data: {}\n\n"], True, False),
    (StreamKind.RESPONSES, [CREATED, DELTA, responses_event("response.completed", 3)], True,
     True),
    (StreamKind.RESPONSES, [CREATED, responses_event("response.incomplete", 2)], True, True),
    (StreamKind.RESPONSES, [CREATED, DELTA], True, False),
    (StreamKind.PLAIN, [b"data: {}\n\n"], True, True),
    (StreamKind.PLAIN, [b"data: {}\n\n"], False, False),
])
def test_StreamEnd_complete_by_protocol(kind: StreamKind, events: list[bytes], eof: bool,
                                        complete: bool) -> None:
    """[DONE], a Responses terminal event, or a clean end of body makes a stream whole."""
    end = StreamEnd(kind)
    for event in events:
        end.feed(event)
    if eof:
        end.eof()
    assert end.complete is complete


def test_StreamEnd_responses_error_event_continues_the_sequence() -> None:
    """A cut Responses stream's error event is ResponseErrorEvent-shaped, next in sequence."""
    end = StreamEnd(StreamKind.RESPONSES)
    end.feed(CREATED + DELTA)
    event = end.error_event("a", "reset")
    assert event.startswith(b"event: error\ndata: ")
    data = json.loads(event.split(b"data: ", 1)[1])
    assert data["type"] == "error" and data["code"] == "stream_interrupted"
    assert data["sequence_number"] == 3


@pytest.mark.parametrize(("accept", "coding", "ok"), [
    ("gzip, deflate, br", "br", True), ("gzip", "br", False), ("*", "zstd", True),
    ("br;q=0, *", "br", False), ("", "gzip", False)])
def test_accepts_reads_accept_encoding(accept: str, coding: str, ok: bool) -> None:
    """A coding is accepted when listed (or by *), unless its q is 0."""
    assert accepts(accept, coding) is ok


@pytest.mark.parametrize("wbits", [31, 15, -15])  # gzip, zlib-wrapped deflate, raw deflate
def test_Decoder_reads_gzip_and_both_deflates_in_pieces(wbits: int) -> None:
    """gzip, deflate with and without its zlib header decode, fed a few bytes at a time."""
    data = b"hello " * 1000
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(data) + packer.flush()
    decoder = Decoder()
    out = b"".join(decoder.decompress(packed[i:i + 7]) for i in range(0, len(packed), 7))
    assert out + decoder.flush() == data
