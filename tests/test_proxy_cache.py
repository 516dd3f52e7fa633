"""The response cache (issue 15) through the openai SDK, with stand-in upstreams and real Redis.

Redis: the one on 127.0.0.1:6379 for sharing between instances (each test uses its
own key prefix), and a ``redis-server`` of the test's own on a free port where a
test stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

TIMEOUT = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
SHARED_REDIS = "redis://127.0.0.1:6379/0"
ASK = [{"role": "user", "content": "what is 2+2?"}]


def _route(cache: str = "exact", scope: str = "key", **extra: str) -> str:
    more = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return f"- model: chat\n  targets: [a]\n  cache: {cache}\n  cache_scope: {scope}\n{more}"


def _cache_section(redis_url: str | None = None, *, prefix: str | None = None,
                   timeout: str = "1s", extra: str = "") -> str:
    lines = ["cache:", "  ttl: 10m"]
    if redis_url is not None:
        lines.append(f"  redis: {{url: '{redis_url}', timeout: {timeout}, "
                     f"prefix: '{prefix or 'skyroute-test:' + uuid.uuid4().hex + ':'}'}}")
    lines += ["  " + line for line in extra.splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


async def _chat(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    return await client.chat.completions.with_raw_response.create(
        model="chat", messages=ASK, **kwargs)


async def _stream_text(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[str, Any, list[Any]]:
    kwargs.setdefault("temperature", 0)
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=ASK, stream=True, **kwargs)
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, raw.headers, chunks


async def _metrics(server: Any) -> str:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        return await (await http.get(f"{server.url}/metrics")).text()


async def test_hit_miss_and_bypass(standin, skyroute, captured_logs):
    """A deterministic request is a miss, then a hit with Age; a sampled one bypasses."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        first = await _chat(client)
        second = await _chat(client)
        sampled = await _chat(client, temperature=0.7)
    assert first.headers["x-skyroute-cache"] == "miss"
    assert second.headers["x-skyroute-cache"] == "hit"
    assert int(second.headers["Age"]) >= 0
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert sampled.headers["x-skyroute-cache"] == "bypass"
    assert up.requests_total == 2  # the hit never reached the upstream
    metrics = await _metrics(server)
    assert 'skyroute_cache_requests_total{result="hit",route="chat"} 1.0' in metrics
    assert 'skyroute_cache_requests_total{result="miss",route="chat"} 1.0' in metrics
    assert 'skyroute_cache_requests_total{result="bypass",route="chat"} 1.0' in metrics
    assert 'skyroute_cache_entries{level="memory"} 1.0' in metrics
    finished = [e for e in captured_logs if e["event"] == "request_finished"]
    assert [e.get("cache") for e in finished] == ["miss", "hit", "bypass"]
    assert all(e.get("request_id") for e in finished)


async def test_a_limited_key_gets_its_rate_limit_and_cache_headers_on_one_answer(standin,
                                                                               skyroute):
    """Both kinds of headers the answer gets when it is prepared arrive together: the key's
    x-ratelimit-* and what the cache did, on a miss, on a hit and on a bypass."""
    up = await standin("a")
    auth = f"auth:\n  api_keys:\n    - name: tests\n      key: {CLIENT_KEY}\n      rpm: 100\n"
    server = await skyroute(routing_yaml([entry(up)], _route(), auth=False, extra=auth))
    async with client_for(server) as client:
        answers = [await _chat(client), await _chat(client), await _chat(client, temperature=0.7)]
    assert [a.headers["x-skyroute-cache"] for a in answers] == ["miss", "hit", "bypass"]
    assert [a.headers["x-ratelimit-limit-requests"] for a in answers] == ["100"] * 3
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["99", "98", "97"]


