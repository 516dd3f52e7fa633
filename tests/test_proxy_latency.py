"""Latency-aware routing end to end: passive and Prometheus latency, /admin/routing.

Three stand-in regions answer in 20 ms; one is raised to 400 ms and lowered
again. Where requests went is read from the answers ("Hello from <region>"),
which is what a client sees. The Prometheus tests run the real Prometheus
server (Debian's ``prometheus``) on a free port with a temporary config.

The passive-latency tests run on a ``FakeClock`` shared by skyroute and the
stand-ins: a stand-in's delay advances the clock instead of passing in real
time, and requests go one at a time, so every time to first token skyroute
measures is exactly the answering stand-in's ``ttft_s``. Measured in real time,
one stall of a busy machine's event loop would make a 20 ms region "slow".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from skyroute.proxy.demo import LocalPrometheus, find_prometheus

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml, served_by
from .conftest import upstream_yaml as entry
from .fakes import FakeClock

MESSAGES = [{"role": "user", "content": "hi"}]
REGIONS = ("west", "east", "south")
FAST_S, SLOW_S = 0.02, 0.4
#: The Prometheus tests measure in real time: their slow region is far past a threshold
#: that is itself far past what a loaded machine adds to ``FAST_S`` (one stall of an
#: event loop inside a 1 s p95 window makes a 20 ms region look 200 ms).
PROMETHEUS_THRESHOLD_MS, PROMETHEUS_SLOW_S = 1500, 4.0
ADMIN_KEY = "admin-test-key"
#: West first: with ``priority`` it gets every request while it is fast, so where
#: traffic goes shows the slow decision directly. The ramp is longer than the
#: ~500 ms a deployment might use, so the "not all back at once" check does not
#: depend on how fast this machine drives requests.
LATENCY = """\
latency:
  interval: 100ms
  passive_window: 1s
  recover_intervals: 2
  ramp: 2s
  probe_share: 2%
"""
ROUTE = """\
- model: chat
  targets: [west, east, south]
  strategy: priority
  latency_threshold: 200ms
"""


async def _regions(standin, clock: FakeClock | None = None) -> dict:
    """The three regions at ``FAST_S``; with ``clock``, their delays pass on it."""
    ups = {}
    for name in REGIONS:
        ups[name] = await standin(name, clock=clock)
        ups[name].behaviour.ttft_s = FAST_S
    return ups


async def _one_by_one(client, n: int) -> Counter[str]:
    """``served_by`` one request at a time: on a fake clock, a request in flight would
    count the delay of another that runs beside it in its own time to first token."""
    return await served_by(client, n, concurrency=1)


def _yaml(ups: dict, *, extra: str = LATENCY, route: str = ROUTE) -> str:
    return routing_yaml([entry(u, region=f"r-{u.name}") for u in ups.values()], route,
                        extra=extra)


async def _get(url: str, **kwargs) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        resp = await h.get(url, **kwargs)
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def _health(server) -> dict:
    return (await _get(f"{server.url}/health"))[1]


def _upstream_state(name: str, state: str, server, client, *, drive: int = 8
                    ) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``eventually``: drive some requests, then is ``name`` in ``state``?"""

    async def check() -> bool:
        await _one_by_one(client, drive)
        return (await _health(server))["upstreams"][name]["state"] == state

    return check


async def test_slow_region_loses_traffic_and_gets_it_back_gradually(standin, skyroute,
                                                                    captured_logs):
    """A region past 200 ms is reported slow and avoided; after recovery traffic ramps back."""
    clock = FakeClock()
    ups = await _regions(standin, clock)
    server = await skyroute(_yaml(ups), clock=clock.now)
    async with client_for(server) as client:
        assert (await _one_by_one(client, 20))["west"] == 20
        ups["west"].behaviour.ttft_s = SLOW_S
        await eventually(_upstream_state("west", "slow", server, client), timeout=10)
        west = (await _health(server))["upstreams"]["west"]
        assert west["latency_source"] == "passive" and west["latency_ms"] > 200
        assert (await _health(server))["routes"]["chat"] == "reduced"

        served = await _one_by_one(client, 300)
        assert served["west"] <= 15, served  # <= 5 %: only the 2 % probes
        assert served["east"] >= 250, served  # priority: the next region takes it

        ups["west"].behaviour.ttft_s = FAST_S
        await eventually(_upstream_state("west", "healthy", server, client), timeout=15)
        first = await _one_by_one(client, 20)
        assert first["west"] <= 14, first  # ramping: far from its full (~100 %) share
        await eventually(lambda: _back_in_full(client), timeout=15)
    slow_lines = [e for e in captured_logs if e["event"] == "upstream_state_changed"
                  and e["upstream"] == "west" and e["to"] == "slow"]
    assert len(slow_lines) == 1
    assert "source passive" in slow_lines[0]["reason"] and "> 200 ms" in slow_lines[0]["reason"]


