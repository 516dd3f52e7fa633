"""Benchmark: the response cache on a Zipf workload, from memory and from a shared Redis.

A stand-in upstream answers its first token after ``--ttft`` (default 300 ms, a realistic
hosted model) and 5 tokens ``--token-delay`` apart. The workload: ``--requests`` (20,000)
chat completions drawn from ``--distinct`` (2,000) deterministic prompts (``temperature: 0``)
with Zipf exponent ``--exponent`` (1.1), every other one streaming, sent ``--concurrency`` at
a time through one skyroute with ``cache: exact`` (memory only), then through two instances
that share Redis (127.0.0.1:6379 unless ``--redis``; lookup timeout ``--redis-timeout``,
50 ms, since everything shares one event loop), requests alternating between them.

Printed: upstream calls made, the saving (1 - calls/requests) against the ideal for the
trace (1 - distinct/requests) and its share of the ideal; hit latency p50/p99 from memory
and from Redis (an instance whose memory level is too small to keep anything) next to a
miss and next to a 0 ms upstream reached directly (the "added" figure is hit minus direct);
the memory level's bytes per entry. The load generator, stand-ins and skyroute share one
event loop (uvloop) in this process, so absolute latencies include the generator's own
cost; compare them with the direct baseline measured in the same run.

Goals (issue 15): >= 98 % of the ideal saving; a hit adds < 1 ms at p50 from memory and
< 3 ms from Redis.

Usage: python bench/cache.py [--requests 20000] [--distinct 2000] [--exponent 1.1]
                             [--concurrency 32] [--ttft 0.3] [--redis redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop
from skyroute.proxy import Server, configure_logging
from skyroute.proxy._cache import CACHE
from skyroute.proxy.demo import Behaviour, StandinUpstream
from skyroute.routing import parse_config

KEY = "sk-bench"
TIMEOUT = aiohttp.ClientTimeout(total=60)
GOAL_SHARE, GOAL_MEMORY_MS, GOAL_REDIS_MS = 0.98, 1.0, 3.0


def zipf_trace(n: int, distinct: int, exponent: float, seed: int = 15) -> list[int]:
    """``n`` prompt indices in ``range(distinct)``, rank ``k`` drawn with weight ``k**-s``."""
    weights = [1 / (k + 1) ** exponent for k in range(distinct)]
    return random.Random(seed).choices(range(distinct), weights=weights, k=n)


def routing_file(upstream: str, *, redis: str | None, prefix: str, memory: str = "256MiB",
                 redis_timeout: str = "5ms") -> str:
    shared = (f"  redis: {{url: '{redis}', timeout: {redis_timeout}, prefix: '{prefix}'}}\n"
              if redis else "")
    return (f"listen: 127.0.0.1:0\nauth:\n  api_keys:\n    - {{name: bench, key: {KEY}}}\n"
            f"cache:\n  memory: {{max_bytes: {memory}}}\n{shared}"
            f"upstreams:\n  - {{name: a, url: {upstream}, models: {{chat: deepseek-chat}}}}\n"
            "routes:\n  - {model: chat, targets: [a], cache: exact}\n")


def body(prompt: int, stream: bool) -> bytes:
    return json.dumps({"model": "chat", "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": f"question number {prompt}"}]
                       }).encode()


async def one(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[float, str]:
    """Send one request; its latency to the last byte and its x-skyroute-cache."""
    started = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", data=data,
                         headers={"Authorization": f"Bearer {KEY}",
                                  "Content-Type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}")
        return time.perf_counter() - started, resp.headers.get("x-skyroute-cache", "-")


async def replay(http: aiohttp.ClientSession, urls: Sequence[str], trace: list[int],
                 concurrency: int) -> list[tuple[float, str]]:
    queue = iter(enumerate(trace))
    results: list[tuple[float, str]] = []

    async def worker() -> None:
        for i, prompt in queue:
            url = urls[(i // 2) % len(urls)]  # every instance gets streams and JSON alike
            results.append(await one(http, url, body(prompt, i % 2 == 1)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(q * len(values)))]


async def sequential(http: aiohttp.ClientSession, url: str, prompts: list[int]) -> list[float]:
    return [(await one(http, url, body(p, False)))[0] for p in prompts]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    trace = zipf_trace(args.requests, args.distinct, args.exponent)
    ideal = 1 - len(set(trace)) / len(trace)
    behaviour = Behaviour(ttft_s=args.ttft, token_delay_s=args.token_delay)
    report: dict[str, Any] = {"requests": len(trace), "distinct_in_trace": len(set(trace)),
                              "ideal_saving": round(ideal, 4)}
    async with StandinUpstream("a", behaviour=behaviour) as slow, \
            StandinUpstream("zero") as zero, aiohttp.ClientSession(timeout=TIMEOUT) as http:
        prefix = f"skyroute-bench:{uuid.uuid4().hex}:"
        # memory only
        server = Server(parse_config(routing_file(slow.base_url, redis=None, prefix=prefix),
                                     env={}), port=0, grace_s=1.0)
        await server.start()
        try:
            await replay(http, [server.url], trace, args.concurrency)
            calls = slow.requests_total
            report["memory"] = {"upstream_calls": calls, "saving": round(1 - calls / len(trace), 4),
                                "share_of_ideal": round((1 - calls / len(trace)) / ideal, 4)}
            state = server.app[CACHE].state() or {}
            memory = state["memory"]
            report["memory"]["bytes_per_entry"] = round(memory["bytes"] / memory["entries"])
            hot = sorted(set(trace))[:200]
            report["memory"]["hit_ms"] = await _latencies(http, server.url, zero, hot)
        finally:
            await server.aclose()
        # two instances sharing Redis; a third that keeps nothing in memory reads Redis only
        before = slow.requests_total
        servers = [Server(parse_config(routing_file(slow.base_url, redis=args.redis,
                                                    prefix=prefix, memory=m,
                                                    redis_timeout=args.redis_timeout), env={}),
                          port=0, grace_s=1.0) for m in ("256MiB", "256MiB", "1")]
        for s in servers:
            await s.start()
        try:
            await replay(http, [servers[0].url, servers[1].url], trace, args.concurrency)
            calls = slow.requests_total - before
            report["redis"] = {"upstream_calls": calls, "saving": round(1 - calls / len(trace), 4),
                               "share_of_ideal": round((1 - calls / len(trace)) / ideal, 4)}
            report["redis"]["hit_ms"] = await _latencies(http, servers[2].url, zero,
                                                         sorted(set(trace))[:200])
            report["redis"]["series"] = [await _cache_series(http, s.url) for s in servers]
        finally:
            for s in servers:
                await s.aclose()
            await _forget(args.redis, prefix)
        report["miss_ms_p50"] = round(args.ttft * 1000, 1)
    return report


async def _latencies(http: aiohttp.ClientSession, url: str, zero: StandinUpstream,
                     prompts: list[int]) -> dict[str, float]:
    """Hit p50/p99 for ``prompts`` (all stored) and the same requests to a 0 ms upstream."""
    hits = await sequential(http, url, prompts)
    direct = []
    for p in prompts:
        started = time.perf_counter()
        async with http.post(f"{zero.base_url}/chat/completions", data=body(p, False),
                             headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
        direct.append(time.perf_counter() - started)
    return {"p50": round(ms(hits, 0.5), 3), "p99": round(ms(hits, 0.99), 3),
            "direct_0ms_p50": round(ms(direct, 0.5), 3),
            "added_p50": round(ms(hits, 0.5) - ms(direct, 0.5), 3),
            "mean": round(1000 * statistics.fmean(hits), 3)}


async def _cache_series(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """An instance's skyroute_cache_* samples (requests by result, Redis errors)."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("skyroute_cache_") and "_created" not in line}


async def _forget(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start:start + 500])
    finally:
        await client.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--distinct", type=int, default=2_000)
    parser.add_argument("--exponent", type=float, default=1.1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ttft", type=float, default=0.3)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    # Generous by default: load generator, stand-ins and three instances share one event
    # loop here, so a lookup often waits behind other requests' work, not behind Redis.
    parser.add_argument("--redis-timeout", default="50ms")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(level="warning", json=True)
    report = uvloop.run(run(args))
    print(json.dumps(report, indent=2))
    ok = (report["memory"]["share_of_ideal"] >= GOAL_SHARE
          and report["redis"]["share_of_ideal"] >= GOAL_SHARE
          and report["memory"]["hit_ms"]["added_p50"] < GOAL_MEMORY_MS
          and report["redis"]["hit_ms"]["added_p50"] < GOAL_REDIS_MS)
    print(f"goals (>= {GOAL_SHARE:.0%} of ideal on both, added p50 < {GOAL_MEMORY_MS} ms memory, "
          f"< {GOAL_REDIS_MS} ms Redis): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