async def test_cache_always_caches_sampled_requests_and_off_caches_nothing(standin, skyroute):
    """cache: always caches a sampled request; a route without cache never says a thing."""
    up = await standin("a")
    models = "{chat: deepseek-chat, other: deepseek-chat}"
    server = await skyroute(routing_yaml([entry(up, models=models)], _route("always") + (
        "- model: other\n  targets: [a]\n")))
    async with client_for(server) as client:
        await _chat(client, temperature=1.0)
        again = await _chat(client, temperature=1.0)
        plain = await client.chat.completions.with_raw_response.create(
            model="other", messages=ASK, temperature=0)
    assert again.headers["x-skyroute-cache"] == "hit"
    assert "x-skyroute-cache" not in plain.headers


async def test_cache_control_no_store_and_no_cache(standin, skyroute):
    """no-store neither reads nor writes; no-cache does not read but stores the fresh answer."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        nostore = await _chat(client, extra_headers={"Cache-Control": "no-store"})
        after_nostore = await _chat(client, extra_headers={"Cache-Control": "no-cache"})
        hit = await _chat(client)
    assert nostore.headers["x-skyroute-cache"] == "bypass"
    assert after_nostore.headers["x-skyroute-cache"] == "miss"  # nothing stored, and no read
    assert hit.headers["x-skyroute-cache"] == "hit"  # no-cache stored it
    assert up.requests_total == 2


async def test_stream_replayed_from_a_json_entry(standin, skyroute):
    """A JSON answer's entry serves a stream: role chunk, content, finish, usage, [DONE]."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        first = (await _chat(client)).parse()
        text, headers, chunks = await _stream_text(
            client, stream_options={"include_usage": True})
    assert headers["x-skyroute-cache"] == "hit"
    assert text == first.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == first.usage.total_tokens
    assert up.requests_total == 1


async def test_json_served_from_a_streamed_entry(standin, skyroute):
    """A stream that ended whole is stored; a JSON request then gets it assembled."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        text, headers, _ = await _stream_text(client)
        hit = await _chat(client)
        replay, replay_headers, _ = await _stream_text(client)
    assert headers["x-skyroute-cache"] == "miss"
    assert hit.headers["x-skyroute-cache"] == "hit"
    assert hit.parse().choices[0].message.content == text
    assert hit.parse().choices[0].finish_reason == "stop"
    assert replay_headers["x-skyroute-cache"] == "hit" and replay == text
    assert up.requests_total == 1


async def test_cut_stream_is_never_stored(standin, skyroute):
    """A stream cut part-way reaches the client as an error and is not cached."""
    up = await standin("a")
    up.behaviour.mode = "reset_midstream"
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        for _ in range(2):
            with pytest.raises(openai.APIError):
                await _stream_text(client)
    assert up.requests_total == 2
    assert 'skyroute_cache_stores_total' not in (await _metrics(server)).replace(
        "# HELP skyroute_cache_stores_total", "").replace("# TYPE skyroute_cache_stores_total", "")


async def test_key_scope_isolates_clients_and_shared_does_not(standin, skyroute):
    """cache_scope key: one key's entry is never served to another; shared: it is."""
    up = await standin("a")
    keys = ("auth:\n  api_keys:\n    - {name: one, key: sk-one}\n    - {name: two, key: sk-two}\n")
    for scope, second in (("key", "miss"), ("shared", "hit")):
        server = await skyroute(routing_yaml([entry(up)], _route(scope=scope), auth=False,
                                             extra=keys))
        async with client_for(server, key="sk-one") as one, \
                client_for(server, key="sk-two") as two:
            await _chat(one)
            other = await _chat(two)
            again = await _chat(one)
        assert other.headers["x-skyroute-cache"] == second, scope
        assert again.headers["x-skyroute-cache"] == "hit"


async def test_two_instances_share_redis(standin, skyroute):
    """The second instance hits, from Redis, what the first stored."""
    up = await standin("a")
    cache = _cache_section(SHARED_REDIS)
    first = await skyroute(routing_yaml([entry(up)], _route(), extra=cache))
    second = await skyroute(routing_yaml([entry(up)], _route(), extra=cache))
    async with client_for(first) as client:
        await _chat(client)
    assert await _redis_keys(cache) == 1
    async with client_for(second) as client:
        hit = await _chat(client)
        _, headers, _ = await _stream_text(client)
    await _redis_keys(cache, delete=True)
    assert hit.headers["x-skyroute-cache"] == "hit"
    assert headers["x-skyroute-cache"] == "hit"
    assert up.requests_total == 1


