"""Graceful degradation through the real OpenAI SDK: fallback models and minimal mode."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import CALL_TIMEOUT_S, client_for, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
FAST = "first_token_timeout: 2s\n"

# chat is served by a and b and falls back to chat-small on the local pool (gpu).
FALLBACK_ROUTES = """\
- model: chat
  targets: [a, b]
  strategy: priority
  fallback_model: chat-small
"""


async def _get(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def _health(server) -> dict:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, \
            http.get(f"{server.url}/health") as resp:
        return await resp.json()


async def _fallback_setup(standin, skyroute, mode: str, **behaviour):
    a, b = await standin("a"), await standin("b")
    gpu = await standin("gpu", models=("small-model",))
    for up in (a, b):
        up.behaviour.mode = mode
        for key, value in behaviour.items():
            setattr(up.behaviour, key, value)
    chat = "{chat: deepseek-chat}"
    server = await skyroute(routing_yaml(
        [entry(a, extra=FAST, models=chat), entry(b, extra=FAST, models=chat),
         entry(gpu, extra=FAST, models="{chat-small: small-model}")], FALLBACK_ROUTES))
    return (a, b, gpu), server


async def _stream_text(client: openai.AsyncOpenAI, **kwargs) -> tuple[dict, str]:
    """A streamed answer's response headers and its text."""
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, stream=True, **kwargs)
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    return dict(raw.headers), text


async def test_primary_targets_failing_are_answered_by_the_fallback_model(
        standin, skyroute, captured_logs):
    """Every chat attempt failing, the request is answered by chat-small, and says so."""
    (a, b, gpu), server = await _fallback_setup(standin, skyroute, "error")
    async with client_for(server) as client:
        raw = await client.chat.completions.with_raw_response.create(model="chat",
                                                                      messages=MESSAGES)
        reply = raw.parse()
        headers, text = await _stream_text(client)
    assert raw.headers["X-Skyroute-Degraded"] == "fallback"
    assert raw.headers["X-Skyroute-Fallback-Model"] == "chat-small"
    assert raw.headers["X-Skyroute-Upstream"] == "gpu"
    assert reply.choices[0].message.content.startswith("Hello from gpu")
    assert reply.model == "small-model"  # the fallback upstream's own answer
    assert gpu.last_json["model"] == "small-model"
    assert a.requests_total >= 1 and b.requests_total >= 1
    assert headers["x-skyroute-degraded"] == "fallback" and text.startswith("Hello from gpu")
    served = [e for e in captured_logs if e["event"] == "fallback_model_used"]
    assert served and served[0]["fallback"] == "chat-small" and served[0]["request_id"]
    access = [e for e in captured_logs if e["event"] == "request_finished" and e["status"] == 200]
    assert access[0]["route"] == "chat" and access[0]["upstream"] == "gpu"
    _, metrics = await _get(f"{server.url}/metrics")
    assert 'skyroute_fallback_served_total{fallback="chat-small",route="chat"} 2.0' in metrics


async def test_route_at_level_fallback_is_served_by_its_fallback_at_once(
        standin, skyroute, captured_logs):
    """chat's targets out (429, Retry-After 60s): /health says fallback and chat-small serves."""
    (a, b, _), server = await _fallback_setup(standin, skyroute, "rate_limited",
                                                retry_after_s=60)
    async with client_for(server) as client:
        await client.chat.completions.create(model="chat", messages=MESSAGES)  # a, b trip
        tried = a.requests_total + b.requests_total
        health = await _health(server)
        assert health["routes"]["chat"] == "fallback" and health["level"] == "fallback"
        assert health["fallbacks"] == {"chat": "chat-small"}
        raw = await client.chat.completions.with_raw_response.create(model="chat",
                                                                      messages=MESSAGES)
        headers, text = await _stream_text(client)
    assert raw.headers["X-Skyroute-Fallback-Model"] == "chat-small"
    assert headers["x-skyroute-fallback-model"] == "chat-small"
    assert text.startswith("Hello from gpu")
    assert a.requests_total + b.requests_total == tried  # not tried again
    changes = [e for e in captured_logs
               if e["event"] == "route_level_changed" and e["route"] == "chat"]
    assert ("reduced", "fallback") in {(e["from"], e["to"]) for e in changes}
    _, metrics = await _get(f"{server.url}/metrics")
    assert 'skyroute_degradation_level{route="chat"} 2.0' in metrics
    assert 'skyroute_degradation_level_changes_total{level="fallback",route="chat"} 1.0' \
        in metrics


