"""StateSync instances on real aiohttp servers (port 0): a full mesh, and DNS discovery."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.statesync import LinkState, Resolve, StateSync, SyncSettings, Usage
from skyroute.statesync._doc import DocHub, EpochDoc
from skyroute.statesync._links import LinkSupervisor, link_backoff
from skyroute.statesync._metrics import SyncMetrics

from .conftest import eventually

TOKEN = "s3cret-token"


def bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@dataclass
class Instance:
    name: str
    port: int
    sync: StateSync
    runner: web.AppRunner
    registry: CollectorRegistry
    sock: socket.socket

    async def stop(self) -> None:
        await self.sync.aclose()
        await self.runner.cleanup()
        self.sock.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0


async def start_instance(
    name: str,
    sock: socket.socket,
    peer_ports: list[int],
    *,
    token: str | None = TOKEN,
    clock: Callable[[], float] = time.time,
    resolve: Resolve | None = None,
    **settings: Any,
) -> Instance:
    port = sock.getsockname()[1]
    registry = CollectorRegistry()
    sync = StateSync(
        SyncSettings(
            instance_id=name,
            token=token,
            peers=tuple(f"ws://127.0.0.1:{p}/sync" for p in peer_ports),
            **settings,
        ),
        registry=registry,
        clock=clock,
        **({"resolve": resolve} if resolve is not None else {}),
    )
    app = web.Application()
    sync.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await sync.start()
    return Instance(name, port, sync, runner, registry, sock)


def all_connected(*instances: Instance) -> bool:
    return all(
        i.sync.peer_states() and set(i.sync.peer_states().values()) == {"connected"}
        for i in instances
    )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[Instance]]:
    socks = [bound_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    instances: list[Instance] = []
    try:
        for i in range(3):
            peers = [p for p in ports if p != ports[i]]
            instances.append(await start_instance(f"s{i + 1}", socks[i], peers))
        await eventually(lambda: all_connected(*instances))
        yield instances
    finally:
        for inst in instances:
            await inst.stop()
        for sock in socks:
            sock.close()


def upstream_of(inst: Instance, session_id: str) -> str | None:
    got = inst.sync.store.get(session_id, now=time.time())
    return got.upstream if got is not None else None


async def test_StateSync_sessions_and_counters_converge(cluster: list[Instance]) -> None:
    """A pin on one instance and counts on all three are seen everywhere."""
    s1, s2, s3 = cluster
    s1.sync.store.pin("conv-1", "deepseek-eu", now=time.time())
    for inst in cluster:
        inst.sync.store.add_usage("team", requests=1, tokens=10, now=time.time())
    await eventually(lambda: all(upstream_of(i, "conv-1") == "deepseek-eu" for i in cluster))
    await eventually(
        lambda: all(i.sync.store.usage("team", now=time.time()) == Usage(3, 30) for i in cluster)
    )
    assert s2.metric("skyroute_sync_peers_connected") == 4  # 2 peers x 2 documents
    assert s3.metric("skyroute_sync_messages_total", direction="in", type="sync_update") > 0


async def test_StateSync_rate_shares_reach_every_peer_and_survive_rotation(
        cluster: list[Instance]) -> None:
    """A writer's published rate-limit shares reach the others, who hear it (local time)
    and see its own counts per writer; its own counts it reads exactly, unflushed too; after
    a rotation the entry is still there (re-asserted by its writer)."""
    s1, s2, s3 = cluster
    entry = {"w": s1.sync.writer_id, "k": {"team": {"d": 7, "g": {s2.sync.writer_id: 3}}}}
    s1.sync.store.publish_shares(entry)
    s1.sync.store.add_usage("team", requests=2, now=time.time())
    assert sum(b.requests for b in s1.sync.store.own_usage_buckets("team", now=time.time())) == 2
    assert s1.sync.store.own_usage_buckets("other", now=time.time()) == []

    def everywhere() -> bool:
        return all(i.sync.store.peer_shares().get(s1.sync.writer_id) == entry
                   and s1.sync.writer_id in i.sync.store.heard_from()
                   and i.sync.store.usage_by_writer("team", now=time.time())
                   == {s1.sync.writer_id: 2} for i in (s2, s3))

    await eventually(everywhere)
    assert s1.sync.writer_id not in s1.sync.store.peer_shares()  # its own is not a peer's
    for inst in cluster:
        await inst.sync.rotate()
    await eventually(lambda: all(i.sync.epoch == s1.sync.epoch for i in cluster)
                     and everywhere())


async def test_StateSync_rpm_counts_add_up_across_instances(cluster: list[Instance]) -> None:
    """Two requests on each of three instances read as six everywhere (the rpm: 6 case)."""
    now = time.time()
    for inst in cluster:
        for _ in range(2):
            inst.sync.store.add_usage("limited", requests=1, now=now)
    await eventually(
        lambda: all(i.sync.store.usage("limited", now=time.time()).requests == 6 for i in cluster)
    )


async def test_StateSync_link_cut_and_heal_loses_nothing(cluster: list[Instance]) -> None:
    """Writes on both sides of a cut are all present everywhere after the heal."""
    s1, s2, s3 = cluster
    await s3.sync.disconnect_peers()
    await eventually(lambda: s3.sync.inbound_connections() == 0 and not s3.sync.peer_states())
    now = time.time()
    s3.sync.store.pin("cut-a", "up-a", now=now)
    s3.sync.store.add_usage("k", requests=4, now=now)
    s1.sync.store.pin("cut-b", "up-b", now=now)
    s1.sync.store.add_usage("k", requests=3, now=now)
    await eventually(lambda: s2.sync.store.usage("k", now=time.time()).requests == 3)
    assert upstream_of(s2, "cut-a") is None and upstream_of(s3, "cut-b") is None
    s3.sync.connect_peers()
    await eventually(
        lambda: all(
            upstream_of(i, "cut-a") == "up-a"
            and upstream_of(i, "cut-b") == "up-b"
            and i.sync.store.usage("k", now=time.time()).requests == 7
            for i in cluster
        )
    )


async def test_StateSync_restarted_instance_catches_up(cluster: list[Instance]) -> None:
    """An instance killed and restarted on its port gets what was written while it was down."""
    s1, s2, s3 = cluster
    s3.sync.store.add_usage("k", requests=2, now=time.time())
    await eventually(lambda: s1.sync.store.usage("k", now=time.time()).requests == 2)
    await s3.stop()
    s1.sync.store.pin("while-down", "u9", now=time.time())
    new_s3 = await start_instance("s3", bound_socket(s3.port), [s1.port, s2.port])
    cluster[2] = new_s3  # the fixture stops it
    await eventually(lambda: upstream_of(new_s3, "while-down") == "u9")
    await eventually(lambda: new_s3.sync.store.usage("k", now=time.time()).requests == 2)
    new_s3.sync.store.add_usage("k", requests=1, now=time.time())
    await eventually(lambda: s1.sync.store.usage("k", now=time.time()).requests == 3)


async def test_StateSync_refuses_unauthenticated_peers(
    captured_logs: list[dict[str, Any]], cluster: list[Instance]
) -> None:
    """No token or a wrong one gets 401 before the upgrade, is counted, and is logged."""
    s1 = cluster[0]
    url = f"http://127.0.0.1:{s1.port}/sync/sessions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        for kwargs in (
            {},
            {"headers": {"Authorization": "Bearer wrong"}},
            {"params": {"token": "wrong"}},
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(url, **kwargs)
            assert info.value.status == 401
        ws = await http.ws_connect(url, params={"token": TOKEN})
        await ws.close()
    assert s1.metric("skyroute_sync_auth_failures_total") == 3
    refused = [e for e in captured_logs if e["event"] == "sync_auth_refused"]
    assert [(e["instance"], e["peer"], e["has_token"]) for e in refused] == [
        ("s1", "127.0.0.1", False),
        ("s1", "127.0.0.1", True),
        ("s1", "127.0.0.1", True),
    ]
    assert "wrong" not in repr(refused)  # the presented token is never logged
    intruder = await start_instance("evil", bound_socket(), [s1.port], token="nope")
    try:
        await eventually(lambda: set(intruder.sync.peer_states().values()) == {"unauthorized"})
        intruder.sync.store.pin("x", "hijack", now=time.time())
        assert upstream_of(s1, "x") is None
    finally:
        await intruder.stop()


async def test_StateSync_rotation_keeps_live_entries_and_sync(cluster: list[Instance]) -> None:
    """Rotating one instance moves the cluster to the next epoch; live kept, dead dropped."""
    s1, s2, s3 = cluster
    now = time.time()
    for i in range(200):  # idle for longer than the TTL: dropped by the rotation
        s1.sync.store.pin(f"old-{i}", "u", now=now - 86400.0 - 10)
    for i in range(50):  # moves: each made knowing the pin before it
        s1.sync.store.pin("churn", f"u{i}", now=now, moved_from=f"u{i - 1}" if i else None)
    s2.sync.store.add_usage("k", requests=5, now=now)
    await eventually(lambda: all(upstream_of(i, "churn") == "u49" for i in cluster))
    await eventually(lambda: s3.sync.store.usage("k", now=time.time()).requests == 5)
    before = s1.sync.document_sizes()["sessions"]
    epoch = s1.sync.epoch
    await s1.sync.rotate()
    await eventually(lambda: all(i.sync.epoch == epoch + 1 for i in cluster))
    await eventually(lambda: all_connected(*cluster))
    assert s1.sync.document_sizes()["sessions"] < before / 4
    s3.sync.store.pin("after", "u-new", now=time.time())
    await eventually(
        lambda: all(
            upstream_of(i, "churn") == "u49"
            and upstream_of(i, "after") == "u-new"
            and i.sync.store.usage("k", now=time.time()).requests == 5
            for i in cluster
        )
    )


async def test_StateSync_snapshot_survives_whole_cluster_restart(tmp_path: Path) -> None:
    """With a snapshot path, a lone instance restarted after everything stopped keeps sessions."""
    path = str(tmp_path / "s1.snapshot")
    sock = bound_socket()
    s1 = await start_instance("s1", sock, [], snapshot_path=path)
    s1.sync.store.pin("persist", "u1", now=time.time())
    await s1.stop()
    again = await start_instance("s1", bound_socket(), [], snapshot_path=path)
    try:
        assert upstream_of(again, "persist") == "u1"
    finally:
        await again.stop()


async def test_StateSync_peer_with_newer_epoch_pulls_cluster_forward() -> None:
    """An instance whose clock is an epoch ahead makes its peers rotate to its epoch."""
    socks = [bound_socket(), bound_socket()]
    ports = [s.getsockname()[1] for s in socks]
    a = await start_instance("a", socks[0], [ports[1]])
    b = await start_instance("b", socks[1], [ports[0]], clock=lambda: time.time() + 3600.0)
    try:
        assert b.sync.epoch == a.sync.epoch + 1
        await eventually(lambda: a.sync.epoch == b.sync.epoch and all_connected(a, b))
        a.sync.store.pin("s", "u", now=time.time())
        await eventually(lambda: upstream_of(b, "s") == "u")
    finally:
        await a.stop()
        await b.stop()


# -- DNS discovery ------------------------------------------------------------------------


def link_states(inst: Instance, base_url: str) -> set[str]:
    """States of ``inst``'s links (one per document) to the peer at ``base_url``."""
    return {
        state for url, state in inst.sync.peer_states().items() if url.startswith(f"{base_url}/")
    }