async def _redis_keys(cache_section: str, *, delete: bool = False) -> int:
    """How many keys the test's prefix has in the shared Redis, once the write landed."""
    import redis.asyncio as aioredis

    prefix = cache_section.split("prefix: '")[1].split("'")[0]
    client = aioredis.Redis.from_url(SHARED_REDIS, socket_timeout=CALL_TIMEOUT_S)
    try:
        for _ in range(200):
            everything = [k async for k in client.scan_iter(match=prefix + "*")]
            # Entries: the prefix and a SHA-256 in hex (not claims or the size measurement).
            keys = [k for k in everything if len(k) == len(prefix.encode()) + 64]
            if keys:
                ttl = await client.ttl(keys[0])
                assert 0 < ttl <= 600 + 3600  # the TTL is set in Redis
                if delete:
                    await client.delete(*everything)
                return len(keys)
            await asyncio.sleep(0.01)
        if delete and everything:
            await client.delete(*everything)
        return 0
    finally:
        await client.aclose()


async def test_coalescing_makes_one_upstream_call(standin, skyroute):
    """100 identical concurrent requests, half streaming, make one upstream call."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.3  # long enough that all of them arrive while it is in flight
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server, max_retries=0) as client:
        async def one(i: int) -> str:
            if i % 2:
                text, _, _ = await _stream_text(client)
                return text
            return (await _chat(client)).parse().choices[0].message.content

        texts = await asyncio.gather(*(one(i) for i in range(100)))
    assert len(set(texts)) == 1
    assert up.requests_total == 1
    assert 'skyroute_cache_coalesced_total{route="chat"} 99.0' in await _metrics(server)


async def test_two_instances_coalesce_through_redis(standin, skyroute):
    """50 identical concurrent requests split over two instances that share Redis, half
    streaming, make one upstream call: the instance that claims the prompt calls, the
    other waits for its entry."""
    up = await standin("a")
    up.behaviour.ttft_s = 0.3
    # A generous lookup timeout: 50 new Redis connections at once on a loaded machine must
    # not count as Redis being down (then nothing is claimed, by design).
    cache = _cache_section(SHARED_REDIS, timeout="5s")
    servers = [await skyroute(routing_yaml([entry(up)], _route(), extra=cache))
               for _ in range(2)]
    async with client_for(servers[0]) as first, client_for(servers[1]) as second:
        async def one(i: int) -> str:
            client = (first, second)[i % 2]
            if i // 2 % 2:
                text, _, _ = await _stream_text(client)
                return text
            return (await _chat(client)).parse().choices[0].message.content

        texts = await asyncio.gather(*(one(i) for i in range(50)))
    await _redis_keys(cache, delete=True)
    assert len(set(texts)) == 1 and texts[0]
    assert up.requests_total == 1


async def test_waiters_go_upstream_when_the_owning_instance_dies(standin, skyroute, tmp_path):
    """The instance calling upstream for a prompt is killed mid-call: the other instance's
    waiters for it go upstream themselves once its claim lapses, with no client error."""
    up = await standin("a")
    up.behaviour.ttft_s = 60.0  # the owner's call hangs until the owner is killed
    cache = _cache_section(SHARED_REDIS, timeout="5s")
    text = routing_yaml([entry(up)], _route(), extra=cache)
    path = tmp_path / "owner.yaml"
    path.write_text(text)
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "skyroute.proxy.cli", "--log-format", "json", "run", "-c",
        str(path), "--workers", "1", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        url = await _started_url(owner)
        waiter = await skyroute(text)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            owners_call = asyncio.create_task(http.post(
                f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                json={"model": "chat", "messages": ASK, "temperature": 0}))
            await eventually(lambda: up.requests_total == 1, timeout=CALL_TIMEOUT_S)
            async with client_for(waiter) as client:
                async def one(i: int) -> str:
                    if i % 2:
                        streamed, _, _ = await _stream_text(client)
                        return streamed
                    return (await _chat(client)).parse().choices[0].message.content

                waiters = [asyncio.create_task(one(i)) for i in range(10)]

                async def waiting() -> bool:
                    health = await (await http.get(f"{waiter.url}/health")).json()
                    return health["cache"]["waiting_on_other_instances"] == 1

                await eventually(waiting, timeout=CALL_TIMEOUT_S)
                owner.kill()
                await owner.wait()
                up.behaviour.ttft_s = 0.0
                texts = await asyncio.gather(*waiters)
            with pytest.raises(aiohttp.ClientError):
                await owners_call
        metrics = await _metrics(waiter)
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
        await _redis_keys(cache, delete=True)
    assert len(set(texts)) == 1 and texts[0]
    assert up.requests_total == 2  # the dead owner's call, then the waiters' one
    assert 'skyroute_cache_remote_waits_total{outcome="fallback"} 1.0' in metrics


async def _started_url(proc: asyncio.subprocess.Process) -> str:
    """The URL a ``skyroute run`` subprocess logs once it serves (its stderr is read on)."""
    assert proc.stderr is not None
    async with asyncio.timeout(CALL_TIMEOUT_S * 2):
        async for line in proc.stderr:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "server_started":
                    url = str(event["url"])
                    break
    # Keep draining, so the subprocess never blocks on a full pipe.
    drain = asyncio.create_task(_drain(proc.stderr))
    _DRAINS.add(drain)
    drain.add_done_callback(_DRAINS.discard)
    return url


_DRAINS: set[asyncio.Task[None]] = set()


async def _drain(stream: asyncio.StreamReader) -> None:
    async for _ in stream:
        pass


async def test_coalesced_waiters_serve_themselves_when_the_leader_fails(standin, skyroute):
    """If the shared call fails, each waiter goes upstream on its own and gets an answer."""
    a = await standin("a")
    b = await standin("b")
    a.behaviour.mode, a.behaviour.error_status = "error", 503
    routes = "- model: chat\n  targets: [a, b]\n  strategy: priority\n  cache: exact\n"
    server = await skyroute(routing_yaml([entry(a), entry(b)], routes))
    async with client_for(server) as client:
        replies = await asyncio.gather(*(_chat(client) for _ in range(10)))
    assert all(r.parse().choices[0].message.content.startswith("Hello from b") for r in replies)


async def test_stale_if_error_serves_an_expired_entry(standin, skyroute):
    """When every upstream fails, an expired entry within stale_if_error is served as stale."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route(), extra=(
        "cache:\n  ttl: 1ms\n  stale_if_error: 1h\n")))
    async with client_for(server) as client:
        first = await _chat(client)
        up.behaviour.mode = "error"
        stale = await _chat(client)
    assert stale.headers["x-skyroute-cache"] == "stale"
    assert stale.parse().choices[0].message.content == \
        first.parse().choices[0].message.content


