"""The shared level of the response cache: Redis, through the ``redis`` package's asyncio client.

Redis down is not an outage. Theory of operation:

* A lookup waits at most ``cache.redis.timeout`` (a few ms); a slower or failed
  lookup is a miss, never a client error. A slow command is left to finish in the
  background rather than cancelled (cancelling costs the connection). Only when this
  process itself ran late (the wait took twice the timeout: its event loop was behind)
  is a lookup given longer (``_within_timeout``), the delay being ours, not Redis'.
* A connection error, or ``_DOWN_AFTER`` slow answers in a row with no answer at all
  (late ones count) for ``_SILENT_S``, marks Redis *down* (a burst that waits on new
  connections is slow, not down):
  one ``cache_redis_down`` log line, ``skyroute_cache_redis_up`` goes to 0, and the
  request path stops asking Redis at all (no added latency). A background task
  pings it every ``_RECONNECT_S`` and marks it *up* again (``cache_redis_up``).
* Writes never delay an answer: they run as background tasks, at most
  ``_MAX_WRITES`` at a time (more are dropped and counted), each with a TTL set in
  Redis (the entry's lifetime plus its stale-if-error window).

Coalescing across instances (``get_or_claim``, ``release``, ``wait_stored``):

* A lookup that misses in Redis *claims* the key in the same round trip (a small Lua
  script: GET, else ``SET <prefix>claim:<key> <token> NX PX``), so no entry can land
  between the look and the claim. The claim is then a ``redis-py`` ``Lock`` holding
  that token: it lives ``_CLAIM_TTL_S``, renewed every ``_CLAIM_RENEW_S`` while this
  instance's upstream call runs. When the call ends the instance writes the entry (if
  any), releases the claim and publishes the key on ``<prefix>stored``, in that order,
  so a waiter that hears the note finds the entry.
* Another instance whose lookup finds the claim held waits for that note (one
  subscription per instance), checking every ``_CLAIM_CHECK_S`` that the claim still
  exists in case a note was lost. It then reads the entry; if there is none (the owner
  got no storable answer, died and its claim lapsed, or the wait passed its bound) it
  calls the upstream itself: never a client error. Claims are only made while Redis
  is up and the subscription is live; a lookup that times out claims nothing (a claim
  won late is given back at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from skyroute.routing import CachePolicy

if TYPE_CHECKING:  # redis-py itself is imported where it is used: ~6 MiB of RSS that
    # an instance without cache.redis does not load
    from redis.asyncio.lock import Lock

log = structlog.get_logger("skyroute.cache")

#: Slow answers in a row that count as Redis being down.
_DOWN_AFTER: Final = 3
#: Slow answers mark Redis down only when nothing came back for this long.
_SILENT_S: Final = 1.0
#: How often a down Redis is pinged.
_RECONNECT_S: Final = 1.0
#: Connecting and background commands wait this long (not the request path's timeout).
_BACKGROUND_TIMEOUT_S: Final = 1.0
#: Writes in flight at once; a Redis that keeps up needs a handful.
_MAX_WRITES: Final = 256
#: A claim lapses this long after its owner last renewed it (a dead owner's waiters go
#: upstream themselves within about this long).
_CLAIM_TTL_S: Final = 2.0
_CLAIM_RENEW_S: Final = 0.5
#: A waiter checks the owner's claim this often, in case the note that ends it is lost.
_CLAIM_CHECK_S: Final = 0.25
#: A lookup whose wait ran late (this process behind) waits at most this many timeouts more.
_LATE_WAITS: Final = 10
#: How often the Redis level's size is measured (by one instance at a time for all).
_MEASURE_S: Final = 30.0
#: Entries whose MEMORY USAGE is read per measurement; the bytes of the rest are
#: estimated from them (a full pass would cost Redis one command per entry).
_SAMPLE: Final = 1000
#: An entry's key is the prefix and a SHA-256 in hex.
_KEY_CHARS: Final = 64
#: ``get_or_claim`` answers this when another instance's call for the key is in flight.
BUSY: Final = "busy"
#: The entry under KEYS[1]; else 1 if KEYS[2] (the claim) was set to ARGV[1] for ARGV[2]
#: ms, 0 if someone else holds it.
_GET_OR_CLAIM: Final = """
local entry = redis.call('GET', KEYS[1])
if entry then return entry end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


