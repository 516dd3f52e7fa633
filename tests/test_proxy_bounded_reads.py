"""Answers skyroute reads for itself stop at their cap, chunked ones included.

A pool server's ``/metrics`` and a Prometheus query answer are read by skyroute, not
passed on; a peer that streams an endless chunked body (no Content-Length to refuse
it by) must cost a bounded read and a clear error, not all of skyroute's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from skyroute.proxy._pool_scrape import MAX_METRICS_BYTES, check_endpoint
from skyroute.proxy._prometheus import MAX_ANSWER_BYTES, QueryFailed, query_latency
from skyroute.routing import PoolScrape, PrometheusSource, parse_config

from .conftest import CALL_TIMEOUT_S

CHUNK = b"# " + b"x" * 65_533 + b"\n"


@contextlib.asynccontextmanager
async def endless_server(path: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A server whose ``path`` streams chunks until the client goes away (``/health`` is
    200); yields its URL and how many bytes each endless answer got out."""
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)  # no Content-Length: chunked
        sent.append(0)
        with contextlib.suppress(ConnectionError):
            while sent[-1] < 64 * MAX_ANSWER_BYTES:  # a bound for the test itself
                await resp.write(CHUNK)
                sent[-1] += len(CHUNK)
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get(path, endless)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", sent
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        yield http


async def test_an_endless_chunked_prometheus_answer_is_refused_at_the_cap(session):
    async with endless_server("/api/v1/query") as (url, sent):
        source = PrometheusSource(url=url, timeout_s=CALL_TIMEOUT_S)
        with pytest.raises(QueryFailed) as failed:
            await query_latency(session, source)
    assert failed.value.result == "error"
    assert f"over {MAX_ANSWER_BYTES} bytes" in str(failed.value)
    assert sent and sent[0] < 64 * MAX_ANSWER_BYTES  # skyroute hung up well before the end


async def test_an_endless_chunked_pool_metrics_answer_is_refused_at_the_cap(session):
    async with endless_server("/metrics") as (url, sent):
        config = parse_config(
            "listen: 127.0.0.1:0\nupstreams:\n"
            f"  - name: gpu\n    endpoints: [{url}/v1]\n    models: {{chat: m}}\n", env={})
        scrape = PoolScrape(timeout_s=CALL_TIMEOUT_S)
        async with asyncio.timeout(CALL_TIMEOUT_S * 2):
            check = await check_endpoint(session, config.upstreams[0], f"{url}/v1", scrape)
    assert check.health_error is None
    assert check.metrics_error == f"{url}/metrics: the answer is over {MAX_METRICS_BYTES} bytes"
    assert check.load is None
    assert sent and sent[0] < 64 * MAX_ANSWER_BYTES