async def test_redis_level_size_is_measured(standin, skyroute, monkeypatch):
    """skyroute_cache_redis_entries/_bytes and /health's redis_level follow what Redis holds
    under the prefix (one instance measures for all; every 30 s, here every 0.1 s)."""
    from skyroute.proxy import _cache_redis

    monkeypatch.setattr(_cache_redis, "_MEASURE_S", 0.1)
    up = await standin("a")
    cache = _cache_section(SHARED_REDIS)
    servers = [await skyroute(routing_yaml([entry(up)], _route(), extra=cache))
               for _ in range(2)]
    async with client_for(servers[0]) as client:
        for n in range(3):
            await _chat(client, max_tokens=10 + n)
    assert await _redis_keys(cache) == 3

    async def measured() -> bool:
        texts = [await _metrics(s) for s in servers]
        return all("skyroute_cache_redis_entries 3.0" in t for t in texts)

    try:
        await eventually(measured, timeout=CALL_TIMEOUT_S)
        metrics = await _metrics(servers[1])
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            health = await (await http.get(f"{servers[1].url}/health")).json()
    finally:
        await _redis_keys(cache, delete=True)
    size = float(metrics.split("\nskyroute_cache_redis_bytes ")[1].split()[0])
    assert 3 * 100 < size < 3 * 10_000  # three short compressed answers and Redis' overhead
    assert health["cache"]["redis_level"]["entries"] == 3


