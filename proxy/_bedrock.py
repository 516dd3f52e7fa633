"""OpenAI chat completions in and out of AWS Bedrock's Converse API, without I/O.

* ``converse_request`` turns a chat completions body into a Converse body: system
  messages become ``system``, tool calls ``toolUse`` blocks, tool answers ``toolResult``
  blocks (consecutive messages of one role are merged, as Converse wants turns to
  alternate), sampling settings ``inferenceConfig`` and tools ``toolConfig``.
* ``chat_completion`` turns a Converse answer into a ``chat.completion``.
* ``ConverseStreamTranslator`` is fed ConverseStream's ``application/vnd.amazon.eventstream``
  bytes as they arrive (botocore's ``EventStreamBuffer`` splits and checks the frames)
  and gives back OpenAI SSE bytes: a role chunk, content and tool-call chunks, a finish
  chunk, a usage chunk when the client asked for ``include_usage``, then ``[DONE]``. An
  exception frame mid-stream (a throttle) ends the translation without ``[DONE]``, so the
  stream counts as cut.
* ``openai_error`` gives a Bedrock error body (``{"message": ...}``) OpenAI's error shape.

What cannot be said in Converse (images by URL, ``n`` > 1, logprobs) is refused with a
``TranslationError`` that names the field, before anything is sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Final

#: Converse ``stopReason`` -> OpenAI ``finish_reason``.
FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
}


class TranslationError(ValueError):
    """A chat completions request Converse cannot express; the message says which field."""


def converse_request(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The Converse body for the chat completions body ``payload`` (its model is in the URL)."""
    if int(payload.get("n") or 1) != 1:
        raise TranslationError("n: Bedrock's Converse API gives one choice; send n: 1")
    if payload.get("logprobs"):
        raise TranslationError("logprobs: Bedrock's Converse API does not return logprobs")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages: a non-empty list is required")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TranslationError(f"messages[{index}]: not an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend({"text": text} for text in _texts(message.get("content"), index))
            continue
        if role == "tool":
            blocks = [{"toolResult": {
                "toolUseId": str(message.get("tool_call_id", "")),
                "content": [{"text": "\n".join(_texts(message.get("content"), index))}]}}]
            role = "user"
        elif role in ("user", "assistant"):
            blocks = [{"text": text} for text in _texts(message.get("content"), index)]
            for call in message.get("tool_calls") or ():
                blocks.append({"toolUse": _tool_use(call, index)})
        else:
            raise TranslationError(f"messages[{index}].role: {role!r} is not system, user, "
                                   "assistant or tool")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    body: dict[str, Any] = {"messages": turns}
    if system:
        body["system"] = system
    config = _inference_config(payload)
    if config:
        body["inferenceConfig"] = config
    tools = _tool_config(payload)
    if tools:
        body["toolConfig"] = tools
    return body


def _texts(content: object, index: int) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TranslationError(f"messages[{index}].content: a {kind!r} part cannot be "
                                       "sent to Bedrock's Converse API; send text parts")
        return texts
    raise TranslationError(f"messages[{index}].content: expected text or a list of parts")


def _tool_use(call: object, index: int) -> dict[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise TranslationError(f"messages[{index}].tool_calls: each needs a function")
    function = call["function"]
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        raise TranslationError(f"messages[{index}].tool_calls: arguments are not JSON") from None
    return {"toolUseId": str(call.get("id", "")), "name": str(function.get("name", "")),
            "input": arguments}


def _inference_config(payload: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    if payload.get("temperature") is not None:
        config["temperature"] = payload["temperature"]
    if payload.get("top_p") is not None:
        config["topP"] = payload["top_p"]
    stop = payload.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    return config


def _tool_config(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not tools or choice == "none":
        return None
    specs = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            raise TranslationError("tools: only function tools can be sent to Bedrock")
        spec: dict[str, Any] = {"name": function.get("name"),
                                "inputSchema": {"json": function.get("parameters")
                                                or {"type": "object", "properties": {}}}}
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: dict[str, Any] = {"tools": specs}
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, Mapping):
        config["toolChoice"] = {"tool": {"name": choice.get("function", {}).get("name")}}
    elif choice == "auto":
        config["toolChoice"] = {"auto": {}}
    return config


def chat_completion(answer: Mapping[str, Any], *, model: str, completion_id: str,
                    created: int | None = None) -> dict[str, Any]:
    """The ``chat.completion`` for a Converse answer."""
    blocks = answer.get("output", {}).get("message", {}).get("content", [])
    text = "".join(block["text"] for block in blocks if "text" in block)
    calls = [{"id": block["toolUse"].get("toolUseId", ""), "type": "function",
              "function": {"name": block["toolUse"].get("name", ""),
                           "arguments": json.dumps(block["toolUse"].get("input", {}))}}
             for block in blocks if "toolUse" in block]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id, "object": "chat.completion",
        "created": created if created is not None else int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(answer.get("stopReason", ""), "stop")}],
        "usage": _usage(answer.get("usage") or {}),
    }