async def test_StateSync_dns_discovery_through_the_real_resolver_skips_itself(
    captured_logs: list[dict[str, Any]],
) -> None:
    """``dns:localhost:<port of b>`` makes a peer with b, and b, resolving the same name to
    itself (a headless Service lists every pod), recognises its own address by the handshake."""
    sock_a, sock_b = bound_socket(), bound_socket()
    port_b = sock_b.getsockname()[1]
    found = {"discovery": f"dns:localhost:{port_b}", "discovery_interval_s": 0.2}
    b = await start_instance("b", sock_b, [], **found)
    a = await start_instance("a", sock_a, [], **found)
    try:
        b_url = f"ws://127.0.0.1:{port_b}/sync"
        await eventually(lambda: link_states(a, b_url) == {"connected"})
        await eventually(lambda: link_states(b, b_url) == {"self"})
        a.sync.store.pin("from-a", "u-a", now=time.time())
        b.sync.store.pin("from-b", "u-b", now=time.time())
        await eventually(
            lambda: upstream_of(b, "from-a") == "u-a" and upstream_of(a, "from-b") == "u-b"
        )
        # b holds no connection to itself: its only inbound links are a's two documents.
        assert b.sync.inbound_connections() == 2
        # localhost may also resolve to ::1, where nothing listens: that link only backs
        # off, and nothing here was ever mistaken for a peer of itself.
        assert set(a.sync.peer_states().values()) <= {"connected", "connecting", "backoff"}
        assert set(b.sync.peer_states().values()) <= {"self", "connecting", "backoff"}
        assert b.metric("skyroute_sync_discovery_lookups_total", outcome="ok") >= 1
        assert b.metric("skyroute_sync_discovered_peers") >= 1
        assert any(
            e["event"] == "sync_discovery_changed" and b_url in e["added"] for e in captured_logs
        )
    finally:
        await a.stop()
        await b.stop()