async def _back_in_full(client) -> bool:
    return (await _one_by_one(client, 20))["west"] >= 19


# -- Prometheus, the real server ----------------------------------------------------------


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[list[str]], Awaitable[str]]]:
    """Factory: ``await prometheus(["127.0.0.1:port", ...])`` starts Prometheus scraping them."""
    binary = find_prometheus()  # its error says how to install one
    started: list[LocalPrometheus] = []

    async def start(targets: list[str]) -> str:
        server = LocalPrometheus({"skyroute": targets}, binary=binary, interval_s=1.0,
                                 workdir=tmp_path / f"prometheus-{len(started)}")
        started.append(server)
        await server.start()
        return server.url

    yield start
    for server in started:
        await server.aclose()


async def _keep_busy(client, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await served_by(client, 4, concurrency=4)


async def test_instance_without_traffic_learns_slow_region_from_prometheus(standin, skyroute,
                                                                           prometheus):
    """Instance B, which sent nothing, learns from Prometheus that west is slow and avoids it."""
    ups = await _regions(standin)
    ups["west"].behaviour.ttft_s = PROMETHEUS_SLOW_S
    # A spreads its traffic evenly and never calls anything slow, so every region shows
    # in its TTFB histogram: it is the "other instances" whose view B gets.
    spread = ROUTE.replace("priority", "weighted").replace("200ms", "60s")
    a = await skyroute(_yaml(ups, route=spread))
    url = await prometheus([f"127.0.0.1:{a.port}"])
    # A and B measure in real time (Prometheus scrapes real servers), and the estimate
    # B reads is the p95 over a 1 s window of A's traffic: on a loaded machine one
    # stall of A's event loop puts a 20 ms region past 200 ms. B's threshold sits far
    # above what load adds to 20 ms and far below west's delay.
    learner = ROUTE.replace("200ms", f"{PROMETHEUS_THRESHOLD_MS}ms")
    b = await skyroute(_yaml(ups, route=learner,
                             extra=LATENCY + f"  prometheus:\n    url: {url}\n"
                                             "    interval: 1s\n"))
    stop = asyncio.Event()
    async with client_for(a) as client_a, client_for(b) as client_b:
        traffic = asyncio.create_task(_keep_busy(client_a, stop))
        try:
            async def west_slow_on_b() -> bool:
                return (await _health(b))["upstreams"]["west"]["state"] == "slow"

            await eventually(west_slow_on_b, timeout=45, interval=0.25)
        finally:
            stop.set()
            await traffic
        health = await _health(b)
        west = health["upstreams"]["west"]
        assert west["latency_source"] == "prometheus", west
        assert west["latency_ms"] > PROMETHEUS_THRESHOLD_MS, west
        assert health["upstreams"]["east"]["state"] == "healthy", health["upstreams"]["east"]
        served = await served_by(client_b, 300)
    assert served["west"] <= 15, served  # <= 5 %: only the 2 % probes
    _, metrics = await _get(f"{b.url}/metrics")
    assert "skyroute_prometheus_source_up 1.0" in metrics
    assert 'skyroute_prometheus_queries_total{result="ok"}' in metrics


@pytest.fixture
def reserved() -> Iterator[socket.socket]:
    """A socket bound to a free port, not listening: connecting is refused until a server
    listens on it, and no other process can take the port in between."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


async def test_unreachable_prometheus_fails_no_request_and_warns_once(standin, skyroute,
                                                                      captured_logs, reserved):
    """A dead Prometheus: requests all succeed, one warning, gauge 0; one info when it's back."""
    ups = await _regions(standin)
    port = reserved.getsockname()[1]
    server = await skyroute(_yaml(ups, extra=LATENCY + f"  prometheus:\n    url: "
                                                       f"http://127.0.0.1:{port}\n"
                                                       "    interval: 100ms\n"
                                                       "    timeout: 200ms\n"))

    async def queries(result: str) -> float:
        _, text = await _get(f"{server.url}/metrics")
        for line in text.splitlines():
            if line.startswith(f'skyroute_prometheus_queries_total{{result="{result}"}}'):
                return float(line.split()[-1])
        return 0.0

    async with client_for(server) as client:
        served = await served_by(client, 40)
        assert sum(served.values()) == 40
        await eventually(lambda: _at_least(queries("unreachable"), 5), timeout=10)
        assert sum((await served_by(client, 20)).values()) == 20
        _, metrics = await _get(f"{server.url}/metrics")
        assert "skyroute_prometheus_source_up 0.0" in metrics
        warnings = [e for e in captured_logs if e["event"] == "latency_prometheus_failed"]
        assert len(warnings) == 1, warnings
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["url"] == f"http://127.0.0.1:{port}"

        # Prometheus comes back (a stand-in for its query API on the same port).
        async with _fake_prometheus(reserved, west=SLOW_S):
            await eventually(lambda: _at_least(queries("ok"), 1), timeout=10)

            async def west_slow() -> bool:
                west = (await _health(server))["upstreams"]["west"]
                return west["state"] == "slow" and west["latency_source"] == "prometheus"

            await eventually(west_slow, timeout=10)
            _, metrics = await _get(f"{server.url}/metrics")
            assert "skyroute_prometheus_source_up 1.0" in metrics
            back = [e for e in captured_logs if e["event"] == "latency_prometheus_recovered"]
            assert len(back) == 1, back
            assert len([e for e in captured_logs
                        if e["event"] == "latency_prometheus_failed"]) == 1


async def _at_least(value: Awaitable[float], minimum: float) -> bool:
    return await value >= minimum


@contextlib.asynccontextmanager
async def _fake_prometheus(sock: socket.socket, *, west: float) -> AsyncIterator[None]:
    """Prometheus's query API on ``sock``: west at ``west`` s, east NaN, a stray series."""

    async def query(request: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"upstream": "west"}, "value": [0, str(west)]},
            {"metric": {"upstream": "east"}, "value": [0, "NaN"]},
            {"metric": {"job": "other"}, "value": [0, "9"]},
        ]}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield
    finally:
        await runner.cleanup()


