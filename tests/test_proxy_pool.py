"""Local GPU pools end to end: skyroute scrapes its servers and picks one per request.

The pool's servers are stand-ins that serve vLLM- or SGLang-format ``/metrics``
(or none, like Ollama) and ``/health`` at their root. Where a request went is
read from the answer ("Hello from <server>"), which is what a client sees.
"""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from skyroute.proxy.demo import StandinUpstream

from .conftest import (
    CALL_TIMEOUT_S,
    UPSTREAM_KEY,
    client_for,
    eventually,
    routing_yaml,
    served_by,
)

MESSAGES = [{"role": "user", "content": "hi"}]
ADMIN_KEY = "admin-test-key"
#: Faster than the 1 s default so tests wait less; a generous timeout so a loaded
#: machine does not fail checks of servers that are up.
SCRAPE = """\
admin:
  key: admin-test-key
latency:
  scrape:
    interval: 200ms
    timeout: 5s
"""


def _pool_yaml(ups: list[StandinUpstream]) -> str:
    endpoints = ", ".join(up.base_url for up in ups)
    pool = (f"  - name: local-gpu\n    endpoints: [{endpoints}]\n    api_key: {UPSTREAM_KEY}\n"
            "    region: onprem\n    first_token_timeout: 20s\n"
            "    models: {chat: deepseek-chat}\n")
    return routing_yaml([pool], "- model: chat\n  targets: [local-gpu]\n", extra=SCRAPE)


async def _get(url: str, **kwargs) -> dict | str:
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url, **kwargs) as resp:
        assert resp.status == 200, await resp.text()
        if resp.content_type == "application/json":
            return await resp.json()
        return await resp.text()


