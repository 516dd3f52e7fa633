"""Sessions and limits across three skyroute instances peered over the Yjs sync protocol."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AsyncExitStack

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry
from skyroute.proxy import Server
from skyroute.proxy._limit_shares import LIMIT_SHARES
from skyroute.proxy._sessions import state_sync_for
from skyroute.proxy._state import STATE_SYNC
from skyroute.proxy.demo import TcpForwarder
from skyroute.routing import ConfigError, parse_config

from .conftest import CALL_TIMEOUT_S, CLIENT_KEY, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
SYNC_TOKEN = "sync-secret-for-tests"
LIMITED_KEY = "sk-limited"


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
async def cluster(standin):
    """Three skyroute instances in a full mesh; instance 0 prefers upstream b, the others a."""
    ups = [await standin(name) for name in ("a", "b", "c")]
    socks = [_bound_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    async with AsyncExitStack() as stack:
        servers = []
        for i, sock in enumerate(socks):
            peers = ", ".join(f"ws://127.0.0.1:{p}/sync" for j, p in enumerate(ports) if j != i)
            order = "[b, a, c]" if i == 0 else "[a, b, c]"
            extra = (f"instance:\n  id: s{i}\n"
                     f"sync:\n  token: {SYNC_TOKEN}\n  peers: [{peers}]\n")
            text = routing_yaml([entry(u) for u in ups],
                                f"- model: chat\n  targets: {order}\n  strategy: priority\n",
                                extra=extra)
            text = text.replace(
                "auth:\n  api_keys:\n",
                f"auth:\n  api_keys:\n    - name: limited\n      key: {LIMITED_KEY}\n"
                "      rpm: 6\n")
            server = Server(parse_config(text, env={}), sock=sock, grace_s=1.0)
            await stack.enter_async_context(server)
            servers.append(server)

        def all_connected() -> bool:
            return all(set(s.app[STATE_SYNC].peer_states().values()) == {"connected"}
                       for s in servers)

        await eventually(all_connected, timeout=10)
        yield servers, ups


async def test_session_keeps_its_upstream_on_every_instance(cluster):
    """A session pinned on one instance is served by the same upstream on the others."""
    servers, _ = cluster
    headers = {"X-Session-ID": "conversation-1"}
    async with client_for(servers[0]) as client:
        first = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                     extra_headers=headers)
    assert "from b" in first.choices[0].message.content

    def pinned_everywhere() -> bool:
        sessions = [s.app[STATE_SYNC].store.get("conversation-1", now=time.time())
                    for s in servers]
        return all(session is not None and session.upstream == "b" for session in sessions)

    await eventually(pinned_everywhere, timeout=5)
    for server in servers[1:]:
        async with client_for(server) as client:
            reply = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                         extra_headers=headers)
            other = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert "from b" in reply.choices[0].message.content
        assert "from a" in other.choices[0].message.content  # no session: its own preference


async def test_session_id_from_openai_user_field(cluster):
    """The body's `user` field identifies the session when there is no header."""
    servers, _ = cluster
    async with client_for(servers[0]) as client:
        await client.chat.completions.create(model="chat", messages=MESSAGES, user="u-7")
    await eventually(lambda: servers[2].app[STATE_SYNC].store.get("u-7", now=time.time())
                     is not None, timeout=5)
    async with client_for(servers[2]) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                     user="u-7")
    assert "from b" in reply.choices[0].message.content


async def test_rpm_limit_holds_across_all_instances_together(cluster):
    """rpm: 6 allows six requests in all, whichever instances they land on; then 429."""
    servers, _ = cluster
    for i in range(6):
        server = servers[i % 3]
        async with client_for(server, key=LIMITED_KEY) as client:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
        await eventually(lambda n=i + 1: all(
            s.app[STATE_SYNC].store.usage("limited", now=time.time()).requests >= n
            for s in servers), timeout=5)
    for server in servers:
        async with client_for(server, key=LIMITED_KEY) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert "6 requests per minute" in caught.value.message
    async with client_for(servers[0], key=CLIENT_KEY) as client:  # other keys are not limited
        await client.chat.completions.create(model="chat", messages=MESSAGES)


async def test_sync_endpoint_refuses_requests_without_the_token(cluster):
    """/sync answers 401 without the shared secret and 404 for an unknown document, each saying
    what to send; /health lists the peers."""
    servers, _ = cluster
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        refused = await h.get(f"{servers[0].url}/sync/sessions")
        wrong = await h.get(f"{servers[0].url}/sync/sessions?token=nope")
        unknown = await h.get(f"{servers[0].url}/sync/nope?token={SYNC_TOKEN}")
        health = await (await h.get(f"{servers[0].url}/health")).json()
        assert (refused.status, wrong.status, unknown.status) == (401, 401, 404)
        assert "send this deployment's sync.token as 'Authorization: Bearer" in await refused.text()
        assert "serves sessions, usage" in await unknown.text()
    assert len(health["peers"]) >= 2
    assert set(health["peers"]) == {"connected"}


