"""Tests for proxy/_standin.py: the stand-in upstream behaves like the real APIs it imitates."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from skyroute.proxy.demo import Behaviour, StandinUpstream

from .fakes import FakeClock

KEY = "sk-standin-test"
TIMEOUT = aiohttp.ClientTimeout(total=5)
CHAT: dict[str, Any] = {"model": "deepseek-chat",
                        "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture
async def up() -> AsyncIterator[StandinUpstream]:
    async with StandinUpstream("alpha", models=("deepseek-chat", "embed-small"),
                               api_key=KEY) as upstream:
        yield upstream


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT,
                                     headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


@pytest.fixture
async def client(up: StandinUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=up.base_url, api_key=KEY, max_retries=0,
                                  timeout=5) as sdk:
        yield sdk


async def read_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """Split an SSE body into its events, each without the blank-line terminator."""
    body = await resp.content.read()
    return [event for event in body.split(b"\n\n") if event]


async def test_StandinUpstream_answers_chat_completion_in_openai_format(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """A non-streaming chat completion parses with the SDK and names the upstream that served it."""
    completion = await client.chat.completions.create(**CHAT)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "deepseek-chat"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello from alpha t3 t4"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    assert up.requests_total == 1 and up.in_flight == 0
    assert up.last_json["messages"] == CHAT["messages"]
    assert up.last_headers is not None and up.last_headers["Authorization"] == f"Bearer {KEY}"


async def test_StandinUpstream_streams_sse_chunks_in_openai_format(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """A streamed chat completion is a role chunk, content chunks, a stop chunk and usage."""
    up.behaviour.tokens = 3
    stream = await client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from alpha"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_StandinUpstream_stream_ends_with_done_on_the_wire(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """The raw SSE body is text/event-stream, ``data:`` events, and ends with ``[DONE]``."""
    async with http.post(f"{up.base_url}/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(r)
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    assert "usage" not in json.loads(events[1][len(b"data: "):])  # include_usage not asked


async def test_StandinUpstream_streams_text_completions(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """The legacy completions endpoint answers and streams in text_completion format."""
    whole = await client.completions.create(model="deepseek-chat", prompt="say hi")
    assert whole.object == "text_completion" and whole.choices[0].text == "Hello from alpha t3 t4"
    stream = await client.completions.create(model="deepseek-chat", prompt="say hi", stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream]
    assert "".join(pieces) == "Hello from alpha t3 t4"


async def test_StandinUpstream_embeds_each_input_deterministically(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """Embeddings come one per input, identical for equal inputs, as floats or the SDK's base64."""
    b64 = await client.embeddings.create(model="embed-small", input=["a", "b", "a"])
    floats = await client.embeddings.create(model="embed-small", input="a",
                                            encoding_format="float")
    vectors = [d.embedding for d in b64.data]
    assert [d.index for d in b64.data] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert len(vectors[0]) == 8