async def _endpoints(server) -> dict[str, dict]:
    # Keyed by URL only in the admin view of /health.
    health = await _get(f"{server.url}/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return health["upstreams"]["local-gpu"]["endpoints"]


async def _samples(server) -> dict[tuple[str, str], float]:
    """``/metrics`` pool samples as (sample name, endpoint) -> value."""
    text = await _get(f"{server.url}/metrics")
    return {(s.name, s.labels["endpoint"]): s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("skyroute_pool_") for s in family.samples
            if "endpoint" in s.labels}


async def test_pool_avoids_servers_with_a_deep_queue_or_full_kv_cache(standin, skyroute):
    """A vLLM or SGLang server reporting a deep queue or a full KV cache gets no new requests."""
    ups = [await standin("gpu-a", metrics_format="vllm"),
           await standin("gpu-b", metrics_format="sglang"),
           await standin("gpu-c", metrics_format="vllm")]
    a, b, c = ups
    server = await skyroute(_pool_yaml(ups))
    async with client_for(server) as client:
        a.load["waiting"] = 40
        await eventually(lambda: _queue_of(server, a, 40), timeout=10)
        served = await served_by(client, 12, concurrency=4)
        assert served["gpu-a"] == 0 and served["gpu-b"] > 0 and served["gpu-c"] > 0, served

        a.load["waiting"], b.load["waiting"] = 0, 25  # now the SGLang server is queueing
        await eventually(lambda: _queue_of(server, b, 25), timeout=10)
        served = await served_by(client, 12, concurrency=4)
        assert served["gpu-b"] == 0 and served["gpu-a"] > 0 and served["gpu-c"] > 0, served

        b.load["waiting"], c.load["kv_cache"] = 0, 0.97
        await eventually(lambda: _kv_of(server, c, 0.97), timeout=10)
        served = await served_by(client, 12, concurrency=4)
        assert served["gpu-c"] == 0 and served["gpu-a"] > 0 and served["gpu-b"] > 0, served

    samples = await _samples(server)
    assert samples[("skyroute_pool_endpoint_kv_cache_usage", c.base_url)] == 0.97
    assert samples[("skyroute_pool_endpoint_up", a.base_url)] == 1
    assert sum(samples[("skyroute_pool_endpoint_picks_total", u.base_url)] for u in ups) == 36
    admin = await _get(f"{server.url}/admin/routing",
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin["latency"]["scrape"]["pools"] == ["local-gpu"]
    gpu = admin["routes"]["chat"]["upstreams"]["local-gpu"]
    assert gpu["endpoints"][c.base_url]["kv_cache_usage"] == 0.97


async def _queue_of(server, up: StandinUpstream, waiting: int) -> bool:
    samples = await _samples(server)
    return samples.get(("skyroute_pool_endpoint_queue_depth", up.base_url)) == waiting


async def _kv_of(server, up: StandinUpstream, share: float) -> bool:
    return (await _endpoints(server))[up.base_url]["kv_cache_usage"] == share


async def test_pool_health_check_takes_a_dead_server_out(standin, skyroute, captured_logs):
    """A server that stops answering fails its checks, leaves the pool, and requests succeed."""
    ups = [await standin(f"gpu-{i}", metrics_format="vllm") for i in range(3)]
    server = await skyroute(_pool_yaml(ups))
    dead = ups[2]
    await eventually(lambda: _reported(server, ups), timeout=10)
    await dead.aclose()

    async def is_out() -> bool:
        return (await _endpoints(server))[dead.base_url]["healthy"] is False

    await eventually(is_out, timeout=10)
    async with client_for(server) as client:
        served = await served_by(client, 10, concurrency=4)
    assert sum(served.values()) == 10 and served["gpu-2"] == 0, served
    assert served["gpu-0"] > 0 and served["gpu-1"] > 0, served

    samples = await _samples(server)
    assert samples[("skyroute_pool_endpoint_up", dead.base_url)] == 0
    assert samples[("skyroute_pool_scrape_errors_total", dead.base_url)] >= 2
    down = [e for e in captured_logs if e["log_level"] == "warning"
            and e.get("endpoint") == dead.base_url]
    assert len(down) == 1, down  # one line on the edge, not one per failed check
    assert down[0]["event"] == "pool_endpoint_health_changed" and not down[0]["healthy"]
    assert down[0]["failed_checks"] >= 2


async def _reported(server, ups: list[StandinUpstream]) -> bool:
    endpoints = await _endpoints(server)
    return all(endpoints[up.base_url]["metrics_age_s"] is not None for up in ups)


async def test_pool_without_metrics_picks_by_in_flight_count(standin, skyroute, captured_logs):
    """Servers with no /metrics (Ollama) are picked by skyroute's own in-flight counts."""
    a = await standin("gpu-a", metrics_format=None)
    b = await standin("gpu-b", metrics_format=None)
    server = await skyroute(_pool_yaml([a, b]))
    a.behaviour.mode = b.behaviour.mode = "busy"  # hold requests until released
    async with client_for(server) as client:
        held = asyncio.ensure_future(served_by(client, 4, concurrency=4))
        await a.wait_for(lambda up: up.in_flight == 2, timeout=CALL_TIMEOUT_S)
        await b.wait_for(lambda up: up.in_flight == 2, timeout=CALL_TIMEOUT_S)
        b.behaviour.mode = "ok"

        async def b_done() -> bool:  # as skyroute counts it, not only as gpu-b does
            return (await _endpoints(server))[b.base_url]["in_flight"] == 0

        await eventually(b_done, timeout=CALL_TIMEOUT_S)
        # gpu-a still holds two requests: every new one goes to gpu-b.
        served = await served_by(client, 3, concurrency=1)
        assert served == {"gpu-b": 3}, served
        a.behaviour.mode = "ok"
        async with asyncio.timeout(CALL_TIMEOUT_S):
            assert await held == {"gpu-a": 2, "gpu-b": 2}

    endpoints = await _endpoints(server)
    assert endpoints[a.base_url]["waiting"] is None and endpoints[a.base_url]["healthy"]
    assert any(e["event"] == "pool_load_source_changed" and e["source"] == "in_flight"
               and e["endpoint"] == a.base_url for e in captured_logs)