async def test_bad_key_found_by_one_instance_is_learnt_by_the_others(cluster):
    """An upstream with a bad key, found on one instance, leaves rotation on all of them."""
    servers, ups = cluster
    ups[0].behaviour.mode = "bad_key"
    async with client_for(servers[1]) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert "from b" in reply.choices[0].message.content

    async def state_on(server) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
            health = await (await h.get(f"{server.url}/health")).json()
        return health["upstreams"]["a"]["state"]

    async def learnt() -> bool:
        return await state_on(servers[2]) == "bad_key"

    await eventually(learnt, timeout=8)
    async with client_for(servers[2]) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert "from b" in reply.choices[0].message.content
    assert ups[0].requests_total == 1



def test_sync_discovery_and_its_interval_come_from_yaml():
    """`sync.discovery` and `sync.discovery_interval` reach the instance's StateSync; a bad
    target is a config error that says what to write."""
    up = "  - {name: a, url: 'http://127.0.0.1:9', api_key: k, region: r, models: {chat: x}}\n"
    text = routing_yaml([up], extra="sync:\n  token: t\n  discovery: dns:sky.ns.svc:9000\n"
                        "  discovery_interval: 250ms\n")
    sync = state_sync_for(parse_config(text, env={}), CollectorRegistry())
    assert sync.settings.discovery_target() == ("sky.ns.svc", 9000)
    assert sync.settings.discovery_interval_s == 0.25
    with pytest.raises(ConfigError, match=r"discovery 'dns:sky:99999' must look like dns:<serv"):
        parse_config(text.replace("dns:sky.ns.svc:9000", "dns:sky:99999"), env={})


async def test_instances_find_each_other_through_dns_discovery(standin):
    """Two instances whose `sync.discovery` names localhost at b's port share sessions; b
    resolves the name to its own address and shows that link as `self` in /health."""
    ups = [await standin(name) for name in ("a", "b")]
    socks = [_bound_socket(), _bound_socket()]
    port_b = socks[1].getsockname()[1]
    async with AsyncExitStack() as stack:
        servers = []
        for i, order in enumerate(("[a, b]", "[b, a]")):
            extra = (f"instance:\n  id: d{i}\nsync:\n  token: {SYNC_TOKEN}\n"
                     f"  discovery: dns:localhost:{port_b}\n  discovery_interval: 200ms\n")
            text = routing_yaml([entry(u) for u in ups],
                                f"- model: chat\n  targets: {order}\n  strategy: priority\n",
                                extra=extra)
            server = Server(parse_config(text, env={}), sock=socks[i], grace_s=1.0)
            await stack.enter_async_context(server)
            servers.append(server)
        a, b = servers
        b_url = f"ws://127.0.0.1:{port_b}/sync/sessions"
        await eventually(lambda: a.app[STATE_SYNC].peer_states().get(b_url) == "connected"
                         and b.app[STATE_SYNC].peer_states().get(b_url) == "self", timeout=10)
        headers = {"X-Session-ID": "found-by-dns"}
        async with client_for(b) as client:
            first = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                         extra_headers=headers)
        assert "from b" in first.choices[0].message.content
        await eventually(lambda: a.app[STATE_SYNC].store.get("found-by-dns", now=time.time())
                         is not None)
        async with client_for(a) as client:
            reply = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                         extra_headers=headers)
        assert "from b" in reply.choices[0].message.content
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
            health = await (await h.get(f"{b.url}/health")).json()
            metrics = await (await h.get(f"{a.url}/metrics")).text()
        assert "self" in health["peers"]  # public /health: states, no URLs
        assert 'skyroute_sync_discovery_lookups_total{outcome="ok"}' in metrics
        assert "skyroute_sync_discovered_peers" in metrics