# -- /admin/routing -----------------------------------------------------------------------


async def test_admin_routing_is_off_without_an_admin_key(standin, skyroute):
    """With no admin.key configured, /admin/routing answers 403 saying how to turn it on."""
    ups = await _regions(standin)
    server = await skyroute(_yaml(ups))
    status, body = await _get(f"{server.url}/admin/routing",
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 403
    assert "admin.key" in body["error"]["message"]
    assert body["error"]["code"] == "admin_disabled"


async def test_admin_routing_needs_the_admin_key(standin, skyroute):
    """A missing or wrong admin key is a 401; the client key is not an admin key."""
    ups = await _regions(standin)
    server = await skyroute(_yaml(ups, extra=LATENCY + f"admin:\n  key: {ADMIN_KEY}\n"))
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Bearer sk-client-test"}, {"Authorization": ADMIN_KEY}):
        status, body = await _get(f"{server.url}/admin/routing", headers=headers)
        assert status == 401, headers
        assert body["error"]["code"] == "invalid_api_key"


async def test_admin_routing_shows_state_latency_share_and_last_change(standin, skyroute):
    """/admin/routing and /metrics show per upstream: state, latency and source, share, why."""
    clock = FakeClock()
    ups = await _regions(standin, clock)
    server = await skyroute(_yaml(ups, extra=LATENCY + f"admin:\n  key: {ADMIN_KEY}\n"),
                            clock=clock.now)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with client_for(server) as client:
        await _one_by_one(client, 20)
        ups["west"].behaviour.ttft_s = SLOW_S
        await eventually(_upstream_state("west", "slow", server, client), timeout=10)
        await _one_by_one(client, 100)
    status, body = await _get(f"{server.url}/admin/routing", headers=auth)
    assert status == 200
    route = body["routes"]["chat"]
    assert route["strategy"] == "priority" and route["latency_threshold_ms"] == 200
    assert route["level"] == "reduced"
    west, east = route["upstreams"]["west"], route["upstreams"]["east"]
    assert west["state"] == "slow" and west["slow"] is True and west["healthy"] is False
    assert west["latency_source"] == "passive" and west["latency_ms"] > 200
    assert west["ramp"] == 0.0
    assert west["last_change"]["new"] == "slow"
    assert "> 200 ms, source passive" in west["last_change"]["reason"]
    assert east["state"] == "healthy" and east["share"] > west["share"]
    assert sum(u["share"] for u in route["upstreams"].values()) == pytest.approx(1.0, abs=1e-3)
    assert body["latency"]["prometheus"] is None

    async def share_gauge() -> bool:
        _, text = await _get(f"{server.url}/metrics")
        line = next((x for x in text.splitlines() if x.startswith(
            'skyroute_routing_share{route="chat",upstream="east"}')), "")
        return bool(line) and float(line.split()[-1]) > 0.3

    await eventually(share_gauge, timeout=5)


async def test_fresh_instance_learns_a_region_the_others_moved_away_from(standin, skyroute,
                                                                         prometheus):
    """Instance 1 sends 30 requests to a 4 s region and moves away; instance 2, which has
    sent nothing (no warm-up), marks it slow from Prometheus and sends it at most 1 of 20.

    The default query reads every instance's own exported estimate, which instance 1 keeps
    after its traffic moved away; a ``rate()`` over its TTFB histogram would see nothing.
    Both measure in real time, hence the Prometheus test's threshold and slow region.
    """
    ups = await _regions(standin)
    ups["west"].behaviour.ttft_s = PROMETHEUS_SLOW_S
    route = ROUTE.replace("200ms", f"{PROMETHEUS_THRESHOLD_MS}ms")
    one = await skyroute(_yaml(ups, route=route, extra="latency:\n  interval: 1s\n"))
    url = await prometheus([f"127.0.0.1:{one.port}"])
    # probe_share 0 %: "at most 1 of 20" must not depend on the dice.
    two = await skyroute(_yaml(ups, route=route.replace("  strategy: priority\n", ""),
                               extra=f"latency:\n  interval: 1s\n  probe_share: 0%\n"
                                     f"  prometheus:\n    url: {url}\n    interval: 1s\n"))
    async with client_for(one) as client_one, client_for(two) as client_two:
        assert (await served_by(client_one, 30, concurrency=30))["west"] == 30

        async def moved_away() -> bool:
            return (await served_by(client_one, 4))["east"] >= 3

        await eventually(moved_away, timeout=30, interval=0.25)

        async def west_slow_on_two() -> bool:
            west = (await _health(two))["upstreams"]["west"]
            return west["state"] == "slow" and west["latency_source"] == "prometheus"

        await eventually(west_slow_on_two, timeout=60, interval=0.25)
        served = await served_by(client_two, 20, concurrency=1)
    assert served["west"] <= 1, served
    assert (await _health(two))["upstreams"]["west"]["state"] == "slow"
    _, metrics = await _get(f"{one.url}/metrics")
    assert 'skyroute_upstream_latency_estimate_seconds{source="passive",upstream="west"}' \
        in metrics


async def test_every_upstream_has_a_ttfb_series_from_the_start(standin, skyroute):
    """A fresh instance exports each upstream's TTFB histogram at zero, before any request."""
    ups = await _regions(standin)
    server = await skyroute(_yaml(ups))
    _, metrics = await _get(f"{server.url}/metrics")
    for name in REGIONS:
        assert (f'skyroute_upstream_ttfb_seconds_count{{region="r-{name}",upstream="{name}"}} '
                "0.0") in metrics
