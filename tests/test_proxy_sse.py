"""StreamTranscript: reading relayed SSE events and rewriting a continuation."""

from __future__ import annotations

import json

from skyroute.proxy._sse import StreamTranscript, complete_events


def _event(**chunk) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _delta(content=None, *, index=0, finish=None, **more) -> dict:
    delta = {"content": content, **more} if content is not None else dict(more)
    return {"index": index, "delta": delta, "finish_reason": finish}


HEAD = {"id": "chatcmpl-1", "created": 100, "model": "deepseek-chat"}


def test_complete_events_stops_at_the_last_blank_line():
    assert complete_events(b"data: 1\n\ndata: 2") == len(b"data: 1\n\n")
    assert complete_events(b"data: 1\r\n\r\ndata: 2") == len(b"data: 1\r\n\r\n")
    assert complete_events(b"data: {\"half") == 0


def test_the_transcript_keeps_text_head_usage_and_done():
    t = StreamTranscript()
    t.feed(_event(**HEAD, choices=[_delta("", role="assistant")])
           + _event(**HEAD, choices=[_delta("Hel")]) + b": keep-alive\n\n"
           + _event(**HEAD, choices=[_delta("lo")]))
    t.feed(_event(**HEAD, choices=[_delta(finish="stop")])
           + _event(**HEAD, choices=[], usage={"total_tokens": 7}) + b"data: [DONE]\n\n")
    assert (t.text, t.content_chunks, t.usage_tokens) == ("Hello", 2, 7)
    assert t.head == HEAD and t.done and t.finished and t.text_only


def test_crlf_framing_is_read_too():
    t = StreamTranscript()
    t.feed(b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\r\n\r\n'
           b"data: [DONE]\r\n\r\n")
    assert t.text == "a" and t.done


def test_text_completions_count_as_content():
    t = StreamTranscript()
    t.feed(_event(**HEAD, choices=[{"index": 0, "text": "once", "finish_reason": None}]))
    assert t.text == "once"


def test_tool_calls_and_second_choices_cannot_be_resumed():
    tools = StreamTranscript()
    tools.feed(_event(**HEAD, choices=[_delta(tool_calls=[{"index": 0, "id": "call_1"}])]))
    two = StreamTranscript()
    two.feed(_event(**HEAD, choices=[_delta("a", index=1)]))
    assert not tools.text_only and not two.text_only


def test_a_continuation_takes_the_first_streams_identity_and_drops_its_opening():
    t = StreamTranscript()
    t.feed(_event(**HEAD, choices=[_delta("", role="assistant")]) + _event(**HEAD, choices=[
        _delta("Hello")]))
    other = {"id": "chatcmpl-2", "created": 200, "model": "qwen"}
    out = t.continue_with(_event(**other, choices=[_delta("", role="assistant")])
                          + _event(**other, choices=[_delta(" there")])
                          + b"data: [DONE]\n\n")
    events = out.split(b"\n\n")
    assert json.loads(events[0][len(b"data: "):]) == {**HEAD, "choices": [_delta(" there")]}
    assert events[1:] == [b"data: [DONE]", b""]
    assert t.text == "Hello there" and t.done


def test_undecodable_events_are_passed_over():
    t = StreamTranscript()
    t.feed(b"data: {not json\n\nevent: ping\n\n" + _event(**HEAD, choices=[_delta("x")]))
    assert t.text == "x"
