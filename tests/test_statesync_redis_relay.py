"""Fleet mode (``sync.relay``): StateSync instances joined through a real Redis.

The shared Redis on 127.0.0.1:6379 carries the tests that do not stop it (each
with its own key prefix, deleted at the end); a test that stops the engine runs
its own ``redis-server`` on a free port.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from prometheus_client import CollectorRegistry
from pycrdt import Doc, Map
from skyroute.proxy import Server
from skyroute.proxy._sessions import state_sync_for
from skyroute.proxy._state import STATE_SYNC
from skyroute.routing import ConfigError, parse_config
from skyroute.statesync import StateSync, SyncConfigError, SyncSettings

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

TOKEN = "relay-test-token"
SHARED_REDIS = "redis://127.0.0.1:6379/0"


def _now() -> float:
    return time.time()


class Fleet:
    """StateSync instances on one relay, each with its own metrics registry."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.instances: list[StateSync] = []
        self.registries: dict[StateSync, CollectorRegistry] = {}

    async def start(self, name: str, **settings: Any) -> StateSync:
        settings.setdefault("relay_compact_every_s", 30.0)
        registry = CollectorRegistry()
        sync = StateSync(SyncSettings(instance_id=name, token=settings.pop("token", TOKEN),
                                      relay_url=self.url, relay_prefix=self.prefix,
                                      ping_interval_s=0.2, **settings), registry=registry)
        await sync.start()
        self.instances.append(sync)
        self.registries[sync] = registry
        return sync

    def metric(self, sync: StateSync, name: str, **labels: str) -> float:
        return self.registries[sync].get_sample_value(name, labels or None) or 0.0

    async def aclose(self) -> None:
        for sync in self.instances:
            await sync.aclose()


def connected(*instances: StateSync) -> bool:
    return all(set(s.peer_states().values()) == {"connected"} for s in instances)


def upstream_at(sync: StateSync, session: str) -> str | None:
    found = sync.store.get(session, now=_now())
    return found.upstream if found is not None else None


async def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=CALL_TIMEOUT_S)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    prefix = f"skyroute-test:{secrets.token_hex(4)}:"
    group = Fleet(SHARED_REDIS, prefix)
    try:
        yield group
    finally:
        await group.aclose()
        await _delete_prefix(SHARED_REDIS, prefix)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of the test's own on a free port, stopped and restarted at will."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)], stdout=subprocess.DEVNULL)

        async def answers() -> bool:
            client = redis.Redis.from_url(self.url, socket_timeout=1.0)
            try:
                return bool(await client.ping())
            except (redis.RedisError, OSError):
                return False
            finally:
                await client.aclose()

        await eventually(answers, timeout=CALL_TIMEOUT_S, interval=0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=CALL_TIMEOUT_S)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def test_three_instances_converge_through_the_relay(fleet: Fleet) -> None:
    """Writes at each of three instances reach the other two; each instance sends every
    update once (to the engine), never once per peer."""
    a, b, c = [await fleet.start(name) for name in ("a", "b", "c")]
    await eventually(lambda: connected(a, b, c), timeout=CALL_TIMEOUT_S)
    for sync, name in ((a, "up-a"), (b, "up-b"), (c, "up-c")):
        sync.store.pin(f"s-{name}", name, now=_now())
    await eventually(lambda: all(upstream_at(s, f"s-{n}") == n for s in (a, b, c)
                                 for n in ("up-a", "up-b", "up-c")), timeout=CALL_TIMEOUT_S)
    a.store.add_usage("key", requests=3, now=_now())
    c.store.add_usage("key", requests=4, now=_now())
    await eventually(lambda: b.store.usage("key", now=_now()).requests == 7,
                     timeout=CALL_TIMEOUT_S)
    assert a.peer_states() == {"redis://127.0.0.1:6379/0/sessions": "connected",
                               "redis://127.0.0.1:6379/0/usage": "connected"}
    assert fleet.metric(a, "skyroute_sync_peers_connected") == 2.0
    assert fleet.metric(b, "skyroute_sync_messages_total", direction="in",
                        type="sync_update") > 0