class ScriptedDns:
    """Stands in for the DNS server (the network boundary): it answers ``answer``, or,
    while that is None, fails as the system resolver does for a name it cannot find."""

    def __init__(self) -> None:
        self.answer: set[str] | None = None
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> set[str]:
        self.lookups += 1
        if self.answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return set(self.answer)


async def test_StateSync_discovery_rereads_dns_and_follows_its_answer(
    captured_logs: list[dict[str, Any]],
) -> None:
    """A name that does not resolve is logged and retried; once it resolves the peer is
    linked, and when its address leaves the answer the link is dropped."""
    b = await start_instance("b", bound_socket(), [])
    dns = ScriptedDns()
    target = f"skyroute-headless.test:{b.port}"
    a = await start_instance(
        "a", bound_socket(), [], discovery=f"dns:{target}", discovery_interval_s=0.05, resolve=dns
    )
    try:
        await eventually(
            lambda: a.metric("skyroute_sync_discovery_lookups_total", outcome="failed") >= 3
        )
        failed = [e for e in captured_logs if e["event"] == "sync_discovery_failed"]
        assert failed[0]["target"] == target and failed[0]["log_level"] == "warning"
        assert "Name or service not known" in failed[0]["error"]
        assert failed[0]["retry_in_s"] == 0.05 and "sync.discovery" in failed[0]["hint"]
        assert a.sync.peer_states() == {}

        dns.answer = {"127.0.0.1"}
        b_url = f"ws://127.0.0.1:{b.port}/sync"
        await eventually(lambda: link_states(a, b_url) == {"connected"})
        a.sync.store.pin("found", "u1", now=time.time())
        await eventually(lambda: upstream_of(b, "found") == "u1")

        dns.answer = set()
        await eventually(lambda: a.sync.peer_states() == {} and b.sync.inbound_connections() == 0)
        assert any(e["event"] == "sync_peer_dropped" and e["peer"] == b_url for e in captured_logs)
        lookups = dns.lookups
        await eventually(lambda: dns.lookups > lookups)  # still re-reading DNS
        assert a.metric("skyroute_sync_discovered_peers") == 0
    finally:
        await a.stop()
        await b.stop()