async def test_fallback_failing_too_is_one_503_naming_both(standin, skyroute):
    """When the fallback fails as well, the client gets one error naming both attempts."""
    (_, _, gpu), server = await _fallback_setup(standin, skyroute, "error")
    gpu.behaviour.mode = "error"
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    message = caught.value.message
    assert "model 'chat'" in message and "fallback model 'chat-small' failed too" in message


async def _minimal_setup(standin, skyroute):
    """chat (essential) on a, other on b, spare on c; minimal below 80 % of upstreams."""
    a, b, c = await standin("a"), await standin("b"), await standin("c")
    c.behaviour.mode = "bad_key"
    server = await skyroute(routing_yaml(
        [entry(a, models="{chat: deepseek-chat}"), entry(b, models="{other: deepseek-chat}"),
         entry(c, models="{spare: deepseek-chat}")],
        "- {model: chat, targets: [a], essential: true}\n- {model: other, targets: [b]}\n",
        extra="degradation:\n  minimal: {when_available_below: 80%, max_tokens: 64}\n"))
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError):  # c's key is bad: c leaves rotation
            await client.chat.completions.create(model="spare", messages=MESSAGES)
    return (a, b, c), server


async def test_minimal_mode_refuses_routes_not_marked_essential(standin, skyroute,
                                                                captured_logs):
    """In minimal mode a non-essential model gets a 503 saying why and what is still served."""
    (_, b, _), server = await _minimal_setup(standin, skyroute)
    health = await _health(server)
    # The instance level is the worst route's: spare has no upstream left.
    assert health["level"] == "unavailable"
    assert health["routes"] == {"chat": "minimal", "other": "minimal", "spare": "unavailable"}
    assert health["minimal"] == {"active": True, "available": 2, "upstreams": 3,
                                 "when_available_below": 0.8, "essential": ["chat"]}
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="other", messages=MESSAGES)
    error = caught.value
    assert error.status_code == 503 and error.code == "minimal_mode"
    assert int(error.response.headers["Retry-After"]) >= 1
    assert "minimal mode: 2 of 3 upstreams are available" in error.message
    assert "only essential models (chat)" in error.message
    assert b.requests_total == 0
    refused = [e for e in captured_logs if e["event"] == "request_refused"]
    assert refused[0]["route"] == "other" and refused[0]["request_id"]
    assert any(e["event"] == "route_level_changed" and e["route"] == "chat"
               and (e["from"], e["to"]) == ("normal", "minimal") for e in captured_logs)
    _, metrics = await _get(f"{server.url}/metrics")
    assert 'skyroute_degraded_refusals_total{reason="not_essential",route="other"} 1.0' \
        in metrics
    assert "skyroute_minimal_mode 1.0" in metrics


async def test_minimal_mode_caps_max_tokens_of_essential_routes(standin, skyroute):
    """An essential route is served with max_tokens capped, or added when the request had none."""
    (a, _, _), server = await _minimal_setup(standin, skyroute)
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                     max_tokens=1000)
        assert reply.choices[0].message.content.startswith("Hello from a")
        assert a.last_json["max_tokens"] == 64
        await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert a.last_json["max_tokens"] == 64
        await client.chat.completions.create(model="chat", messages=MESSAGES,
                                             max_completion_tokens=10)
        assert a.last_json["max_completion_tokens"] == 10 and "max_tokens" not in a.last_json
        _, text = await _stream_text(client, max_tokens=500)
        assert text.startswith("Hello from a") and a.last_json["max_tokens"] == 64
    _, metrics = await _get(f"{server.url}/metrics")
    assert 'skyroute_max_tokens_capped_total{route="chat"} 3.0' in metrics


async def test_minimal_mode_refuses_more_than_max_n_choices(standin, skyroute):
    """n above degradation.minimal.max_n is refused with a message saying why and what to send."""
    (a, _, _), server = await _minimal_setup(standin, skyroute)
    async with client_for(server) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES, n=3)
        await client.chat.completions.create(model="chat", messages=MESSAGES, n=1)
    error = caught.value
    assert error.status_code == 503 and error.code == "minimal_mode"
    assert error.body["param"] == "n"
    assert "at most 1 choice(s) (degradation.minimal.max_n); this one asked for n=3" \
        in error.message
    assert a.requests_total == 1  # only the n=1 request went upstream
    _, metrics = await _get(f"{server.url}/metrics")
    assert 'skyroute_degraded_refusals_total{reason="n_above_max",route="chat"} 1.0' in metrics