async def test_health_shows_the_cache(standin, skyroute):
    """/health has the cache's levels."""
    up = await standin("a")
    cache = _cache_section(SHARED_REDIS)
    server = await skyroute(routing_yaml([entry(up)], _route(), extra=cache))
    async with client_for(server) as client:
        await _chat(client)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        health = await (await http.get(f"{server.url}/health")).json()
    await _redis_keys(cache, delete=True)
    assert health["cache"]["memory"]["entries"] == 1
    assert health["cache"]["redis"] == "up"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def own_redis(tmp_path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A redis-server of this test's own on a free port; stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    proc.port = port  # type: ignore[attr-defined]
    try:
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                await asyncio.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=CALL_TIMEOUT_S)


async def test_redis_killed_mid_run_causes_no_client_error(standin, skyroute, own_redis,
                                                           captured_logs):
    """Redis killed while requests run: every request still succeeds, down is logged once."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route(), extra=_cache_section(
        f"redis://127.0.0.1:{own_redis.port}/0", timeout="50ms")))
    async with client_for(server) as client:
        async def batch(tag: str) -> None:
            replies = await asyncio.gather(*(client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"{tag} {i % 5}"}],
                temperature=0) for i in range(20)))
            assert all(r.choices[0].message.content for r in replies)

        await batch("before")
        os.kill(own_redis.pid, 9)
        own_redis.wait(timeout=CALL_TIMEOUT_S)
        for round_ in range(3):
            await batch(f"after {round_}")
    downs = [e for e in captured_logs if e["event"] == "cache_redis_down"]
    assert len(downs) == 1
    metrics = await _metrics(server)
    assert "skyroute_cache_redis_up 0.0" in metrics
    assert "skyroute_cache_redis_errors_total" in metrics
    assert not [e for e in captured_logs if e["event"] == "request_finished"
                and e["status"] != 200]


async def test_memory_level_is_bounded_in_bytes(standin, skyroute):
    """A small memory level keeps under its byte limit and counts what it evicts."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route(), extra=(
        "cache:\n  memory: {max_bytes: 3KiB}\n")))
    async with client_for(server) as client:
        for i in range(12):
            await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"question {i}"}],
                temperature=0)
        newest = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "question 11"}], temperature=0)
    assert newest.headers["x-skyroute-cache"] == "hit"  # the most recent entry stayed
    metrics = await _metrics(server)
    held = float(metrics.split('skyroute_cache_bytes{level="memory"} ')[1].split()[0])
    evicted = float(metrics.split('skyroute_cache_evictions_total{level="memory"} ')[1].split()[0])
    assert 0 < held <= 3 * 1024
    assert evicted >= 12 - 3 * 1024 // 330


async def test_streaming_waiters_follow_the_leader_live(standin, skyroute):
    """Streams that join a streaming leader mid-way get all of it, from one upstream call."""
    up = await standin("a")
    up.behaviour.token_delay_s = 0.05
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        leader = asyncio.create_task(_stream_text(client))
        await up.wait_for(lambda u: u.requests_total == 1)
        followers = await asyncio.gather(*(_stream_text(client) for _ in range(20)))
        text, headers, _ = await leader
    assert headers["x-skyroute-cache"] == "miss"
    assert [f[0] for f in followers] == [text] * 20
    assert {f[1]["x-skyroute-cache"] for f in followers} == {"hit"}
    assert up.requests_total == 1


