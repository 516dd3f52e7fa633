"""A true drop-in (issue 12): Responses streams, uploads, headers, keys, limits, stateful objects.

Each behaviour is driven with the official openai SDK (or raw HTTP where the point is a
header the SDK would not send) against stand-in upstreams on port 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from contextlib import AsyncExitStack

import aiohttp
import openai
import pytest
from skyroute.proxy import Server
from skyroute.proxy._state import STATE_SYNC
from skyroute.routing import parse_config

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, UPSTREAM_KEY, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

TIMEOUT = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
MODELS = "{chat: deepseek-chat, whisper: whisper-1}"
TWO = "- model: chat\n  targets: [a, b]\n  strategy: priority\n"
SYNC_TOKEN = "sync-secret-for-tests"


async def _responses_events(client: openai.AsyncOpenAI) -> list[object]:
    stream = await client.responses.create(model="chat", input="hi", stream=True)
    return [event async for event in stream]


# -- 1. Responses streams by protocol --------------------------------------------------


async def test_responses_stream_ends_whole_and_counts_as_success(standin, skyroute,
                                                                 captured_logs):
    """A Responses stream (no [DONE]) reaches the client whole and its upstream stays healthy."""
    up = await standin("a", models=("deepseek-chat",))
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    async with client_for(server) as client:
        for _ in range(5):
            events = await _responses_events(client)
            assert events[-1].type == "response.completed"
            assert events[-1].response.output_text == "Hello from a t3 t4"
            assert "error" not in [e.type for e in events]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        state = (await (await http.get(f"{server.url}/health")).json())["upstreams"]["a"]
        metrics = await (await http.get(f"{server.url}/metrics")).text()
    assert state["state"] == "healthy"
    assert 'skyroute_attempts_total{outcome="success",upstream="a"} 5.0' in metrics
    assert not [e for e in captured_logs if e.get("cut")]


async def test_responses_stream_busy_after_its_opening_events_fails_over(standin, skyroute):
    """response.created then only keep-alives is busy: the next upstream serves the stream."""
    a = await standin("a", models=("deepseek-chat",))
    b = await standin("b", models=("deepseek-chat",))
    a.behaviour.mode = "busy"
    server = await skyroute(routing_yaml(
        [entry(a, models=MODELS, extra="first_token_timeout: 300ms"), entry(b, models=MODELS)],
        TWO))
    async with client_for(server) as client:
        events = await _responses_events(client)
    kinds = [e.type for e in events]
    assert kinds.count("response.created") == 1  # a's opening was held back, not relayed
    assert kinds[-1] == "response.completed"
    assert events[-1].response.output_text == "Hello from b t3 t4"
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_responses_stream_cut_ends_with_a_responses_error_event(standin, skyroute):
    """A cut Responses stream ends with an `error` event, never a terminal one."""
    up = await standin("a", models=("deepseek-chat",))
    up.behaviour.mode = "reset_midstream"
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    async with client_for(server) as client:
        events = await _responses_events(client)
    assert events[-1].type == "error"
    assert events[-1].code == "stream_interrupted"
    assert "broke off the stream" in events[-1].message
    assert events[-1].sequence_number == events[-2].sequence_number + 1
    assert "response.completed" not in [e.type for e in events]


async def test_responses_stream_usage_counts_toward_tpm(standin, skyroute):
    """A Responses stream's tokens count from its terminal event's usage."""
    up = await standin("a", models=("deepseek-chat",))
    text = routing_yaml([entry(up, models=MODELS)]).replace(
        f"      key: {CLIENT_KEY}\n", f"      key: {CLIENT_KEY}\n      tpm: 100000\n")
    server = await skyroute(text)
    async with client_for(server) as client:
        events = await _responses_events(client)
    store = server.app[STATE_SYNC].store
    used = events[-1].response.usage.total_tokens
    await eventually(lambda: store.usage("tests", now=time.time()).tokens == used)


# -- 2. Uploads ----------------------------------------------------------------------------


async def test_multipart_upload_is_streamed_and_its_model_field_renamed(standin, skyroute):
    """An audio upload routes by its `model` form field, renamed to the upstream's model."""
    up = await standin("a", models=("deepseek-chat", "whisper-1"))
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    audio = bytes(range(256)) * 400
    async with client_for(server) as client:
        text = await client.audio.transcriptions.create(model="whisper",
                                                        file=("a.mp3", io.BytesIO(audio)))
    assert text.text == f"{len(audio)} bytes of audio transcribed by a"
    assert up.api.last_form["model"] == "whisper-1"


