"""Stream resume (a route's ``resume: true``) and token counting of streamed answers."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, client_for, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
RESUMING = "- model: chat\n  targets: [a, b, c]\n  strategy: priority\n  resume: true\n"


async def _three(standin, skyroute, routes: str = RESUMING, extra: str = ""):
    ups = [await standin(name) for name in ("a", "b", "c")]
    server = await skyroute(routing_yaml([entry(u, extra="first_token_timeout: 2s\n")
                                          for u in ups], routes, extra=extra))
    return ups, server


async def _stream(client, **kwargs):
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True,
                                                  **kwargs)
    return [chunk async for chunk in stream]


async def _metrics(server) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        return await (await h.get(f"{server.url}/metrics")).text()


async def test_a_cut_stream_continues_on_the_next_upstream_as_one_answer(standin, skyroute):
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "reset_midstream"  # cut after "Hello", " from"
    async with client_for(server) as client:
        chunks = await _stream(client, max_tokens=50)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # b goes on from the prefix it was given, as a model continuing a message does.
    assert text == "Hello from b t3 t4"
    assert len({c.id for c in chunks}) == 1  # one stream, as far as the client can tell
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = ups[1].last_json
    assert sent["messages"][-1] == {"role": "assistant", "content": "Hello from"}
    assert sent["max_tokens"] == 48  # what the cut attempt already used is taken off
    assert 'skyroute_stream_resumes_total{result="resumed",route="chat"} 1.0' in \
        await _metrics(server)


async def test_the_resumed_stream_is_well_formed_sse_ending_in_done(standin, skyroute):
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "reset_midstream"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        resp = await h.post(f"{server.url}/v1/chat/completions",
                            json={"model": "chat", "messages": MESSAGES, "stream": True},
                            headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert raw.count(b'"role": "assistant"') == 1  # the continuation's opening is dropped
    assert b"stream_interrupted" not in raw


async def test_a_cut_nobody_can_continue_ends_with_the_error_event(standin, skyroute,
                                                                    captured_logs):
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "reset_midstream"
    for up in ups[1:]:
        up.behaviour.mode = "error"
    async with client_for(server) as client:
        with pytest.raises(openai.APIError, match="no upstream could continue it"):
            await _stream(client)
    assert 'skyroute_stream_resumes_total{result="cut",route="chat"} 1.0' in \
        await _metrics(server)
    failed = [e for e in captured_logs if e["event"] == "upstream_attempt_failed"]
    assert [(e["upstream"], e["result"], e["resume"]) for e in failed][:2] == [
        ("a", "stream_cut", True), ("b", "server_error", True)]


async def test_without_resume_a_cut_stream_is_not_continued(standin, skyroute):
    ups, server = await _three(
        standin, skyroute, "- model: chat\n  targets: [a, b, c]\n  strategy: priority\n")
    ups[0].behaviour.mode = "reset_midstream"
    async with client_for(server) as client:
        with pytest.raises(openai.APIError, match="broke off"):
            await _stream(client)
    assert ups[1].requests_total == 0


async def test_several_choices_are_not_resumed(standin, skyroute):
    """n > 1 cannot be carried over as one assistant prefix: the cut is reported instead."""
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "reset_midstream"
    async with client_for(server) as client:
        with pytest.raises(openai.APIError, match="broke off"):
            await _stream(client, n=2)
    assert ups[1].requests_total == 0


LIMITED = """\
auth:
  api_keys:
    - name: tests
      key: sk-client-test
      tpm: 30
"""


async def test_streamed_tokens_count_towards_tpm(standin, skyroute):
    up = await standin("a")
    text = routing_yaml([entry(up)], auth=False, extra=LIMITED)
    server = await skyroute(text)
    async with client_for(server) as client:
        refused = None
        for _ in range(10):  # 5 answer tokens + prompt each: over 30 within a few requests
            try:
                await _stream(client, stream_options={"include_usage": True})
            except openai.RateLimitError as exc:
                refused = exc
                break
    assert refused is not None, "streamed answers were never counted against tpm"
    assert "token limit for key 'tests'" in refused.message
    assert up.requests_total < 10
