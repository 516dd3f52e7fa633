"""Streamed answers: resume eligibility of a cut stream, and the tokens one used."""

from __future__ import annotations

import pytest
from skyroute.routing import is_resumable, streamed_tokens

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}

RESUME_CASES = [
    # (route resume, payload, text only so far, finished, resumable)
    (True, CHAT, True, False, True),
    (True, {**CHAT, "n": 1}, True, False, True),
    (False, CHAT, True, False, False),  # the route did not opt in
    (True, {**CHAT, "n": 2}, True, False, False),  # two choices: one prefix cannot carry both
    (True, CHAT, False, False, False),  # tool calls or a second choice already streamed
    (True, CHAT, True, True, False),  # finished: nothing left to continue
    (True, {"model": "chat", "prompt": "hi"}, True, False, False),  # not a chat request
    (True, None, True, False, False),
]


@pytest.mark.parametrize(("resume", "payload", "text_only", "finished", "expected"),
                         RESUME_CASES)
def test_is_resumable_only_for_an_unfinished_one_choice_text_chat(resume, payload, text_only,
                                                                  finished, expected):
    """Only an unfinished one-choice text chat stream on a route with resume: true goes on."""
    assert is_resumable(resume=resume, payload=payload, text_only=text_only,
                        finished=finished) is expected


@pytest.mark.parametrize(("reported", "request_bytes", "chunks", "tokens"), [
    (57, 400, 12, 57),  # the upstream said (stream_options.include_usage)
    (0, 400, 12, 112),  # estimated: 400 / 4 + 12
    (0, 3, 0, 0),
])
def test_streamed_tokens_are_reported_or_estimated(reported, request_bytes, chunks, tokens):
    """What the upstream reported counts; without it, a token per 4 request bytes plus one
    per content chunk."""
    assert streamed_tokens(reported=reported, request_bytes=request_bytes,
                           content_chunks=chunks) == tokens
