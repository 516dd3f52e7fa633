"""The shared level of the response cache: Redis, through the ``redis`` package's asyncio client.

Redis down is not an outage. Theory of operation:

* A lookup waits at most ``cache.redis.timeout`` (a few ms); a slower or failed
  lookup is a miss, never a client error. A slow command is left to finish in the
  background rather than cancelled (cancelling costs the connection).
* A connection error, or ``_DOWN_AFTER`` slow answers in a row with no answer at all
  (late ones count) for ``_SILENT_S``, marks Redis *down* (a burst that waits on new
  connections is slow, not down):
  one ``cache_redis_down`` log line, ``skyroute_cache_redis_up`` goes to 0, and the
  request path stops asking Redis at all (no added latency). A background task
  pings it every ``_RECONNECT_S`` and marks it *up* again (``cache_redis_up``).
* Writes never delay an answer: they run as background tasks, at most
  ``_MAX_WRITES`` at a time (more are dropped and counted), each with a TTL set in
  Redis (the entry's lifetime plus its stale-if-error window).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from skyroute.routing import CachePolicy

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


class RedisLevel:
    """One Redis client for the cache, with its up/down state and reconnect task."""

    def __init__(self, policy: CachePolicy, metrics: RedisMetrics) -> None:
        assert policy.redis is not None
        self._settings = policy.redis
        self._lifetime_s = policy.ttl_s + policy.stale_if_error_s
        self._metrics = metrics
        self._client = aioredis.Redis.from_url(
            policy.redis.url, socket_connect_timeout=_BACKGROUND_TIMEOUT_S,
            socket_timeout=_BACKGROUND_TIMEOUT_S, retry_on_timeout=False)
        self.up = True
        self._slow = 0
        self._last_answer = asyncio.get_running_loop().time()
        self._writes: set[asyncio.Task[None]] = set()
        self._reconnect: asyncio.Task[None] | None = None
        metrics.up.set(1)
        # Connect now: a first connection (connect, HELLO) takes longer than a lookup may.
        self._warm: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            async with asyncio.timeout(_BACKGROUND_TIMEOUT_S):
                await self._client.ping()
        except Exception as exc:
            self._failed("ping", "error", detail=f"{type(exc).__name__}: {exc}")

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
            blob = await asyncio.wait_for(asyncio.shield(command), self._settings.timeout_s)
        except TimeoutError:
            command.add_done_callback(self._late)
            self._failed("get", "timeout", slow=True)
            return None
        except Exception as exc:  # any failure of the client is Redis being unusable
            self._failed("get", "error", detail=f"{type(exc).__name__}: {exc}")
            return None
        self._answered()
        return blob if isinstance(blob, bytes) else None

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
        if len(self._writes) >= _MAX_WRITES:
            self._metrics.errors.labels("set", "dropped").inc()
            return
        ttl_ms = int((self._lifetime_s - age_s) * 1000)
        if ttl_ms <= 0:
            return
        task = asyncio.create_task(self._write(self._settings.prefix + key, blob, ttl_ms))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

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
        self._warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._warm
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self._writes:
            await asyncio.wait(self._writes, timeout=_BACKGROUND_TIMEOUT_S)
        for task in self._writes:
            task.cancel()
        await self._client.aclose()