def client_name(prefix: str) -> str:
    """The cache's Redis connection name for ``prefix`` (CLIENT SETNAME takes no spaces)."""
    return "skyroute-cache:" + re.sub(r"[^A-Za-z0-9:_.-]", "_", prefix)


class RedisMetrics:
    """The Redis level's series (registered once per application registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("skyroute_cache_redis_up",
                        "1 while the cache's Redis answers, 0 while skyroute goes on without it.",
                        multiprocess_mode="livemin", registry=registry)
        self.errors = Counter("skyroute_cache_redis_errors",
                              "Failed or slow Redis commands of the cache, by operation "
                              "(get, set, ping) and kind (timeout, error, dropped).",
                              ["op", "kind"], registry=registry)
        # The same shared value on every worker and instance: max, not sum.
        self.bytes = Gauge("skyroute_cache_redis_bytes",
                           "Bytes the Redis level's entries use in Redis (MEMORY USAGE of a "
                           "sample of up to 1000 entries, scaled to all), measured every 30 s.",
                           multiprocess_mode="max", registry=registry)
        self.entries = Gauge("skyroute_cache_redis_entries",
                             "Entries the Redis level holds (all instances' together), measured "
                             "every 30 s.", multiprocess_mode="max", registry=registry)
        self.remote_waits = Counter(
            "skyroute_cache_remote_waits",
            "Misses that waited for another instance's identical call in flight (coalescing "
            "through Redis), by outcome: hit (its answer served), fallback (no answer from it: "
            "served upstream here).", ["outcome"], registry=registry)


@dataclass(slots=True, eq=False)
class Claim:
    """This instance's claim on a key: its lock in Redis and the task that renews it."""

    key: str
    lock: Lock
    renewing: asyncio.Task[None]