async def test_StateSync_processes_sharing_an_instance_id_still_peer(
    captured_logs: list[dict[str, Any]],
) -> None:
    """Two processes misconfigured with one ``instance.id`` are not taken for one
    another (the handshake names the process), so they sync; the clash is logged."""
    socks = [bound_socket(), bound_socket()]
    ports = [s.getsockname()[1] for s in socks]
    a = await start_instance("same", socks[0], [ports[1]])
    b = await start_instance("same", socks[1], [ports[0]])
    try:
        await eventually(lambda: all_connected(a, b))
        a.sync.store.pin("twin", "u", now=time.time())
        await eventually(lambda: upstream_of(b, "twin") == "u")
        assert any(e["event"] == "sync_instance_id_duplicated" for e in captured_logs)
    finally:
        await a.stop()
        await b.stop()


async def test_LinkSupervisor_waits_the_backoff_through_its_injected_sleep() -> None:
    """A peer that refuses connections is redialled after each delay of routing's backoff
    (equal jitter, seeded), and every wait goes through the injected ``sleep``: eight
    attempts take no wall time."""
    refusing = bound_socket()  # bound, never listening: every connect is refused at once
    port = refusing.getsockname()[1]
    waits: list[float] = []
    states: set[LinkState] = set()
    enough = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        states.add(supervisor.state)
        if len(waits) == 8:
            enough.set()
        await asyncio.sleep(0)

    hub = DocHub(EpochDoc("sessions", 1), metrics=SyncMetrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        supervisor = LinkSupervisor(
            base_url=f"ws://127.0.0.1:{port}/sync", hub=hub,
            settings=SyncSettings(instance_id="lonely", token=TOKEN), writer_id="lonely.1",
            session=session, metrics=SyncMetrics(CollectorRegistry()), epoch=lambda: 1,
            on_peer_epoch=lambda epoch: asyncio.sleep(0), sleep=sleep, rng=random.Random(9))
        supervisor.start()
        try:
            async with asyncio.timeout(5.0):
                await enough.wait()
        finally:
            await supervisor.aclose()
    refusing.close()
    assert waits[:8] == list(itertools.islice(link_backoff(random.Random(9)), 8))
    assert states == {LinkState.BACKOFF}
