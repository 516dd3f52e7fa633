"""Failover, busy detection, breakers and clear errors, through the real OpenAI SDK."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from skyroute.proxy import Server, build_app
from skyroute.routing import parse_config

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, client_for, routing_yaml
from .conftest import upstream_yaml as entry
from .fakes import FakeClock

MESSAGES = [{"role": "user", "content": "hi"}]
ROUTE = "- model: chat\n  targets: [a, b, c]\n  strategy: priority\n"
#: a's first-token deadline: what busy detection is tested on. b and c, which answer at once,
#: keep the default (30 s), a safety bound: with 500 ms they too would time out whenever a
#: loaded machine stalls the event loop for that long, and the retries would spend the budget.
FAST = "first_token_timeout: 500ms\n"


async def _three(standin, skyroute, *, extra: str = "", **server_kwargs):
    """Upstreams a, b, c in that priority; a is the one a test makes misbehave alone."""
    ups = [await standin(name) for name in ("a", "b", "c")]
    entries = [entry(u, extra=FAST if u.name == "a" else "") for u in ups]
    server = await skyroute(routing_yaml(entries, ROUTE, extra=extra), **server_kwargs)
    return ups, server


async def _health(server) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        return await (await h.get(f"{server.url}/health")).json()


async def _load(client, n: int) -> list[str]:
    """n requests, half streaming, 8 at a time; returns who answered each."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with sem:
            if i % 2:
                stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                              stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            else:
                reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
                text = reply.choices[0].message.content
            assert text.startswith("Hello from"), text
            return text.split()[2]

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_one_upstream_failing_gives_no_client_errors(standin, skyroute):
    """With one of three upstreams in each failure mode, a mixed load sees zero errors."""
    ups, server = await _three(standin, skyroute)
    async with client_for(server) as client:
        for mode in ("error", "reset_before", "busy", "rate_limited", "reset_midstream"):
            ups[0].behaviour.mode = mode
            served = await _load(client, 40)
            assert len(served) == 40, mode
            assert set(served) <= {"a", "b", "c"}
            ups[0].behaviour.mode = "ok"


async def test_busy_upstream_is_abandoned_after_first_token_deadline(standin, skyroute):
    """A request to a busy (keep-alive only) upstream moves on and is answered by the next."""
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "busy"
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert "from b" in reply.choices[0].message.content
    await ups[0].wait_for(lambda u: u.cancelled == 1 and u.in_flight == 0)


async def test_every_upstream_down_is_a_fast_503_with_retry_after(standin):
    """With all upstreams failing, the client gets an OpenAI-shaped 503 with Retry-After.

    It is fast because, once every breaker is open, a request tries each upstream at most
    once (the panic rule's probes, paid from the retry budget) and waits nothing longer
    than ``retry.backoff_cap`` in between. That is what is checked, with the waits taken
    through the app's injected sleep and on a fake clock, so that no breaker's cool-down
    ends during the test.
    """
    ups = [await standin(name) for name in ("a", "b", "c")]
    for up in ups:
        up.behaviour.mode = "error"
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    config = parse_config(routing_yaml([entry(u) for u in ups], ROUTE), env={})
    app = build_app(config, sleep=sleep, clock=FakeClock().now)
    async with Server(config, app=app, port=0) as server, client_for(server) as client:
        for _ in range(8):  # enough to open every breaker
            with pytest.raises(openai.APIStatusError):
                await client.chat.completions.create(model="chat", messages=MESSAGES)
        tried = sum(up.requests_total for up in ups)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
        health = await _health(server)
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
            metrics = await (await h.get(f"{server.url}/metrics")).text()
    assert tried < sum(up.requests_total for up in ups) <= tried + len(ups)
    assert all(0 <= wait <= config.retry.backoff_cap_s for wait in waits), waits
    error = caught.value
    assert error.status_code == 503
    retry_after = int(error.response.headers["Retry-After"])
    assert 1 <= retry_after <= 30
    assert f"Retry after {retry_after}s" in error.message
    assert error.code == "upstream_unavailable"
    assert health["level"] == "unavailable"
    assert {u["state"] for u in health["upstreams"].values()} == {"open"}
    assert 'skyroute_panic_attempts_total{route="chat",upstream=' in metrics
    assert 'skyroute_retries_paid_total{route="chat"}' in metrics


