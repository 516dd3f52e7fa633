"""What a relayed OpenAI stream has said so far: SSE events, the partial answer, usage.

skyroute relays streams as bytes, whole events at a time (``complete_events``), and
reads them only when it has to: to resume a cut stream on another upstream (a
route's ``resume: true``) and to count a client's tokens for ``tpm``. Then every
relayed piece is fed to a ``StreamTranscript``, which keeps the first chunk's
``id``/``created``/``model``, the text of the answer, how many content chunks
came (one token each on the servers we know), the ``usage`` the upstream reported
(only with ``stream_options.include_usage``) and whether ``[DONE]`` arrived.

A Responses stream is read the same way: its ``response.output_text.delta`` events
are the content chunks and the terminal event's ``response.usage`` the usage; it is
never resumable (its events carry sequence numbers and item ids of one upstream).

The stream of a resumed attempt goes through ``continue_with``, which rewrites its
events to carry the original ``id``/``created``/``model`` and drops its role-only
opening chunk, so the client reads one stream.

Upstream bytes are not trusted: a data line that is not JSON, a ``null`` choice, a
``delta`` that is a string, deep nesting: each is skipped as "not a chunk we read"
and never raises, so a relayed stream can only end as the upstream ended it.
"""

from __future__ import annotations

import json
import re
from typing import Any, final

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_DONE = object()  # the ``data: [DONE]`` event


def complete_events(buf: bytes) -> int:
    """How many bytes of ``buf`` are whole SSE events (0 if it holds none yet)."""
    end = buf.rfind(b"\n\n")
    if end >= 0:
        return end + 2
    end = buf.rfind(b"\n\r\n")  # the CRLF form: "...\r\n\r\n"
    return end + 3 if end >= 0 else 0


def _data_of(event: bytes) -> bytes | None:
    """The ``data:`` payload of one event; None for comments and other fields."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


@final
class StreamTranscript:
    """The answer so far of one streamed completion, possibly over several upstreams."""

    __slots__ = ("content_chunks", "done", "finished", "head", "parts", "text_only",
                 "usage_tokens")

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None  # id, created, model of the first chunk
        self.parts: list[str] = []
        self.content_chunks = 0
        self.usage_tokens = 0  # total_tokens the upstreams reported
        self.done = False  # [DONE] arrived
        self.finished = False  # a choice carried a finish_reason
        #: False once the stream has more than one choice or calls tools (a text
        #: prefix cannot carry those over to another upstream: ``routing.is_resumable``).
        self.text_only = True

    def __repr__(self) -> str:
        return (f"<StreamTranscript chunks={self.content_chunks} done={self.done} "
                f"text_only={self.text_only}>")

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, events: bytes) -> None:
        """Take whole events relayed as they came (see ``complete_events``)."""
        for event in _EVENT_END.split(events):
            chunk = self._parse(event)
            if isinstance(chunk, dict):
                self._take(chunk)

    def continue_with(self, events: bytes) -> bytes:
        """Take whole events of a resumed attempt; the bytes to send in their place."""
        out = []
        for event in _EVENT_END.split(events):
            chunk = self._parse(event)
            if chunk is _DONE:
                out.append(b"data: [DONE]\n\n")
            elif isinstance(chunk, dict) and not self._opens_only(chunk):
                if self.head is not None:
                    chunk.update(self.head)
                self._take(chunk)
                out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        return b"".join(out)

    def _parse(self, event: bytes) -> dict[str, Any] | object | None:
        data = _data_of(event)
        if data is None:
            return None
        if data.strip() == b"[DONE]":
            self.done = True
            return _DONE
        try:
            chunk = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        return chunk if isinstance(chunk, dict) else None

    @staticmethod
    def _opens_only(chunk: dict[str, Any]) -> bool:
        """A chunk that only says ``role: assistant`` (how every stream opens)."""
        choices = _choices(chunk)
        return bool(choices) and not chunk.get("usage") and all(
            not c.get("finish_reason") and not _delta(c).get("content")
            and set(_delta(c)) <= {"role", "content"} for c in choices)

    def _take(self, chunk: dict[str, Any]) -> None:
        kind = chunk.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            self._take_responses_event(kind, chunk)
            return
        if self.head is None and "id" in chunk:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            self.usage_tokens += usage["total_tokens"]
        raw_choices = chunk.get("choices")
        if raw_choices is not None and not isinstance(raw_choices, list):
            self.text_only = False  # not OpenAI's shape: nothing to continue from
        for choice in _choices(chunk):
            if choice.get("index", 0) != 0:
                self.text_only = False
            delta = _delta(choice)
            if delta.get("tool_calls") or delta.get("function_call"):
                self.text_only = False
            content = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(content, str) and content:
                self.parts.append(content)
                self.content_chunks += 1
            if choice.get("finish_reason"):
                self.finished = True

    def _take_responses_event(self, kind: str, event: dict[str, Any]) -> None:
        self.text_only = False
        delta = event.get("delta")
        if kind == "response.output_text.delta" and isinstance(delta, str) and delta:
            self.parts.append(delta)
            self.content_chunks += 1
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
            self.usage_tokens = usage["total_tokens"]  # the terminal event's, once
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.finished = True

def _choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunk's choices that are objects (an upstream may send ``null`` or junk)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict)]


def _delta(choice: dict[str, Any]) -> dict[str, Any]:
    delta = choice.get("delta")
    return delta if isinstance(delta, dict) else {}
