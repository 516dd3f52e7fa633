"""Slow and greedy clients: head, body and keep-alive timeouts, the connection cap; full upstream
pools and per-key concurrency."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from skyroute.proxy import Server
from skyroute.proxy.demo import StandinUpstream
from skyroute.routing import parse_config

from .conftest import (
    CALL_TIMEOUT_S,
    CLIENT_KEY,
    client_for,
    eventually,
    routing_yaml,
    upstream_yaml,
)
from .hostile import RAW_TIMEOUT_S, raw_request
from .test_proxy_hostile_streams import DONE, ScriptedUpstream, _chunk

HALF_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
             b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n")


async def _config(standin: Callable[..., Awaitable[StandinUpstream]], limits: str) -> str:
    up = await standin("a")
    return routing_yaml([upstream_yaml(up)], extra=f"limits:\n{limits}")


class HalfSent:
    """Many connections that each sent part of a request head and then nothing."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []

    async def open(self, port: int, n: int, *, batch: int = 100) -> None:
        for start in range(0, n, batch):
            async with asyncio.timeout(RAW_TIMEOUT_S):  # the batch connects at once
                pairs = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                               for _ in range(min(batch, n - start))))
            for reader, writer in pairs:
                writer.write(HALF_HEAD)
                self.readers.append(reader)
                self.writers.append(writer)
            await asyncio.gather(*(w.drain() for _, w in pairs))

    def closed_by_server(self) -> int:
        return sum(r.at_eof() for r in self.readers)

    async def aclose(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def half_sent() -> AsyncIterator[HalfSent]:
    held = HalfSent()
    yield held
    await held.aclose()


async def _chat_ok(server: Server, n: int) -> None:
    async with client_for(server) as client:
        for _ in range(n):
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.startswith("Hello from a")


async def test_1000_half_sent_requests_do_not_stop_normal_ones(standin, skyroute, half_sent):
    """1,000 connections holding half a request head stay open; normal requests succeed."""
    server = await skyroute(await _config(standin, "  max_client_connections: 2000\n"))
    await half_sent.open(server.port, 1000)
    await eventually(lambda: server.guard.open_connections >= 1000, timeout=10)
    await _chat_ok(server, 20)
    assert half_sent.closed_by_server() == 0
    metrics = await raw_request(server.port, "GET /metrics HTTP/1.1\r\nHost: x")
    assert b"skyroute_client_connections " in metrics.body


async def test_at_the_cap_half_sent_connections_make_room(standin, skyroute, half_sent):
    """With more half-sent connections than the cap, the oldest are closed for new clients."""
    server = await skyroute(await _config(standin, "  max_client_connections: 50\n"))
    await half_sent.open(server.port, 300)
    await _chat_ok(server, 10)
    assert server.guard.open_connections <= 50
    metrics = (await raw_request(server.port, "GET /metrics HTTP/1.1\r\nHost: x")).body.decode()
    evicted = next(line for line in metrics.splitlines()
                   if line.startswith('skyroute_client_connections_closed_total{reason="evicted"}'))
    assert float(evicted.split()[-1]) >= 250


async def test_head_not_complete_in_time_gets_408_and_is_closed(standin, skyroute):
    """A request head still incomplete after limits.head_timeout gets a 408 and a close."""
    server = await skyroute(await _config(standin, "  head_timeout: 200ms\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HALF_HEAD)
        async with asyncio.timeout(RAW_TIMEOUT_S):
            data = await reader.read()  # until the server closes
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in data and b"limits.head_timeout" in data


@pytest.mark.parametrize(("content_type", "start"), [
    (b"application/json", b'{"model":'),
    (b"multipart/form-data; boundary=xx", b'--xx\r\nContent-Disposition: form-data; name="a"'),
], ids=["json", "upload"])
async def test_body_paused_too_long_gets_408(standin, skyroute, content_type, start):
    """A JSON body or an upload that stops arriving for limits.body_timeout gets an
    OpenAI-shaped 408."""
    server = await skyroute(await _config(standin, "  body_timeout: 200ms\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HALF_HEAD + b"Content-Type: " + content_type + b"\r\n"
                                 b"Content-Length: 100\r\n\r\n" + start)
        async with asyncio.timeout(RAW_TIMEOUT_S):
            data = await reader.read()
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'"type": "invalid_request_error"' in data and b"limits.body_timeout" in data


async def test_idle_keepalive_connection_is_closed(standin, skyroute):
    """A kept-alive connection idle for limits.keepalive_timeout is closed by skyroute."""
    server = await skyroute(await _config(standin, "  keepalive_timeout: 200ms\n"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(RAW_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        async with asyncio.timeout(RAW_TIMEOUT_S):
            rest = await reader.read()  # EOF once closed
    finally:
        writer.close()
    assert rest.endswith(b'{"status": "alive"}')


async def test_at_the_cap_with_every_connection_busy_new_ones_get_503(standin, skyroute):
    """When every connection serves a request, a new one gets a 503 with Retry-After."""
    up = await standin("a")
    up.behaviour.mode = "busy"
    server = await skyroute(routing_yaml([upstream_yaml(up, extra="first_token_timeout: 30s")],
                                         extra="limits:\n  max_client_connections: 2\n"))
    async with client_for(server) as client:
        calls = [asyncio.create_task(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])) for _ in range(2)]
        try:
            await up.wait_for(lambda u: u.in_flight == 2)
            answer = await raw_request(server.port, "GET /livez HTTP/1.1\r\nHost: x")
        finally:
            up.behaviour.mode = "ok"
            await asyncio.gather(*calls)
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    assert "max_client_connections" in answer.json()["error"]["message"]


# -- upstream connection slots and per-key concurrency ------------------------------------

def _routes_ab() -> str:
    return "- model: chat\n  targets: [a, b]\n  strategy: priority\n"


async def test_full_upstream_pool_fails_over_without_blaming_the_upstream(standin, skyroute):
    """With a's max_connections all held, the next request waits pool_timeout, then goes to b;
    a stays healthy (the wait is skyroute's, not a's)."""
    a, b = await standin("a"), await standin("b")
    a.behaviour.mode = "busy"
    extra = "first_token_timeout: 30s\nmax_connections: 2\npool_timeout: 200ms"
    server = await skyroute(routing_yaml([upstream_yaml(a, extra=extra), upstream_yaml(b)],
                                         _routes_ab()))
    async with client_for(server) as client:
        held = [asyncio.create_task(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])) for _ in range(2)]
        try:
            await a.wait_for(lambda u: u.in_flight == 2)
            reply = await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content.startswith("Hello from b")
            assert a.requests_total == 2  # the third never reached a
        finally:
            a.behaviour.mode = "ok"
            answers = await asyncio.gather(*held)
    assert all(r.choices[0].message.content.startswith("Hello from a") for r in answers)
    health = await raw_request(server.port, "GET /health HTTP/1.1\r\nHost: x")
    assert health.json()["upstreams"]["a"]["state"] == "healthy"
    assert health.json()["upstreams"]["a"]["breaker"] == "CLOSED"
    metrics = (await raw_request(server.port, "GET /metrics HTTP/1.1\r\nHost: x")).body.decode()
    assert 'skyroute_attempts_total{outcome="pool_full",upstream="a"} 1.0' in metrics


async def test_client_key_over_max_concurrent_gets_429(standin, skyroute):
    """A key with max_concurrent: 1 and one request in flight gets a 429 for a second one."""
    up = await standin("a")
    up.behaviour.mode = "busy"
    auth = (f"auth:\n  api_keys:\n    - name: tests\n      key: {CLIENT_KEY}\n"
            "      max_concurrent: 1\n")
    text = routing_yaml([upstream_yaml(up, extra="first_token_timeout: 30s")], auth=False,
                        extra=auth)
    server = await skyroute(text)
    async with client_for(server) as client:
        held = asyncio.create_task(client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]))
        try:
            await up.wait_for(lambda u: u.in_flight == 1)
            answer = await raw_request(
                server.port, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
                "Content-Length: 2", b"{}")
        finally:
            up.behaviour.mode = "ok"
            await held
    assert answer.status == 429
    assert answer.json()["error"]["code"] == "too_many_concurrent_requests"
    assert answer.headers["retry-after"] == "1"


async def test_a_client_that_stops_reading_a_stream_is_cut_off():
    """A client reading nothing of a stream for limits.send_timeout is disconnected, so its
    upstream connection is freed; counted as send_timeout."""
    upstream = ScriptedUpstream()
    await upstream.start()
    upstream.pieces = [_chunk("x" * 60_000) for _ in range(400)] + [DONE]  # ~24 MB
    config = parse_config(
        f"listen: 127.0.0.1:0\nauth: {{api_keys: [{{name: t, key: {CLIENT_KEY}}}]}}\n"
        "limits: {send_timeout: 300ms}\n"
        f"upstreams: [{{name: s, url: 'http://127.0.0.1:{upstream.port}/v1', "
        "models: {chat: m}}]\n", env={})
    server = Server(config, port=0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        body = b'{"model": "chat", "stream": true, "messages": []}'
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()

        async def cut_off() -> bool:
            answer = await raw_request(server.port, "GET /metrics HTTP/1.1\r\nHost: x")
            return b'skyroute_client_connections_closed_total{reason="send_timeout"} 1.0' \
                in answer.body

        await eventually(cut_off, timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(ConnectionError):  # the abort may show as a reset
            async with asyncio.timeout(CALL_TIMEOUT_S):
                while await reader.read(1 << 20):  # drains what was sent, then EOF
                    pass
    finally:
        writer.close()
        await server.aclose()
        await upstream.aclose()