class RedisLevel:
    """One Redis client for the cache, with its up/down state and reconnect task."""

    def __init__(self, policy: CachePolicy, metrics: RedisMetrics) -> None:
        assert policy.redis is not None
        self._settings = policy.redis
        self._lifetime_s = policy.ttl_s + policy.stale_if_error_s
        self._metrics = metrics
        import redis.asyncio as aioredis

        # Named, so CLIENT LIST tells which connections are the cache's (and whose prefix).
        self._client = aioredis.Redis.from_url(
            policy.redis.url, socket_connect_timeout=_BACKGROUND_TIMEOUT_S,
            socket_timeout=_BACKGROUND_TIMEOUT_S, retry_on_timeout=False,
            client_name=client_name(policy.redis.prefix))
        self.up = True
        self._slow = 0
        self._last_answer = asyncio.get_running_loop().time()
        self._writes: set[asyncio.Task[None]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        metrics.up.set(1)
        self._channel = policy.redis.prefix + "stored"
        self._notes: dict[str, set[asyncio.Future[None]]] = {}
        self._renewals: set[asyncio.Task[None]] = set()
        self._get_or_claim_script = self._client.register_script(_GET_OR_CLAIM)
        self.listening = False
        self._subscribed = asyncio.Event()
        #: The Redis level's last measured size (``entries``, ``bytes``), for /health.
        self.size: dict[str, int] | None = None
        loop = asyncio.get_running_loop()
        # Connect now: a first connection (connect, HELLO) takes longer than a lookup may.
        self._warm: asyncio.Task[None] = loop.create_task(self._warm_up())
        self._listener: asyncio.Task[None] = loop.create_task(
            self._listen(), name="skyroute-cache-redis-notes")
        self._measurer: asyncio.Task[None] = loop.create_task(
            self._measure_loop(), name="skyroute-cache-redis-size")

    async def _warm_up(self) -> None:
        try:
            async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                await self._client.ping()
        except Exception as exc:
            self._failed("ping", "error", detail=f"{type(exc).__name__}: {exc}")

    async def ready(self) -> None:
        """Wait (at most ``_BACKGROUND_TIMEOUT_S``) until connected and subscribed, so the
        first requests already coalesce across instances."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                await self._warm
                await self._subscribed.wait()

    @property
    def waiting(self) -> int:
        """Keys this instance waits on another instance's call for."""
        return len(self._notes)

    def __repr__(self) -> str:
        return f"<RedisLevel {'up' if self.up else 'down'} writes={len(self._writes)}>"

    async def get(self, key: str) -> bytes | None:
        """The blob stored under ``key``; None on a miss, or when Redis is down or slow."""
        if not self.up:
            return None
        # Shielded: a command cancelled mid-way costs redis-py its connection, and a new
        # one (connect, HELLO) takes longer than the timeout; left to finish, the
        # connection goes back to the pool and the request goes on without the answer.
        command = asyncio.ensure_future(self._client.get(self._settings.prefix + key))
        try:
            blob = await self._within_timeout(command)
        except TimeoutError:
            command.add_done_callback(self._late)
            self._failed("get", "timeout", slow=True)
            return None
        except Exception as exc:  # any failure of the client is Redis being unusable
            self._failed("get", "error", detail=f"{type(exc).__name__}: {exc}")
            return None
        self._answered()
        return blob if isinstance(blob, bytes) else None

    async def get_or_claim(self, key: str) -> tuple[bytes | None, Claim | Literal["busy"] | None]:
        """The blob under ``key``; else a claim on it for this instance's upstream call (a
        ``Claim``, or ``BUSY`` when another instance holds it): one round trip, atomic, so
        no entry can land between the look and the claim. ``(None, None)`` when Redis is
        down or slow, or claims are off (no live subscription)."""
        if not self.up:
            return None, None
        if not self.listening:
            return await self.get(key), None
        token = uuid.uuid4().hex
        command = asyncio.ensure_future(self._get_or_claim_script(
            keys=[self._settings.prefix + key, self._claim_name(key)],
            args=[token, int(_CLAIM_TTL_S * 1000)]))
        try:
            found = await self._within_timeout(command)
        except TimeoutError:
            command.add_done_callback(lambda _: self._drop_late_claim(key, token, command))
            self._failed("get", "timeout", slow=True)
            return None, None
        except Exception as exc:  # any failure of the client is Redis being unusable
            self._failed("get", "error", detail=f"{type(exc).__name__}: {exc}")
            return None, None
        self._answered()
        if isinstance(found, bytes):
            return found, None
        return None, (self._claim(key, token) if found == 1 else BUSY)

    async def _within_timeout(self, command: asyncio.Future[Any]) -> Any:
        """``command``'s answer within ``cache.redis.timeout``; TimeoutError past it.

        Unless this process ran late: a wait that took twice the timeout or more means the
        event loop was behind (a burst, a starved CPU), so the time says nothing about
        Redis, whose answer is most likely already read. It is given as long again (at
        most ``_LATE_WAITS`` timeouts) before it counts as slow."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # landing in the tick the command answers (CPython gh-86296).
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                return await asyncio.shield(command)
        except TimeoutError:
            took = loop.time() - started
            if took < 2 * self._settings.timeout_s:
                raise
        async with asyncio.timeout(min(took, _LATE_WAITS * self._settings.timeout_s)):
            return await asyncio.shield(command)

    def _claim_name(self, key: str) -> str:
        return self._settings.prefix + "claim:" + key

    def _claim(self, key: str, token: str) -> Claim:
        """The claim this instance won with ``token``, renewed until released."""
        from redis.asyncio.lock import Lock

        lock = Lock(self._client, self._claim_name(key), timeout=_CLAIM_TTL_S, blocking=False,
                    thread_local=False, raise_on_release_error=False)
        # Set by our script rather than Lock.acquire (one round trip with the lookup); the
        # Lock then renews and releases it by this token as usual.
        lock.local.token = token.encode()
        renewing = asyncio.create_task(self._renew(lock))
        self._renewals.add(renewing)
        renewing.add_done_callback(self._renewals.discard)
        return Claim(key, lock, renewing)

    def _drop_late_claim(self, key: str, token: str, command: asyncio.Future[object]) -> None:
        # A claim won after its request went on without it: give it back at once, and
        # wake any waiter for it.
        if not command.cancelled() and command.exception() is None and command.result() == 1:
            self._answered()
            self.release(self._claim(key, token), None)

    async def _renew(self, lock: Lock) -> None:
        with contextlib.suppress(Exception):  # a claim that lapses only costs a duplicate call
            while True:
                await asyncio.sleep(_CLAIM_RENEW_S)
                async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                    await lock.reacquire()

    def release(self, claim: Claim, blob: bytes | None, *, age_s: float = 0.0) -> None:
        """End ``claim``: store ``blob`` (if any), release the claim, tell the waiters."""
        claim.renewing.cancel()
        ttl_ms = int((self._lifetime_s - age_s) * 1000)
        self._background(self._release(claim.lock, claim.key,
                                       blob if blob is not None and ttl_ms > 0 else None, ttl_ms),
                         force=True)

    async def _release(self, lock: Lock, key: str, blob: bytes | None, ttl_ms: int) -> None:
        from redis.exceptions import LockNotOwnedError

        try:
            async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                if blob is not None:
                    await self._client.set(self._settings.prefix + key, blob, px=ttl_ms)
                # A claim that lapsed (this process ran late renewing it) has nothing to
                # give back; its waiters are told all the same.
                with contextlib.suppress(LockNotOwnedError):
                    await lock.release()
                await self._client.publish(self._channel, key)
        except TimeoutError:
            self._failed("release", "timeout", slow=True)
        except Exception as exc:  # any failure of the client is Redis being unusable
            self._failed("release", "error", detail=f"{type(exc).__name__}: {exc}")

    async def wait_stored(self, key: str, *, bound_s: float) -> bytes | None:
        """The entry another instance's claimed call stores under ``key``; None when it
        ends without one, its claim lapses, or ``bound_s`` passes."""
        loop = asyncio.get_running_loop()
        note: asyncio.Future[None] = loop.create_future()
        self._notes.setdefault(key, set()).add(note)
        deadline = loop.time() + bound_s
        try:
            while not note.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(_CLAIM_CHECK_S, remaining)):
                        await asyncio.shield(note)
                if not note.done() and not await self._claimed(key):
                    break  # the owner is gone (or Redis is): a last look for its entry
            return await self.get(key)
        finally:
            notes = self._notes.get(key)
            if notes is not None:
                notes.discard(note)
                if not notes:
                    del self._notes[key]

    async def _claimed(self, key: str) -> bool:
        """Whether ``key``'s claim still exists; False when Redis cannot say in time."""
        try:
            async with asyncio.timeout(max(self._settings.timeout_s, _CLAIM_CHECK_S)):
                return bool(await self._client.exists(self._claim_name(key)))
        except Exception:  # not knowing ends the wait: the caller goes upstream
            return False

    async def _listen(self) -> None:
        """Hear the keys whose claimed calls ended, for this instance's waiters."""
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                    await pubsub.subscribe(self._channel)
                self.listening = True
                self._subscribed.set()
                async for message in pubsub.listen():
                    data = message.get("data")
                    key = data.decode() if isinstance(data, bytes) else str(data)
                    for note in self._notes.get(key, ()):
                        if not note.done():
                            note.set_result(None)
            except Exception:  # retried below; claims stop meanwhile
                self._metrics.errors.labels("subscribe", "error").inc()
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_RECONNECT_S)

    async def _measure_loop(self) -> None:
        """Keep ``skyroute_cache_redis_bytes``/``_entries`` current: every ``_MEASURE_S``
        one instance (whichever sets ``<prefix>measuring`` first) counts the entries and
        stores the result in ``<prefix>size``; every instance reads it from there."""
        prefix = self._settings.prefix
        while True:
            if self.up:
                try:
                    async with asyncio.timeout(_MEASURE_S):
                        if await self._client.set(prefix + "measuring", "1", nx=True,
                                                  px=int(_MEASURE_S * 900)):
                            entries, size = await self._measure()
                            await self._client.hset(prefix + "size", mapping={
                                "entries": entries, "bytes": size})
                        measured = await self._client.hgetall(prefix + "size")
                    self.size = {"entries": int(measured.get(b"entries", 0)),
                                 "bytes": int(measured.get(b"bytes", 0))}
                    self._metrics.entries.set(self.size["entries"])
                    self._metrics.bytes.set(self.size["bytes"])
                except Exception:  # the next round tries again; lookups never wait on this
                    self._metrics.errors.labels("measure", "error").inc()
            await asyncio.sleep(_MEASURE_S)

    async def _measure(self) -> tuple[int, int]:
        """Entries under the prefix (a SCAN), and their bytes estimated from a sample."""
        prefix = self._settings.prefix.encode()
        entries, sample = 0, []
        async for name in self._client.scan_iter(match=self._settings.prefix + "*", count=1000):
            if len(name) != len(prefix) + _KEY_CHARS:  # claims, notes, this measurement
                continue
            entries += 1
            if len(sample) < _SAMPLE:
                sample.append(name)
        if not sample:
            return entries, 0
        pipe = self._client.pipeline(transaction=False)
        for name in sample:
            pipe.memory_usage(name, samples=0)
        used = [int(u) for u in await pipe.execute() if u is not None]
        return entries, sum(used) * entries // len(used) if used else 0

    def _background(self, work: Coroutine[Any, Any, None], *, force: bool = False) -> None:
        """Run ``work`` as a write task (dropped past ``_MAX_WRITES`` unless ``force``)."""
        if not force and len(self._writes) >= _MAX_WRITES:
            work.close()
            self._metrics.errors.labels("set", "dropped").inc()
            return
        task = asyncio.create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _answered(self) -> None:
        self._slow, self._last_answer = 0, asyncio.get_running_loop().time()

    def _late(self, command: asyncio.Future[object]) -> None:
        """A lookup that answered after its request went on: Redis is slow, not gone."""
        if not command.cancelled() and command.exception() is None:
            self._answered()

    def set(self, key: str, blob: bytes, *, age_s: float = 0.0) -> None:
        """Store ``blob`` under ``key`` in the background, expiring with the entry."""
        if not self.up:
            return
        ttl_ms = int((self._lifetime_s - age_s) * 1000)
        if ttl_ms <= 0:
            return
        self._background(self._write(self._settings.prefix + key, blob, ttl_ms))

    async def _write(self, key: str, blob: bytes, ttl_ms: int) -> None:
        try:
            async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                await self._client.set(key, blob, px=ttl_ms)
        except TimeoutError:
            self._failed("set", "timeout", slow=True)
        except Exception as exc:  # any failure of the client is Redis being unusable
            self._failed("set", "error", detail=f"{type(exc).__name__}: {exc}")

    def _failed(self, op: str, kind: str, *, slow: bool = False, detail: str = "") -> None:
        self._metrics.errors.labels(op, kind).inc()
        self._slow = self._slow + 1 if slow else _DOWN_AFTER
        silent = not slow or asyncio.get_running_loop().time() - self._last_answer >= _SILENT_S
        if self.up and self._slow >= _DOWN_AFTER and silent:
            self.up = False
            self._metrics.up.set(0)
            log.warning("cache_redis_down", op=op, error=detail or f"lookups slower than "
                        f"{self._settings.timeout_s * 1000:g} ms and no answer for {_SILENT_S:g} s",
                        hint="serving from memory and upstreams; reconnecting in the background")
            self._reconnect = asyncio.create_task(self._reconnect_loop(),
                                                  name="skyroute-cache-redis-reconnect")

    async def _reconnect_loop(self) -> None:
        while True:
            await asyncio.sleep(_RECONNECT_S)
            try:
                async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                    await self._client.ping()
            except Exception:
                self._metrics.errors.labels("ping", "error").inc()
                continue
            self.up = True
            self._answered()
            self._metrics.up.set(1)
            log.info("cache_redis_up")
            return

    async def aclose(self) -> None:
        """Cancel the reconnect task, let pending writes finish briefly, close the client."""
        for task in (self._warm, self._listener, self._measurer, *self._renewals):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self._writes:
            await asyncio.wait(self._writes, timeout=_BACKGROUND_TIMEOUT_S)
        for task in self._writes:
            task.cancel()
        await self._client.aclose()