async def test_client_that_waits_retry_after_is_admitted_by_the_sdk_retry(standin, skyroute,
                                                                          captured_logs):
    """rpm: 3 with two requests counted 56.5 s ago (as a peer instance would have) and one
    now: the next call is refused with 429, a Retry-After that the message repeats and
    OpenAI's rate-limit headers; the SDK (max_retries=2) waits as told and is admitted on
    its first retry."""
    up = await standin("a")
    text = routing_yaml([entry(up)], "- model: chat\n  targets: [a]\n").replace(
        "auth:\n  api_keys:\n",
        f"auth:\n  api_keys:\n    - name: limited\n      key: {LIMITED_KEY}\n      rpm: 3\n")
    server = await skyroute(text)
    answers = []  # every HTTP answer the SDK got, retries included

    async def seen(response) -> None:
        await response.aread()
        answers.append(response)

    async with openai.DefaultAsyncHttpxClient(event_hooks={"response": [seen]},
                                              timeout=CALL_TIMEOUT_S) as http, \
            client_for(server, key=LIMITED_KEY, max_retries=2, http_client=http) as client:
        await client.chat.completions.create(model="chat", messages=MESSAGES)
        server.app[STATE_SYNC].store.add_usage("limited", requests=2, now=time.time() - 56.5)
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from a")
    assert [r.status_code for r in answers] == [200, 429, 200]
    refused = answers[1]
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 5
    assert refused.json()["error"]["message"].endswith(f"retry after {wait}s")
    assert "3 requests per minute" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == f"{wait}s"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        metrics = await (await h.get(f"{server.url}/metrics")).text()
    assert 'skyroute_rate_limited_total{key="limited",limit="requests"} 1.0' in metrics
    (logged,) = [e for e in captured_logs if e["event"] == "request_rate_limited"]
    assert (logged["key"], logged["limit"], logged["retry_after_s"]) == ("limited", "requests",
                                                                         wait)
    assert logged["request_id"] == refused.headers["X-Request-ID"]


@pytest.fixture
async def distant(standin):
    """Three instances whose sync links are delay lines (5/20/15 ms one-way), a key with
    rpm 6; yields once every instance has heard from the two others (each owns 2)."""
    up = await standin("a")
    socks = [_bound_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    delays = {(0, 1): 0.005, (0, 2): 0.020, (1, 2): 0.015}
    async with AsyncExitStack() as stack:
        servers = []
        for i, sock in enumerate(socks):
            peers = []
            for j, port in enumerate(ports):
                if j != i:
                    line = TcpForwarder(port, delay_s=delays[(min(i, j), max(i, j))])
                    await line.start()
                    stack.push_async_callback(line.aclose)
                    peers.append(f"ws://127.0.0.1:{line.port}/sync")
            text = routing_yaml([entry(up)], "- model: chat\n  targets: [a]\n", extra=(
                f"instance:\n  id: s{i}\nsync:\n  token: {SYNC_TOKEN}\n"
                f"  peers: [{', '.join(peers)}]\n")).replace(
                "auth:\n  api_keys:\n",
                f"auth:\n  api_keys:\n    - name: limited\n      key: {LIMITED_KEY}\n"
                "      rpm: 6\n")
            server = Server(parse_config(text, env={}), sock=sock, grace_s=1.0)
            await stack.enter_async_context(server)
            servers.append(server)
        await eventually(lambda: all(len(s.app[LIMIT_SHARES].live) == 3 for s in servers),
                         timeout=10)
        yield servers


async def test_rpm_holds_for_a_burst_at_three_instances_behind_delay_lines(distant):
    """30 requests at once, 10 at each instance, admit at most 6 in all: each instance keeps
    to its share (2 here); counting alone, each would admit up to 6 before the others' counts
    arrive (18 were). The refusals say the share, and /metrics shows it."""
    servers = distant

    async def one(server: Server) -> str:
        async with client_for(server, key=LIMITED_KEY) as client:
            try:
                await client.chat.completions.create(model="chat", messages=MESSAGES)
            except openai.RateLimitError as refused:
                return refused.message
        return "admitted"

    outcomes = await asyncio.gather(*(one(servers[n % 3]) for n in range(30)))
    assert outcomes.count("admitted") <= 6
    assert outcomes.count("admitted") >= 3  # each instance admitted within its share
    refusals = [o for o in outcomes if o != "admitted"]
    assert all("6 requests per minute" in o for o in refusals)
    assert any("this instance's share (2) is used" in o for o in refusals)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)) as h:
        metrics = await (await h.get(f"{servers[0].url}/metrics")).text()
    assert 'skyroute_rate_limit_share{key="limited"}' in metrics


async def test_a_key_used_at_one_instance_gets_the_whole_rpm_by_retrying_as_told(distant):
    """Six requests one after another at one instance: the shares of the two idle instances
    move to it. A request that finds this instance's share used while the others hold unused
    budget is told Retry-After 1s, and the SDK's own retries (it waits as told) get all six
    through; the seventh is refused once nothing is left anywhere."""
    servers = distant
    async with client_for(servers[0], key=LIMITED_KEY, max_retries=8) as client:
        for _ in range(6):
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    async with client_for(servers[0], key=LIMITED_KEY) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert int(caught.value.response.headers["Retry-After"]) > 1
