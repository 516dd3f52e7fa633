"""Live reload of the routing file while skyroute serves."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry
from .fakes import FakeClock

MESSAGES = [{"role": "user", "content": "hi"}]


async def _metric(server, name: str) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        text = await (await http.get(f"{server.url}/metrics")).text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_valid_edit_applies_within_about_a_second(standin, skyroute):
    """Adding a route to the file makes it servable without a restart, and is counted."""
    a, b = await standin("us-east"), await standin("eu-west")
    text = routing_yaml([entry(a, models="{chat: deepseek-chat}")])
    server = await skyroute(text)
    async with client_for(server) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="fast", messages=MESSAGES)
        server.config_path.write_text(routing_yaml(
            [entry(a, models="{chat: deepseek-chat}"), entry(b, models="{fast: deepseek-chat}")]))

        async def fast_is_served() -> bool:
            try:
                await client.chat.completions.create(model="fast", messages=MESSAGES)
            except openai.NotFoundError:
                return False
            return True

        await eventually(fast_is_served, timeout=5)
    assert b.requests_total == 1
    assert await _metric(server, 'skyroute_config_reloads_total{result="success"}') == 1


async def test_invalid_edit_is_refused_and_old_config_keeps_serving(standin, skyroute,
                                                                    captured_logs):
    """A broken edit is logged with field and line, counted, and the old config still serves."""
    up = await standin("us-east")
    server = await skyroute(routing_yaml([entry(up)]))
    broken = routing_yaml([entry(up)], "- model: chat\n  targets: [nowhere]\n")
    server.config_path.write_text(broken)
    broken_line = broken.splitlines().index("    targets: [nowhere]") + 1

    def refused() -> bool:
        return any(e["event"] == "config_reload_refused" for e in captured_logs)

    await eventually(refused, timeout=5)
    line = next(e for e in captured_logs if e["event"] == "config_reload_refused")
    assert line["field"] == "routes[0].targets[0]"
    assert line["line"] == broken_line
    assert "nowhere" in line["problem"]
    assert await _metric(server, 'skyroute_config_reloads_total{result="error"}') == 1
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert "us-east" in reply.choices[0].message.content


async def test_in_flight_request_finishes_on_the_old_config(standin, skyroute):
    """A stream that started before a reload is finished by the upstream it started on."""
    a, b = await standin("us-east"), await standin("eu-west")
    a.behaviour.token_delay_s = 0.2
    a.behaviour.tokens = 6
    server = await skyroute(routing_yaml([entry(a), entry(b)],
                                         "- model: chat\n  targets: [us-east]\n"))
    async with client_for(server) as client:
        stream = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                      stream=True)
        server.config_path.write_text(routing_yaml([entry(a), entry(b)],
                                                   "- model: chat\n  targets: [eu-west]\n"))
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert "us-east" in text and len(text.split()) == 6

        async def moved() -> bool:
            reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
            return "eu-west" in reply.choices[0].message.content

        await eventually(moved, timeout=5)


BILLION_LAUGHS = "".join(
    ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n']
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)])


@pytest.mark.parametrize("broken", [
    pytest.param(lambda good: good.encode() + b"# caf\xe9\n", id="not-utf8"),
    pytest.param(lambda good: (BILLION_LAUGHS + good).encode(), id="alias-bomb"),
])
async def test_hostile_edit_is_refused_and_a_later_edit_still_applies(standin, skyroute,
                                                                      captured_logs, broken):
    """A non-UTF-8 or alias-bomb file is refused as one problem with a line; the watch
    goes on, and the next valid edit is served."""
    a, b = await standin("us-east"), await standin("eu-west")
    good = routing_yaml([entry(a, models="{chat: deepseek-chat}")])
    server = await skyroute(good)
    server.config_path.write_bytes(broken(good))

    def refused() -> list[dict]:
        return [e for e in captured_logs if e["event"] == "config_reload_refused"]

    await eventually(lambda: bool(refused()), timeout=5)
    assert len(refused()) == 1 and refused()[0]["line"] is not None
    server.config_path.write_text(routing_yaml(
        [entry(a, models="{chat: deepseek-chat}"), entry(b, models="{fast: deepseek-chat}")]))
    async with client_for(server) as client:

        async def fast_is_served() -> bool:
            try:
                await client.chat.completions.create(model="fast", messages=MESSAGES)
            except openai.NotFoundError:
                return False
            return True

        await eventually(fast_is_served, timeout=5)
    assert await _metric(server, 'skyroute_config_reloads_total{result="error"}') == 1
    assert await _metric(server, 'skyroute_config_reloads_total{result="success"}') == 1


async def _metrics_text(server) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as http:
        return await (await http.get(f"{server.url}/metrics")).text()


async def test_reload_drops_the_series_of_a_removed_key_and_route(standin, skyroute):
    """A reload that removes a client key with an rpm and a route takes their
    skyroute_rate_limit_share and skyroute_routing_share series out of /metrics; the kept
    ones stay."""
    a = await standin("us-east")
    limited = "    - name: limited\n      key: sk-limited-reload\n      rpm: 6\n"
    before = routing_yaml([entry(a, models="{chat: deepseek-chat, old: deepseek-chat}")]
                          ).replace("auth:\n  api_keys:\n", "auth:\n  api_keys:\n" + limited)
    server = await skyroute(before)
    share, route = 'skyroute_rate_limit_share{key="limited"}', 'route="old"'

    async def exported() -> bool:
        text = await _metrics_text(server)
        return share in text and f'skyroute_routing_share{{{route}' in text

    await eventually(exported, timeout=5)
    server.config_path.write_text(routing_yaml([entry(a, models="{chat: deepseek-chat}")]))

    async def dropped() -> bool:
        text = await _metrics_text(server)
        return share not in text and f'skyroute_routing_share{{{route}' not in text

    await eventually(dropped, timeout=5)
    assert 'skyroute_routing_share{route="chat"' in await _metrics_text(server)


async def test_reload_applies_a_changed_retry_budget(standin, skyroute):
    """With the route's retry budget spent, an edit that widens retry.budget_window lets
    retries go again at once: the reload replaced the budget, no restart needed. (Routing
    reads a fake clock that never moves, so no window slides and no breaker cools down.)"""
    ups = [await standin(name) for name in ("a", "b")]
    for up in ups:
        up.behaviour.mode = "error"
    tuned = "breaker: {consecutive_failures: 1}\nretry: {backoff_base: 1ms, backoff_cap: 1ms%s}\n"
    routes = "- model: chat\n  targets: [a, b]\n"
    server = await skyroute(routing_yaml([entry(u) for u in ups], routes, extra=tuned % ""),
                            clock=FakeClock().now)

    async def budget_is_spent() -> bool:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
        return "retry budget is spent" in caught.value.message

    async with client_for(server) as client:
        await eventually(budget_is_spent, timeout=CALL_TIMEOUT_S)
        server.config_path.write_text(routing_yaml(
            [entry(u) for u in ups], routes, extra=tuned % ", budget_window: 100s"))

        async def reloaded() -> bool:
            return await _metric(server, 'skyroute_config_reloads_total{result="success"}') == 1

        await eventually(reloaded, timeout=5)
        # One request: each request also raises the allowance (20 % of requests), so
        # asking until it is back would pass without the reload too.
        assert not await budget_is_spent()
