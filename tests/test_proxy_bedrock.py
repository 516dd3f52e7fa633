"""The OpenAI <-> Bedrock Converse translation, and event-stream frames botocore accepts."""

from __future__ import annotations

import json

import pytest
from botocore.eventstream import EventStreamBuffer
from skyroute.proxy._bedrock import (
    ConverseStreamTranslator,
    TranslationError,
    chat_completion,
    converse_request,
    openai_error,
)
from skyroute.proxy.demo._clouds import event_frame


def frame(kind: str, body: dict) -> bytes:
    return event_frame({":event-type": kind, ":content-type": "application/json",
                        ":message-type": "event"}, json.dumps(body).encode())


def sse_events(data: bytes) -> list:
    return [e.removeprefix(b"data: ").decode() for e in data.split(b"\n\n") if e]


def test_the_stand_ins_frames_are_valid_for_botocores_decoder():
    buffer = EventStreamBuffer()
    buffer.add_data(frame("messageStart", {"role": "assistant"}))
    (message,) = list(buffer)
    assert message.headers[":event-type"] == "messageStart"
    assert json.loads(message.payload) == {"role": "assistant"}


def test_request_translation_merges_turns_and_maps_settings():
    body = converse_request({
        "model": "x", "temperature": 0, "top_p": 0.5, "max_completion_tokens": 9,
        "stop": "END", "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object"}}}],
        "messages": [{"role": "system", "content": "sys"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]},
                     {"role": "user", "content": "c"}]})
    assert body["system"] == [{"text": "sys"}]
    assert body["messages"] == [{"role": "user", "content": [{"text": "a"}, {"text": "b"},
                                                             {"text": "c"}]}]
    assert body["inferenceConfig"] == {"maxTokens": 9, "temperature": 0, "topP": 0.5,
                                       "stopSequences": ["END"]}
    assert body["toolConfig"]["toolChoice"] == {"any": {}}


@pytest.mark.parametrize(("payload", "field"), [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n:"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": []}, "messages:"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
])
def test_what_converse_cannot_say_is_refused_by_field(payload, field):
    with pytest.raises(TranslationError, match=field.replace("[", r"\[").replace("]", r"\]")):
        converse_request(payload)


def test_answer_translation():
    answer = chat_completion({"output": {"message": {"content": [
        {"text": "hi"}, {"toolUse": {"toolUseId": "t1", "name": "f", "input": {"a": 1}}}]}},
        "stopReason": "tool_use", "usage": {"inputTokens": 2, "outputTokens": 3}},
        model="m", completion_id="c", created=1)
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "hi"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f",
                                                              "arguments": '{"a": 1}'}
    assert choice["finish_reason"] == "tool_calls"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_stream_translation_split_anywhere():
    """Frames split at every byte boundary give the same SSE as whole frames."""
    stream = b"".join([
        frame("messageStart", {"role": "assistant"}),
        frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}}),
        frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo"}}),
        frame("contentBlockStop", {"contentBlockIndex": 0}),
        frame("messageStop", {"stopReason": "max_tokens"}),
        frame("metadata", {"usage": {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3}}),
    ])
    whole = ConverseStreamTranslator(model="m", completion_id="c", include_usage=True,
                                     created=1)
    expected = whole.feed(stream)
    split = ConverseStreamTranslator(model="m", completion_id="c", include_usage=True,
                                     created=1)
    assert b"".join(split.feed(stream[i:i + 1]) for i in range(len(stream))) == expected
    events = sse_events(expected)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c["choices"]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["total_tokens"] == 3 and chunks[-1]["choices"] == []


def test_an_exception_frame_before_content_sends_nothing():
    translator = ConverseStreamTranslator(model="m", completion_id="c", include_usage=False)
    out = translator.feed(frame("messageStart", {"role": "assistant"}) + event_frame(
        {":exception-type": "throttlingException", ":message-type": "exception"}, b"{}"))
    assert out == b"" and translator.error == "throttlingException"


def test_a_corrupt_frame_is_an_error():
    data = bytearray(frame("messageStart", {"role": "assistant"}))
    data[-1] ^= 0xFF
    with pytest.raises(ValueError, match="event stream"):
        ConverseStreamTranslator(model="m", completion_id="c", include_usage=False).feed(
            bytes(data))


def test_errors_take_openais_shape():
    body = json.loads(openai_error(429, b'{"message": "Too many requests"}',
                                   "ThrottlingException:http://internal"))
    assert body == {"error": {"message": "Too many requests", "type": "ThrottlingException",
                              "param": None, "code": "ThrottlingException"}}