async def test_upload_over_max_upload_bytes_is_refused_before_reading(standin, skyroute):
    """A declared upload over limits.max_upload_bytes gets 413 with no body sent."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra="limits:\n  max_upload_bytes: 1MiB\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                 b"Content-Type: multipart/form-data; boundary=xyz\r\n"
                 + f"Authorization: Bearer {CLIENT_KEY}\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(CALL_TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
    async with asyncio.timeout(CALL_TIMEOUT_S):
        body = await reader.read(4096)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert b"max_upload_bytes" in body
    assert up.requests_total == 0


async def test_upload_fails_over_with_the_same_bytes(standin, skyroute):
    """An upload whose first upstream fails is sent whole to the next one."""
    a = await standin("a")
    b = await standin("b")
    a.behaviour.mode = "reset_before"
    server = await skyroute(routing_yaml([entry(a), entry(b)], TWO))
    data = b"line\n" * 300_000  # 1.5 MB: past the in-memory spool
    async with client_for(server) as client:
        created = await client.files.create(file=("f.jsonl", io.BytesIO(data)), purpose="batch")
    assert created.bytes == len(data)
    assert b.api.files[created.id].size == len(data)


# -- 4. Headers -----------------------------------------------------------------------------


async def test_client_headers_are_filtered_by_the_rules(standin, skyroute):
    """Credentials, cookies, billing, forwarding and Connection-named headers never pass as sent."""
    up = await standin("a")
    up_entry = entry(up, extra="organization: org-skyroute\nforward_headers: [OpenAI-Project]")
    server = await skyroute(routing_yaml([up_entry]))
    sent = {"Authorization": f"Bearer {CLIENT_KEY}", "Cookie": "session=secret",
            "X-Goog-Api-Key": "goog-secret", "OpenAI-Organization": "org-client",
            "OpenAI-Project": "proj-client", "Forwarded": "for=1.2.3.4",
            "X-Forwarded-For": "1.2.3.4", "Connection": "keep-alive, X-Hop",
            "X-Hop": "hop", "OpenAI-Beta": "assistants=v2", "Content-Type": "application/json"}
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions", data=body, headers=sent)
        assert resp.status == 200
        answer_headers = resp.headers
    got = up.last_headers
    assert got is not None
    assert got["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    for name in ("Cookie", "X-Goog-Api-Key", "Forwarded", "X-Hop"):
        assert name not in got, name
    assert got["OpenAI-Organization"] == "org-skyroute"
    assert got["OpenAI-Project"] == "proj-client"  # listed in forward_headers
    assert got["X-Forwarded-For"] == "127.0.0.1"  # the client's value: not from a trusted proxy
    assert got["X-Forwarded-Proto"] == "http"
    assert got["OpenAI-Beta"] == "assistants=v2"
    assert got["Accept-Encoding"] == "identity"
    assert answer_headers["X-Upstream-Request-ID"].startswith("req_")
    assert not [h for h in answer_headers if h.lower().startswith("x-ratelimit-")]


async def test_trusted_proxy_forwarded_for_is_appended_to(standin, skyroute, captured_logs):
    """From a trusted proxy, X-Forwarded-For is kept and the peer appended; the upstream's
    request id is in the access log."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], extra="trusted_proxies: [127.0.0.0/8]\n"))
    async with client_for(server, default_headers={"X-Forwarded-For": "203.0.113.9",
                                                   "X-Forwarded-Proto": "https"}) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
    assert up.last_headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert up.last_headers["X-Forwarded-Proto"] == "https"
    upstream_id = raw.headers["x-upstream-request-id"]
    assert [e for e in captured_logs if e.get("upstream_request_id") == upstream_id]