async def test_new_instance_catches_up_from_snapshot_and_tail(fleet: Fleet) -> None:
    """Writes compacted into a snapshot (the stream trimmed behind it) and writes after it:
    an instance started later holds them all."""
    a = await fleet.start("a", relay_compact_every_s=0.1)
    b = await fleet.start("b", relay_compact_every_s=0.1)
    await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
    for i in range(20):
        a.store.pin(f"old-{i}", "up-old", now=_now())
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=CALL_TIMEOUT_S)
    log_key = f"{fleet.prefix}{{sessions:{a.epoch}}}:log"
    snap_key = f"{fleet.prefix}{{sessions:{a.epoch}}}:snap"
    try:
        await eventually(lambda: upstream_at(b, "old-19") == "up-old", timeout=CALL_TIMEOUT_S)
        newest = (await client.xrevrange(log_key, "+", "-", count=1))[0][0]

        async def trimmed() -> bool:
            # Compacted twice since: the pins left the stream, only the snapshot has them.
            cut = await client.hget(snap_key, "trimmed")
            return cut is not None and _id(cut) > _id(newest)

        await eventually(trimmed, timeout=CALL_TIMEOUT_S)
        assert not await client.xrange(log_key, "-", newest)
        b.store.pin("new", "up-new", now=_now())
        c = await fleet.start("c")
        await eventually(lambda: connected(c) and upstream_at(c, "new") == "up-new",
                         timeout=CALL_TIMEOUT_S)
        assert all(upstream_at(c, f"old-{i}") == "up-old" for i in range(20))
        assert fleet.metric(a, "skyroute_sync_relay_compactions_total") + fleet.metric(
            b, "skyroute_sync_relay_compactions_total") >= 2
    finally:
        await client.aclose()


async def test_engine_restarted_mid_run_then_everyone_catches_up(own_redis: OwnRedis) -> None:
    """The engine stops: /health's link states and the metric show it within the dead time,
    local state keeps working; it comes back empty, and writes made meanwhile reach the
    other instance (the instances republish what the engine lacks)."""
    await own_redis.start()
    fleet = Fleet(own_redis.url, "skyroute:sync:")
    try:
        a, b = await fleet.start("a"), await fleet.start("b")
        await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
        a.store.pin("before", "up-1", now=_now())
        await eventually(lambda: upstream_at(b, "before") == "up-1", timeout=CALL_TIMEOUT_S)
        own_redis.stop()
        await eventually(lambda: not any(connected(s) for s in (a, b)), timeout=CALL_TIMEOUT_S)
        assert fleet.metric(a, "skyroute_sync_peers_connected") == 0.0
        a.store.pin("during", "up-2", now=_now())
        b.store.pin("during-b", "up-3", now=_now())
        assert upstream_at(a, "during") == "up-2"  # reads and writes go on locally
        await own_redis.start()
        await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
        await eventually(lambda: upstream_at(b, "during") == "up-2"
                         and upstream_at(a, "during-b") == "up-3", timeout=CALL_TIMEOUT_S)
        assert upstream_at(b, "before") == "up-1"
        c = await fleet.start("c")  # the engine was refilled: a newcomer gets everything
        await eventually(lambda: upstream_at(c, "during") == "up-2"
                         and upstream_at(c, "before") == "up-1", timeout=CALL_TIMEOUT_S)
    finally:
        await fleet.aclose()


def _id(raw: bytes) -> tuple[int, int]:
    ms, seq = raw.decode().split("-")
    return int(ms), int(seq)


def _signed_entry(doc: str, epoch: int, writer: str, update: bytes, token: str = TOKEN
                  ) -> dict[str, bytes]:
    """A stream entry as a writer holding ``token`` publishes it (see _redis_relay)."""
    mac = hmac.new(token.encode(), b"|".join([doc.encode(), str(epoch).encode(),
                                              writer.encode(), update]), hashlib.sha256)
    return {"u": update, "w": writer.encode(), "m": mac.digest()}


def _session_update(session: str, value: Any) -> bytes:
    doc: Doc[Any] = Doc()
    doc.get("sessions", type=Map)[session] = value
    return doc.get_update()


