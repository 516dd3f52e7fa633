"""The gateway through the official OpenAI SDK: formats, streaming, auth, errors, headers."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, UPSTREAM_KEY, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

TIMEOUT = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
MESSAGES = [{"role": "user", "content": "hi"}]


async def test_chat_completion_reaches_upstream_with_its_model_name(standin, skyroute):
    """A chat completion for alias 'chat' is served by the upstream under its own model name."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)], "- model: chat\n  targets: [us-east]\n"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from us-east")
    assert up.last_json["model"] == "deepseek-chat"
    assert up.last_json["messages"] == MESSAGES


async def test_streaming_chunks_arrive_in_order_and_incrementally(standin, skyroute):
    """SSE chunks reach the client in order while the upstream is still producing them."""
    up = await standin("us-east", behaviour=None)
    up.behaviour.token_delay_s = 0.3
    up.behaviour.tokens = 4
    server = await skyroute(routing_yaml([entry(up)]))
    pieces: list[str] = []
    upstream_busy_at_first_piece = None
    async with client_for(server) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                      stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if upstream_busy_at_first_piece is None:
                    upstream_busy_at_first_piece = up.in_flight
                pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces).startswith("Hello from us-east")
    assert len(pieces) == 4
    # The first piece was delivered while the upstream was still writing the rest.
    assert upstream_busy_at_first_piece == 1


async def test_completions_embeddings_and_models_work_unchanged(standin, skyroute):
    """Completions, embeddings, models.list and models.retrieve work through the SDK."""
    up = await standin("us-east", models=("deepseek-chat", "text-embedding-3-small"))
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        completion = await client.completions.create(model="chat", prompt="Say hi")
        assert completion.choices[0].text
        embedding = await client.embeddings.create(model="embed", input=["a", "b"])
        assert len(embedding.data) == 2
        assert up.last_json["model"] == "text-embedding-3-small"
        models = [m.id async for m in client.models.list()]
        assert sorted(models) == ["chat", "embed"]
        assert (await client.models.retrieve("chat")).id == "chat"
        with pytest.raises(openai.NotFoundError, match="nope"):
            await client.models.retrieve("nope")


async def test_other_v1_paths_pass_through_to_the_route_upstream(standin, skyroute):
    """An unknown /v1 path is passed to the upstream of the request's route."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        echoed = await client.post("/some/new/endpoint?x=1", body={"model": "chat"},
                                   cast_to=object)
    assert echoed["path"].endswith("/some/new/endpoint")
    assert echoed["upstream"] == "us-east"


async def test_client_key_never_reaches_the_upstream(standin, skyroute):
    """The upstream sees its own key and the request id, never the client's key."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions",
                               json={"model": "chat", "messages": MESSAGES},
                               headers={"Authorization": f"Bearer {CLIENT_KEY}",
                                        "X-Request-ID": "req-123", "Connection": "keep-alive",
                                        "Proxy-Authorization": "secret"})
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "req-123"
        assert resp.headers["X-Skyroute-Upstream"] == "us-east"
    assert up.last_headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert up.last_headers["X-Request-ID"] == "req-123"
    assert "Proxy-Authorization" not in up.last_headers


async def test_wrong_client_key_is_refused_with_401(standin, skyroute):
    """A wrong client key gets an OpenAI-shaped 401 and no upstream call."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    assert up.requests_total == 0


async def test_missing_client_key_is_refused_with_401(standin, skyroute):
    """A request without any key gets a 401 that says how to send one."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions",
                               json={"model": "chat", "messages": MESSAGES})
        body = await resp.json()
    assert resp.status == 401
    assert "Authorization: Bearer" in body["error"]["message"]
    assert up.requests_total == 0


async def test_unknown_model_is_404_naming_it(standin, skyroute):
    """Asking for a model no route serves is a 404 that names the model and the known ones."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert "gpt-9" in caught.value.message
    assert "chat" in caught.value.message
    assert caught.value.code == "model_not_found"


async def test_malformed_json_is_400(standin, skyroute):
    """A body that is not JSON is refused with a 400 that says so."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions", data=b"{not json",
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        body = await resp.json()
    assert resp.status == 400
    assert "not valid JSON" in body["error"]["message"]


async def test_body_over_limit_is_refused_from_content_length_before_reading(standin, skyroute):
    """A declared Content-Length over the limit is answered 413 without sending the body."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)], extra="limits:\n  max_body_bytes: 1KiB\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(CALL_TIMEOUT_S):
            status_line = await reader.readline()
    finally:
        writer.close()
    assert b" 413 " in status_line
    assert up.requests_total == 0


async def test_chunked_body_over_limit_is_refused(standin, skyroute):
    """A chunked body is refused with 413 once it passes the limit."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)], extra="limits:\n  max_body_bytes: 1KiB\n"))

    async def body():
        for _ in range(8):
            yield b"x" * 512

    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions", data=body(),
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        payload = await resp.json()
    assert resp.status == 413
    assert "max_body_bytes" in payload["error"]["message"]


