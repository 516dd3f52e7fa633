"""The response cache's I/O: two levels, coalescing, and serving a request through them.

``routing`` decides what is cacheable, under which key, and what may be stored
(``routing._cache``); this module keeps the entries and serves requests with them.

Theory of operation:

* Level 1 is in-process: a ``cachetools.TLRUCache`` sized in bytes (each entry's
  compressed size plus its bookkeeping), least recently used out first, each entry
  leaving at the end of its stale-if-error window. Level 2 is Redis
  (``proxy._cache_redis``), when ``cache.redis`` names one; a level-2 hit is copied
  into level 1.
* ``serve_cached`` wraps the call that serves a route. A fresh entry is a hit:
  JSON as stored, or replayed as SSE for ``stream: true``. A miss joins an identical
  request already in flight (coalescing: one upstream call for all of them, at most
  ``cache.max_waiters`` waiting) or leads its own; a leader's answer is stored when
  ``routing.is_storable`` says so (a streamed one is read from the bytes relayed to
  its client, through ``STREAM_TAP``) and handed to its waiters. A waiter whose
  leader got no storable answer serves itself, failover included. When every
  upstream fails, an expired entry within ``cache.stale_if_error`` is served, marked
  ``stale``; failing that, on a ``cache: approximate`` route, a near-identical prompt's
  entry (``routing._approximate``), marked ``approximate``, which is also served at
  once while the instance is in minimal mode.
* Every cached-route answer says ``x-skyroute-cache: hit|miss|bypass|stale|approximate``; hits
  carry ``Age``. The access log line carries ``cache=...`` (bound to the request's
  log context) and ``skyroute_cache_*`` counts it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import cachetools
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from skyroute.routing import (
    ApiKey,
    ApproximateIndex,
    CacheLookup,
    CacheMode,
    CachePolicy,
    Freshness,
    NotCacheable,
    Route,
    cache_lookup,
    freshness,
    is_storable,
)

from ._cache_entry import CachedAnswer, assemble_stream, parse_answer, replay_sse
from ._cache_redis import BUSY, Claim, RedisLevel, RedisMetrics
from ._coalesce import Flight, LiveStream, follow_live
from ._errors import UpstreamError
from ._forward import UpstreamCall
from ._state import CLOCK, METRICS, SERVING, STREAM_TAP, SUMMARY

log = structlog.get_logger("skyroute.cache")

CACHE_HEADER: Final = "x-skyroute-cache"
#: Bookkeeping per level-1 entry besides its blob: the key string, the holder, the
#: cache's own links (measured with tracemalloc at about 330 bytes).
ENTRY_OVERHEAD: Final = 330
#: Prompts the approximate index remembers per instance (~1 KiB each: a signature and
#: its bucket keys); older ones are forgotten, their entries stay exact-only.
APPROXIMATE_ENTRIES: Final = 50_000


class CacheMetrics:
    """The cache's series on one application's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "skyroute_cache_requests",
            "Requests on routes with a cache, by result: hit, miss, bypass (the client's "
            "Cache-Control or an uncacheable request), stale (served expired after every "
            "upstream failed).", ["route", "result"], registry=registry)
        self.bytes = Gauge("skyroute_cache_bytes",
                           "Bytes the in-process level holds (compressed entries and their "
                           "bookkeeping).", ["level"], multiprocess_mode="livesum",
                           registry=registry)
        self.entries = Gauge("skyroute_cache_entries", "Entries the in-process level holds.",
                             ["level"], multiprocess_mode="livesum", registry=registry)
        self.evictions = Counter("skyroute_cache_evictions",
                                 "Entries dropped from the in-process level to make room.",
                                 ["level"], registry=registry)
        self.stores = Counter("skyroute_cache_stores",
                              "Answers stored, by kind: json or stream.", ["route", "kind"],
                              registry=registry)
        self.coalesced = Counter("skyroute_cache_coalesced",
                                 "Requests that waited for an identical one in flight instead "
                                 "of calling an upstream.", ["route"], registry=registry)
        self.redis = RedisMetrics(registry)


@dataclass(slots=True)
class _Held:
    stored_at: float
    blob: bytes