async def test_update_failing_validation_is_refused_as_on_the_mesh(fleet: Fleet) -> None:
    """A signed update that breaks the schema is dropped whole and counted; one with a
    wrong MAC (not the sync token) is refused as an auth failure; good ones still apply."""
    a = await fleet.start("a")
    await eventually(lambda: connected(a), timeout=CALL_TIMEOUT_S)
    log_key = f"{fleet.prefix}{{sessions:{a.epoch}}}:log"
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=CALL_TIMEOUT_S)
    try:
        bad = _session_update("evil", {"upstream": "x", "created": float("inf")})
        await client.xadd(log_key, _signed_entry("sessions", a.epoch, "mallory.1", bad))
        forged = _session_update("forged", {"upstream": "x"})
        await client.xadd(log_key, _signed_entry("sessions", a.epoch, "mallory.1", forged,
                                                 token="not-the-token"))
        good = _session_update("fine", {"upstream": "up-ok"})
        await client.xadd(log_key, _signed_entry("sessions", a.epoch, "friend.1", good))
    finally:
        await client.aclose()
    await eventually(lambda: upstream_at(a, "fine") == "up-ok", timeout=CALL_TIMEOUT_S)
    assert a.store.get("evil", now=_now()) is None
    assert a.store.get("forged", now=_now()) is None
    assert fleet.metric(a, "skyroute_sync_updates_rejected_total", doc="sessions",
                        reason="schema") == 1.0
    assert fleet.metric(a, "skyroute_sync_auth_failures_total") == 1.0
    assert connected(a)  # the shared stream is not "closed" on a bad entry


async def test_rotation_through_the_relay(fleet: Fleet) -> None:
    """One instance rotating makes the other follow (an ``{e: N}`` entry in the old
    stream); state is carried, and writes in the new epoch converge."""
    a, b = await fleet.start("a"), await fleet.start("b")
    await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
    a.store.pin("kept", "up-1", now=_now())
    await eventually(lambda: upstream_at(b, "kept") == "up-1", timeout=CALL_TIMEOUT_S)
    old = a.epoch
    await a.rotate()
    await eventually(lambda: b.epoch == old + 1, timeout=CALL_TIMEOUT_S)
    await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
    b.store.pin("after", "up-2", now=_now())
    await eventually(lambda: upstream_at(a, "after") == "up-2", timeout=CALL_TIMEOUT_S)
    assert upstream_at(a, "kept") == upstream_at(b, "kept") == "up-1"
    late = await fleet.start("late")  # its clock says the old epoch: it adopts the newest
    await eventually(lambda: late.epoch == old + 1 and upstream_at(late, "after") == "up-2",
                     timeout=CALL_TIMEOUT_S)


def test_relay_settings_are_checked() -> None:
    """A relay needs the token, excludes peers, and names a Redis URL."""
    with pytest.raises(SyncConfigError, match=r"needs sync\.token"):
        SyncSettings(instance_id="a", token=None, relay_url=SHARED_REDIS)
    with pytest.raises(SyncConfigError, match="replaces peers and discovery"):
        SyncSettings(instance_id="a", token="t", relay_url=SHARED_REDIS,
                     peers=("ws://127.0.0.1:1/sync",))
    with pytest.raises(SyncConfigError, match=r"'tcp://\*\*\*@h:1' must start with redis://"):
        SyncSettings(instance_id="a", token="t", relay_url="tcp://:pw@h:1")


_UP = "  - {name: a, url: 'http://127.0.0.1:9', api_key: k, region: r, models: {chat: x}}\n"


def test_routing_file_sync_relay() -> None:
    """``sync.relay`` reaches StateSync as written; with peers it is refused, saying why."""
    text = routing_yaml([_UP], extra="sync:\n  token: t\n  relay:\n"
                                     "    url: redis://:secret@127.0.0.1:6379/2\n"
                                     "    prefix: 'fleet-eu:'\n    compact_every: 5s\n")
    sync = state_sync_for(parse_config(text, env={}), CollectorRegistry())
    assert sync.settings.relay_url == "redis://:secret@127.0.0.1:6379/2"
    assert sync.settings.relay_prefix == "fleet-eu:"
    assert sync.settings.relay_compact_every_s == 5.0
    with pytest.raises(ConfigError, match="relay replaces peers and discovery"):
        parse_config(text.replace("  relay:\n", "  peers: [ws://127.0.0.1:1/sync]\n  relay:\n"),
                     env={})


