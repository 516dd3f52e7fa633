"""Stream protocols: how each kind of OpenAI stream begins, ends, and is broken off.

Theory of operation
-------------------
skyroute relays SSE as bytes, whole events at a time, and must know two things it
cannot guess from bytes alone: when real content has begun (busy detection and
failover end there) and whether the stream ended whole (a cut must reach the client
as an error, never as a clean end). Both depend on the endpoint, so the request's
path picks a ``StreamKind``:

* ``DONE``: chat and legacy completions. Content is the first byte that is not a
  blank line or an SSE comment (``: keep-alive``); the stream is whole only if it
  ends with ``data: [DONE]``.
* ``RESPONSES``: ``POST /responses``. There is no ``[DONE]``: a whole stream ends
  with a terminal event (``response.completed``, ``response.incomplete``,
  ``response.failed``, or an ``error`` event the upstream sent itself). Servers
  send ``response.created``/``response.in_progress``/``response.queued`` at once,
  before the model has produced anything, so those count as keep-alives for the
  first-token deadline: they are held back (not dropped) and reach the client
  with the first real event, from whichever upstream produced it.
* ``PLAIN``: any other SSE endpoint; whole when the upstream's body ends cleanly
  (aiohttp raises on a chunked body or ``Content-Length`` cut short).

A stream that is not whole ends with an error event in its own protocol's shape:
``data: {"error": {...}}`` for ``DONE`` (what the SDKs raise on), an ``event:
error`` with Responses' ``ResponseErrorEvent`` fields for ``RESPONSES``.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Final, final

from ._sse import complete_events

#: Events a Responses stream opens with before any output: not a first token.
RESPONSES_PREAMBLE: Final = frozenset({"response.created", "response.in_progress",
                                       "response.queued"})
#: Events that end a Responses stream whole.
RESPONSES_TERMINAL: Final = frozenset({"response.completed", "response.incomplete",
                                       "response.failed", "error"})
_EVENT_END: Final = re.compile(rb"\r?\n\r?\n")
_TYPE: Final = re.compile(rb'"type"\s*:\s*"([^"]+)"')
_SEQUENCE: Final = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_DONE_TAIL: Final = 64


class StreamKind(enum.Enum):
    """Which protocol a stream follows, by endpoint."""

    DONE = "done"
    RESPONSES = "responses"
    PLAIN = "plain"


def stream_kind(path: str) -> StreamKind:
    """The protocol of a stream answering ``path`` (below ``/v1``, query included)."""
    path = path.partition("?")[0].rstrip("/")
    if path in ("/chat/completions", "/completions"):
        return StreamKind.DONE
    if path == "/responses":
        return StreamKind.RESPONSES
    return StreamKind.PLAIN


def event_type(event: bytes) -> str | None:
    """The type of one SSE event: its ``event:`` field, else its data's ``"type"``."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    data = event.find(b"data:")
    if data < 0:
        return None
    match = _TYPE.search(event, data, data + 200)
    return match.group(1).decode("utf-8", "replace") if match else None


def _is_keepalive(event: bytes) -> bool:
    """A blank or comment-only event (``: keep-alive``)."""
    return all(not line.strip() or line.startswith(b":") for line in event.splitlines())


def first_content_offset(buf: bytes, *, sse: bool) -> int | None:
    """Where real content starts in ``buf``, skipping keep-alives; None if not yet.

    Blank lines are skipped in both formats; in SSE, comment lines (``:`` ...) too.
    """
    i, n = 0, len(buf)
    while i < n:
        byte = buf[i]
        if byte in b"\r\n \t":
            i += 1
        elif sse and byte == 0x3A:  # ':' starts an SSE comment such as ": keep-alive"
            end = buf.find(b"\n", i)
            if end < 0:
                return None
            i = end + 1
        else:
            return i
    return None


def content_start(buf: bytes, *, sse: bool, kind: StreamKind) -> bytes | None:
    """The bytes to relay once real content has begun in ``buf``; None while it has not.

    Keep-alives before the content are dropped; a Responses stream's opening events
    are kept and relayed with the first real event.
    """
    if not sse or kind is not StreamKind.RESPONSES:
        offset = first_content_offset(buf, sse=sse)
        return None if offset is None else buf[offset:]
    whole = complete_events(buf)
    kept: list[bytes] = []
    started = False
    for event in _EVENT_END.split(buf[:whole]):
        if _is_keepalive(event):
            continue
        kept.append(event + b"\n\n")
        started = started or event_type(event) not in RESPONSES_PREAMBLE
    return b"".join(kept) + buf[whole:] if started else None


@final
class StreamEnd:
    """Whether a relayed stream has ended whole, by its protocol; fed whole events."""

    __slots__ = ("_sequence", "_tail", "complete", "kind")

    def __init__(self, kind: StreamKind) -> None:
        self.kind = kind
        self.complete = False
        self._tail = b""
        self._sequence = -1  # the last Responses sequence_number seen

    def __repr__(self) -> str:
        return f"<StreamEnd {self.kind.value} complete={self.complete}>"

    def feed(self, events: bytes) -> None:
        """Take whole events as they are relayed (the last one decides)."""
        if self.kind is StreamKind.DONE:
            self._tail = (self._tail + events)[-_DONE_TAIL:]
            self.complete = b"[DONE]" in self._tail
        elif self.kind is StreamKind.RESPONSES:
            last = events.rstrip(b"\r\n")
            last = last[max(last.rfind(b"\n\n"), last.rfind(b"\n\r\n")) + 1:]
            if _is_keepalive(last):
                return
            self.complete = event_type(last) in RESPONSES_TERMINAL
            sequence = _SEQUENCE.findall(last)
            if sequence:
                self._sequence = int(sequence[-1])

    def eof(self) -> None:
        """The upstream's body ended cleanly (whole, for ``PLAIN`` streams)."""
        if self.kind is StreamKind.PLAIN:
            self.complete = True

    @property
    def missing(self) -> str:
        """What a stream that is not complete lacked, for logs and the error event."""
        if self.kind is StreamKind.DONE:
            return "the upstream ended the stream without [DONE]"
        if self.kind is StreamKind.RESPONSES:
            return ("the upstream ended the stream without a terminal event "
                    "(response.completed, response.incomplete or response.failed)")
        return "the upstream's body ended before its end"

    def error_event(self, upstream: str, reason: str) -> bytes:
        """An error event in this protocol's shape, for a stream that broke off."""
        message = (f"the upstream '{upstream}' broke off the stream part-way ({reason}); "
                   "the answer above is incomplete, retry the request")
        if self.kind is StreamKind.RESPONSES:
            event = {"type": "error", "code": "stream_interrupted", "message": message,
                     "param": None, "sequence_number": self._sequence + 1}
            return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
        error = {"error": {"message": message, "type": "upstream_error", "param": None,
                           "code": "stream_interrupted"}}
        head = b"event: error\n" if self.kind is StreamKind.PLAIN else b""
        return head + b"data: " + json.dumps(error).encode() + b"\n\n"