class _MemoryLevel(cachetools.TLRUCache[str, _Held]):
    """Level 1: byte-bounded LRU whose entries expire at the end of their stale window."""

    def __init__(self, policy: CachePolicy, metrics: CacheMetrics) -> None:
        lifetime = policy.ttl_s + policy.stale_if_error_s
        super().__init__(maxsize=policy.memory.max_bytes,
                         ttu=lambda _key, held, _now: held.stored_at + lifetime,
                         timer=time.time, getsizeof=lambda held: len(held.blob) + ENTRY_OVERHEAD)
        self._metrics = metrics

    def popitem(self) -> tuple[str, _Held]:
        # Called only to make room (cachetools' documented hook for evictions).
        item = super().popitem()
        self._metrics.evictions.labels("memory").inc()
        return item


@dataclass(slots=True, eq=False)
class ResponseCache:
    """Both levels and the requests in flight, for one ``cache`` policy."""

    policy: CachePolicy
    metrics: CacheMetrics
    memory: _MemoryLevel = field(init=False)
    redis: RedisLevel | None = field(init=False)
    near: ApproximateIndex = field(init=False)
    flights: dict[str, Flight] = field(init=False, default_factory=dict)
    #: Requests using this cache now (a replaced cache closes when none are).
    users: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.memory = _MemoryLevel(self.policy, self.metrics)
        self.near = ApproximateIndex(threshold=self.policy.approximate.threshold,
                                     max_entries=APPROXIMATE_ENTRIES)
        self.redis = RedisLevel(self.policy, self.metrics.redis) \
            if self.policy.redis is not None else None
        self.metrics.redis.up.set(1 if self.redis is not None else 0)

    async def get(self, key: str) -> CachedAnswer | None:
        """The entry for ``key`` from level 1, else level 2 (fresh or stale)."""
        return (await self.get_or_claim(key, claim=False))[0]

    async def get_or_claim(self, key: str, *, claim: bool
                           ) -> tuple[CachedAnswer | None, Claim | Literal["busy"] | None]:
        """The entry for ``key`` from level 1, else level 2 (fresh or stale); with
        ``claim``, a level-2 miss also claims the key (``RedisLevel.get_or_claim``)."""
        held = self.memory.get(key)
        if held is not None:
            return CachedAnswer.decode(held.blob), None
        if self.redis is None:
            return None, None
        if claim:
            blob, claimed = await self.redis.get_or_claim(key)
        else:
            blob, claimed = await self.redis.get(key), None
        entry = CachedAnswer.decode(blob) if blob is not None else None
        if entry is not None and blob is not None:
            self._keep(key, _Held(entry.stored_at, blob))
        return entry, claimed

    def put(self, key: str, entry: CachedAnswer, *, claim: Claim | None = None) -> None:
        """Keep ``entry`` in both levels; with this instance's ``claim`` on the key, the
        Redis write also ends the claim and tells other instances' waiters."""
        blob = entry.encode()
        self._keep(key, _Held(entry.stored_at, blob))
        if self.redis is not None:
            age_s = time.time() - entry.stored_at
            if claim is not None:
                self.redis.release(claim, blob, age_s=age_s)
            else:
                self.redis.set(key, blob, age_s=age_s)

    async def wait_elsewhere(self, key: str, route: str, *,
                             bound_s: float) -> CachedAnswer | None:
        """The entry another instance's call in flight for ``key`` stores (see
        ``RedisLevel.wait_stored``); None when it ends without one."""
        assert self.redis is not None
        blob = await self.redis.wait_stored(key, bound_s=bound_s)
        entry = CachedAnswer.decode(blob) if blob is not None else None
        if entry is not None:
            self._keep(key, _Held(entry.stored_at, blob or b""))
        self.metrics.redis.remote_waits.labels("hit" if entry is not None else "fallback").inc()
        if entry is None:
            log.info("cache_wait_fallback", route=route,
                     hint="the instance calling upstream for this prompt gave no answer in "
                          "time; calling upstream here")
        return entry

    def _keep(self, key: str, held: _Held) -> None:
        with contextlib.suppress(ValueError):  # bigger than the whole level: level 2 only
            self.memory[key] = held
        self.metrics.bytes.labels("memory").set(self.memory.currsize)
        self.metrics.entries.labels("memory").set(len(self.memory))

    def state(self) -> dict[str, Any]:
        """For ``/health``."""
        return {"memory": {"entries": len(self.memory), "bytes": self.memory.currsize,
                           "max_bytes": self.memory.maxsize},
                "redis": None if self.redis is None else ("up" if self.redis.up else "down"),
                "redis_level": None if self.redis is None else self.redis.size,
                "in_flight": len(self.flights),
                "waiting_on_other_instances": 0 if self.redis is None else self.redis.waiting}

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