async def test_streaming_waiters_see_a_cut_leader_as_an_error(standin, skyroute):
    """A shared stream cut part-way ends every follower with an error, never a clean end."""
    up = await standin("a")
    up.behaviour.mode, up.behaviour.token_delay_s = "reset_midstream", 0.05
    server = await skyroute(routing_yaml([entry(up)], _route()))
    async with client_for(server) as client:
        async def cut() -> None:
            with pytest.raises(openai.APIError):
                await _stream_text(client)

        leader = asyncio.create_task(cut())
        await up.wait_for(lambda u: u.requests_total == 1)
        await asyncio.gather(*(cut() for _ in range(5)))
        await leader


@pytest.mark.parametrize(("accept", "coding"), [
    ("br", "br"), ("zstd", "zstd"), ("gzip", "gzip"), ("gzip, deflate, br, zstd", "br"),
    ("gzip;q=1, br;q=0.5", "gzip"), ("br;q=0, *", "zstd"), ("identity", None), ("", None),
])
async def test_whole_answers_are_compressed_for_clients_that_ask(standin, skyroute, accept,
                                                                coding):
    """A JSON answer above the threshold comes compressed by Accept-Encoding; SSE never does."""
    import brotli
    import zstandard

    up = await standin("a")
    up.behaviour.tokens = 400  # an answer of several KiB
    server = await skyroute(routing_yaml([entry(up)], _route()))
    decode = {"br": brotli.decompress, "gzip": __import__("gzip").decompress,
              "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b, 1 << 24)}
    async with aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as http:
        for stream in (False, True):
            async with http.post(f"{server.url}/v1/chat/completions", json={
                    "model": "chat", "messages": ASK, "temperature": 0, "stream": stream},
                    headers={"Authorization": "Bearer sk-client-test",
                             "Accept-Encoding": accept}) as resp:
                raw = await resp.read()
                got = resp.headers.get("Content-Encoding")
            if stream:
                assert got is None and raw.endswith(b"data: [DONE]\n\n")
                continue
            assert got == coding
            body = decode[coding](raw) if coding else raw
            assert json.loads(body)["object"] == "chat.completion"


async def test_approximate_answers_only_when_every_upstream_failed(standin, skyroute):
    """cache: approximate serves a near-identical prompt's answer, marked, only in an outage."""
    up = await standin("a")
    server = await skyroute(routing_yaml([entry(up)], _route("approximate")))
    stored = [{"role": "user", "content": "What is the capital of France?"}]
    near = [{"role": "user", "content": "what is the capital of france"}]
    other = [{"role": "user", "content": "What is the capital of Germany?"}]
    async with client_for(server) as client:
        await client.chat.completions.create(model="chat", messages=stored, temperature=0)
        normal = await client.chat.completions.with_raw_response.create(
            model="chat", messages=near, temperature=0)
        up.behaviour.mode = "error"
        outage = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "What is the capital of FRANCE"}],
            temperature=0)
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="chat", messages=other, temperature=0)
    assert normal.headers["x-skyroute-cache"] == "miss"  # normal operation: never approximate
    assert outage.headers["x-skyroute-cache"] == "approximate"
    assert outage.parse().choices[0].message.content.startswith("Hello from a")
    assert 'skyroute_cache_requests_total{result="approximate",route="chat"} 1.0' in \
        await _metrics(server)


