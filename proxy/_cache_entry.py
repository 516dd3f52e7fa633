"""Cache entries: how an answer is kept (compressed), and how it is given back as JSON or SSE.

An entry is one chat completion in its non-streaming JSON form, whether it came
from a JSON answer (kept byte for byte) or from a stream (assembled from its
chunks by ``assemble_stream``). Stored, it is a zlib-compressed blob: a header line
(``{"v":1,"stored_at":...,"upstream":...}``) then the JSON body. A hit for a JSON
request sends the body as it is; a hit for ``stream: true`` replays it as the SSE
OpenAI sends (``replay_sse``): a role chunk per choice, the content in chunks, a
finish chunk, a usage chunk when ``stream_options.include_usage`` asks, ``[DONE]``.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Final

from ._sse import _data_of

#: The blob format; an entry of another version is a miss.
ENTRY_VERSION: Final = 1
#: zlib level 6 (its default): chat JSON shrinks to about a third, at ~50 us a KiB.
_LEVEL: Final = 6
#: Content is replayed in chunks of about this many characters, cut after a space.
_REPLAY_CHARS: Final = 48
_EVENT_END: Final = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedAnswer:
    """One cached chat completion."""

    stored_at: float  # wall-clock time it was stored (its age is counted from it)
    body: bytes  # the chat.completion JSON
    upstream: str  # who answered it first

    def encode(self) -> bytes:
        head = json.dumps({"v": ENTRY_VERSION, "stored_at": self.stored_at,
                           "upstream": self.upstream}).encode()
        return zlib.compress(head + b"\n" + self.body, _LEVEL)

    @classmethod
    def decode(cls, blob: bytes) -> CachedAnswer | None:
        """The entry in ``blob``; None for a blob this version cannot read."""
        try:
            head, _, body = zlib.decompress(blob).partition(b"\n")
            meta = json.loads(head)
            if meta.get("v") != ENTRY_VERSION:
                return None
            return cls(stored_at=float(meta["stored_at"]), body=body,
                       upstream=str(meta.get("upstream", "-")))
        except (zlib.error, ValueError, KeyError, TypeError, AttributeError):
            return None


def parse_answer(body: bytes | None) -> dict[str, Any] | None:
    """A JSON answer's chat completion object; None if it is not one."""
    if not body:
        return None
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return answer if isinstance(answer, dict) and answer.get("object") == "chat.completion" \
        else None


def assemble_stream(events: bytes) -> dict[str, Any] | None:
    """The chat completion a whole SSE stream carried; None if it did not end with ``[DONE]``."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    done = False
    for event in _EVENT_END.split(events):
        data = _data_of(event)
        if data is None:
            continue
        if data.strip() == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(chunk, dict) or "error" in chunk:
            return None
        if not head:
            head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint")
                    if k in chunk}
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            _take_delta(choices.setdefault(int(choice.get("index", 0)), {
                "index": int(choice.get("index", 0)), "role": "assistant", "content": None,
                "tool_calls": {}, "finish_reason": None}), choice)
    if not done or not choices:
        return None
    answer: dict[str, Any] = {"id": head.get("id", ""), "object": "chat.completion",
                              "created": head.get("created", 0), "model": head.get("model", "")}
    if "system_fingerprint" in head:
        answer["system_fingerprint"] = head["system_fingerprint"]
    answer["choices"] = [_message_of(choices[i]) for i in sorted(choices)]
    if usage is not None:
        answer["usage"] = usage
    return answer


def _take_delta(acc: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta") or {}
    if delta.get("role"):
        acc["role"] = delta["role"]
    if isinstance(delta.get("content"), str):
        acc["content"] = (acc["content"] or "") + delta["content"]
    for call in delta.get("tool_calls") or []:
        held = acc["tool_calls"].setdefault(call.get("index", 0), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            held["id"] = call["id"]
        function = call.get("function") or {}
        held["function"]["name"] += function.get("name") or ""
        held["function"]["arguments"] += function.get("arguments") or ""
    if choice.get("finish_reason"):
        acc["finish_reason"] = choice["finish_reason"]


def _message_of(acc: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": acc["role"], "content": acc["content"]}
    if acc["tool_calls"]:
        message["tool_calls"] = [acc["tool_calls"][i] for i in sorted(acc["tool_calls"])]
    return {"index": acc["index"], "message": message, "logprobs": None,
            "finish_reason": acc["finish_reason"]}


def replay_sse(body: bytes, *, include_usage: bool) -> bytes | None:
    """The SSE stream for a cached chat completion; None if ``body`` is not one."""
    answer = parse_answer(body)
    if answer is None:
        return None
    head = {"id": answer.get("id", ""), "object": "chat.completion.chunk",
            "created": answer.get("created", 0), "model": answer.get("model", "")}
    if "system_fingerprint" in answer:
        head["system_fingerprint"] = answer["system_fingerprint"]
    events: list[bytes] = []

    def emit(choices: list[dict[str, Any]], **extra: Any) -> None:
        chunk = {**head, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            chunk["usage"] = None
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    for choice in answer.get("choices") or []:
        index, message = choice.get("index", 0), choice.get("message") or {}
        emit([{"index": index, "delta": {"role": message.get("role", "assistant"),
                                         "content": ""}, "logprobs": None,
               "finish_reason": None}])
        for piece in _pieces(message.get("content") or ""):
            emit([{"index": index, "delta": {"content": piece}, "logprobs": None,
                   "finish_reason": None}])
        for n, call in enumerate(message.get("tool_calls") or []):
            emit([{"index": index, "delta": {"tool_calls": [{"index": n, **call}]},
                   "logprobs": None, "finish_reason": None}])
        emit([{"index": index, "delta": {}, "logprobs": None,
               "finish_reason": choice.get("finish_reason") or "stop"}])
    if include_usage:
        emit([], usage=answer.get("usage"))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def _pieces(text: str) -> list[str]:
    """``text`` in chunks of about ``_REPLAY_CHARS``, each ending after a space."""
    pieces, start = [], 0
    while start < len(text):
        end = start + _REPLAY_CHARS
        if end < len(text):
            space = text.find(" ", end)
            end = len(text) if space < 0 else space + 1
        pieces.append(text[start:end])
        start = end
    return pieces