class CacheHolder:
    """The instance's cache; rebuilt when a reload changes the ``cache`` section.

    A request *takes* the current cache and *gives it back* when done. A cache a reload
    replaced is closed (its Redis client included) once the last request using it is
    done, so lookups in flight finish on the client they started with.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = CacheMetrics(registry)
        self._current: ResponseCache | None = None
        self._retired: set[ResponseCache] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def for_policy(self, policy: CachePolicy) -> ResponseCache:
        """The cache for ``policy``: rebuilt (the old one retired) when its levels changed,
        else the current one, following ``policy``'s other settings from now on."""
        current = self._current
        if current is not None and current.policy != policy and _same_levels(current.policy,
                                                                             policy):
            current.policy = policy
        elif current is None or current.policy != policy:
            if current is not None:
                self._retire(current)
            current = self._current = ResponseCache(policy, self.metrics)
        return current

    def take(self, policy: CachePolicy) -> ResponseCache:
        cache = self.for_policy(policy)
        cache.users += 1
        return cache

    def give_back(self, cache: ResponseCache) -> None:
        cache.users -= 1
        if cache.users == 0 and cache in self._retired:
            self._close(cache)

    def _retire(self, cache: ResponseCache) -> None:
        log.info("cache_replaced", in_flight=cache.users,
                 hint="the old cache closes once its requests in flight are done")
        if cache.users == 0:
            self._close(cache)
        else:
            self._retired.add(cache)

    def _close(self, cache: ResponseCache) -> None:
        self._retired.discard(cache)
        task = asyncio.get_running_loop().create_task(cache.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def state(self) -> dict[str, Any] | None:
        return None if self._current is None else self._current.state()

    async def aclose(self) -> None:
        for cache in [*self._retired, *([self._current] if self._current else [])]:
            await cache.aclose()
        if self._closing:
            await asyncio.wait(self._closing)
        self._retired, self._current = set(), None


def _same_levels(old: CachePolicy, new: CachePolicy) -> bool:
    """Whether the levels built for ``old`` serve ``new`` as they are (what they were
    built with is the same; ``max_waiters`` and ``compression`` are read as they come)."""
    return (old.ttl_s, old.stale_if_error_s, old.memory, old.redis, old.approximate) == \
        (new.ttl_s, new.stale_if_error_s, new.memory, new.redis, new.approximate)


CACHE = web.AppKey("response_cache", CacheHolder)

Serve = Callable[[], Awaitable[web.StreamResponse]]


async def serve_cached(request: web.Request, route: Route, call: UpstreamCall,
                       client: ApiKey | None, serve: Serve) -> web.StreamResponse:
    """Serve ``call`` through the cache when its route has one; else just ``serve()``."""
    if route.cache is CacheMode.OFF:
        return await serve()
    lookup = cache_lookup(route=route.model, mode=route.cache, scope=route.cache_scope,
                          method=call.method, path=call.path_qs, payload=call.payload,
                          client=client.name if client is not None else None,
                          cache_control=request.headers.get("Cache-Control"),
                          multi_turn=route.cache_multi_turn)
    holder = request.app[CACHE]
    if isinstance(lookup, NotCacheable):
        holder.metrics.requests.labels(route.model, "bypass").inc()
        _mark(request, route.model, "bypass")
        return await serve()
    cache = holder.take(request.app[SERVING].runtime.config.cache)
    try:
        return await _serve_through(request, cache, route, call, lookup, serve)
    finally:
        holder.give_back(cache)


async def _serve_through(request: web.Request, cache: ResponseCache, route: Route,
                         call: UpstreamCall, lookup: CacheLookup,
                         serve: Serve) -> web.StreamResponse:
    """A cacheable request: a memory hit, a wait for an identical one in flight here, or
    the lead (a Redis lookup, then a wait elsewhere or the upstream call)."""
    assert call.payload is not None  # cacheable requests have a JSON body
    stream = call.payload.get("stream") is True
    held = cache.memory.get(lookup.key) if lookup.read else None
    entry = CachedAnswer.decode(held.blob) if held is not None else None
    if entry is not None and freshness(stored_at=entry.stored_at, policy=cache.policy,
                                       now=time.time()) is Freshness.FRESH:
        return await _answer_from(request, cache, route.model, entry, stream, call, "hit")
    # Everything else for this key goes through one flight per instance, made before any
    # await: its leader alone looks in Redis (and claims the key there), so a claim is
    # always held by the request that leads here.
    flight = cache.flights.get(lookup.key) if lookup.read else None
    if flight is not None and flight.waiters < cache.policy.max_waiters:
        flight.waiters += 1
        cache.metrics.coalesced.labels(route.model).inc()
        if stream and flight.live is not None:
            _mark(request, route.model, "hit", age="0")  # a leader that fails: marked again
            resp = await follow_live(request, flight.live, headers={})
            if resp is not None:
                request[SUMMARY].route, request[SUMMARY].upstream = route.model, "cache"
                cache.metrics.requests.labels(route.model, "hit").inc()
                return resp
        # Set before the live stream ends: a leader that streamed nothing may still have
        # an entry (from Redis, or one another instance stored while this one waited).
        shared = await asyncio.shield(flight.answer)
        if shared is not None:
            return await _answer_from(request, cache, route.model, shared, stream, call, "hit")
    return await _lead(request, cache, lookup, call, stream, serve, stale=entry,
                       wait_bound_s=route.timeout_s)


async def _lead(request: web.Request, cache: ResponseCache, lookup: CacheLookup,
                call: UpstreamCall, stream: bool, serve: Serve, *,
                stale: CachedAnswer | None, wait_bound_s: float) -> web.StreamResponse:
    """Look in Redis; else serve the miss upstream, store what may be stored, and hand
    the answer to any waiters.

    With Redis, the lookup that misses also claims the key: this instance's call is then
    the one other instances wait for. If another instance holds the claim, its entry is
    waited for (bounded) instead, with this instance's own waiters; no entry from it,
    and this request goes upstream itself."""
    flight: Flight | None = None
    tap = LiveStream()
    if lookup.key not in cache.flights:
        flight = cache.flights[lookup.key] = Flight(
            answer=asyncio.get_running_loop().create_future(), live=tap if stream else None)
    stored: CachedAnswer | None = None
    claim: Claim | None = None
    try:
        if lookup.read and cache.redis is not None:
            # Only a flight's leader claims: a request past max_waiters just looks.
            found, claimed = await cache.get_or_claim(lookup.key, claim=flight is not None)
            if found is not None:
                if freshness(stored_at=found.stored_at, policy=cache.policy,
                             now=time.time()) is Freshness.FRESH:
                    stored = found
                    return await _answer_from(request, cache, lookup.route, found, stream,
                                              call, "hit")
                stale = found
            claim = claimed if isinstance(claimed, Claim) else None
            if claimed == BUSY:
                stored = await cache.wait_elsewhere(lookup.key, lookup.route,
                                                    bound_s=wait_bound_s)
                if stored is not None:
                    return await _answer_from(request, cache, lookup.route, stored, stream,
                                              call, "hit")
        if lookup.approximate is not None and lookup.read:
            router = request.app[SERVING].runtime.router
            if router.minimal(now=request.app[CLOCK]()).active:
                near = await _near(cache, lookup)
                if near is not None:
                    return await _answer_from(request, cache, lookup.route, near, stream, call,
                                              "approximate")
        if stream and (lookup.write or flight is not None):
            request[STREAM_TAP] = tap
        body_before = call.body
        _mark(request, lookup.route, "miss")  # the header, before a stream is prepared
        try:
            resp = await serve()
        except UpstreamError:
            if stale is not None and freshness(stored_at=stale.stored_at, policy=cache.policy,
                                               now=time.time()) is Freshness.STALE:
                return await _answer_from(request, cache, lookup.route, stale, stream, call,
                                          "stale")
            near = await _near(cache, lookup) if lookup.read else None
            if near is None:
                cache.metrics.requests.labels(lookup.route, "miss").inc()
                raise
            return await _answer_from(request, cache, lookup.route, near, stream, call,
                                      "approximate")
        cache.metrics.requests.labels(lookup.route, "miss").inc()
        if lookup.write:
            stored = _store(request, cache, lookup, resp, b"".join(tap) if stream else None,
                            as_asked=call.body is body_before, claim=claim)
            if stored is not None:
                claim = None  # ended by the store
        return resp
    finally:
        if claim is not None and cache.redis is not None:
            cache.redis.release(claim, None)  # no entry: other instances' waiters go upstream
        if flight is not None:
            del cache.flights[lookup.key]
            # In finally: a leader that fails or is cancelled releases its waiters too.
            flight.answer.set_result(stored)
            tap.finish()


async def _near(cache: ResponseCache, lookup: CacheLookup) -> CachedAnswer | None:
    """A fresh entry for a near-identical prompt (``cache: approximate``), if one is kept."""
    if lookup.approximate is None:
        return None
    found = cache.near.find(lookup.approximate)
    if found is None:
        return None
    entry = await cache.get(found[0])
    if entry is None or freshness(stored_at=entry.stored_at, policy=cache.policy,
                                  now=time.time()) is Freshness.GONE:
        return None
    log.info("cache_approximate_served", route=lookup.route, similarity=round(found[1], 3))
    return entry


def _store(request: web.Request, cache: ResponseCache, lookup: CacheLookup,
           resp: web.StreamResponse, streamed: bytes | None, *,
           as_asked: bool, claim: Claim | None) -> CachedAnswer | None:
    """Store the answer ``resp`` (or the ``streamed`` bytes) if routing says it may be."""
    summary = request[SUMMARY]
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) \
        else None
    answer = assemble_stream(streamed) if streamed is not None else parse_answer(body)
    as_asked = as_asked and summary.fallback is None and not summary.cut
    if not is_storable(status=resp.status, answer=answer, as_asked=as_asked):
        return None
    entry = CachedAnswer(stored_at=time.time(), upstream=summary.upstream,
                         body=body if body is not None else json.dumps(answer).encode())
    cache.put(lookup.key, entry, claim=claim)
    if lookup.approximate is not None:
        cache.near.add(lookup.approximate, lookup.key)
    cache.metrics.stores.labels(lookup.route, "json" if streamed is None else "stream").inc()
    return entry