async def test_compression_threshold_is_a_setting(standin, skyroute):
    """cache.compression.min_bytes: a short answer is sent as it is by default (1 KiB) and
    compressed with min_bytes: 0; a reload changes it without emptying the cache."""
    up = await standin("a")  # a short answer (well under 1 KiB)
    server = await skyroute(routing_yaml([entry(up)], _route()))

    async def coding() -> tuple[str | None, str]:
        async with aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False) as http, \
                http.post(f"{server.url}/v1/chat/completions", json={
                    "model": "chat", "messages": ASK, "temperature": 0},
                    headers={"Authorization": f"Bearer {CLIENT_KEY}",
                             "Accept-Encoding": "gzip"}) as resp:
            await resp.read()
            return resp.headers.get("Content-Encoding"), resp.headers["x-skyroute-cache"]

    assert await coding() == (None, "miss")
    server.config_path.write_text(routing_yaml([entry(up)], _route(), extra=_cache_section(
        extra="compression: {min_bytes: 0}")))

    async def compressed() -> bool:
        return (await coding())[0] == "gzip"

    await eventually(compressed, timeout=CALL_TIMEOUT_S)
    assert await coding() == ("gzip", "hit")  # the reload kept the entry
    assert up.requests_total == 1


async def _cache_clients(cache_section: str) -> int:
    """Connections the shared Redis has from caches with this section's prefix."""
    import redis.asyncio as aioredis
    from skyroute.proxy._cache_redis import client_name

    name = client_name(cache_section.split("prefix: '")[1].split("'")[0])
    client = aioredis.Redis.from_url(SHARED_REDIS, socket_timeout=CALL_TIMEOUT_S)
    try:
        return sum(1 for c in await client.client_list() if c.get("name") == name)
    finally:
        await client.aclose()


async def test_reload_swaps_the_redis_client_after_requests_in_flight(standin, skyroute):
    """A reload that changes cache.redis serves new requests with a new client at once; the
    old one stays open for the request in flight, and is closed once it is answered."""
    up = await standin("a")
    up.behaviour.busy_for_s = 30.0
    up.behaviour.mode = "busy"  # holds the request until flipped back
    old, new = _cache_section(SHARED_REDIS), _cache_section(SHARED_REDIS)
    server = await skyroute(routing_yaml([entry(up)], _route(), extra=old))
    async with client_for(server) as client:
        held = asyncio.create_task(_chat(client))
        await eventually(lambda: up.in_flight == 1, timeout=CALL_TIMEOUT_S)
        assert await _cache_clients(old) >= 1
        server.config_path.write_text(routing_yaml([entry(up)], _route(), extra=new))

        async def connected(section: str, at_least: int = 1) -> bool:
            return await _cache_clients(section) >= at_least

        await eventually(lambda: connected(new), timeout=CALL_TIMEOUT_S)
        assert await _cache_clients(old) >= 1  # still in use by the held request
        up.behaviour.mode = "ok"
        assert (await held).headers["x-skyroute-cache"] == "miss"

        async def closed() -> bool:
            return await _cache_clients(old) == 0

        await eventually(closed, timeout=CALL_TIMEOUT_S)
        after = await _chat(client, max_tokens=7)
    assert after.headers["x-skyroute-cache"] == "miss"
    assert await _redis_keys(new, delete=True) == 1  # stored through the new client
    await _redis_keys(old, delete=True)


async def test_approximate_multi_turn_only_when_the_route_allows(standin, skyroute):
    """cache_multi_turn: true lets a near-identical follow-up in the same chat be answered
    approximately in an outage; without it a multi-turn request never is."""
    up = await standin("a")
    routes = _route("approximate") + "- model: strict\n  targets: [a]\n  cache: approximate\n"
    routes = routes.replace("  cache_scope: key\n",
                            "  cache_scope: key\n  cache_multi_turn: true\n", 1)
    models = "{chat: deepseek-chat, strict: deepseek-chat}"
    server = await skyroute(routing_yaml([entry(up, models=models)], routes))

    def turns(last: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": last}]

    async with client_for(server) as client:
        for model in ("chat", "strict"):
            await client.chat.completions.create(model=model, temperature=0,
                                                 messages=turns("How many people live there?"))
        up.behaviour.mode = "error"
        multi = await client.chat.completions.with_raw_response.create(
            model="chat", temperature=0, messages=turns("how many people live there"))
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(
                model="strict", temperature=0, messages=turns("how many people live there"))
    assert multi.headers["x-skyroute-cache"] == "approximate"
