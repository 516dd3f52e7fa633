"""Each upstream's connection pool: ``upstreams[].max_connections`` bounds it."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]


async def _in_flight(server) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        text = await (await http.get(f"{server.url}/metrics")).text()
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("skyroute_in_flight_requests "))


async def _in_flight_is(server, count: int) -> bool:
    return await _in_flight(server) == count


async def test_max_connections_bounds_the_requests_open_at_an_upstream(standin, skyroute):
    """With max_connections: 2, four held requests reach the upstream two at a time; the
    other two wait for a pooled connection and are served once one is free."""
    up = await standin("us-east")
    up.behaviour.mode = "busy"  # hold every request (keep-alives only) until released
    server = await skyroute(routing_yaml([entry(up, extra="""\
        max_connections: 2
        first_token_timeout: 60s
        """)], "- {model: chat, targets: [us-east], max_attempts: 1}\n"))
    async with client_for(server) as client:
        calls = [asyncio.create_task(client.chat.completions.create(
            model="chat", messages=MESSAGES)) for _ in range(4)]
        try:
            await eventually(lambda: _in_flight_is(server, 4), timeout=CALL_TIMEOUT_S)
            await up.wait_for(lambda u: u.in_flight == 2, timeout=CALL_TIMEOUT_S)
            assert up.in_flight == 2 and up.requests_total == 2  # two wait in skyroute
            up.behaviour.mode = "ok"
            replies = await asyncio.gather(*calls)
        finally:
            for call in calls:
                call.cancel()
    assert all("us-east" in r.choices[0].message.content for r in replies)
    assert up.requests_total == 4


async def _connections(server) -> dict[str, float]:
    """skyroute_upstream_connections by state, for upstream us-east."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        text = await (await http.get(f"{server.url}/metrics")).text()
    return {m["state"]: float(m["value"]) for m in re.finditer(
        r'^skyroute_upstream_connections\{(?=[^}]*upstream="us-east")[^}]*state="(?P<state>\w+)"'
        r'[^}]*\} (?P<value>\S+)$', text, re.M)}


async def test_upstream_connections_gauge_shows_busy_then_idle(standin, skyroute):
    """skyroute_upstream_connections{upstream,state} is 0/0 before the first request, counts
    two held requests' connections as busy, and the same two as idle (kept alive) once
    they are answered."""
    up = await standin("us-east")
    up.behaviour.mode = "busy"
    server = await skyroute(routing_yaml([entry(up, extra="first_token_timeout: 60s\n")],
                                         "- {model: chat, targets: [us-east], max_attempts: 1}\n"))
    assert await _connections(server) == {"busy": 0, "idle": 0}
    async with client_for(server) as client:
        calls = [asyncio.create_task(client.chat.completions.create(
            model="chat", messages=MESSAGES)) for _ in range(2)]
        try:
            await up.wait_for(lambda u: u.in_flight == 2, timeout=CALL_TIMEOUT_S)
            assert await _connections(server) == {"busy": 2, "idle": 0}
            up.behaviour.mode = "ok"
            await asyncio.gather(*calls)
        finally:
            for call in calls:
                call.cancel()

    async def idle_two() -> bool:  # a connection goes back once its answer is read whole
        return await _connections(server) == {"busy": 0, "idle": 2}

    await eventually(idle_two, timeout=CALL_TIMEOUT_S)