async def test_two_skyroutes_share_a_session_through_the_relay(standin) -> None:
    """Two skyroute servers with ``sync.relay``: a session answered by b at instance 0 is
    answered by b at instance 1 too (which prefers a); /health shows the relay link."""
    ups = [await standin(name) for name in ("a", "b")]
    prefix = f"skyroute-test:{secrets.token_hex(4)}:"
    try:
        async with AsyncExitStack() as stack:
            servers = []
            for i, order in enumerate(("[b, a]", "[a, b]")):
                extra = (f"instance:\n  id: f{i}\nsync:\n  token: {TOKEN}\n  relay:\n"
                         f"    url: {SHARED_REDIS}\n    prefix: '{prefix}'\n")
                text = routing_yaml([entry(u) for u in ups],
                                    f"- model: chat\n  targets: {order}\n  strategy: priority\n",
                                    extra=extra)
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                server = Server(parse_config(text, env={}), sock=sock, grace_s=1.0)
                await stack.enter_async_context(server)
                servers.append(server)
            first, second = servers
            await eventually(lambda: all(connected(s.app[STATE_SYNC]) for s in servers),
                             timeout=CALL_TIMEOUT_S)
            headers = {"X-Session-ID": "via-relay"}
            messages = [{"role": "user", "content": "hi"}]
            async with client_for(first) as client:
                reply = await client.chat.completions.create(model="chat", messages=messages,
                                                             extra_headers=headers)
            assert "from b" in reply.choices[0].message.content
            await eventually(lambda: second.app[STATE_SYNC].store.get("via-relay", now=_now())
                             is not None, timeout=CALL_TIMEOUT_S)
            async with client_for(second) as client:
                reply = await client.chat.completions.create(model="chat", messages=messages,
                                                             extra_headers=headers)
            assert "from b" in reply.choices[0].message.content
            timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                health = await (await http.get(f"{second.url}/health")).json()
                metrics = await (await http.get(f"{second.url}/metrics")).text()
            assert "connected" in str(health["peers"])
            assert "secret" not in str(health)
            assert "skyroute_sync_relay_compactions_total" in metrics
    finally:
        await _delete_prefix(SHARED_REDIS, prefix)


async def test_engine_unreachable_at_start_does_not_stop_the_instance(fleet: Fleet) -> None:
    """No engine at the address: start() returns, local state works, the link backs off."""
    dead = Fleet(f"redis://127.0.0.1:{_free_port()}/0", fleet.prefix)
    try:
        a = await dead.start("a")
        a.store.pin("local", "up-1", now=_now())
        assert upstream_at(a, "local") == "up-1"
        await eventually(lambda: set(a.peer_states().values()) <= {"backoff", "connecting"}
                         and "backoff" in a.peer_states().values(), timeout=CALL_TIMEOUT_S)
    finally:
        await dead.aclose()


async def test_epoch_key_is_signed_and_forged_values_are_refused(fleet: Fleet) -> None:
    """``{prefix}epoch`` carries a MAC: a forged or unsigned epoch (someone who can write
    to the Redis but lacks the token) neither moves the fleet nor blocks it; it is logged,
    counted as an auth failure and replaced by a signed value."""
    a = await fleet.start("a")
    await eventually(lambda: connected(a), timeout=CALL_TIMEOUT_S)
    key = f"{fleet.prefix}epoch"
    client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=CALL_TIMEOUT_S)
    try:
        stored = await client.get(key)
        number, _, mac = stored.partition(b":")
        assert int(number) == a.epoch
        expected = hmac.new(TOKEN.encode(), b"|".join([b"epoch", fleet.prefix.encode(),
                                                       number]), hashlib.sha256).hexdigest()
        assert mac.decode() == expected
        far = str(a.epoch + 1000).encode()
        forged = hmac.new(b"not-the-token", b"|".join([b"epoch", fleet.prefix.encode(), far]),
                          hashlib.sha256).hexdigest().encode()
        await client.set(key, far + b":" + forged)
        b = await fleet.start("b")
        await eventually(lambda: connected(a, b), timeout=CALL_TIMEOUT_S)
        assert b.epoch == a.epoch
        assert fleet.metric(b, "skyroute_sync_auth_failures_total") >= 1.0  # once per document link
        assert (await client.get(key)).partition(b":")[0] == str(a.epoch).encode()
        await client.set(key, far)  # unsigned, as an older version wrote it
        c = await fleet.start("c")
        await eventually(lambda: connected(a, b, c), timeout=CALL_TIMEOUT_S)
        assert c.epoch == a.epoch
        assert fleet.metric(c, "skyroute_sync_auth_failures_total") >= 1.0
        a.store.pin("still-synced", "up-1", now=_now())
        await eventually(lambda: upstream_at(c, "still-synced") == "up-1",
                         timeout=CALL_TIMEOUT_S)
    finally:
        await client.aclose()