async def test_dead_upstream_is_503_with_retry_after_naming_it(standin, skyroute):
    """With the only upstream refusing connections, the client gets a 503 naming it."""
    up = await standin("us-east")
    text = routing_yaml([entry(up)])
    await up.aclose()
    server = await skyroute(text)
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "1"
    assert "us-east" in caught.value.message
    assert "cannot connect" in caught.value.message
    assert "Retry after 1s" in caught.value.message


async def test_busy_upstream_past_first_token_deadline_is_503(standin, skyroute):
    """An upstream sending only keep-alives past its first-token deadline gives a 503."""
    up = await standin("us-east")
    up.behaviour.mode = "busy"
    server = await skyroute(routing_yaml([entry(up, extra="first_token_timeout: 300ms\n")]))
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert "Retry-After" in caught.value.response.headers
    assert "busy" in caught.value.message
    await up.wait_for(lambda u: u.in_flight == 0)


async def test_keepalive_comments_are_not_sent_on(standin, skyroute):
    """Keep-alive comments before the first token never reach the streaming client."""
    up = await standin("us-east")
    up.behaviour.mode = "busy"
    up.behaviour.busy_for_s = 0.3
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions",
                               json={"model": "chat", "messages": MESSAGES, "stream": True},
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        raw = await resp.read()
    assert resp.status == 200
    assert b"keep-alive" not in raw
    assert raw.startswith(b"data: ")
    assert raw.rstrip().endswith(b"data: [DONE]")


async def test_client_disconnect_cancels_the_upstream_request(standin, skyroute, captured_logs):
    """A streaming client that goes away part-way makes skyroute drop the upstream request."""
    up = await standin("us-east")
    up.behaviour.token_delay_s = 0.5
    up.behaviour.tokens = 20
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/v1/chat/completions",
                               json={"model": "chat", "messages": MESSAGES, "stream": True},
                               headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        await resp.content.readline()
        resp.close()
        await up.wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)

        async def released() -> bool:  # the attempt ended with no outcome, not as a failure
            health = await (await http.get(f"{server.url}/health")).json()
            return health["upstreams"]["us-east"]["outstanding"] == 0

        await eventually(released)
        metrics = await (await http.get(f"{server.url}/metrics")).text()
    assert "stream_cut" not in metrics  # the client left; the upstream did nothing wrong
    [line] = [e for e in captured_logs if e["event"] == "request_finished"]
    assert line["status"] == 499  # logged as the client's leaving, not a server error


async def test_wrong_method_names_the_allowed_ones(skyroute, standin):
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        resp = await http.post(f"{server.url}/health")
        body = await resp.json()
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert body["error"]["message"].startswith("POST is not allowed on /health; use ")


async def test_client_disconnect_while_waiting_cancels_the_upstream_request(standin, skyroute):
    """A client that gives up while the upstream is busy cancels the upstream request."""
    up = await standin("us-east")
    up.behaviour.mode = "busy"
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(TimeoutError):
            await http.post(f"{server.url}/v1/chat/completions",
                            json={"model": "chat", "messages": MESSAGES},
                            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                            timeout=aiohttp.ClientTimeout(total=0.3))
    await up.wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)


async def test_upstream_4xx_goes_back_untouched(standin, skyroute):
    """A 400 from the upstream is the client's problem and is passed on as it came."""
    up = await standin("us-east")
    up.behaviour.mode = "bad_request"
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert up.requests_total == 1


async def test_metrics_report_requests_latency_and_in_flight(standin, skyroute):
    """/metrics counts requests by route/upstream/status and has TTFB histograms by region."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up, region="us-east")]))
    async with client_for(server) as client:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        text = await (await http.get(f"{server.url}/metrics")).text()
    assert 'skyroute_requests_total{route="chat",status="200",upstream="us-east"} 1.0' in text
    assert 'skyroute_upstream_ttfb_seconds_count{region="us-east",upstream="us-east"} 1.0' in text
    assert 'skyroute_upstream_latency_seconds_count{region="us-east",upstream="us-east"}' in text
    assert "skyroute_in_flight_requests 0.0" in text


async def test_one_log_line_per_request_with_request_id_and_no_secrets(standin, skyroute,
                                                                      captured_logs):
    """Each request logs one 'request' line with its id, route and upstream, and no key/body."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "secret prompt"}],
            extra_headers={"X-Request-ID": "rid-42"})
    logs = captured_logs
    lines = [e for e in logs if e["event"] == "request_finished"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["request_id"], line["route"], line["upstream"], line["status"],
            line["attempts"]) == ("rid-42", "chat", "us-east", 200, 1)
    dumped = json.dumps(logs)
    assert CLIENT_KEY not in dumped and UPSTREAM_KEY not in dumped
    assert "secret prompt" not in dumped


async def test_health_lists_upstreams(standin, skyroute):
    """/health returns JSON with the level and every upstream's state."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        health = await (await http.get(f"{server.url}/health")).json()
        ready = await http.get(f"{server.url}/readyz")
    assert health["level"] == "normal"
    assert health["upstreams"]["us-east"]["state"] == "healthy"
    assert ready.status == 200