async def test_route_is_back_with_the_first_request_that_succeeds_after_an_outage(standin,
                                                                                  skyroute):
    """Every breaker open, then the upstreams answer: the next request is served (the panic
    probe) and /health says so at once, not when the cool-downs end."""
    ups, server = await _three(standin, skyroute, extra="breaker:\n  cooldown: 30s\n")
    for up in ups:
        up.behaviour.mode = "error"
    async with client_for(server) as client:
        for _ in range(8):
            try:
                await client.chat.completions.create(model="chat", messages=MESSAGES)
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and "Retry-After" in exc.response.headers
        assert (await _health(server))["level"] == "unavailable"
        for up in ups:
            up.behaviour.mode = "ok"
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    served_by = reply.choices[0].message.content.split()[2]
    health = await _health(server)
    assert health["upstreams"][served_by]["state"] == "healthy"
    assert health["level"] != "unavailable"


async def test_every_upstream_rate_limited_is_a_429_with_the_soonest_retry_after(standin,
                                                                                 skyroute):
    """All upstreams answering 429: the client gets 429 with the soonest upstream's wait."""
    ups, server = await _three(standin, skyroute)
    for up, seconds in zip(ups, (20, 7, 12), strict=True):
        up.behaviour.mode = "rate_limited"
        up.behaviour.retry_after_s = seconds
    async with client_for(server) as client:
        try:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
        except openai.RateLimitError as exc:
            error = exc
    assert error.code == "upstream_rate_limited"
    retry_after = int(error.response.headers["Retry-After"])
    assert retry_after in (6, 7)  # 7 s from the upstream's answer, less the time since
    assert f"Retry after {retry_after}s" in error.message


async def test_bad_key_takes_the_upstream_out_of_rotation(standin, skyroute, captured_logs):
    """A 401 from an upstream: the request is served by the next, and the upstream stays out."""
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "bad_key"
    async with client_for(server) as client:
        for _ in range(3):
            reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
            assert "from b" in reply.choices[0].message.content
    assert ups[0].requests_total == 1
    health = await _health(server)
    assert health["upstreams"]["a"]["state"] == "bad_key"
    assert health["level"] == "reduced"
    errors = [e for e in captured_logs if e["log_level"] == "error"]
    assert any(e["event"] == "upstream_state_changed" and e["upstream"] == "a"
               and e["to"] == "bad_key" for e in errors)


async def test_retry_after_keeps_the_upstream_out_until_then(standin, skyroute):
    """A 429 with Retry-After keeps that upstream out of rotation while it lasts."""
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "rate_limited"
    ups[0].behaviour.retry_after_s = 60
    async with client_for(server) as client:
        for _ in range(4):
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert ups[0].requests_total == 1
    state = (await _health(server))["upstreams"]["a"]
    assert state["state"] == "open" and state["until_s"] > 50


async def test_stream_cut_after_first_token_ends_with_an_error_event(standin, skyroute):
    """A stream cut mid-way gives the client an SSE error event and never [DONE]."""
    up = await standin("a")
    up.behaviour.mode = "reset_midstream"
    server = await skyroute(routing_yaml([entry(up)]))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        resp = await h.post(f"{server.url}/v1/chat/completions",
                            json={"model": "chat", "messages": MESSAGES, "stream": True},
                            headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        raw = await resp.read()
    assert b"Hello" in raw
    assert b"[DONE]" not in raw
    assert b'"code": "stream_interrupted"' in raw


async def test_stream_cut_surfaces_as_an_error_in_the_sdk(standin, skyroute):
    """The openai SDK raises on the in-band error instead of returning a short answer."""
    up = await standin("a")
    up.behaviour.mode = "reset_midstream"
    server = await skyroute(routing_yaml([entry(up)]))
    async with client_for(server) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                      stream=True)
        try:
            async for _ in stream:
                pass
        except openai.APIError as exc:
            assert "broke off" in str(exc)
        else:
            raise AssertionError("a cut stream ended as if complete")