async def _answer_from(request: web.Request, cache: ResponseCache, route: str,
                       entry: CachedAnswer, stream: bool, call: UpstreamCall,
                       result: str) -> web.StreamResponse:
    """A hit (or a stale answer): the entry as JSON, or replayed as SSE."""
    summary = request[SUMMARY]
    summary.route, summary.upstream = route, "cache"
    age = str(max(0, int(time.time() - entry.stored_at)))
    cache.metrics.requests.labels(route, result).inc()
    _mark(request, route, result, age=age)
    if not stream:
        return web.Response(body=entry.body, content_type="application/json")
    options = (call.payload or {}).get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    events = replay_sse(entry.body, include_usage=include_usage)
    if events is None:  # unreadable entry: never expected, but not the client's problem
        raise UpstreamError("the cached answer could not be read", status=502)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(events)
    await resp.write_eof()
    return resp


def _mark(request: web.Request, route: str, result: str, *, age: str | None = None) -> None:
    """Say ``result`` in the answer's headers and the request's log line."""
    headers = {CACHE_HEADER: result}
    if age is not None:
        headers["Age"] = age
    request[SUMMARY].cache_headers = headers  # put on the answer when it is prepared
    structlog.contextvars.bind_contextvars(cache=result)


def install_cache(app: web.Application) -> None:
    """Give ``app`` a response cache: its app key and lifecycle (its headers go on the
    answer through ``RequestSummary.cache_headers``)."""
    app[CACHE] = CacheHolder(app[METRICS].registry)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        cache = app[CACHE].for_policy(app[SERVING].runtime.config.cache)  # connect at start
        if cache.redis is not None:
            await cache.redis.ready()
        yield
        await app[CACHE].aclose()

    app.cleanup_ctx.append(lifecycle)