def _usage(usage: Mapping[str, Any]) -> dict[str, int]:
    prompt, completion = int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(usage.get("totalTokens", prompt + completion))}


def openai_error(status: int, body: bytes, error_type: str) -> bytes:
    """A Bedrock error body in OpenAI's shape, so an SDK shows its message."""
    try:
        message = json.loads(body).get("message") or ""
    except (ValueError, AttributeError):
        message = ""
    kind = error_type.partition(":")[0] or f"HTTP {status}"
    return json.dumps({"error": {"message": message or kind, "type": kind, "param": None,
                                 "code": kind}}).encode()


class ConverseStreamTranslator:
    """ConverseStream event-stream bytes in, OpenAI SSE bytes out, as they arrive."""

    def __init__(self, *, model: str, completion_id: str, include_usage: bool,
                 created: int | None = None) -> None:
        from botocore.eventstream import EventStreamBuffer  # skyroute[bedrock]

        self._buffer = EventStreamBuffer()
        self._base = {"id": completion_id, "object": "chat.completion.chunk",
                      "created": created if created is not None else int(time.time()),
                      "model": model}
        self._include_usage = include_usage
        self._tools: dict[int, int] = {}  # Converse content block index -> tool_calls index
        self._finish: str | None = None
        #: The role chunk waits for the first content, so that a throttle right after
        #: ``messageStart`` fails before anything is relayed (and can fail over).
        self._held = b""
        self.error: str | None = None  # an exception frame's type, once one came
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The SSE bytes for the complete frames in ``data`` (and any held back before).

        Raises:
            ValueError: the bytes are not a valid event stream (a checksum or length is
                wrong); the answer cannot be trusted from there on.
        """
        if self.done or self.error is not None:
            return b""
        from botocore.eventstream import ParserError

        self._buffer.add_data(data)
        out = []
        try:
            for message in self._buffer:
                out.append(self._event(message.headers, message.payload))
                if self.done or self.error is not None:
                    break
        except ParserError as exc:
            raise ValueError(f"not a valid Bedrock event stream ({type(exc).__name__})") from None
        return b"".join(out)

    def _event(self, headers: Mapping[str, Any], payload: bytes) -> bytes:
        if headers.get(":message-type") != "event":
            self.error = str(headers.get(":exception-type") or headers.get(":error-code")
                             or "error")
            return b""
        kind = headers.get(":event-type")
        body = json.loads(payload) if payload else {}
        if kind == "messageStart":
            self._held = self._chunk({"role": body.get("role", "assistant"), "content": ""})
            return b""
        if kind == "contentBlockStart":
            tool = body.get("start", {}).get("toolUse")
            if tool is None:
                return b""
            index = self._tools.setdefault(body.get("contentBlockIndex", 0), len(self._tools))
            return self._chunk({"tool_calls": [{
                "index": index, "id": tool.get("toolUseId", ""), "type": "function",
                "function": {"name": tool.get("name", ""), "arguments": ""}}]})
        if kind == "contentBlockDelta":
            delta = body.get("delta", {})
            if "text" in delta:
                return self._chunk({"content": delta["text"]})
            if "toolUse" in delta:
                index = self._tools.setdefault(body.get("contentBlockIndex", 0),
                                               len(self._tools))
                return self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta["toolUse"].get("input", "")}}]})
            return b""
        if kind == "messageStop":
            self._finish = FINISH_REASONS.get(body.get("stopReason", ""), "stop")
            return self._chunk({}, finish=self._finish)
        if kind == "metadata":
            self.done = True
            usage = b""
            if self._include_usage:
                usage = _sse({**self._base, "choices": [], "usage": _usage(body.get("usage", {}))})
            return usage + b"data: [DONE]\n\n"
        return b""

    def _chunk(self, delta: Mapping[str, Any], *, finish: str | None = None) -> bytes:
        held, self._held = self._held, b""
        return held + _sse({**self._base, "choices": [{"index": 0, "delta": dict(delta),
                                                "logprobs": None, "finish_reason": finish}]})


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


__all__ = [
    "ConverseStreamTranslator",
    "TranslationError",
    "chat_completion",
    "converse_request",
    "openai_error",
]