async def test_non_streaming_cut_fails_over_instead_of_passing_half_an_answer(standin, skyroute):
    """A JSON answer cut part-way is retried on the next upstream, not passed on."""
    ups, server = await _three(standin, skyroute)
    ups[0].behaviour.mode = "reset_midstream"
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert "from b" in reply.choices[0].message.content


async def test_breaker_opens_after_consecutive_failures_and_shows_in_metrics(standin, skyroute):
    """After repeated 503s the upstream's circuit opens; /metrics shows the state."""
    ups, server = await _three(standin, skyroute,
                               extra="breaker:\n  consecutive_failures: 2\n  cooldown: 30s\n")
    ups[0].behaviour.mode = "error"
    async with client_for(server) as client:
        for _ in range(4):
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert ups[0].requests_total == 2
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        text = await (await h.get(f"{server.url}/metrics")).text()
    assert 'skyroute_upstream_state{state="open",upstream="a"} 1.0' in text
    assert 'skyroute_failovers_total{route="chat"} 2.0' in text


async def test_hedged_request_wins_on_the_next_upstream_and_cancels_the_slow_one(standin,
                                                                                  skyroute):
    """With hedge_after, a slow first upstream is raced by the next; the loser is cancelled."""
    a, b = await standin("a"), await standin("b")
    a.behaviour.ttft_s = 3.0
    route = "- model: chat\n  targets: [a, b]\n  strategy: priority\n  hedge_after: 100ms\n"
    server = await skyroute(routing_yaml([entry(a), entry(b)], route,
                                         extra="retry:\n  hedge_budget: 100%\n"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "from b" in reply.choices[0].message.content and "from b" in text
    await a.wait_for(lambda u: u.cancelled == 2 and u.in_flight == 0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        metrics = await (await h.get(f"{server.url}/metrics")).text()
    assert 'skyroute_hedges_total{result="won",route="chat"} 2.0' in metrics


async def test_hedge_is_not_started_when_the_first_answers_in_time(standin, skyroute):
    """A fast first upstream answers alone: no second upstream call is made."""
    a, b = await standin("a"), await standin("b")
    route = "- model: chat\n  targets: [a, b]\n  strategy: priority\n  hedge_after: 2s\n"
    server = await skyroute(routing_yaml([entry(a), entry(b)], route))
    async with client_for(server) as client:
        for _ in range(3):
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert (a.requests_total, b.requests_total) == (3, 0)


async def test_backoff_between_attempts_is_waited_through_the_app_sleep(standin):
    """Failover to an untried sound upstream waits nothing; paid retries (back to upstreams
    whose breakers are open, here by the panic rule) wait full-jitter delays (within the 2 s
    and 4 s ceilings of `retry.backoff_base: 2s`) through the app's injected sleep, so the
    request is served without waiting them in wall time."""
    ups = [await standin(name) for name in ("a", "b", "c")]
    ups[0].behaviour.mode = ups[1].behaviour.mode = "error"
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    config = parse_config(routing_yaml(
        [entry(u) for u in ups], ROUTE,
        extra="retry:\n  backoff_base: 2s\n  backoff_cap: 30s\n"
              "breaker:\n  consecutive_failures: 1\n"), env={})
    async with Server(config, app=build_app(config, sleep=sleep), port=0) as server, \
            client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("Hello from c")
        assert waits == []  # a, then b failed: each move to a sound upstream is free
        # a and b are open now; c fails too, a (the least bad) fails again, b answers.
        ups[1].behaviour.mode, ups[2].behaviour.mode = "ok", "error"
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from b")
    assert len(waits) == 2
    assert 0 <= waits[0] <= 2.0 and 0 <= waits[1] <= 4.0