# -- 5. Client keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["api-key", "x-api-key"])
async def test_client_key_accepted_in_azure_and_x_api_key_headers(standin, skyroute, header):
    """A client key in `api-key` or `x-api-key` is accepted, and never sent upstream."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)]))
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        good = await http.post(f"{server.url}/v1/chat/completions", data=body,
                               headers={header: CLIENT_KEY, "Content-Type": "application/json"})
        bad = await http.post(f"{server.url}/v1/chat/completions", data=body,
                              headers={header: "sk-wrong", "Content-Type": "application/json"})
    assert good.status == 200
    assert bad.status == 401
    assert header not in up.last_headers


async def test_key_headers_setting_limits_where_keys_are_read(standin, skyroute):
    """With auth.key_headers: [authorization], an api-key header is not a key."""
    up = await standin("a")
    text = routing_yaml([entry(up)]).replace("auth:\n", "auth:\n  key_headers: [authorization]\n")
    server = await skyroute(text)
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions", data=body,
                               headers={"api-key": CLIENT_KEY, "Content-Type": "application/json"})
        error = (await resp.json())["error"]
    assert resp.status == 401
    assert error["message"] == ("missing API key: send it as one of 'Authorization: Bearer <key>' "
                                "(the OpenAI SDK's api_key)")


# -- 6. skyroute's own rate-limit headers -----------------------------------------------------


async def test_per_key_limits_send_openai_ratelimit_headers(standin, skyroute):
    """A key with rpm gets x-ratelimit-* for its own limit, counting down to the 429."""
    up = await standin("a")
    text = routing_yaml([entry(up)]).replace(
        f"      key: {CLIENT_KEY}\n", f"      key: {CLIENT_KEY}\n      rpm: 2\n      tpm: 1000\n")
    server = await skyroute(text)
    remaining = []
    async with client_for(server) as client:
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="chat",
                                                 messages=[{"role": "user", "content": "hi"}])
    assert remaining == ["1", "0"]
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"


# -- 7. Stateful objects stay with their upstream ---------------------------------------------


async def test_objects_stay_with_the_upstream_that_created_them(standin, skyroute):
    """A file, a batch and a stored response made at b are used at b, though a comes first."""
    a = await standin("a", models=("deepseek-chat",))
    b = await standin("b", models=("deepseek-chat",))
    server = await skyroute(routing_yaml([entry(a, models=MODELS), entry(b, models=MODELS)],
                                         TWO))
    a.behaviour.mode = "error"  # the creating calls fail over to b
    async with client_for(server) as client:
        created = await client.files.create(file=("f.jsonl", io.BytesIO(b"{}\n")),
                                            purpose="batch")
        first = await client.responses.create(model="chat", input="hi")
        a.behaviour.mode = "ok"  # from now on a is first choice again
        assert (await client.files.retrieve(created.id)).id == created.id
        assert (await client.files.content(created.id)).content == b"{}\n"
        batch = await client.batches.create(input_file_id=created.id, completion_window="24h",
                                            endpoint="/v1/chat/completions")
        assert (await client.batches.retrieve(batch.id)).input_file_id == created.id
        follow = await client.responses.create(model="chat", input="more",
                                               previous_response_id=first.id)
        assert follow.output_text == "Hello from b t3 t4"
        fresh = await client.responses.create(model="chat", input="new")
    assert fresh.output_text == "Hello from a t3 t4"  # naming nothing: normal routing
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        metrics = await (await http.get(f"{server.url}/metrics")).text()
    # Remembered: the file, the batch and three responses; routed: the five follow-ups.
    assert 'skyroute_object_affinity_total{result="remembered"} 5.0' in metrics
    assert 'skyroute_object_affinity_total{result="routed"} 5.0' in metrics
    assert "skyroute_sync_objects 5.0" in metrics


async def test_object_whose_upstream_is_down_is_a_503_naming_it(standin, skyroute):
    """With the object's upstream out, the client gets a 503 naming it, not another's 404."""
    a = await standin("a")
    b = await standin("b")
    server = await skyroute(routing_yaml([entry(a), entry(b)], TWO,
                                         extra="breaker:\n  consecutive_failures: 1\n"))
    a.behaviour.mode = "reset_before"
    async with client_for(server) as client:
        created = await client.files.create(file=("f.jsonl", io.BytesIO(b"{}\n")),
                                            purpose="batch")
        a.behaviour.mode = "ok"
        await b.aclose()
        with pytest.raises(openai.APIStatusError) as failed:  # b is tried, and named
            await client.files.content(created.id)
        assert failed.value.status_code == 503  # a give-up is 503 with Retry-After
        assert "b: cannot connect" in failed.value.message
        assert failed.value.response.headers["Retry-After"]
        with pytest.raises(openai.InternalServerError) as refused:  # b's breaker is open
            await client.files.retrieve(created.id)
    assert refused.value.status_code == 503
    assert f"'{created.id}' is held by upstream 'b'" in refused.value.message
    assert refused.value.response.headers["Retry-After"]
    assert a.api.files == {}


async def test_objects_follow_their_upstream_on_every_instance(standin):
    """A file created through one instance is fetched from its upstream through another."""
    a = await standin("a")
    b = await standin("b")
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ports = [s.getsockname()[1] for s in socks]
    async with AsyncExitStack() as stack:
        servers = []
        for i, sock in enumerate(socks):
            peer = ports[1 - i]
            extra = (f"instance:\n  id: s{i}\nsync:\n  token: {SYNC_TOKEN}\n"
                     f"  peers: [ws://127.0.0.1:{peer}/sync]\n")
            text = routing_yaml([entry(a), entry(b)], TWO, extra=extra)
            server = Server(parse_config(text, env={}), sock=sock, grace_s=1.0)
            await stack.enter_async_context(server)
            servers.append(server)
        await eventually(lambda: all(set(s.app[STATE_SYNC].peer_states().values())
                                     == {"connected"} for s in servers), timeout=10)
        a.behaviour.mode = "error"
        async with client_for(servers[0]) as client:
            created = await client.files.create(file=("f.jsonl", io.BytesIO(b"{}\n")),
                                                purpose="batch")
        a.behaviour.mode = "ok"
        other = servers[1].app[STATE_SYNC].objects
        await eventually(lambda: other.upstream_of(created.id, now=time.time()) == "b")
        async with client_for(servers[1]) as client:
            assert (await client.files.retrieve(created.id)).id == created.id


async def test_other_sse_streams_end_with_the_body_and_cuts_are_errors(standin, skyroute):
    """A transcription stream (no [DONE], no terminal event) is whole when its body ends
    cleanly; cut, the SDK raises on the error event instead of ending quietly."""
    up = await standin("a", models=("deepseek-chat", "whisper-1"))
    server = await skyroute(routing_yaml([entry(up, models=MODELS)]))
    audio = ("a.mp3", b"\xff\xfb" * 100)
    async with client_for(server) as client:
        stream = await client.audio.transcriptions.create(model="whisper", file=audio,
                                                          stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "transcript.text.done"
        up.behaviour.mode = "reset_midstream"
        stream = await client.audio.transcriptions.create(model="whisper", file=audio,
                                                          stream=True)
        with pytest.raises(openai.APIError, match="broke off the stream"):
            [event async for event in stream]


async def test_deflate_answer_reaches_the_client_decoded(standin, skyroute):
    """An upstream that deflates although asked for identity is decoded for the client."""
    up = await standin("a")
    up.behaviour.content_encoding = "deflate"
    up.behaviour.force_encoding = True  # skyroute asks for identity; the upstream ignores it
    server = await skyroute(routing_yaml([entry(up)]))
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions", data=body,
                               headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                        "Content-Type": "application/json",
                                        "Accept-Encoding": "deflate"})
        raw = await resp.read()
    assert "Content-Encoding" not in resp.headers
    assert json.loads(raw)["choices"][0]["message"]["content"].startswith("Hello from a")


async def test_responses_stream_is_hedged_like_chat(standin, skyroute):
    """A Responses stream whose first upstream is slow to its first token is hedged; the
    faster one's stream reaches the client, with one opening."""
    a = await standin("a", models=("deepseek-chat",))
    b = await standin("b", models=("deepseek-chat",))
    a.behaviour.ttft_s = 5.0
    routes = TWO + "  hedge_after: 100ms\n"
    server = await skyroute(routing_yaml([entry(a, models=MODELS), entry(b, models=MODELS)],
                                         routes, extra="retry:\n  hedge_budget: 100%\n"))
    async with client_for(server) as client:
        events = await _responses_events(client)
    assert [e.type for e in events].count("response.created") == 1
    assert events[-1].response.output_text == "Hello from b t3 t4"
    await a.wait_for(lambda s: s.in_flight == 0)  # the loser was cancelled