async def test_StandinUpstream_lists_its_models(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """GET /v1/models lists the configured models; retrieving one returns its model object."""
    models = [m.id async for m in client.models.list()]
    assert models == ["deepseek-chat", "embed-small"]
    assert (await client.models.retrieve("embed-small")).owned_by == "alpha"


async def test_StandinUpstream_rejects_unknown_model_with_404(
        up: StandinUpstream, client: openai.AsyncOpenAI) -> None:
    """An unknown model is OpenAI's 404 model_not_found, which the SDK maps to NotFoundError."""
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


async def test_StandinUpstream_rejects_wrong_key_with_401(up: StandinUpstream) -> None:
    """A wrong bearer key is 401 invalid_api_key, before the body is even looked at."""
    async with openai.AsyncOpenAI(base_url=up.base_url, api_key="sk-wrong", max_retries=0,
                                  timeout=5) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.chat.completions.create(**CHAT)
    assert info.value.code == "invalid_api_key"


async def test_StandinUpstream_rejects_malformed_json_with_400(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """A body that is not JSON gets a 400 with an OpenAI-shaped error."""
    async with http.post(f"{up.base_url}/chat/completions", data=b"{nope",
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_StandinUpstream_echoes_other_paths(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """Any other /v1 path is echoed back so pass-through can be tested."""
    async with http.delete(f"{up.base_url}/assistants/asst-1") as r:
        assert await r.json() == {"path": "/v1/assistants/asst-1", "method": "DELETE",
                                  "upstream": "alpha"}


@pytest.mark.parametrize(
    ("mode", "status", "code", "type_"),
    [
        ("error", 503, None, "server_error"),
        ("bad_key", 401, "invalid_api_key", "authentication_error"),
        ("no_balance", 402, "invalid_request_error", "unknown_error"),
        ("bad_request", 400, "invalid_request_error", "invalid_request_error"),
        ("rate_limited", 429, "rate_limit_exceeded", "requests"),
    ],
)
async def test_StandinUpstream_error_modes_answer_openai_shaped_errors(
        up: StandinUpstream, http: aiohttp.ClientSession,
        mode: str, status: int, code: str | None, type_: str) -> None:
    """Each error mode answers its status with an OpenAI-shaped error body."""
    up.behaviour.mode = mode
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == status
        error = (await r.json())["error"]
    assert error["code"] == code and error["type"] == type_ and error["message"]


async def test_StandinUpstream_rate_limited_sends_retry_after_in_whole_seconds(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """A 429 carries Retry-After rounded up to whole seconds."""
    up.behaviour = Behaviour(mode="rate_limited", retry_after_s=1.2)
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "2"


async def test_StandinUpstream_busy_json_sends_empty_lines_then_answers(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """Busy non-streaming is 200 at once, empty lines, then the real JSON on the same body."""
    up.behaviour = Behaviour(mode="busy", keepalive_interval_s=0.01)
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        lines = [await r.content.readline() for _ in range(3)]
        assert lines == [b"\n"] * 3
        up.behaviour.mode = "ok"  # the busy period ends; the answer follows
        body = await r.content.read()
    answer = json.loads(body)  # json ignores the leading blank lines, as real clients do
    assert answer["choices"][0]["message"]["content"].startswith("Hello from alpha")


async def test_StandinUpstream_busy_stream_sends_keepalive_comments_for_busy_for_s(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """Busy streaming sends ``: keep-alive`` comments, then streams the answer after busy_for_s."""
    up.behaviour = Behaviour(mode="busy", busy_for_s=0.1, keepalive_interval_s=0.01)
    async with http.post(f"{up.base_url}/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        events = await read_events(r)
    comments = [e for e in events if e.startswith(b":")]
    assert comments and set(comments) == {b": keep-alive"}
    assert events[: len(comments)] == comments  # all comments come before any data
    assert events[-1] == b"data: [DONE]"


async def test_StandinUpstream_counts_client_that_leaves_busy_answer_as_cancelled(
        up: StandinUpstream) -> None:
    """A client that gives up on a busy answer is counted as cancelled and leaves in_flight."""
    up.behaviour = Behaviour(mode="busy")  # until the client gives up
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT, headers=headers) as session:
        r = await session.post(f"{up.base_url}/chat/completions", json=CHAT)
        assert await r.content.readline() == b"\n"
        r.close()  # drop the connection mid-answer, as a client timeout does
    await up.wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)


async def test_StandinUpstream_slow_first_byte_sends_headers_then_waits(
        up: StandinUpstream) -> None:
    """With ttft_s a stream's headers arrive at once; a client that leaves first is cancelled."""
    up.behaviour.ttft_s = 60.0
    timeout = aiohttp.ClientTimeout(total=5, sock_read=0.2)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
                session.post(f"{up.base_url}/chat/completions",
                             json={**CHAT, "stream": True}) as r):
        assert r.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await r.content.read()
    await up.wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)


async def test_StandinUpstream_streams_each_chunk_as_it_is_produced(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """With a long token delay the first content chunk is readable before the second exists."""
    up.behaviour.token_delay_s = 60.0
    r = await http.post(f"{up.base_url}/chat/completions", json={**CHAT, "stream": True})
    role = await r.content.readuntil(b"\n\n")
    first = await r.content.readuntil(b"\n\n")
    assert json.loads(role[6:])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "Hello"
    r.close()
    await up.wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)


async def test_StandinUpstream_on_a_virtual_clock_advances_it_instead_of_waiting(
        http: aiohttp.ClientSession) -> None:
    """With a clock, an hour-long first-token and token delay pass on it: the answer is at once."""
    clock = FakeClock(start=100.0)
    behaviour = Behaviour(ttft_s=3600.0, token_delay_s=60.0, tokens=3)
    async with StandinUpstream("virtual", api_key=KEY, behaviour=behaviour,
                               clock=clock) as upstream:
        async with http.post(f"{upstream.base_url}/chat/completions", json=CHAT) as r:
            assert r.status == 200  # TIMEOUT (5 s) bounds the wait: no real hour passes
            assert (await r.json())["choices"][0]["message"]["content"].startswith("Hello")
        assert clock.now() == 3700.0
        async with http.post(f"{upstream.base_url}/chat/completions",
                             json={**CHAT, "stream": True}) as r:
            events = await read_events(r)
    assert events[-1] == b"data: [DONE]"
    assert clock.now() == 3700.0 + 3600.0 + 2 * 60.0  # first token, then a delay per chunk


async def test_StandinUpstream_reset_midstream_stream_ends_in_payload_error(
        up: StandinUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream reset after N chunks gives the client N chunks, no [DONE], then a payload error."""
    up.behaviour = Behaviour(mode="reset_midstream", reset_after_chunks=2)
    received = b""
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        async with http.post(f"{up.base_url}/chat/completions",
                             json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in r.content.iter_any():
                    received += data
        await up.wait_for(lambda u: u.in_flight == 0)
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content")
                for e in received.split(b"\n\n") if e.startswith(b"data: {")]
    assert contents == ["", "Hello", " from"]
    assert b"[DONE]" not in received
    assert up.cancelled == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


async def test_StandinUpstream_reset_midstream_json_ends_in_payload_error(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """A non-streaming reset sends headers and part of the body, then the read fails."""
    up.behaviour.mode = "reset_midstream"
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_StandinUpstream_reset_before_drops_connection_without_response(
        up: StandinUpstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """reset_before drops the connection before any response byte, quietly on the server side."""
    up.behaviour.mode = "reset_before"
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(f"{up.base_url}/chat/completions", json=CHAT):
                pass
        await up.wait_for(lambda u: u.in_flight == 0)
    up.behaviour.mode = "ok"  # the upstream keeps serving new connections
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 200
    assert up.cancelled == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("fmt", "names"),
    [
        ("vllm", ("vllm:num_requests_waiting", "vllm:num_requests_running",
                  "vllm:kv_cache_usage_perc")),
        ("sglang", ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage")),
    ],
)
async def test_StandinUpstream_serves_prometheus_metrics_from_load(
        http: aiohttp.ClientSession, fmt: str, names: tuple[str, str, str]) -> None:
    """/metrics serves the engine's gauges from ``load``, running including real in-flight."""
    async with StandinUpstream("gpu", metrics_format=fmt,
                               behaviour=Behaviour(mode="busy")) as up:
        up.load.update(waiting=3, running=1, kv_cache=0.5)
        busy = await http.post(f"{up.base_url}/chat/completions", json=CHAT)
        await busy.content.readline()  # the busy request is now in flight
        async with http.get(f"http://127.0.0.1:{up.port}/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        busy.close()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")
    label = '{model_name="deepseek-chat"}'
    assert samples == {names[0] + label: "3.0", names[1] + label: "2.0", names[2] + label: "0.5"}
    assert f"# TYPE {names[0]} gauge" in text


async def test_StandinUpstream_without_metrics_format_has_no_metrics(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """Without a metrics format /metrics is 404 while /health answers ok."""
    async with http.get(f"http://127.0.0.1:{up.port}/metrics") as r:
        assert r.status == 404
    async with http.get(f"http://127.0.0.1:{up.port}/health") as r:
        assert r.status == 200 and await r.text() == "ok"


async def test_StandinUpstream_wait_for_raises_TimeoutError_naming_the_state(
        up: StandinUpstream) -> None:
    """wait_for gives up after its timeout with a TimeoutError that shows the upstream's state."""
    with pytest.raises(TimeoutError, match="cancelled=0"):
        await up.wait_for(lambda u: u.cancelled == 1, timeout=0.05)


def test_Behaviour_rejects_unknown_mode() -> None:
    """Setting an unknown mode fails at once rather than when a request arrives."""
    behaviour = Behaviour()
    with pytest.raises(ValueError, match="mode"):
        behaviour.mode = "sleepy"
    with pytest.raises(ValueError, match="error_status"):
        Behaviour(mode="error", error_status=418)


async def test_StandinUpstream_aclose_drops_a_held_busy_answer_promptly(
        http: aiohttp.ClientSession) -> None:
    """aclose() with a busy answer open cuts it short (a payload error, not a clean end) at once."""
    up = StandinUpstream("held", behaviour=Behaviour(mode="busy"))
    await up.start()
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert await r.content.readline() == b"\n"
        async with asyncio.timeout(2):
            await up.aclose()
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert up.in_flight == 0 and up.cancelled == 0


# -- the control endpoint: changing a running stand-in from outside -----------------------


async def test_StandinUpstream_control_endpoint_shows_and_changes_the_live_behaviour(
        up: StandinUpstream) -> None:
    """GET shows the behaviour; POST changes the live object, needs no key, counts no request."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as anonymous:
        async with anonymous.get(up.control_url) as r:
            assert r.status == 200
            shown = await r.json()
        assert shown["upstream"] == "alpha" and shown["mode"] == "ok" and shown["ttft_s"] == 0
        behaviour = up.behaviour
        async with anonymous.post(up.control_url,
                                  data='{"mode": "error", "error_status": 502, "tokens": 7}') as r:
            assert r.status == 200
            assert (await r.json())["error_status"] == 502
    assert up.behaviour is behaviour  # changed in place: holders of the object see it
    assert (behaviour.mode, behaviour.error_status, behaviour.tokens) == ("error", 502, 7)
    assert up.requests_total == 0
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(timeout=TIMEOUT, headers=headers) as http, \
            http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert r.status == 502  # the next API request answers with the new behaviour


async def test_StandinUpstream_control_endpoint_logs_each_change(
        up: StandinUpstream, captured_logs: list[dict[str, Any]]) -> None:
    """A change is one log line naming the stand-in, each field and its old and new value."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as anonymous, \
            anonymous.post(up.control_url, json={"ttft_s": 0.4}) as r:
        assert r.status == 200
    [line] = [e for e in captured_logs if e.get("upstream") == "alpha"]
    assert line["event"] == "standin_behaviour_changed"
    assert line["changes"] == {"ttft_s": [0.0, 0.4]}


async def test_StandinUpstream_control_endpoint_releases_a_held_busy_answer(
        up: StandinUpstream, http: aiohttp.ClientSession) -> None:
    """POST {"mode": "ok"} ends a busy period that a request is waiting in, as flipping it does."""
    up.behaviour.mode = "busy"
    async with http.post(f"{up.base_url}/chat/completions", json=CHAT) as r:
        assert await r.content.readline() == b"\n"
        async with http.post(up.control_url, json={"mode": "ok"}) as change:
            assert change.status == 200
        answer = json.loads(await r.read())
    assert answer["choices"][0]["message"]["content"].startswith("Hello from alpha")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"ttft": 0.4}', "unknown field 'ttft'; Behaviour fields: mode, ttft_s"),
        ('{"ttft_s": "slow"}', "field 'ttft_s' must be a number of seconds >= 0, got \"slow\""),
        ('{"ttft_s": -1}', "field 'ttft_s' must be a number of seconds >= 0, got -1"),
        ('{"ttft_s": true}', "field 'ttft_s' must be a number of seconds >= 0, got true"),
        ('{"tokens": 2.5}', "field 'tokens' must be a whole number >= 0, got 2.5"),
        ('{"busy_for_s": "x"}', "must be a number of seconds >= 0 or null"),
        ('{"mode": 3}', "field 'mode' must be one of ['bad_key', 'bad_request', 'busy'"),
        ('{"mode": "sleepy"}', "Behaviour.mode must be one of"),
        ('{"error_status": 418}', "Behaviour.error_status must be 500/502/503/504"),
        ('{"ttft_s": 0.4, "mode": "sleepy"}', "Behaviour.mode must be one of"),
        ('[0.4]', 'the body must be a JSON object of Behaviour fields, e.g. {"ttft_s": 0.4}'),
        ('{}', "the body must be a JSON object of Behaviour fields"),
        ('{"ttft_s": 0.4', "POST /_standin/behaviour on stand-in 'alpha': Expecting"),
    ],
)
async def test_StandinUpstream_control_endpoint_rejects_bad_bodies_and_changes_nothing(
        up: StandinUpstream, body: str, says: str) -> None:
    """A bad body is a 400 naming the endpoint, the stand-in and the field; nothing changes."""
    before = dataclasses.replace(up.behaviour)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as anonymous, \
            anonymous.post(up.control_url, data=body) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["message"].startswith("POST /_standin/behaviour on stand-in 'alpha': ")
    assert says in error["message"]
    assert error["code"] == "invalid_behaviour"
    assert up.behaviour == before
